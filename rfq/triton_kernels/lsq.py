"""Triton kernels of the fused LSQ family (../shared/spec/kernels.md §1-2) and their launchers.

Numerics are the spec's, bit for bit:
    v = tl.div_rn(x, s)         correctly rounded fp32 division; Triton's plain `/` lowers to the
                                <= 2-ulp div.full.f32 on NVIDIA GPUs (the interpreter cannot see it)
    k = rint(clip(v, qn, qp))   clip by comparisons (NaN passes through: tl.maximum/minimum would
                                drop it on GPU), round half to even with (c + 1.5*2^23) - 1.5*2^23,
                                exact for |c| < 2^22; signed 1-bit: k = +1 if v >= 0 else -1
    y = k * s                   fp32, rounded once to x's dtype
Every launch passes enable_fp_fusion=False: with fusion on, Triton lets LLVM/ptxas contract
k * s - x into one FMA and skip y's rounding (quant_stats' MSE), just as GCC did on CPU.

Host side: no syncs. ``sel`` and the steps are read inside the kernels; a bad step (!(s > 0) or
not finite) or an out-of-range ``sel`` turns the outputs into NaN (spec §1, "Bad steps"): NaN in
y, dx and the step gradient, NaN mse/share for that candidate, code 0 from quantize_codes.

Reductions are deterministic and use no atomics: every program owns one tile of BLOCK elements
and writes one fp32 partial per candidate (a fixed-order tree sum, tl.sum); a one-program-per-row
second kernel adds the partials in fp64 in tile order. Counts (quant_stats' share) are int32 per
tile and int64 in total, so they are exact.

The launchers check metadata only (dtype, shape, device agreement) and raise RuntimeError naming
the op and the argument. They run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1
(how the tests exercise them).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from rfq.triton_kernels import _interpreter_compat
from rfq.triton_kernels.checks import (
    check_bit,
    check_delta,
    check_grad,
    check_grad_scale,
    check_sel,
    check_step,
    check_steps,
    check_x,
)
from rfq.ops.layout import qrange

_interpreter_compat.apply()
# One tile per program; it is also the reduction chunk (one fp32 partial per tile). 2048
# elements on 8 warps is 8 per thread: two 128-bit loads of fp32, one of bf16/fp16.
BLOCK = 2048
NUM_WARPS = 8
# Second pass: one program per candidate walks its partials RBLOCK at a time.
RBLOCK = 1024
RBLOCK_WARPS = 4
FLT_MAX = tl.constexpr(3.4028234663852886e38)  # largest finite fp32



# ---- device helpers -----------------------------------------------------------------------------


@triton.jit
def _rint(c):
    # Half-to-even rounding of an fp32 in [-2^22, 2^22]: adding 1.5 * 2^23 leaves no fraction bits,
    # and the IEEE round-to-nearest-even of that add is the rounding. Codes are within [-128, 255].
    return (c + 12582912.0) - 12582912.0


@triton.jit
def _code(v, qn, qp):
    # Clip then round; comparisons are false for NaN, so NaN stays NaN.
    c = tl.where(v < qn, qn, tl.where(v > qp, qp, v))
    return _rint(c)


@triton.jit
def _binary_code(v):
    # Signed 1-bit: +1 for v >= 0 (also -0.0), -1 below, NaN stays NaN.
    k = tl.where(v >= 0.0, 1.0, -1.0)
    return tl.where(v != v, v, k)


@triton.jit
def _checked_step(steps_ptr, offset, valid):
    # The step at steps_ptr + offset (when valid), or NaN when it is unusable: !(s > 0), inf, NaN.
    s = tl.load(steps_ptr + offset, mask=valid, other=float("nan"))
    ok = (s > 0.0) & (s <= FLT_MAX)
    return tl.where(ok, s, float("nan")), ok


@triton.jit
def _selected(sel_ptr, QN: tl.constexpr, QP: tl.constexpr, BIN: tl.constexpr, K: tl.constexpr):
    # Range of candidate j = *sel (bits are static, sel is not): a where-chain over the K
    # candidates. valid is False for j outside [0, K).
    j = tl.load(sel_ptr)
    valid = (j >= 0) & (j < K)
    qn = tl.where(valid, 0.0, float("nan"))
    qp = qn
    is_binary = j < 0
    for c in tl.static_range(K):
        qn = tl.where(j == c, QN[c], qn)
        qp = tl.where(j == c, QP[c], qp)
        if BIN[c]:
            is_binary = is_binary | (j == c)
    return j, valid, qn, qp, is_binary


@triton.jit
def _row_sum_f64(ptr, count, RBLOCK: tl.constexpr):
    # Fixed-order fp64 sum of count fp32 values: lane-wise over RBLOCK strides, then a tree.
    acc = tl.zeros([RBLOCK], dtype=tl.float64)
    for start in range(0, count, RBLOCK):
        idx = start + tl.arange(0, RBLOCK)
        acc += tl.load(ptr + idx, mask=idx < count, other=0.0).to(tl.float64)
    return tl.sum(acc, axis=0)


@triton.jit
def _row_sum_i64(ptr, count, RBLOCK: tl.constexpr):
    acc = tl.zeros([RBLOCK], dtype=tl.int64)
    for start in range(0, count, RBLOCK):
        idx = start + tl.arange(0, RBLOCK)
        acc += tl.load(ptr + idx, mask=idx < count, other=0).to(tl.int64)
    return tl.sum(acc, axis=0)


# ---- coupled_quant: one candidate picked by sel --------------------------------------------------


@triton.jit
def _forward_kernel(x_ptr, y_ptr, steps_ptr, steps_stride, sel_ptr, n,
                    QN: tl.constexpr, QP: tl.constexpr, BIN: tl.constexpr, K: tl.constexpr,
                    ANY_BINARY: tl.constexpr, BLOCK: tl.constexpr):
    j, valid, qn, qp, is_binary = _selected(sel_ptr, QN, QP, BIN, K)
    s, ok = _checked_step(steps_ptr, j * steps_stride, valid)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: n may pass 2^31
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.div_rn(x, s)
    k = _code(v, qn, qp)
    if ANY_BINARY:
        k = tl.where(is_binary, _binary_code(v), k)
    tl.store(y_ptr + offs, (k * s).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(dy_ptr, x_ptr, dx_ptr, partial_ptr, steps_ptr, steps_stride, sel_ptr, n,
                     QN: tl.constexpr, QP: tl.constexpr, BIN: tl.constexpr, K: tl.constexpr,
                     ANY_BINARY: tl.constexpr, BLOCK: tl.constexpr):
    j, valid, qn, qp, is_binary = _selected(sel_ptr, QN, QP, BIN, K)
    s, ok = _checked_step(steps_ptr, j * steps_stride, valid)
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0)
    g = dy.to(tl.float32)
    v = tl.div_rn(x, s)
    k = _code(v, qn, qp)
    if ANY_BINARY:
        k = tl.where(is_binary, _binary_code(v), k)
    inside = (v >= qn) & (v <= qp)  # on the unrounded v, inclusive
    h = tl.where(inside, k - v, k)
    tl.store(partial_ptr + pid, tl.sum(tl.where(mask, g * h, 0.0), axis=0))
    dx = tl.where(inside, g, 0.0)  # dy exactly: widening to fp32 and back is exact
    dx = tl.where(ok, dx, float("nan"))
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _selected_step_grad_kernel(partial_ptr, count, out_ptr, steps_ptr, steps_stride, sel_ptr,
                               scale_hi, scale_lo, K: tl.constexpr, RBLOCK: tl.constexpr):
    # grad_steps[K]: slot sel gets grad_scale * (fp64 sum of the partials), the others 0.
    j = tl.load(sel_ptr)
    valid = (j >= 0) & (j < K)
    s, ok = _checked_step(steps_ptr, j * steps_stride, valid)
    total = _row_sum_f64(partial_ptr, count, RBLOCK)
    grad = (total * (tl.cast(scale_hi, tl.float64) + tl.cast(scale_lo, tl.float64))).to(tl.float32)
    grad = tl.where(ok, grad, float("nan"))
    for c in tl.static_range(K):
        slot = tl.where(j == c, grad, 0.0)
        tl.store(out_ptr + c, tl.where(valid, slot, float("nan")))


# ---- coupled_quant_multi: all K candidates from one read of x ------------------------------------


@triton.jit
def _multi_forward_kernel(x_ptr, y_ptr, steps_ptr, steps_stride, n,
                          QN: tl.constexpr, QP: tl.constexpr, BIN: tl.constexpr, K: tl.constexpr,
                          BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y_plane = y_ptr + offs  # plane c starts c * n elements later (64-bit pointer arithmetic)
    for c in tl.static_range(K):
        s, ok = _checked_step(steps_ptr, c * steps_stride, True)
        v = tl.div_rn(x, s)
        if BIN[c]:
            k = _binary_code(v)
        else:
            k = _code(v, QN[c], QP[c])
        tl.store(y_plane, (k * s).to(y_ptr.dtype.element_ty), mask=mask)
        y_plane += n


@triton.jit
def _multi_backward_kernel(dy_ptr, x_ptr, dx_ptr, partial_ptr, num_tiles, steps_ptr, steps_stride,
                           n, QN: tl.constexpr, QP: tl.constexpr, BIN: tl.constexpr,
                           K: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy_plane = dy_ptr + offs
    dx = tl.zeros([BLOCK], dtype=tl.float32)
    all_ok = True
    for c in tl.static_range(K):
        s, ok = _checked_step(steps_ptr, c * steps_stride, True)
        all_ok = all_ok & ok
        g = tl.load(dy_plane, mask=mask, other=0.0).to(tl.float32)
        dy_plane += n
        v = tl.div_rn(x, s)
        if BIN[c]:
            k = _binary_code(v)
        else:
            k = _code(v, QN[c], QP[c])
        inside = (v >= QN[c]) & (v <= QP[c])
        dx = dx + tl.where(inside, g, 0.0)  # fp32, in candidate order (as the reference)
        h = tl.where(inside, k - v, k)
        tl.store(partial_ptr + c * num_tiles + pid, tl.sum(tl.where(mask, g * h, 0.0), axis=0))
    dx = tl.where(all_ok, dx, float("nan"))
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _step_grads_kernel(partial_ptr, count, out_ptr, steps_ptr, steps_stride, scale_hi, scale_lo,
                       RBLOCK: tl.constexpr):
    # One program per candidate c: grad_steps[c] = grad_scale * (fp64 sum of row c's partials).
    c = tl.program_id(0)
    s, ok = _checked_step(steps_ptr, c * steps_stride, True)
    total = _row_sum_f64(partial_ptr + c * count, count, RBLOCK)
    grad = (total * (tl.cast(scale_hi, tl.float64) + tl.cast(scale_lo, tl.float64))).to(tl.float32)
    tl.store(out_ptr + c, tl.where(ok, grad, float("nan")))


# ---- quant_stats ------------------------------------------------------------------------------


@triton.jit
def _stats_kernel(x_ptr, sq_ptr, count_ptr, num_tiles, steps_ptr, steps_stride, n,
                  near_threshold, delta, QN: tl.constexpr, QP: tl.constexpr, BIN: tl.constexpr,
                  K: tl.constexpr, ROUND_TRIP: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    xr = tl.load(x_ptr + offs, mask=mask, other=0.0)
    x = xr.to(tl.float32)
    for c in tl.static_range(K):
        s, ok = _checked_step(steps_ptr, c * steps_stride, True)
        v = tl.div_rn(x, s)
        if BIN[c]:
            k = _binary_code(v)
            near = tl.abs(v) < delta  # the only boundary of binary codes is 0
        else:
            k = _code(v, QN[c], QP[c])
            near = tl.abs(v - k) > near_threshold
        y = k * s
        if ROUND_TRIP:  # the MSE of what the fake-quantized output stores
            y = y.to(xr.dtype).to(tl.float32)
        d = y - x
        tl.store(sq_ptr + c * num_tiles + pid, tl.sum(tl.where(mask, d * d, 0.0), axis=0))
        hit = mask & (v >= QN[c]) & (v <= QP[c]) & near
        tl.store(count_ptr + c * num_tiles + pid, tl.sum(hit.to(tl.int32), axis=0))


@triton.jit
def _stats_finish_kernel(sq_ptr, count_ptr, num_tiles, n, mse_ptr, share_ptr, steps_ptr,
                         steps_stride, RBLOCK: tl.constexpr):
    c = tl.program_id(0)
    s, ok = _checked_step(steps_ptr, c * steps_stride, True)
    total_sq = _row_sum_f64(sq_ptr + c * num_tiles, num_tiles, RBLOCK)
    total_count = _row_sum_i64(count_ptr + c * num_tiles, num_tiles, RBLOCK)
    n_f64 = tl.cast(n, tl.float64)
    nonempty = n_f64 > 0.0
    denominator = tl.where(nonempty, n_f64, 1.0)
    mse = tl.where(nonempty, total_sq / denominator, 0.0).to(tl.float32)
    share = tl.where(nonempty, total_count.to(tl.float64) / denominator, 0.0).to(tl.float32)
    tl.store(mse_ptr + c, tl.where(ok, mse, float("nan")))
    tl.store(share_ptr + c, tl.where(ok, share, float("nan")))


# ---- quantize_codes ---------------------------------------------------------------------------


@triton.jit
def _codes_kernel(x_ptr, out_ptr, step_ptr, n, QN: tl.constexpr, QP: tl.constexpr,
                  BINARY: tl.constexpr, BLOCK: tl.constexpr):
    s, ok = _checked_step(step_ptr, 0, True)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.div_rn(x, s)
    if BINARY:
        k = _binary_code(v)
    else:
        k = _code(v, QN, QP)
    k = tl.where(k != k, 0.0, k)  # NaN (data or step) -> code 0; the rest are exact integers
    tl.store(out_ptr + offs, k.to(out_ptr.dtype.element_ty), mask=mask)


# ---- host side ----------------------------------------------------------------------------------

_LAUNCH = dict(num_warps=NUM_WARPS, enable_fp_fusion=False)
_FINISH = dict(num_warps=RBLOCK_WARPS, enable_fp_fusion=False)
_RANGES: dict = {}


def candidate_ranges(bits: Sequence[int], signed: bool):
    """(QN, QP, BIN) constexpr tuples of the candidates: fp32 range ends and the binary flags."""
    key = (tuple(bits), bool(signed))
    hit = _RANGES.get(key)
    if hit is None:
        qn, qp, binary = [], [], []
        for b in key[0]:
            lo, hi = qrange(b, signed)
            qn.append(float(lo))
            qp.append(float(hi))
            binary.append(bool(signed and b == 1))
        hit = _RANGES[key] = (tuple(qn), tuple(qp), tuple(binary))
    return hit


def _split_f64(value: float):
    """value as hi + lo fp32 kernel arguments (Triton passes Python floats as fp32): the kernels
    rebuild it in fp64 to ~2^-48 relative, so grad_scale is not rounded to fp32 first."""
    hi = float(np.float32(value))
    return hi, float(np.float32(value - hi))


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill one block of memory in some dim order (what
    ATen's is_non_overlapping_and_dense tests; size-1 dims do not matter)."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _dense(x: torch.Tensor) -> torch.Tensor:
    # Elementwise kernels walk memory order. Dense layouts are kept (channels_last stays
    # channels_last); anything else is copied once into the layout empty_like gives it.
    return x if is_dense(x) else torch.empty_like(x).copy_(x)


def _in_layout_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # t (like's shape) with exactly like's strides, so both walk memory in the same order.
    if t.stride() == like.stride() and is_dense(t):
        return t
    return torch.empty_like(like).copy_(t)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor's elements in memory order, as a 1-D view (no copy)."""
    return t.as_strided((t.numel(),), (1,))


