"""Plain-PyTorch implementation of every rfq op: the test oracle and the E1 speed baseline.

Written for clarity, not speed, from ../shared/spec/kernels.md §1-2:
    v = x / s in fp32 (torch's division is IEEE correctly rounded; never x * (1/s))
    k = rint(clip(v, qn, qp)), half to even; signed 1-bit: k = +1 if v >= 0 else -1
    y = (k * s) in fp32, cast once to x's dtype
    dx = dy where qn <= v <= qp (inclusive), else 0
    ds = grad_scale * sum(dy * h), h = k - v inside the range, k (= qn or qp) outside; fp64 sum

``lsq_fake_quant`` is the same quantizer as a differentiable expression (straight-through
rounding), so autograd through it gives the LSQ gradients; the ``*_backward`` functions are the
closed forms, exact in dx.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from rfq.ops.layout import (BLOCK_K, code_offset, container_bits, is_binary,  # noqa: F401
                            packed_row_bytes, padded_k, qrange)


def codes_float(v: Tensor, bits: int, signed: bool) -> Tensor:
    """Integer codes (as fp32) of v = x / s. NaN stays NaN."""
    if is_binary(bits, signed):
        k = torch.where(v >= 0, 1.0, -1.0)
        return torch.where(v.isnan(), v, k)
    qn, qp = qrange(bits, signed)
    return torch.clamp(v, qn, qp).round()


def _scaled_step(step: Tensor, grad_scale: float) -> Tensor:
    # Value exactly `step`, gradient `grad_scale` (a + 0 is exact; a*g + (a - a*g) is not).
    if grad_scale == 1.0:
        return step
    return step.detach() + (step - step.detach()) * grad_scale


def lsq_fake_quant(
    x: Tensor, step: Tensor, bits: int, signed: bool = True, grad_scale: float = 1.0
) -> Tensor:
    """Differentiable LSQ fake quantization at one bit-width; ``step`` is a 0-dim fp32 tensor."""
    qn, qp = qrange(bits, signed)
    s = _scaled_step(step, grad_scale)
    v = x.float() / s
    c = torch.clamp(v, qn, qp)
    k = c + (codes_float(c, bits, signed) - c).detach()  # round with a straight-through gradient
    return (k * s).to(x.dtype)


def coupled_quant(
    x: Tensor,
    steps: Tensor,
    bits: Sequence[int],
    sel: Tensor,
    signed: bool = True,
    grad_scale: float = 1.0,
) -> Tensor:
    j = int(sel)
    return lsq_fake_quant(x, steps[j], bits[j], signed, grad_scale)


def _one_bit_grads(grad_y: Tensor, x: Tensor, step: Tensor, bits: int, signed: bool):
    qn, qp = qrange(bits, signed)
    v = x.float() / step
    k = codes_float(v, bits, signed)
    inside = (v >= qn) & (v <= qp)
    h = torch.where(inside, k - v, k)
    step_sum = (grad_y.double() * h.double()).sum()
    return inside, step_sum


def coupled_quant_backward(
    grad_y: Tensor,
    x: Tensor,
    steps: Tensor,
    bits: Sequence[int],
    sel: Tensor,
    signed: bool,
    grad_scale: float,
) -> tuple[Tensor, Tensor]:
    j = int(sel)
    inside, step_sum = _one_bit_grads(grad_y, x, steps[j], bits[j], signed)
    grad_x = torch.where(inside, grad_y, torch.zeros((), dtype=grad_y.dtype, device=grad_y.device))
    grad_steps = torch.zeros_like(steps)
    grad_steps[j] = (step_sum * grad_scale).float()
    return grad_x, grad_steps


def relu_quant(x: Tensor, steps: Tensor, bits: Sequence[int], sel: Tensor,
               grad_scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Twin of ``rfq.ops.relu_quant``: the two ops it replaces."""
    return torch.relu(x), coupled_quant(x, steps, bits, sel, False, grad_scale)


