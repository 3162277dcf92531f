"""DF-MPC's speed (issue: the whole compensation of ResNet-18 in under 2 s on 2 CPU cores; the
paper reports ~2 s on a GPU). Same run, two baselines that bound it from below: a deep copy of
the model (the compensation returns a copy, so it cannot beat one) and the ternary/DoReFa
quantizers alone over every layer (the part a fused op could speed up: if it is a small share of
the whole, a kernel would not pay). ResNet-18 for 10 classes at 1 input channel (11.2M weights);
the smoke run (CI) uses ResNet-20.
"""

import copy
import os

import pytest
import torch
from torch import nn

from rfq.methods.dfmpc import compensate, quantize_weight
from rfq.models import build_model

SMOKE = bool(os.environ.get("RFQ_BENCH_SMOKE"))
MODEL = "resnet20" if SMOKE else "resnet18"


@pytest.fixture(scope="module")
def float_model():
    torch.manual_seed(0)
    model = build_model(MODEL, 1, 10).eval()
    with torch.no_grad():  # trained-looking BN statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 1.5)
                m.running_mean.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("impl", ["rfq", "deep copy of the model", "quantizers alone"])
def bench_dfmpc_compensation(benchmark, float_model, impl):
    benchmark.group = f"{MODEL} DF-MPC compensation 2/6 (whole, no data)"
    benchmark.extra_info.update(role=impl, target="DF-MPC speed", floor="< 2 s absolute")
    if impl == "rfq":
        def run():
            return compensate(float_model, 2, 6)
    elif impl == "deep copy of the model":
        def run():
            return copy.deepcopy(float_model)
    else:
        layers = [m for m in float_model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

        def run():
            return [quantize_weight(m.weight.detach(), 6).dequantize() for m in layers]
    benchmark.pedantic(run, rounds=3 if SMOKE else 10, warmup_rounds=1)
