"""DF-MPC's compensation as a zero-data repair of any mixed configuration of a weight-coupled model
(the main method's searched configs): wherever a conv runs at fewer weight bits than the conv it
alone feeds, fold the closed-form c (compensate.py) into the BN copy selected for the low conv's
(weight bit, input bit). Its LSQ-quantized weight plays w_hat; the shared float weight plays w.

Unlike the float case this is not exact in the function it folds: the high conv quantizes its
input with a learned LSQ step, and Q(c z) != c Q(z). The repair reads no data; the BN statistics
it uses are whatever the model holds (recalibrate first, as the search pipeline does).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from rfq.methods.dfmpc.compensate import bn_gain_and_offset, check_lambdas, closed_form_c
from rfq.methods.dfmpc.pairing import FOLD_BN, find_pairs
from rfq.nn import set_bits
from rfq.nn.modules import QuantConv2d, SwitchableBatchNorm2d


@torch.no_grad()
def repair_config(model: nn.Module, config=None, *, lam1: float = 0.5, lam2: float = 0.0):
    """A copy of the coupled ``model`` at ``config`` (its current bits if None) with c folded
    into every low->high pair's selected BN copy, and a list of what was repaired."""
    check_lambdas(lam1, lam2)
    model = copy.deepcopy(model).eval()
    if config is not None:
        set_bits(model, config)
    repaired = []
    for pair in find_pairs(model):
        low, high = model.get_submodule(pair.low), model.get_submodule(pair.high)
        if not (isinstance(low, QuantConv2d) and isinstance(high, QuantConv2d)):
            continue
        if pair.fold != FOLD_BN or pair.bn is None or low.w_bit >= high.w_bit:
            continue
        bn = model.get_submodule(pair.bn)
        if not isinstance(bn, SwitchableBatchNorm2d):
            continue
        i, j = bn.wi, bn.ai
        sigma = (bn.running_var[i, j].double() + bn.eps).sqrt()
        g, y = bn_gain_and_offset(bn.weight[i, j].double(), bn.bias[i, j].double(),
                                  bn.running_mean[i, j].double(), sigma)
        rows = low.weight.double().reshape(low.out_channels, -1)
        rows_hat = low.quantized_weight().double().reshape(low.out_channels, -1)
        c = closed_form_c(g[:, None] * rows_hat, g[:, None] * rows, y, y, lam1, lam2)
        bn.weight[i, j] *= c.to(bn.weight.dtype)
        bn.bias[i, j] *= c.to(bn.bias.dtype)
        repaired.append({"low": pair.low, "high": pair.high, "bits": [low.w_bit, high.w_bit],
                         "c_min": float(c.min()), "c_mean": float(c.mean()),
                         "c_max": float(c.max())})
    return model, repaired


__all__ = ["repair_config"]
