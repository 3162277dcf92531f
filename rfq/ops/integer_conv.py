"""Convolution on integer codes: ``x_scale * w_scale * conv(x_codes, w_codes)`` (+ bias), for
inference loops that run many bit configurations of one model (the search's scoring).

The sum over codes is an exact int32 sum, so the result is the exact convolution of the
dequantized tensors rounded once to fp32; the float convolution of the fake-quantized tensors
rounds at every accumulation instead (they agree to ~1e-7 relative). On x86 CPUs with VNNI this
runs oneDNN's u8 x s8 convolution through PyTorch's own ``torch.ops.onednn`` kernels (the ones
torch.compile's x86 int8 path uses; speed: bench/README.md, "E2 with integer convolutions").
Elsewhere (CUDA, other CPUs) it is the float convolution of the dequantized codes: same
semantics, no speedup; ``integer_conv_fast(device)`` tells which.

Without VNNI, oneDNN's u8 x s8 products go through 16-bit pair sums that saturate at 8 bits
(255 * -128 * 2 < -32768), so the fast path also requires VNNI, and a one-time probe with the
extreme codes checks the sum is exact before the first use.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class PackedConvCodes:
    """A conv weight's signed int8 codes, one fp32 step and the conv's geometry, prepacked for
    ``integer_conv2d`` (oneDNN's blocked layout on the fast path, the dequantized weight
    elsewhere)."""

    weight: Tensor  # prepacked codes (fast path) or the dequantized fp32 weight
    scales: Tensor  # fp32 [C_out], the step repeated (oneDNN takes per-channel scales)
    zero_points: Tensor  # int64 [C_out] zeros
    bias: Tensor | None
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    in_channels: int
    fast: bool


def _pair(name: str, v) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2 or any(not isinstance(i, int) or i < 0 for i in t):
        raise ValueError(f"{name} must be a non-negative int or a pair of them, got {v!r}")
    return t


def _check_scale(name: str, scale) -> float:
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{name} must be a positive finite number, got {scale}")
    return scale


def _onednn_int8() -> bool:
    ops = getattr(torch.ops, "onednn", None)
    return (ops is not None and hasattr(ops, "qconv_prepack") and hasattr(ops, "qconv_pointwise")
            and torch.backends.mkldnn.is_available()
            and bool(getattr(torch.cpu, "_is_vnni_supported", lambda: False)()))


@functools.lru_cache(maxsize=None)
def _probe() -> bool:
    """The fast path's sum of the extreme codes (255 x -128 over 3x3x16) is exact."""
    try:
        x = torch.full((1, 16, 3, 3), 255, dtype=torch.uint8)
        w = torch.full((16, 16, 3, 3), -128, dtype=torch.int8)
        packed = _pack(w, 1.0, (1, 1), (0, 0), (1, 1), 1, None, fast=True)
        y = _run(x, 1.0, packed)
    except Exception:  # noqa: BLE001  a capability probe: any failure (another torch's
        return False    # schema, a missing kernel) means the float fallback
    return bool((y == 255 * -128 * 9 * 16).all())


def integer_conv_fast(device: torch.device | str = "cpu") -> bool:
    """Whether ``integer_conv2d`` runs as an integer convolution on ``device`` (else as the
    float convolution of the dequantized codes)."""
    return torch.device(device).type == "cpu" and _onednn_int8() and _probe()


def pack_conv_codes(codes: Tensor, scale: float, stride=1, padding=0, dilation=1, groups: int = 1,
                    bias: Tensor | None = None) -> PackedConvCodes:
    """Prepacks a conv weight's int8 codes ``[C_out, C_in/groups, kh, kw]`` (e.g.
    ``quantize_codes(w, step, bits, signed=True)``) with its step ``scale``; once per weight."""
    if not isinstance(codes, Tensor) or codes.dtype != torch.int8 or codes.dim() != 4:
        raise ValueError("codes must be an int8 tensor [C_out, C_in/groups, kh, kw], got "
                         + (f"{codes.dtype} {tuple(codes.shape)}" if isinstance(codes, Tensor)
                            else type(codes).__name__))
    scale = _check_scale("scale", scale)
    geometry = (_pair("stride", stride), _pair("padding", padding), _pair("dilation", dilation))
    if 0 in geometry[0] or 0 in geometry[2]:
        raise ValueError(f"stride and dilation must be positive, got {stride!r}, {dilation!r}")
    if not isinstance(groups, int) or groups < 1 or codes.shape[0] % groups:
        raise ValueError(f"groups must be a positive divisor of C_out={codes.shape[0]}, "
                         f"got {groups!r}")
    if bias is not None and (bias.shape != (codes.shape[0],) or not bias.is_floating_point()):
        raise ValueError(f"bias must be a float tensor [{codes.shape[0]}], got "
                         f"{bias.dtype} {tuple(bias.shape)}")
    return _pack(codes, scale, *geometry, groups, bias, fast=integer_conv_fast(codes.device))


def _pack(codes, scale, stride, padding, dilation, groups, bias, fast: bool) -> PackedConvCodes:
    c_out = codes.shape[0]
    scales = torch.full((c_out,), scale, dtype=torch.float32, device=codes.device)
    zeros = torch.zeros(c_out, dtype=torch.long, device=codes.device)
    if fast:
        weight = torch.ops.onednn.qconv_prepack(codes.contiguous(), scales, 1.0, 0, list(stride),
                                                list(padding), list(dilation), groups, None)
    else:
        weight = codes.float() * scales.view(-1, 1, 1, 1)
    bias = None if bias is None else bias.detach().float()
    return PackedConvCodes(weight, scales, zeros, bias, stride, padding, dilation, groups,
                           codes.shape[1] * groups, fast)


def _run(x_codes: Tensor, x_scale: float, w: PackedConvCodes) -> Tensor:
    if w.fast:
        return torch.ops.onednn.qconv_pointwise(
            x_codes, x_scale, 0, w.weight, w.scales, w.zero_points, w.bias, list(w.stride),
            list(w.padding), list(w.dilation), w.groups, 1.0, 0, torch.float32, "none", [], "")
    return F.conv2d(x_codes.float() * x_scale, w.weight, w.bias, w.stride, w.padding,
                    w.dilation, w.groups)


def integer_conv2d(x_codes: Tensor, x_scale: float, weight: PackedConvCodes) -> Tensor:
    """fp32 ``conv2d(x_codes * x_scale, w_codes * w_scale) + bias`` for unsigned input codes
    (uint8 ``[N, C_in, H, W]``, e.g. ``quantize_codes(x, step, bits, signed=False)``; a
    channels_last input gives a channels_last output). ``x_scale``: the input's step, a host
    float (the search reads each step once)."""
    if not isinstance(weight, PackedConvCodes):
        raise ValueError(f"weight must come from pack_conv_codes, got {type(weight).__name__}")
    if not isinstance(x_codes, Tensor) or x_codes.dtype != torch.uint8 or x_codes.dim() != 4:
        raise ValueError("x_codes must be a uint8 tensor [N, C_in, H, W], got "
                         + (f"{x_codes.dtype} {tuple(x_codes.shape)}"
                            if isinstance(x_codes, Tensor) else type(x_codes).__name__))
    if x_codes.shape[1] != weight.in_channels:
        raise ValueError(f"x_codes has {x_codes.shape[1]} channels, the weight expects "
                         f"{weight.in_channels}")
    if weight.fast and x_codes.device.type != "cpu":
        raise ValueError(f"x_codes is on {x_codes.device}, the packed weight on the CPU")
    return _run(x_codes, _check_scale("x_scale", x_scale), weight)
