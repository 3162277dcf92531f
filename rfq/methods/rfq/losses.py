"""The main method's extra loss terms (spec method_rfq.md §2): IDM (feature MSE of low-bit passes
to the max pass), QE (oscillation dampening) and AR (2-bit weight decay)."""

from __future__ import annotations

import torch
from torch import nn

from rfq import ops
from rfq.ops import qrange
from rfq.nn import QuantLayer, mixed_layers


class FeatureMSE(torch.autograd.Function):
    """mean((student - teacher)^2) with the teacher detached, in three memory passes (difference,
    norm; one multiply back) instead of F.mse_loss's six. Its gradient keeps the features' memory
    format: F.mse_loss's comes back NCHW-contiguous for channels_last features, and batch-norm
    backward with a channels_last input and an NCHW gradient takes a much slower path."""

    @staticmethod
    def forward(ctx, student, teacher):
        diff = student - teacher
        ctx.save_for_backward(diff)
        return torch.linalg.vector_norm(diff).square() / max(diff.numel(), 1)

    @staticmethod
    def backward(ctx, grad):
        (diff,) = ctx.saved_tensors
        return diff * (grad * (2.0 / max(diff.numel(), 1))), None


class FeatureTap:
    """Forward hooks on the switchable BNs of the selected layers (IDM): in 'teacher' mode they
    keep detached outputs; in 'student' mode the outputs, with their graph. Only the selected
    BNs carry a hook: the others may run fused with the next layer's input quantizer, which
    never materializes their output."""

    def __init__(self, model: nn.Module):
        self.mode, self._selected, self.teacher, self.student = None, set(), {}, {}
        self.bns = {name: layer._bn_ref[0] for name, layer in mixed_layers(model)
                    if layer._bn_ref}
        self.handles = []

    @property
    def selected(self) -> set:
        return self._selected

    @selected.setter
    def selected(self, names) -> None:
        self.close()
        self._selected = set(names)
        self.handles = [self.bns[n].register_forward_hook(self._hook(n))
                        for n in sorted(self._selected) if n in self.bns]

    def _hook(self, name):
        def hook(mod, inputs, output):
            if self.mode == "teacher":
                if name in self.selected:  # only what a later pass compares against
                    self.teacher[name] = output.detach()
            elif self.mode == "student" and name in self.selected:
                self.student[name] = output
        return hook

    def loss(self) -> torch.Tensor | None:
        terms = [FeatureMSE.apply(out, self.teacher[n]) for n, out in self.student.items()]
        self.student = {}
        return torch.stack(terms).sum() if terms else None

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles = []


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
