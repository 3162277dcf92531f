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


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer code range [qn, qp] of one candidate; signed 1-bit is binary {-1, +1}."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if signed and bits == 1:
        return -1, 1
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def is_binary(bits: int, signed: bool) -> bool:
    return signed and bits == 1


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
