"""Deployment: a searched configuration's weights as packed integer codes (``rfq.ops.pack_weight``)
that run through ``rfq.ops.packed_conv2d`` / ``packed_linear``; inputs keep their LSQ fake
quantization at the chosen bits. The exported file holds the architecture name, the per-layer
bits, the packed codes with their one LSQ step each, and every other tensor (BN of the chosen
copies with recalibrated statistics, biases, activation steps)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from rfq.nn import SwitchableBatchNorm2d, quant_layers, set_bits
from rfq.nn.packed import PackedLayer


def _plain_bn(sbn: SwitchableBatchNorm2d) -> nn.BatchNorm2d:
    i, j = sbn.wi, sbn.ai
    bn = nn.BatchNorm2d(sbn.num_features, eps=sbn.eps)
    with torch.no_grad():
        bn.weight.copy_(sbn.weight[i, j])
        bn.bias.copy_(sbn.bias[i, j])
        bn.running_mean.copy_(sbn.running_mean[i, j])
        bn.running_var.copy_(sbn.running_var[i, j])
    return bn


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def to_packed(model: nn.Module, config=None) -> nn.Module:
    """A deployable copy of a quantized model at ``config`` (current bits if None), eval mode."""
    model = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format)
    if config is not None:
        set_bits(model, config)
    for name, m in list(model.named_modules()):
        if isinstance(m, SwitchableBatchNorm2d):
            _swap(model, name, _plain_bn(m))
    for name, layer in quant_layers(model):
        _swap(model, name, PackedLayer(layer))
    return model.eval()


def packed_size_bytes(model: nn.Module) -> int:
    return sum(m.packed_bytes() for m in model.modules() if isinstance(m, PackedLayer))


def save_packed(model: nn.Module, path: str | Path, arch: dict) -> Path:
    from rfq.checkpoint import save_atomic

    layers = {n: {"w_bit": m.w_bit, "a_bit": m.a_bit, "a_signed": m.a_signed,
                  "weight_shape": list(m.weight_shape)}
              for n, m in model.named_modules() if isinstance(m, PackedLayer)}
    return save_atomic({"kind": "packed", "arch": arch, "layers": layers,
                        "state": model.state_dict()}, path)


def load_packed(path: str | Path) -> nn.Module:
    """Rebuild an exported model (architecture from the file, packed weights restored)."""
    from rfq import checkpoint as ckpt
    from rfq.models import build_model
    from rfq.nn import QuantConfig, quantize_

    obj = ckpt.load(path, kind="packed")
    arch = obj["arch"]
    model = build_model(arch["model"], arch["in_channels"], arch["classes"])
    quantize_(model, QuantConfig(**arch["quant_config"]))
    set_bits(model, {n: tuple(v) for n, v in arch["config"].items()})
    packed = to_packed(model)
    packed.load_state_dict(obj["state"])
    return packed
