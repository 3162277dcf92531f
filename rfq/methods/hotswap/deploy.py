"""A hot-swap model at one bit-width as a deploy file: direct-path layers as LSQ codes, wavelet
layers (3..1 bits) as their Haar band codes with one step per band (the deploy format's "haar"
convention, flagged 1-D for depthwise convs), BN copies of that bit folded by the deploy path.
``rfq.deploy.load`` rebuilds each wavelet layer's weight from its bands once."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from rfq import ops
from rfq.deploy import LayerSpec, export_specs
from rfq.deploy.export import lsq_spec
from rfq.methods.hotswap.modules import _HotSwap
from rfq.nn import quant_layers


@torch.no_grad()
def layer_spec(layer) -> LayerSpec:
    if not (isinstance(layer, _HotSwap) and layer.uses_wavelet):
        return lsq_spec(layer)
    bands = layer.transform(layer.weight.detach().float())
    steps = layer.band_steps.detach()[layer.wavelet_bits.index(layer.w_bit)].float()
    codes = torch.stack([ops.quantize_codes(band, steps[j].reshape(1), layer.w_bit, True)
                         for j, band in enumerate(bands.unbind(0))])
    a_step = None if layer.a_bit is None else layer.a_steps.detach()[layer.a_index]
    return LayerSpec(codes, layer.w_bit, torch.ones(1), "haar", layer.a_bit, layer.a_signed,
                     a_step, band_steps=steps, one_d=layer.one_d)


def export(model: nn.Module, bits: int, path: str | os.PathLike, arch: dict | None = None,
           extra: dict | None = None) -> Path:
    """Write ``model`` (hotswap_) at uniform ``bits`` to a deploy file; the model is not
    changed."""
    model = copy.deepcopy(model).cpu().float().eval()
    model.set_bits(bits)
    specs = {name: layer_spec(layer) for name, layer in quant_layers(model)}
    config = {n: [bits, bits] for n in model.rfq_mixed}
    return export_specs(model, specs, path, arch, {"method": "hotswap", "bits": bits,
                                                   **(extra or {})}, config=config)


__all__ = ["export", "layer_spec"]
