"""Optimizer steps that leave untouched what no pass of the step used (stacked per-bit tensors)."""

from __future__ import annotations

import torch
from torch import nn

from rfq.nn import QuantLayer, SwitchableBatchNorm2d


class MaskedUpdate:
    """Stacked tensors (BN copies, per-bit steps) whose entries no pass of the step used keep
    their values and optimizer moments (spec §6 quirk 7). Usage marks are set on device by the
    layers' forwards; the restore is a torch.where per tensor: no host sync."""

    def __init__(self, model: nn.Module, optimizers):
        self.entries = []  # (param, layer or BN, attribute of the usage mask)
        for m in model.modules():
            if isinstance(m, QuantLayer):
                self.entries += [(p, m, attr) for p, attr in m.masked_entries()]
            elif isinstance(m, SwitchableBatchNorm2d) and m.used.numel() > 1:
                self.entries += [(m.weight, m, "used"), (m.bias, m, "used")]
        self.optimizers = optimizers
        self._saved = []

    def _state(self, p):
        for opt in self.optimizers:
            if p in opt.state:
                return {k: v for k, v in opt.state[p].items()
                        if torch.is_tensor(v) and v.shape == p.shape}
        return {}

    def snapshot(self) -> None:
        self._saved = []
        for p, owner, attr in self.entries:
            if p.grad is None:
                continue
            state = self._state(p)
            self._saved.append((p, owner, attr, p.detach().clone(),
                                {k: v.clone() for k, v in state.items()}))

    @torch.no_grad()
    def restore(self) -> None:
        for p, owner, attr, old, old_state in self._saved:
            mask = getattr(owner, attr)
            if mask.dim() < p.dim():
                mask = mask.reshape(*mask.shape, *([1] * (p.dim() - mask.dim())))
            p.copy_(torch.where(mask, p, old))
            state = self._state(p)
            for k, v in old_state.items():
                state[k].copy_(torch.where(mask, state[k], v))
        self._saved = []