def _tiles(n: int, block: int) -> int:
    return triton.cdiv(n, block)


def coupled_quant(x, steps, bits, sel, signed=True, grad_scale=1.0, *, block=BLOCK):
    """y = fake-quantized x at bits[sel], step steps[sel] (sel read in the kernel)."""
    op = "coupled_quant"
    check_x(op, x)
    check_steps(op, x, steps, bits)
    check_sel(op, x, sel)
    qn, qp, binary = candidate_ranges(bits, signed)
    xd = _dense(x)
    y = torch.empty_like(xd)
    n = xd.numel()
    if n:
        _forward_kernel[(_tiles(n, block),)](
            _flat(xd), _flat(y), steps, steps.stride(0), sel, n, QN=qn, QP=qp, BIN=binary,
            K=len(bits), ANY_BINARY=any(binary), BLOCK=block, **_LAUNCH)
    return y


def coupled_quant_backward(grad_y, x, steps, bits, sel, signed, grad_scale, *, block=BLOCK):
    """(dx, d steps): dx = dy inside the range of bits[sel]; slot sel of d steps holds
    grad_scale * sum(dy * h), the other slots 0."""
    op = "coupled_quant_backward"
    check_x(op, x)
    check_steps(op, x, steps, bits)
    check_sel(op, x, sel)
    check_grad(op, grad_y, x, x.shape)
    check_grad_scale(op, grad_scale)
    qn, qp, binary = candidate_ranges(bits, signed)
    xd = _dense(x)
    gd = _in_layout_of(grad_y, xd)
    grad_x = torch.empty_like(xd)
    grad_steps = torch.empty(len(bits), dtype=torch.float32, device=x.device)
    n = xd.numel()
    tiles = _tiles(n, block)
    partials = torch.empty(max(tiles, 1), dtype=torch.float32, device=x.device)
    if n:
        _backward_kernel[(tiles,)](
            _flat(gd), _flat(xd), _flat(grad_x), partials, steps, steps.stride(0), sel, n,
            QN=qn, QP=qp, BIN=binary, K=len(bits), ANY_BINARY=any(binary), BLOCK=block,
            **_LAUNCH)
    hi, lo = _split_f64(grad_scale)
    _selected_step_grad_kernel[(1,)](partials, tiles, grad_steps, steps, steps.stride(0), sel,
                                     hi, lo, K=len(bits), RBLOCK=RBLOCK, **_FINISH)
    return grad_x, grad_steps


