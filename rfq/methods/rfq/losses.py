"""The main method's extra loss terms (spec method_rfq.md §2): IDM (feature MSE of low-bit passes
to the max pass), QE (oscillation dampening) and AR (2-bit weight decay)."""

from __future__ import annotations

import torch
from torch import nn

from rfq import ops
from rfq.ops import qrange
from rfq.nn import QuantLayer, mixed_layers


class FeatureTap:
    """IDM's features on the switchable BNs of the selected layers, through the BNs' own
    feature-matching attributes (no hooks, which would keep a BN from running fused with the
    next layer's input quantizer). 'teacher' mode: each selected BN keeps its output, detached
    (``match_keep``). 'student' mode: each selected BN gets its teacher feature as
    ``match_teacher`` and computes its feature MSE (``batch_norm_quant_mse`` when fused: the BN
    output is never written). Only selected BNs are touched."""

    def __init__(self, model: nn.Module):
        self.mode, self._selected, self.teacher = None, set(), {}
        self.bns = {name: layer._bn_ref[0] for name, layer in mixed_layers(model)
                    if layer._bn_ref}  # execution order

    @property
    def selected(self) -> set:
        return self._selected

    @selected.setter
    def selected(self, names) -> None:
        """Set after ``mode``; first collects the features a teacher pass kept."""
        for n, bn in self.bns.items():
            if bn.match_kept is not None:
                self.teacher[n] = bn.match_kept
        self.close()
        self._selected = set(names)
        for n in self.bns:
            if n in self._selected:
                if self.mode == "teacher":
                    self.bns[n].match_keep = True
                elif self.mode == "student":
                    self.bns[n].match_teacher = self.teacher[n]

    def loss(self) -> torch.Tensor | None:
        """The sum of the student pass's feature MSEs (None when no selected BN ran)."""
        terms = []
        for bn in self.bns.values():
            if bn.match_loss is not None:
                terms.append(bn.match_loss)
                bn.match_loss = None
        return torch.stack(terms).sum() if terms else None

    def close(self):
        for bn in self.bns.values():
            if bn.match_keep or bn.match_kept is not None or bn.match_teacher is not None \
                    or bn.match_loss is not None:
                bn.match_keep, bn.match_kept = False, None
                bn.match_teacher = bn.match_loss = None


def qe_loss(layer: QuantLayer, min_bit: int) -> torch.Tensor:
    """Oscillation-dampening pull of the weights towards codes that also lie on the coarsest
    grid (spec §2 "QE"); gradient to the weight only."""
    b, j = layer.w_bit, layer.w_index
    s = layer.w_steps.detach()[j]
    qn, qp = qrange(b, True)
    w_hat = torch.clamp(layer.weight, s * qn, s * qp)
    codes = ops.quantize_codes(layer.weight.detach(), s.reshape(1), b, True).float()
    d = b - min_bit
    target = s * codes
    if d > 0:
        target = torch.where(torch.remainder(codes, 2 ** d) == 0, target, w_hat.detach())
    sq = (w_hat - target).square()
    return sq.sum(0).mean()


def ar_loss(layer: QuantLayer) -> torch.Tensor:
    """Adaptive-region weight decay term 1/2 ||clip(W, -2 s_2, s_2)||^2 (spec §2 "AR")."""
    s2 = layer.w_steps.detach()[layer.w_bits.index(2)]
    return 0.5 * torch.clamp(layer.weight, -2 * s2, s2).square().sum()
