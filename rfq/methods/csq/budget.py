"""CSQ's budget regulariser (spec methods_seeds.md §C.3): growing and pruning bits to a target.

    L = CE + lambda (R - R*) sum_l w~_l sum_i g(beta m_{l,i}),   R* = target_bits / N

R, the weighted fraction of bits on, carries no gradient: above the target the term is an L1
penalty on the gates that prunes bits, below it the coefficient turns negative and grows bits
back. Modes [ours] weight layer l by w_l and its gates by w~_l = w_l / mean(w):

    size    (default) w_l = P_l, the layer's weight count: R N is the size-weighted average bits
    bitops  w_l = MAC_l a_l, its multiply-accumulates times its input bits (8 for the image)
    layer   w_l = 1, the official code's unweighted form
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rfq.cost import FIXED_BITS, CostModel
from rfq.methods.csq.modules import csq_layers

BUDGET_MODES = ("size", "bitops", "layer")


def check_target(target_bits: float, planes: int) -> None:
    if not isinstance(target_bits, (int, float)) or not 0 < target_bits <= planes:
        raise ValueError(f"target_bits must be in (0, N={planes}] (N: the bit planes), got "
                         f"{target_bits!r}")


def layer_weights(model: nn.Module, costs: CostModel, mode: str) -> dict[str, float]:
    """w_l of every CSQ layer under a budget mode."""
    if mode not in BUDGET_MODES:
        raise ValueError(f"budget mode must be one of {BUDGET_MODES}, got {mode!r}")
    out = {}
    for name, layer in csq_layers(model):
        if mode == "size":
            out[name] = float(costs.layers[name].params)
        elif mode == "bitops":
            a = layer.a_bits[0] if layer.a_bits else FIXED_BITS
            out[name] = float(costs.layers[name].macs * a)
        else:
            out[name] = 1.0
    return out


class BudgetRegulariser:
    """The §C.3 term over a model's CSQ layers, for one target and mode."""

    def __init__(self, model: nn.Module, costs: CostModel, target_bits: float, mode: str = "size",
                 strength: float = 0.01):
        self.layers = csq_layers(model)
        if not self.layers:
            raise ValueError("BudgetRegulariser: the model has no CSQ layer (call csq_ first)")
        self.planes = self.layers[0][1].planes
        check_target(target_bits, self.planes)
        weights = layer_weights(model, costs, mode)
        w = torch.tensor([weights[n] for n, _ in self.layers], dtype=torch.float64)
        device = self.layers[0][1].m.device
        self.share = (w / w.sum()).float().to(device)  # w_l / sum w: R's weights
        self.gate_weight = (w / w.mean()).float().to(device)  # w~_l
        self.target = target_bits / self.planes
        self.mode, self.strength = mode, strength

    def ratio(self) -> Tensor:
        """R, the weighted fraction of bits on (a device value, no gradient)."""
        on = torch.stack([layer.bits_on().mean() for _, layer in self.layers])
        return (self.share * on).sum()

    def average_bits(self) -> Tensor:
        return self.ratio() * self.planes

    def loss(self, ratio: Tensor | None = None) -> Tensor:
        """lambda (R - R*) sum_l w~_l sum_i g(beta m_{l,i}); its sign flips at R = R*.
        ``ratio``: R when the caller has it already (a step logs it too)."""
        gates = torch.stack([torch.sigmoid(layer.beta * layer.m).sum()
                             for _, layer in self.layers])
        r = self.ratio() if ratio is None else ratio
        return self.strength * (r - self.target) * (self.gate_weight * gates).sum()


__all__ = ["BUDGET_MODES", "BudgetRegulariser", "check_target", "layer_weights"]
