"""A DF-MPC model as a deploy file: each layer's own codes and scale in the deploy format's code
conventions (ternary: "lsq" 2-bit codes -1/0/1 times alpha; DoReFa k-bit: "dorefa", whose
n in [0, 2^k - 1] is stored as q = n - 2^(k-1) with w = (q + 1/2) * 2 max|W| / (2^k - 1)), a
compensation folded into a layer itself as its per-row scale, and the compensated BNs folded by
the deploy path. Weights only: DF-MPC leaves activations in float."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from rfq.deploy import LayerSpec, export_specs
from rfq.methods.dfmpc.compensate import LayerCodes, Report


def layer_spec(q: LayerCodes) -> LayerSpec:
    if q.kind == "ternary":
        codes, scale, code = q.codes.to(torch.int8), q.scale.reshape(1).float(), "lsq"
    else:
        levels = (1 << q.bits) - 1
        codes = (q.codes.to(torch.int16) - (1 << (q.bits - 1))).to(torch.int8)
        scale, code = (2 * q.scale / levels).reshape(1).float(), "dorefa"
    if q.channel_scale is not None:
        scale = scale * q.channel_scale.float()
    return LayerSpec(codes.reshape(codes.shape[0], -1), q.bits, scale, code)


def export(model: nn.Module, report: Report, path: str | os.PathLike, arch: dict | None = None,
           extra: dict | None = None) -> Path:
    """Write ``compensate``'s model and report to a deploy file (rfq.deploy.load reads it)."""
    specs = {name: layer_spec(q) for name, q in report.layers.items()}
    info = {"method": "dfmpc", "bits": f"{report.low_bits}/{report.high_bits}", "lam1": report.lam1,
            "lam2": report.lam2, "rule": report.rule, "compensated": report.compensated}
    return export_specs(model, specs, path, arch, {**info, **(extra or {})})


__all__ = ["export", "layer_spec"]