def coupled_quant_multi(x, steps, bits, signed=True, grad_scale=1.0, *, block=BLOCK):
    """[K, *x.shape]: every candidate's fake-quantized x from one read of x."""
    op = "coupled_quant_multi"
    check_x(op, x)
    check_steps(op, x, steps, bits)
    qn, qp, binary = candidate_ranges(bits, signed)
    xc = x.contiguous()
    y = torch.empty((len(bits), *x.shape), dtype=x.dtype, device=x.device)
    n = xc.numel()
    if n:
        _multi_forward_kernel[(_tiles(n, block),)](
            xc, y, steps, steps.stride(0), n, QN=qn, QP=qp, BIN=binary, K=len(bits),
            BLOCK=block, **_LAUNCH)
    return y


def coupled_quant_multi_backward(grad_y, x, steps, bits, signed, grad_scale, *, block=BLOCK):
    """(dx, d steps): dx sums the K planes' in-range gradients in fp32 in candidate order; every
    d steps[j] = grad_scale * sum(dy_j * h_j)."""
    op = "coupled_quant_multi_backward"
    check_x(op, x)
    check_steps(op, x, steps, bits)
    check_grad(op, grad_y, x, (len(bits), *x.shape))
    check_grad_scale(op, grad_scale)
    qn, qp, binary = candidate_ranges(bits, signed)
    xc = x.contiguous()
    gc = grad_y.contiguous()
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    grad_steps = torch.empty(len(bits), dtype=torch.float32, device=x.device)
    n = xc.numel()
    tiles = _tiles(n, block)
    partials = torch.empty((len(bits), max(tiles, 1)), dtype=torch.float32, device=x.device)
    if n:
        _multi_backward_kernel[(tiles,)](
            gc, xc, grad_x, partials, tiles, steps, steps.stride(0), n, QN=qn, QP=qp,
            BIN=binary, K=len(bits), BLOCK=block, **_LAUNCH)
    hi, lo = _split_f64(grad_scale)
    _step_grads_kernel[(len(bits),)](partials, tiles, grad_steps, steps, steps.stride(0), hi, lo,
                                     RBLOCK=RBLOCK, **_FINISH)
    return grad_x, grad_steps