def relu_quant_backward(grad_r, grad_y, x, steps, bits, sel, grad_scale):
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    grad_x = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    grad_steps = torch.zeros_like(steps)
    if grad_r is not None:
        grad_x = grad_x + torch.where(x > 0, grad_r, zero).float()
    if grad_y is not None:
        gq, grad_steps = coupled_quant_backward(grad_y, x, steps, bits, sel, False, grad_scale)
        grad_x = grad_x + gq.float()
    return grad_x.to(x.dtype), grad_steps


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
    stats: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Twin of ``rfq.ops.batch_norm_quant``, differentiable in x, weight, bias and steps.

    The batch mean and biased variance are taken in fp64 and rounded to fp32; ``stats`` (e.g. an
    op's own mean and var) replaces their values while the gradients still flow through x's
    batch statistics, so the outputs can be compared exactly with the op's for those statistics.
    """
    z, mean, var = _batch_norm_output(x, weight, bias, eps, stats)
    j = int(sel)
    return lsq_fake_quant(z, steps[j], bits[j], signed, grad_scale), mean, var


def _batch_norm_output(x, weight, bias, eps, stats=None) -> tuple[Tensor, Tensor, Tensor]:
    """(z, mean, var): batch_norm_quant's BN output z = x * alpha + beta (fp32, each operation
    rounded) and its detached batch statistics (see batch_norm_quant for ``stats``)."""
    dims = [0, *range(2, x.dim())]
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    xd = x.double()
    mean64 = xd.mean(dims)
    var64 = ((xd - mean64.view(shape)) ** 2).mean(dims)
    mean, var = mean64.float(), var64.float()
    if stats is not None:
        mean = mean + (stats[0] - mean).detach()
        var = var + (stats[1] - var).detach()
    # sqrt correctly rounded, as the kernels' sqrtf: torch.sqrt's fp32 vector path is not on
    # every CPU (fp64's rounded to fp32 is, since double has more than 2 x 24 + 2 bits)
    invstd = 1 / torch.sqrt((var + eps).double()).float()
    alpha = weight * invstd
    beta = bias - mean * alpha
    z = x * alpha.view(shape) + beta.view(shape)
    return z, mean.detach(), var.detach()


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
    stats: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Twin of ``rfq.ops.batch_norm_quant_mse``: ``batch_norm_quant``'s outputs and
    mean((z - teacher)^2) of its BN output, taken in fp64 (the teacher is not differentiated)."""
    z, mean, var = _batch_norm_output(x, weight, bias, eps, stats)
    j = int(sel)
    mse = ((z.double() - teacher.detach().double()) ** 2).mean().float()
    return lsq_fake_quant(z, steps[j], bits[j], signed, grad_scale), mean, var, mse


