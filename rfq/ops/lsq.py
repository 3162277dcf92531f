"""Typed wrappers of the LSQ op family (coupled_quant, coupled_quant_multi, quant_stats,
quantize_codes, relu_quant, batch_norm_quant, batch_norm_quant_mse). Conventions in rfq/ops/__init__.py; semantics ../shared/spec/kernels.md §1-2.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from rfq.ops import backend

_ops = torch.ops.rfq


def coupled_quant(
    x: Tensor,
    steps: Tensor,
    bits: Sequence[int],
    sel: Tensor,
    signed: bool = True,
    grad_scale: float = 1.0,
) -> Tensor:
    """LSQ fake quantization of ``x`` at ``bits[sel]`` with step ``steps[sel]``.

    Differentiable: dx is the clipped straight-through gradient, d steps is the LSQ step gradient
    (times ``grad_scale``) in slot ``sel`` and zero elsewhere. Output has x's dtype and layout.
    """
    if backend.triton_lsq and x.is_cuda:
        return torch.ops.rfq_triton.coupled_quant.default(x, steps, list(bits), sel, signed,
                                                          grad_scale)
    return _ops.coupled_quant.default(x, steps, list(bits), sel, signed, grad_scale)


def relu_quant(
    x: Tensor,
    steps: Tensor,
    bits: Sequence[int],
    sel: Tensor,
    grad_scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """``(relu(x), coupled_quant(x, steps, bits, sel, signed=False, grad_scale))`` from one read
    of x: a residual block's ReLU output (its shortcut) and the next conv's quantized input. The
    unsigned quantizer clamps at 0 itself, so it takes x, not relu(x) (the same codes, and the
    same gradients except at x == 0 exactly). Backward is one pass over both gradients; either
    may be unused."""
    return _ops.relu_quant.default(x, steps, list(bits), sel, grad_scale)


def batch_norm_quant(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float,
    steps: Tensor,
    bits: Sequence[int],
    sel: Tensor,
    signed: bool = False,
    grad_scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BatchNorm of fp32 ``x`` [N, C, ...] fused with the next layer's quantizer.

    Returns ``(coupled_quant(z, steps, bits, sel, signed, grad_scale), mean, var)`` where
    ``z = x * alpha + beta`` per channel, ``alpha = weight / sqrt(var + eps)``,
    ``beta = bias - mean * alpha`` (fp32, each operation rounded), and ``mean``/``var`` are the
    batch mean and biased variance over every dim but 1 (fp32 [C]). One write instead of the BN
    output plus the quantizer's; backward saves x, not the BN output. Differentiable in x,
    weight, bias and steps; running statistics are the caller's (from mean and var). 4-D
    channels_last input gives channels_last output, anything else contiguous.
    """
    return _ops.batch_norm_quant.default(x, weight, bias, eps, steps, list(bits), sel, signed,
                                         grad_scale)



def batch_norm_quant_mse(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float,
    steps: Tensor,
    bits: Sequence[int],
    sel: Tensor,
    teacher: Tensor,
    signed: bool = False,
    grad_scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``batch_norm_quant`` plus a feature MSE of its BN output to a teacher (IDM's term).

    Returns ``(y, mean, var, mse)``: the first three as ``batch_norm_quant``'s, and ``mse =
    mean((z - teacher)^2)`` (fp32 0-dim) of the BN output ``z`` against ``teacher`` (fp32, x's
    shape, not differentiated), summed in fp64 across chunks. ``z`` is still never written: the
    backward adds ``2 * grad_mse * (z - teacher) / numel`` to z's gradient inside its two passes.
    """
    return _ops.batch_norm_quant_mse.default(x, weight, bias, eps, steps, list(bits), sel,
                                             teacher, signed, grad_scale)


def batch_norm_add(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float,
    residual: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BatchNorm of fp32 ``x`` [N, C, ...] plus ``residual`` (fp32, x's shape):
    a residual block's last BN and its shortcut add in one pass.

    Returns ``(z + residual, mean, var)`` with ``z``, ``mean`` and ``var`` as
    ``batch_norm_quant``'s (fp32, each operation rounded). The BN output is never written on its
    own; backward saves x, and the residual's gradient is the output's. Differentiable in x,
    weight, bias and residual; running statistics are the caller's. 4-D channels_last x gives
    channels_last output, anything else contiguous.
    """
    return _ops.batch_norm_add.default(x, weight, bias, eps, residual)


def coupled_quant_multi(
    x: Tensor,
    steps: Tensor,
    bits: Sequence[int],
    signed: bool = True,
    grad_scale: float = 1.0,
) -> Tensor:
    """All K fake-quantized versions of ``x``, stacked as [K, *x.shape], from one read of x."""
    if backend.triton_lsq and x.is_cuda:
        return torch.ops.rfq_triton.coupled_quant_multi.default(x, steps, list(bits), signed,
                                                                grad_scale)
    return _ops.coupled_quant_multi.default(x, steps, list(bits), signed, grad_scale)


def quant_stats(
    x: Tensor,
    steps: Tensor,
    bits: Sequence[int],
    signed: bool = True,
    delta: float = 0.125,
) -> tuple[Tensor, Tensor]:
    """Per candidate bit: (quantization MSE, share of values within ``delta`` of a boundary).

    A value counts as near a boundary when it is inside the clipping range and
    |x/s - rint(x/s)| > 1/2 - delta; for signed 1-bit (boundary 0) when |x/s| < delta. Both are
    fp32 [K]; an empty x gives zeros. The bit-width scheduler's turbulence is
    ``mean_b(share_b / b)``.
    """
    if backend.triton_lsq and x.is_cuda:
        return torch.ops.rfq_triton.quant_stats.default(x, steps, list(bits), signed, delta)
    return _ops.quant_stats.default(x, steps, list(bits), signed, delta)


def quantize_codes(x: Tensor, step: Tensor, bits: int, signed: bool = True) -> Tensor:
    """Integer codes of ``x`` at ``bits`` with one fp32 ``step``: int8 when ``signed``, uint8
    otherwise (unsigned 8-bit codes reach 255). NaN maps to code 0."""
    if backend.triton_lsq and x.is_cuda:
        return torch.ops.rfq_triton.quantize_codes.default(x, step, bits, signed)
    return _ops.quantize_codes.default(x, step, bits, signed)
