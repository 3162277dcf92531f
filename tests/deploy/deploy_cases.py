"""Quantized models with non-trivial BN statistics and activation steps, at a chosen config."""

import random

import torch

from rfq.models import build_model
from rfq.nn import QuantConfig, SwitchableBatchNorm2d, mixed_layers, quantize_, set_bits

INPUT = {"smallcnn": (1, 8, 8), "resnet20": (1, 28, 28), "resnet18": (3, 28, 28),
         "mobilenetv2": (3, 28, 28)}


@torch.no_grad()
def quantized_model(name: str, config=None, qconfig: QuantConfig | None = None, seed: int = 0):
    """``name`` quantized, every BN copy given random statistics, activation steps set from one
    batch at ``config`` (a uniform int, a dict, or None: a random mixed config); eval mode."""
    torch.manual_seed(seed)
    model = build_model(name, INPUT[name][0], 10)
    quantize_(model, qconfig)
    if config is None:
        rng = random.Random(seed)
        config = {n: (rng.choice(m.w_bits), rng.choice(m.a_bits)) for n, m in mixed_layers(model)}
    set_bits(model, config)
    for m in model.modules():
        if isinstance(m, (SwitchableBatchNorm2d, torch.nn.BatchNorm2d)):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    for _, layer in mixed_layers(model):  # steps initialised from this batch (a_ready)
        layer.a_ready = [False] * len(layer.a_ready)
    model(example_input(name, 8, seed))
    return model


def example_input(name: str, batch: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *INPUT[name], generator=g)
