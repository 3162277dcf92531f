"""Typed wrappers of the packed-weight ops (pack_weight, unpack_weight, packed_linear) and the
packed conv built on them. Layout: rfq/ops/layout.py (csrc/packed_layout.h); spec §3.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from rfq.ops import backend
from rfq.ops.layout import code_offset, is_binary
from rfq.ops.lsq import coupled_quant

_ops = torch.ops.rfq


def pack_weight(codes: Tensor, bits: int) -> Tensor:
    """Signed int8 codes [N, K] (e.g. ``quantize_codes`` of a weight, convs flattened to
    [C_out, C_in*kh*kw]) -> uint8 [N, packed_row_bytes(K, bits)] in the packed layout."""
    return _ops.pack_weight.default(codes, bits)


def unpack_weight(packed: Tensor, bits: int, shape: Sequence[int]) -> Tensor:
    """Exact inverse of ``pack_weight``: int8 codes of shape [N, K]."""
    return _ops.unpack_weight.default(packed, bits, list(shape))


def dequantize_weight(
    packed: Tensor,
    scales: Tensor,
    bits: int,
    shape: Sequence[int],
    group_size: int = 0,
    zeros: Tensor | None = None,
) -> Tensor:
    """fp32 weights [N, K] of a packed tensor: q * s (per-tensor) or (u - z) * scale per group."""
    n, k = shape
    q = unpack_weight(packed, bits, (n, k)).float()
    if group_size == 0:
        return q * scales.float().reshape(())
    scale = scales.float().repeat_interleave(group_size, dim=1)[:, :k]
    if zeros is None:
        return q * scale
    u = q + code_offset(bits)
    return (u - zeros.float().repeat_interleave(group_size, dim=1)[:, :k]) * scale


def packed_linear(
    x: Tensor,
    packed: Tensor,
    scales: Tensor,
    bits: int,
    group_size: int = 0,
    zeros: Tensor | None = None,
    bias: Tensor | None = None,
    x_step: Tensor | None = None,
    x_bits: int = 8,
    x_signed: bool = False,
) -> Tensor:
    """y = x @ dequant(W)^T (+ bias) from packed weights, without materializing W for small M.

    group_size 0: per-tensor LSQ step (``scales`` holds one value, no zeros); 32/64/128: scales
    (and optional zeros, in offset-binary units) of shape [N, ceil(K/group_size)]. x: [..., K]
    fp32/bf16/fp16; output [..., N] in x's dtype, fp32 accumulation. Differentiable in x only.

    ``x_step`` (one fp32 value) fuses a deployed layer's LSQ input quantizer at ``x_bits``
    (``x_signed``) into the op: y = x_step * (k @ W^T) + bias with k the integer codes of x,
    what ``coupled_quant`` followed by this op computes, in one call.
    """
    if backend.triton_packed and x.is_cuda:
        return torch.ops.rfq_triton.packed_linear.default(x, packed, scales, zeros, bits,
                                                          group_size, bias, x_step, x_bits,
                                                          x_signed)
    return _ops.packed_linear.default(x, packed, scales, zeros, bits, group_size, bias, x_step,
                                      x_bits, x_signed)


def quantize_input(x: Tensor, x_step: Tensor, x_bits: int, x_signed: bool) -> Tensor:
    """The unfused form of the input quantizer ``packed_linear`` fuses (``coupled_quant`` at one
    bit-width), for the paths that run a dense weight."""
    sel = torch.zeros((), dtype=torch.long, device=x.device)
    return coupled_quant(x, x_step.reshape(1), [x_bits], sel, x_signed)


# Below this many output positions a packed conv runs as unfold + packed_linear (the weight is
# read packed); above it the packed kernel would dequantize anyway, so dequantize once and let
# oneDNN's direct convolution run.
_CONV_PACKED_MAX_M = 32


def conv_reads_packed(batch: int, out_hw: Sequence[int], groups: int = 1) -> bool:
    """Whether ``packed_conv2d`` reads the packed weight (else it runs a dense conv)."""
    return groups == 1 and batch * out_hw[0] * out_hw[1] < _CONV_PACKED_MAX_M


def packed_conv2d(
    x: Tensor,
    packed: Tensor,
    scales: Tensor,
    bits: int,
    weight_shape: Sequence[int],
    group_size: int = 0,
    zeros: Tensor | None = None,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    x_step: Tensor | None = None,
    x_bits: int = 8,
    x_signed: bool = False,
) -> Tensor:
    """conv2d with a packed weight of logical shape ``weight_shape`` = (C_out, C_in/groups, kh,
    kw), packed as [C_out, C_in/groups*kh*kw]. Same arguments as ``F.conv2d`` otherwise;
    ``x_step``/``x_bits``/``x_signed``: the input quantizer of ``packed_linear``, fused where the
    conv reads the packed weight."""
    c_out, c_in_g, kh, kw = weight_shape
    if x.dim() != 4 or x.shape[1] != c_in_g * groups:
        raise ValueError(f"rfq.packed_conv2d: x must be [B, {c_in_g * groups}, H, W], "
                         f"got {tuple(x.shape)}")
    pair = torch.nn.modules.utils._pair
    stride, padding, dilation = pair(stride), pair(padding), pair(dilation)
    b, _, h, w = x.shape
    h_out = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    quant = (x_step, x_bits, x_signed)
    if conv_reads_packed(b, (h_out, w_out), groups):
        if (kh, kw) == (1, 1) and padding == (0, 0):  # a 1x1 conv is a linear over positions
            rows = x[:, :, ::stride[0], ::stride[1]].permute(0, 2, 3, 1)
            y = packed_linear(rows, packed, scales, bits, group_size, zeros, bias, *quant)
            return y.permute(0, 3, 1, 2)
        if x_step is not None and padding != (0, 0) and is_binary(x_bits, x_signed):
            # binary codes map the zero padding to +1: quantize before padding, as unfused
            x, quant = quantize_input(x, x_step, x_bits, x_signed), (None, 8, False)
        cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
        y = packed_linear(cols.transpose(1, 2), packed, scales, bits, group_size, zeros, bias,
                          *quant)
        return y.transpose(1, 2).reshape(b, c_out, h_out, w_out)
    if x_step is not None:
        x = quantize_input(x, x_step, x_bits, x_signed)
    weight = dequantize_weight(packed, scales, bits, (c_out, c_in_g * kh * kw), group_size, zeros)
    return F.conv2d(x, weight.reshape(weight_shape).to(x.dtype), bias, stride, padding, dilation,
                    groups)
