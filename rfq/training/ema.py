"""Exponential moving average of a model's weights (the model a run is evaluated with)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """theta_ema <- d theta_ema + (1 - d) theta over every float parameter and buffer, with the
    optional warm-up d_t = min(d, (1 + t) / (10 + t))."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.model = copy.deepcopy(model)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self._pairs(model)

    def _pairs(self, model):
        live = dict(model.named_parameters()) | dict(model.named_buffers())
        mine = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        persistent = set(model.state_dict())
        self.float_pairs, self.other_pairs = ([], []), []
        for name, t in mine.items():
            if name not in persistent:
                continue
            if t.is_floating_point():
                self.float_pairs[0].append(t)
                self.float_pairs[1].append(live[name])
            else:
                self.other_pairs.append((t, live[name]))

    @torch.no_grad()
    def update(self) -> None:
        d = self.decay
        if self.warmup:
            d = min(d, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        torch._foreach_lerp_(self.float_pairs[0], self.float_pairs[1], 1.0 - d)  # no_grad: no detach
        for mine, live in self.other_pairs:
            mine.copy_(live)

    def state_dict(self):
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]