def quant_stats(x, steps, bits, signed=True, delta=0.125, *, block=BLOCK):
    """(mse[K], share[K]): MSE of each candidate's stored output and the exact share of values
    inside its range within delta of a rounding boundary (signed 1-bit: |v| < delta)."""
    op = "quant_stats"
    check_x(op, x)
    check_steps(op, x, steps, bits)
    check_delta(op, delta)
    qn, qp, binary = candidate_ranges(bits, signed)
    xd = _dense(x)  # a reduction over all of x: memory order is as good as any
    k = len(bits)
    mse = torch.empty(k, dtype=torch.float32, device=x.device)
    share = torch.empty(k, dtype=torch.float32, device=x.device)
    n = xd.numel()
    tiles = _tiles(n, block)
    sq = torch.empty((k, max(tiles, 1)), dtype=torch.float32, device=x.device)
    counts = torch.empty((k, max(tiles, 1)), dtype=torch.int32, device=x.device)
    if n:
        # thresholds rounded once to fp32, as the reference and the C++ kernels do
        _stats_kernel[(tiles,)](
            _flat(xd), sq, counts, tiles, steps, steps.stride(0), n,
            float(np.float32(0.5 - delta)), float(np.float32(delta)), QN=qn, QP=qp, BIN=binary,
            K=k, ROUND_TRIP=x.dtype != torch.float32, BLOCK=block, **_LAUNCH)
    _stats_finish_kernel[(k,)](sq, counts, tiles, n, mse, share, steps, steps.stride(0),
                               RBLOCK=RBLOCK, **_FINISH)
    return mse, share


def quantize_codes(x, step, bits, signed=True, *, block=BLOCK):
    """Integer codes of x at one bit-width: int8 when signed, uint8 otherwise; NaN -> 0."""
    op = "quantize_codes"
    check_x(op, x)
    check_bit(op, "bits", bits)
    check_step(op, x, step)
    (qn,), (qp,), (binary,) = candidate_ranges([bits], signed)
    xd = _dense(x)
    codes = torch.empty_like(xd, dtype=torch.int8 if signed else torch.uint8)
    n = xd.numel()
    if n:
        # a 1-element step of any shape: its single element is at data_ptr
        _codes_kernel[(_tiles(n, block),)](
            _flat(xd), _flat(codes), step, n, QN=qn, QP=qp, BINARY=binary, BLOCK=block,
            **_LAUNCH)
    return codes