def batch_norm_add(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float,
    residual: Tensor,
    stats: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Twin of ``rfq.ops.batch_norm_add``: ``batch_norm_quant``'s BN output z plus the residual
    (one more rounded fp32 add), differentiable in x, weight, bias and residual; ``stats`` as
    ``batch_norm_quant``'s."""
    z, mean, var = _batch_norm_output(x, weight, bias, eps, stats)
    return z + residual, mean, var


def coupled_quant_multi(
    x: Tensor,
    steps: Tensor,
    bits: Sequence[int],
    signed: bool = True,
    grad_scale: float = 1.0,
) -> Tensor:
    return torch.stack(
        [lsq_fake_quant(x, steps[j], b, signed, grad_scale) for j, b in enumerate(bits)]
    )


def coupled_quant_multi_backward(
    grad_y: Tensor,
    x: Tensor,
    steps: Tensor,
    bits: Sequence[int],
    signed: bool,
    grad_scale: float,
) -> tuple[Tensor, Tensor]:
    grad_x = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    grad_steps = torch.zeros_like(steps)
    for j, b in enumerate(bits):  # fp32 sum in candidate order, as the kernels do
        inside, step_sum = _one_bit_grads(grad_y[j], x, steps[j], b, signed)
        grad_x = grad_x + torch.where(inside, grad_y[j].float(), 0.0)
        grad_steps[j] = (step_sum * grad_scale).float()
    return grad_x.to(x.dtype), grad_steps


def quant_stats(
    x: Tensor,
    steps: Tensor,
    bits: Sequence[int],
    signed: bool = True,
    delta: float = 0.125,
) -> tuple[Tensor, Tensor]:
    n = x.numel()
    mse = torch.zeros(len(bits), dtype=torch.float32, device=x.device)
    share = torch.zeros(len(bits), dtype=torch.float32, device=x.device)
    if n == 0:
        return mse, share
    xf = x.float()
    near_threshold = float(np.float32(0.5 - delta))  # rounded once to fp32
    for j, b in enumerate(bits):
        qn, qp = qrange(b, signed)
        v = xf / steps[j]
        k = codes_float(v, b, signed)
        y = (k * steps[j]).to(x.dtype).float()  # what the fake-quantized output holds
        mse[j] = ((y - xf).double() ** 2).sum() / n
        if is_binary(b, signed):
            near = v.abs() < float(np.float32(delta))
        else:
            near = (v - k).abs() > near_threshold
        count = (((v >= qn) & (v <= qp)) & near).sum()
        share[j] = count.double() / n
    return mse, share


def quantize_codes(x: Tensor, step: Tensor, bits: int, signed: bool = True) -> Tensor:
    k = codes_float(x.float() / step.reshape(()), bits, signed)
    return torch.where(k.isnan(), 0.0, k).to(torch.int8 if signed else torch.uint8)


def composed_lsq(x: Tensor, step: Tensor, qn: int, qp: int) -> Tensor:
    """The textbook composed LSQ expression (divide, clamp, round-STE, multiply).

    Used as the ``torch.compile`` baseline of the benchmarks; same values as lsq_fake_quant for
    b >= 2 in fp32.
    """
    c = torch.clamp(x / step, qn, qp)
    return (c + (c.round() - c).detach()) * step


# ---- packed weights (layout: rfq/ops/layout.py, csrc/packed_layout.h; spec §3) ------------------


def pack_weight(codes: Tensor, bits: int) -> Tensor:
    n, k = codes.shape
    kp = padded_k(k)
    q = torch.zeros(n, kp, dtype=torch.int64)
    q[:, :k] = codes.long()
    blocks = q.reshape(n, kp // BLOCK_K, BLOCK_K)
    c = container_bits(bits)
    if c == 8:
        body = blocks.to(torch.int8).view(torch.uint8)
    else:
        u = blocks + code_offset(bits)
        per_byte = 8 // c  # elements per byte; element j + i*(BLOCK_K/per_byte) at offset i*c
        parts = u.reshape(n, kp // BLOCK_K, per_byte, BLOCK_K // per_byte)
        body = sum(parts[:, :, i] << (i * c) for i in range(per_byte)).to(torch.uint8)
    out = torch.zeros(n, packed_row_bytes(k, bits), dtype=torch.uint8)
    flat = body.reshape(n, kp * container_bits(bits) // 8)
    out[:, : flat.shape[1]] = flat
    return out


def unpack_weight(packed: Tensor, bits: int, shape) -> Tensor:
    n, k = shape
    kp = padded_k(k)
    c = container_bits(bits)
    body = packed[:, : kp * c // 8].long().reshape(n, kp // BLOCK_K, BLOCK_K * c // 8)
    if c == 8:
        q = body.to(torch.uint8).view(torch.int8).long()
    else:
        per_byte = 8 // c
        parts = [(body >> (i * c)) & ((1 << c) - 1) for i in range(per_byte)]
        q = torch.cat(parts, dim=2) - code_offset(bits)
    return q.reshape(n, kp)[:, :k].to(torch.int8)


def dequantize_weight(packed, scales, bits, shape, group_size=0, zeros=None) -> Tensor:
    n, k = shape
    q = unpack_weight(packed, bits, shape).float()
    if group_size == 0:
        return q * scales.float().reshape(())
    scale = scales.float().repeat_interleave(group_size, dim=1)[:, :k]
    z = (zeros.float().repeat_interleave(group_size, dim=1)[:, :k] if zeros is not None
         else torch.full_like(q, float(code_offset(bits))))
    return (q + code_offset(bits) - z) * scale


def packed_linear(x, packed, scales, zeros, bits, group_size, bias=None, x_step=None, x_bits=8,
                  x_signed=False) -> Tensor:
    """fp32 dequantize, then F.linear in fp32 (spec §3's reference); with ``x_step``, x is first
    LSQ fake-quantized in fp32 (the deployed layer's input quantizer, k * x_step)."""
    w = dequantize_weight(packed, scales, bits, (packed.shape[0], x.shape[-1]), group_size, zeros)
    xf = x.float()
    if x_step is not None:
        step = x_step.reshape(())
        xf = codes_float(xf / step, x_bits, x_signed) * step
    y = torch.nn.functional.linear(xf, w, None if bias is None else bias.float())
    return y.to(x.dtype)


# ---- data-free weight quantizers of DF-MPC (spec methods_seeds.md §A.2) -------------------------


def ternary_quant(w: Tensor) -> Tensor:
    """TWN ternary, the spec's formula as written: W_hat = alpha * sign(W) * 1[|W| > 0.7 mean|W|]."""
    w = w.float()
    delta = 0.7 * w.abs().mean()
    t = torch.sign(w) * (w.abs() > delta).float()
    kept = w.abs()[w.abs() > delta]
    alpha = kept.sum() / kept.numel() if kept.numel() else torch.zeros(())
    return alpha * t


def dorefa_quant(w: Tensor, bits: int) -> Tensor:
    """DoReFa k-bit as the spec writes it: s = max|W|, n = round((2^k-1)(W/(2s) + 1/2)),
    W_hat = s (2n/(2^k-1) - 1)."""
    w = w.float()
    s = w.abs().max()
    if s == 0:
        return torch.zeros_like(w)
    levels = 2 ** bits - 1
    n = torch.clamp(torch.round(levels * (w / (2 * s) + 0.5)), 0, levels)
    return s * (2 * n / levels - 1)


# ---- CSQ's bit-level weight (spec methods_seeds.md §C.1) ------------------------------------------


def csq_plane_coefs(m: Tensor, scale: Tensor, beta: Tensor) -> Tensor:
    """coef_i = (scale g(beta m_i)) 2^(N-1-i) / (2^N - 1), in m's dtype."""
    n = m.shape[0]
    place = torch.tensor([2.0 ** (n - 1 - i) / (2 ** n - 1) for i in range(n)],
                         dtype=torch.float64).to(m.dtype)
    return (scale.reshape(()) * torch.sigmoid(beta.reshape(()) * m)) * place


def csq_weight(p: Tensor, q: Tensor, m: Tensor, scale: Tensor, beta: Tensor) -> Tensor:
    """w = sum_i coef_i (g(beta p_i) - g(beta q_i)), summed in plane order; differentiable in
    p, q, m and scale through autograd (the oracle of csq_weight and its backward)."""
    coef = csq_plane_coefs(m, scale, beta)
    b = beta.reshape(())
    w = torch.zeros(p.shape[1:], dtype=p.dtype, device=p.device)
    for i in range(p.shape[0]):
        w = w + coef[i] * (torch.sigmoid(b * p[i]) - torch.sigmoid(b * q[i]))
    return w


def csq_codes(p: Tensor, q: Tensor, m: Tensor) -> Tensor:
    """The hardened weight's integer codes (spec §C.1 "Export"): n = sum_i 1[m_i > 0]
    (1[p_i > 0] - 1[q_i > 0]) 2^(N-1-i), int32; the weight is scale n / (2^N - 1)."""
    n = p.shape[0]
    codes = torch.zeros(p.shape[1:], dtype=torch.int32, device=p.device)
    for i in range(n):
        if bool(m[i] > 0):
            digit = (p[i] > 0).to(torch.int32) - (q[i] > 0).to(torch.int32)
            codes += digit * (1 << (n - 1 - i))
    return codes


def csq_weight_composed(p: Tensor, q: Tensor, m: Tensor, scale: Tensor, beta: Tensor) -> Tensor:
    """CSQ's weight as the official code builds it, in eager PyTorch over all planes at once
    (the baseline of the fused op's benchmarks): gates, differences, per-plane factors, sum."""
    n = p.shape[0]
    place = (2.0 ** torch.arange(n - 1, -1, -1, dtype=p.dtype, device=p.device)) / (2 ** n - 1)
    gates = (torch.sigmoid(beta * m) * place).view(n, *[1] * (p.dim() - 1))
    return scale * ((torch.sigmoid(beta * p) - torch.sigmoid(beta * q)) * gates).sum(0)


def batch_norm_quant_from_stats(x, weight, bias, mean, var, eps, steps, bits, sel,
                                signed=False, grad_scale=1.0) -> Tensor:
    """``batch_norm_quant``'s output for given batch statistics (an op's own mean and var)."""
    return batch_norm_quant(x, weight, bias, eps, steps, bits, sel, signed, grad_scale,
                            stats=(mean, var))[0]
