"""The seed methods' layers in the deploy format (the deploy layer calls the methods, never the
other way round).

- DF-MPC (``export_dfmpc``): each layer's own codes and scale; ternary as "lsq" 2-bit codes
  -1/0/1 times alpha, DoReFa k-bit as "dorefa" (n in [0, 2^k - 1] stored as q = n - 2^(k-1),
  w = (q + 1/2) * 2 max|W| / (2^k - 1)); a compensation kept in a layer itself as its per-row
  scale; the compensated BNs folded. Weights only: DF-MPC leaves activations in float.
- Hot-swap (``hotswap_spec``, used by ``export`` for any hot-swap layer, and
  ``export_hotswap``): direct-path layers as LSQ codes, wavelet layers (3..1 bits) as their Haar
  band codes with one step per band ("haar", flagged 1-D for depthwise convs).
- CSQ (``csq_spec``, ``export_csq``): the hardened layer's signed-digit codes n (|n| <= 2^N - 1)
  as "lsq" codes: the pruned least significant planes shift into the step, n >> shift times
  s 2^shift / (2^N - 1). The record's ``bits`` is the storage the codes need, sign included:
  b contiguous bits on give up to 2^(b+1) - 1 levels (signed digits), so up to b + 1 bits.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from rfq import ops
from rfq.deploy.export import LayerSpec, export_specs, lsq_spec
from rfq.nn import quant_layers


def dfmpc_spec(q) -> LayerSpec:
    """A DF-MPC ``LayerCodes`` as a layer spec."""
    if q.kind == "ternary":
        codes, scale, code = q.codes.to(torch.int8), q.scale.reshape(1).float(), "lsq"
    else:
        levels = (1 << q.bits) - 1
        codes = (q.codes.to(torch.int16) - (1 << (q.bits - 1))).to(torch.int8)
        scale, code = (2 * q.scale / levels).reshape(1).float(), "dorefa"
    if q.channel_scale is not None:
        scale = scale * q.channel_scale.float()
    return LayerSpec(codes.reshape(codes.shape[0], -1), q.bits, scale, code)


def export_dfmpc(model: nn.Module, report, path: str | os.PathLike, arch: dict | None = None,
                 extra: dict | None = None) -> Path:
    """Write ``rfq.methods.dfmpc.compensate``'s model and report to a deploy file."""
    specs = {name: dfmpc_spec(q) for name, q in report.layers.items()}
    info = {"method": "dfmpc", "bits": f"{report.low_bits}/{report.high_bits}",
            "lam1": report.lam1, "lam2": report.lam2, "rule": report.rule,
            "compensated": report.compensated}
    return export_specs(model, specs, path, arch, {**info, **(extra or {})})


@torch.no_grad()
def hotswap_spec(layer) -> LayerSpec:
    """A hot-swap layer at its current bits: band codes on the wavelet path, else LSQ."""
    if not layer.uses_wavelet:
        return lsq_spec(layer)
    bands = layer.transform(layer.weight.detach().float())
    steps = layer.band_steps.detach()[layer.wavelet_bits.index(layer.w_bit)].float()
    codes = torch.stack([ops.quantize_codes(band, steps[j].reshape(1), layer.w_bit, True)
                         for j, band in enumerate(bands.unbind(0))])
    a_step = None if layer.a_bit is None else layer.a_steps.detach()[layer.a_index]
    return LayerSpec(codes, layer.w_bit, torch.ones(1), "haar", layer.a_bit, layer.a_signed,
                     a_step, band_steps=steps, one_d=layer.one_d)


def export_hotswap(model: nn.Module, bits: int, path: str | os.PathLike,
                   arch: dict | None = None, extra: dict | None = None) -> Path:
    """Write a hot-swap model (``rfq.methods.hotswap.hotswap_``) at uniform ``bits``; the model
    is not changed."""
    from rfq.deploy.export import layer_spec

    model = copy.deepcopy(model).cpu().float().eval()
    model.set_bits(bits)
    specs = {name: layer_spec(layer) for name, layer in quant_layers(model)}
    config = {n: [bits, bits] for n in model.rfq_mixed}
    return export_specs(model, specs, path, arch, {"method": "hotswap", "bits": bits,
                                                   **(extra or {})}, config=config)


@torch.no_grad()
def csq_spec(layer) -> LayerSpec:
    """A hardened CSQ layer (rfq.methods.csq) as "lsq" codes at their storage bit-width."""
    planes = layer.planes
    on = [i for i in range(planes) if bool(layer.m[i] > 0)]
    shift = planes - 1 - on[-1] if on else 0
    codes = layer.hard_codes() >> shift  # exact: the pruned low planes are zero
    largest = int(codes.abs().max()) if codes.numel() else 0
    bits = max(largest.bit_length() + 1, 2)
    if bits > 8:
        raise ValueError(f"rfq.deploy: a CSQ layer with bits {on} on has codes up to "
                         f"|{largest}|, which need {bits}-bit signed storage; the deploy format "
                         f"stores at most 8 (train with N <= 7 planes)")
    step = (layer.scale.detach().float() / ((1 << planes) - 1)) * (1 << shift)
    a_step = layer.a_steps.detach()[0] if layer.a_bits else None
    return LayerSpec(codes.reshape(codes.shape[0], -1), bits, step.reshape(1),
                     "lsq", layer.a_bits[0] if layer.a_bits else None, layer.a_signed, a_step)


def export_csq(model: nn.Module, path: str | os.PathLike, arch: dict | None = None,
               extra: dict | None = None) -> Path:
    """Write a hardened CSQ model (``rfq.methods.csq.harden``) to a deploy file."""
    from rfq.methods.csq import csq_layers

    model = copy.deepcopy(model).cpu().float().eval()
    layers = csq_layers(model)
    if any(layer.gate_mode != "hard" for _, layer in layers):
        raise ValueError("export_csq: harden the model first (rfq.methods.csq.harden)")
    specs = {name: csq_spec(layer) for name, layer in layers}
    config = {name: [layer.precision(), layer.a_bits[0] if layer.a_bits else None]
              for name, layer in layers}
    return export_specs(model, specs, path, arch, {"method": "csq", **(extra or {})},
                        config=config)


__all__ = ["csq_spec", "dfmpc_spec", "export_csq", "export_dfmpc", "hotswap_spec",
           "export_hotswap"]
