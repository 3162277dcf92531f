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
        self._copies = {}  # (id(param), state key) -> the snapshot buffer

    def _state(self, p):
        for opt in self.optimizers:
            if p in opt.state:
                return {k: v for k, v in opt.state[p].items()
                        if torch.is_tensor(v) and v.shape == p.shape}
        return {}

    def snapshot(self) -> None:
        """Copies every entry that has a gradient, with its optimizer moments, into buffers kept
        from step to step (one foreach copy: no allocation, ~150 dispatches fewer)."""
        self._saved = []
        live, copies = [], []
        for p, owner, attr in self.entries:
            if p.grad is None:
                continue
            state = self._state(p)
            tensors = [p.detach(), *state.values()]
            saved = [self._copy_of(p, key, t) for key, t in zip(["", *state], tensors)]
            self._saved.append((p, owner, attr, list(state), saved))
            live += tensors
            copies += saved
        if live:
            torch._foreach_copy_(copies, live)

    def _copy_of(self, p, key: str, t):
        buf = self._copies.get((id(p), key))
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or buf.device != t.device:
            buf = self._copies[(id(p), key)] = torch.empty_like(t)
        return buf

    @torch.no_grad()
    def restore(self) -> None:
        for p, owner, attr, keys, saved in self._saved:
            mask = getattr(owner, attr)
            if mask.dim() < p.dim():
                mask = mask.reshape(*mask.shape, *([1] * (p.dim() - mask.dim())))
            state = self._state(p)
            for t, old in zip([p.detach(), *(state[k] for k in keys)], saved):
                torch.where(mask, t, old, out=t)
        self._saved = []
