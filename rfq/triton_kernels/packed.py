"""Triton kernels of the packed-weight family (../shared/spec/kernels.md §3): packed_linear,
dequantize_weight and unpack_weight, reading the canonical layout of csrc/packed_layout.h as is.

Layout (per row of N; rows are row_stride bytes apart): 128-element K-blocks of PART bytes each,
PART = 128 * CB / 8 for a CB-bit container. Byte j of a block holds elements j + i * PART for
i < 8 / CB at bit offset i * CB (4-bit: j and j + 64; 2-bit: j, j + 32, j + 64, j + 96; int8:
element j). So one load of a block's bytes [BLOCK_N, PART] plus a shift and mask gives each
"part" of PART consecutive codes, and the activations need no shuffle. Stored codes are
offset-binary u = q + OFFSET (2 for 2-bit, 8 for 4-bit; int8 stores q).

Weights: group_size 0 is the per-tensor LSQ format, w = q * s; group_size g in {32, 64, 128}
has scales (and optional zeros, in offset-binary units) [N, ceil(K/g)], w = (u - z) * scale.
Kernels work on "sub-blocks" of SUB = min(PART, g) consecutive codes, so each sub-block has one
scale (and zero) per row.

Two kernels, both with fp32 accumulation, output in x's dtype:
- GEMV / split-K (M <= GEMV_MAX_M): one program per (BLOCK_N rows, one row of x, one K-split);
  weights are dequantized in registers exactly as the reference does (fp32 (u - z) * scale) and
  multiplied elementwise; the packed weight is read once per row of x. Split-K partials go to
  an fp32 buffer summed in a fixed order by a second small kernel (deterministic, no atomics).
- Tiled GEMM (tl.dot) for larger M: integer codes q are exact in fp16/bf16, so the dot runs on
  x's dtype (tensor cores) with codes, and each sub-block's scale multiplies the fp32 partial
  product; zeros enter as - (z - OFFSET) * sum(x over the sub-block). fp32 x uses an IEEE fp32
  dot (input_precision="ieee"), never TF32.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from rfq.triton_kernels import _interpreter_compat
from rfq.ops.layout import BLOCK_K, code_offset, container_bits, is_binary, qrange
from rfq.reference import codes_float
from rfq.triton_kernels.checks import (check_input_quant, check_linear, check_packed,
                                       check_scales, fail)
from rfq.triton_kernels.lsq import FLT_MAX, _binary_code, _code

_FLT_MAX = 3.4028234663852886e38

_interpreter_compat.apply()

# Up to this many rows of x the GEMV kernel runs (one weight pass per row); above, the tiled GEMM.
# Not tuned on a GPU yet; RFQ_TRITON_GEMV_MAX_M moves it.
GEMV_MAX_M = int(os.environ.get("RFQ_TRITON_GEMV_MAX_M", "4"))
GEMV_BLOCK_N = 32
GEMV_WARPS = 4
GEMM_STAGES = 3
GEMM_BLOCK_N = 64
GEMM_KSTEP = 32  # dot depth (fp16/bf16): 64 spilled registers on sm_90 (ptxas -v)
GEMM_GROUP_M = 8  # program swizzle: GROUP_M row tiles share weight tiles in L2
FINISH_BLOCK_N = 256


# ---- device helpers -----------------------------------------------------------------------------


@triton.jit
def _codes(byte, i: tl.constexpr, CB: tl.constexpr, OFFSET: tl.constexpr):
    # Signed codes q (int32) of part i from a block's bytes (uint8 -> int32 already).
    if CB == 8:
        return tl.where(byte >= 128, byte - 256, byte)  # int8 stores q two's complement
    else:
        return ((byte >> (i * CB)) & ((1 << CB) - 1)) - OFFSET


@triton.jit
def _input_step(xs_ptr):
    # The fused input quantizer's step, NaN when unusable (!(s > 0), inf, NaN): the GPU convention
    s = tl.load(xs_ptr).to(tl.float32)
    return tl.where((s > 0.0) & (s <= FLT_MAX), s, float("nan"))


@triton.jit
def _input_codes(xv, x_step, valid, QN: tl.constexpr, QP: tl.constexpr, BINARY: tl.constexpr):
    # LSQ codes of x (exact fp32 integers); lanes past K stay 0 (binary codes would make them +1)
    v = tl.div_rn(xv, x_step)
    if BINARY:
        k = _binary_code(v)
    else:
        k = _code(v, QN, QP)
    return tl.where(valid, k, 0.0)


@triton.jit
def _group_values(ptr, stride_n, stride_g, rows, row_mask, k0, K, GROUP: tl.constexpr):
    # One scale (or zero) per row for the group holding element k0, as fp32 [BLOCK_N]. Sub-blocks
    # past K (the layout's padding) have no group column: masked, they read 0 instead of past the
    # tensor's end. The scalar k0 < K selects the i1 block mask rather than entering `&`: Triton's
    # interpreter broadcasts a scalar comparison into an int32 array, so row_mask & (k0 < K) was
    # an int32 mask there, which Triton 3.9's interpreted loads reject (3.6 took it). Compiled,
    # both forms lower to the same and.pred.
    mask = tl.where(k0 < K, row_mask, False)
    return tl.load(ptr + rows * stride_n + (k0 // GROUP) * stride_g, mask=mask,
                   other=0.0).to(tl.float32)


# ---- GEMV / split-K -----------------------------------------------------------------------------


@triton.jit
def _gemv_kernel(x_ptr, stride_xm, stride_xk, w_ptr, stride_wn, s_ptr, stride_sn, stride_sg,
                 z_ptr, stride_zn, stride_zg, bias_ptr, stride_b, out_ptr, stride_os, stride_om,
                 xs_ptr, N, K, blocks_per_split,
                 CB: tl.constexpr, OFFSET: tl.constexpr, GROUP: tl.constexpr,
                 HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, FINAL: tl.constexpr,
                 QUANT_X: tl.constexpr, XQN: tl.constexpr, XQP: tl.constexpr,
                 X_BINARY: tl.constexpr, BLOCK_N: tl.constexpr):
    PART: tl.constexpr = 128 * CB // 8
    PARTS: tl.constexpr = 8 // CB
    SUB: tl.constexpr = PART if (GROUP == 0 or GROUP >= PART) else GROUP
    pid_n = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn
    x_row = x_ptr + m * stride_xm
    cols = tl.arange(0, SUB)
    acc = tl.zeros([BLOCK_N, SUB], dtype=tl.float32)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(K, 128))
    if QUANT_X:  # the fused input quantizer: codes of x in registers, its step after the sums
        x_step = _input_step(xs_ptr)
    for b in range(first, last):
        for t in tl.static_range(PART // SUB):
            byte = tl.load(w_rows + (b * PART + t * SUB + cols)[None, :],
                           mask=row_mask[:, None], other=0).to(tl.int32)
            for i in tl.static_range(PARTS):
                k0 = b * 128 + i * PART + t * SUB  # first element of this sub-block
                ks = k0 + cols
                xv = tl.load(x_row + ks.to(tl.int64) * stride_xk, mask=ks < K,
                             other=0.0).to(tl.float32)
                if QUANT_X:
                    xv = _input_codes(xv, x_step, ks < K, XQN, XQP, X_BINARY)
                q = _codes(byte, i, CB, OFFSET)
                if GROUP == 0:
                    w = q.to(tl.float32)  # per-tensor: the step multiplies the row sums
                else:
                    scale = _group_values(s_ptr, stride_sn, stride_sg, rows, row_mask, k0, K,
                                          GROUP)
                    if HAS_ZEROS:
                        z = _group_values(z_ptr, stride_zn, stride_zg, rows, row_mask, k0, K,
                                          GROUP)
                        w = ((q + OFFSET).to(tl.float32) - z[:, None]) * scale[:, None]
                    else:
                        w = q.to(tl.float32) * scale[:, None]
                acc += w * xv[None, :]
    y = tl.sum(acc, axis=1)
    if GROUP == 0:
        y = y * tl.load(s_ptr).to(tl.float32)
    if QUANT_X:
        y = y * x_step
    if FINAL:  # no split: bias and the cast to x's dtype here
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows * stride_b, mask=row_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + m * stride_om + rows, y.to(out_ptr.dtype.element_ty), mask=row_mask)
    else:
        tl.store(out_ptr + split.to(tl.int64) * stride_os + m * stride_om + rows, y,
                 mask=row_mask)


@triton.jit
def _split_k_finish_kernel(part_ptr, stride_ps, stride_pm, bias_ptr, stride_b, y_ptr, stride_ym,
                           N, splits, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    # y[m, rows] = sum of the split partials in split order (+ bias), cast once.
    pid_n = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    y = tl.zeros([BLOCK_N], dtype=tl.float32)
    for s in range(0, splits):
        y += tl.load(part_ptr + s * stride_ps + m * stride_pm + rows, mask=row_mask, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows * stride_b, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + rows, y.to(y_ptr.dtype.element_ty), mask=row_mask)


# ---- tiled GEMM -------------------------------------------------------------------------------


@triton.jit
def _gemm_kernel(x_ptr, stride_xm, stride_xk, w_ptr, stride_wn, s_ptr, stride_sn, stride_sg,
                 z_ptr, stride_zn, stride_zg, xsum_ptr, stride_xsm, bias_ptr, stride_b, y_ptr,
                 stride_ym, xs_ptr, M, N, K,
                 CB: tl.constexpr, OFFSET: tl.constexpr, GROUP: tl.constexpr,
                 HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE_X: tl.constexpr,
                 DOT_IEEE: tl.constexpr,
                 KSTEP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUP_M: tl.constexpr):
    # KSTEP: depth of one dot, dividing both the part (PART codes share a bit offset) and the
    # group (one scale per row). xsum [M, K/KSTEP]: fp32 sums of x over each step (read only with
    # zeros), computed by the launcher, so the loop needs no register copy of the x tile.
    PART: tl.constexpr = 128 * CB // 8
    STEPS: tl.constexpr = 128 // KSTEP  # steps per 128-element K-block
    # swizzled program order: GROUP_M consecutive row tiles walk the same column tiles
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m

    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rows_m < M
    n_mask = rows_n < N
    x_rows = x_ptr + rows_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + rows_n.to(tl.int64)[:, None] * stride_wn
    cols = tl.arange(0, KSTEP)
    dot_dtype = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # One dot of depth KSTEP per step, in K order. The part index (the bit offset of these codes in
    # their bytes) is a runtime value, so the loop body stays small (no spills) and pipelines;
    # the bytes of a block are re-read once per part, from L1/L2.
    for step in range(0, tl.cdiv(K, 128) * STEPS):
        b = step // STEPS
        e0 = (step % STEPS) * KSTEP  # first element within the block
        k0 = b * 128 + e0
        byte = tl.load(w_rows + (b * PART + e0 % PART + cols)[None, :], mask=n_mask[:, None],
                       other=0).to(tl.int32)
        if CB == 8:
            q = tl.where(byte >= 128, byte - 256, byte)
        else:
            q = ((byte >> ((e0 // PART) * CB)) & ((1 << CB) - 1)) - OFFSET
        ks = k0 + cols
        xt = tl.load(x_rows + ks.to(tl.int64)[None, :] * stride_xk,
                     mask=m_mask[:, None] & (ks < K)[None, :], other=0.0)
        qt = tl.trans(q.to(dot_dtype))  # |q| <= 128: exact in fp16 and bf16
        if DOT_IEEE:
            part = tl.dot(xt, qt, input_precision="ieee")
        else:
            part = tl.dot(xt, qt)
        if GROUP == 0:
            acc += part
        else:
            scale = _group_values(s_ptr, stride_sn, stride_sg, rows_n, n_mask, k0, K, GROUP)
            if HAS_ZEROS:  # (u - z) s = (q - (z - OFFSET)) s
                z = _group_values(z_ptr, stride_zn, stride_zg, rows_n, n_mask, k0, K, GROUP)
                x_sum = tl.load(xsum_ptr + rows_m.to(tl.int64) * stride_xsm + step, mask=m_mask,
                                other=0.0)
                part -= x_sum[:, None] * (z - OFFSET)[None, :]
            acc += part * scale[None, :]
    if GROUP == 0:
        acc = acc * tl.load(s_ptr).to(tl.float32)
    if SCALE_X:  # x holds the fused input quantizer's codes (the launcher's stage): times its step
        acc = acc * _input_step(xs_ptr)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_n * stride_b, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows_m.to(tl.int64)[:, None] * stride_ym + rows_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# ---- dequantize / unpack ------------------------------------------------------------------------


@triton.jit
def _dequantize_kernel(w_ptr, stride_wn, s_ptr, stride_sn, stride_sg, z_ptr, stride_zn, stride_zg,
                       out_ptr, stride_on, N, K,
                       CB: tl.constexpr, OFFSET: tl.constexpr, GROUP: tl.constexpr,
                       HAS_ZEROS: tl.constexpr, CODES: tl.constexpr, BLOCK_N: tl.constexpr):
    # One program per (BLOCK_N rows, one 128-element K-block). CODES: int8 q; else fp32 weights
    # computed as the reference does (q * s per tensor, (u - z) * scale per group).
    PART: tl.constexpr = 128 * CB // 8
    PARTS: tl.constexpr = 8 // CB
    SUB: tl.constexpr = PART if (GROUP == 0 or GROUP >= PART) else GROUP
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tl.program_id(1)
    row_mask = rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn
    out_rows = out_ptr + rows.to(tl.int64)[:, None] * stride_on
    cols = tl.arange(0, SUB)
    for t in tl.static_range(PART // SUB):
        byte = tl.load(w_rows + (b * PART + t * SUB + cols)[None, :], mask=row_mask[:, None],
                       other=0).to(tl.int32)
        for i in tl.static_range(PARTS):
            k0 = b * 128 + i * PART + t * SUB
            ks = k0 + cols
            q = _codes(byte, i, CB, OFFSET)
            if CODES:
                value = q.to(tl.int8)
            elif GROUP == 0:
                value = q.to(tl.float32) * tl.load(s_ptr).to(tl.float32)
            else:
                scale = _group_values(s_ptr, stride_sn, stride_sg, rows, row_mask, k0, K, GROUP)
                if HAS_ZEROS:
                    z = _group_values(z_ptr, stride_zn, stride_zg, rows, row_mask, k0, K, GROUP)
                    value = ((q + OFFSET).to(tl.float32) - z[:, None]) * scale[:, None]
                else:
                    value = q.to(tl.float32) * scale[:, None]
            tl.store(out_rows + ks[None, :], value, mask=row_mask[:, None] & (ks < K)[None, :])


# ---- host side ----------------------------------------------------------------------------------

_SM_COUNT: dict = {}


def _group_args(scales, zeros, group_size):
    """(scales, stride_n, stride_g, zeros, stride_n, stride_g) kernel arguments; per-tensor
    scales are read at their single element, absent zeros point at the scales (never read)."""
    if group_size == 0:
        s = (scales, 0, 0)
    else:
        s = (scales, scales.stride(0), scales.stride(1))
    z = (zeros, zeros.stride(0), zeros.stride(1)) if zeros is not None else (scales, 0, 0)
    return (*s, *z)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter runs: small, but enough to exercise split-K
    index = device.index if device.index is not None else torch.cuda.current_device()
    count = _SM_COUNT.get(index)
    if count is None:
        count = _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return count


def split_k(m: int, n: int, k: int, device: torch.device, block_n: int = GEMV_BLOCK_N) -> int:
    """K-splits of the GEMV: enough programs for ~4 per SM, whole 128-blocks per split."""
    blocks = triton.cdiv(k, BLOCK_K)
    programs = triton.cdiv(n, block_n) * m
    want = max(1, min(blocks, triton.cdiv(4 * _sm_count(device), max(programs, 1))))
    per_split = triton.cdiv(blocks, want)
    return triton.cdiv(blocks, per_split) if blocks else 1


def packed_linear(x, packed, scales, zeros, bits, group_size, bias=None, x_step=None, x_bits=8,
                  x_signed=False, *, gemv_max_m=None, splits=None):
    """y = x @ dequant(W)^T (+ bias), fp32 accumulation, output in x's dtype; with ``x_step``, x
    passes the LSQ input quantizer first: y = x_step * (k @ W^T) + bias."""
    check_linear("packed_linear", x, packed, scales, zeros, bits, group_size, bias)
    check_input_quant("packed_linear", x, x_step, x_bits)
    k, n = x.shape[-1], packed.shape[0]
    out_shape = (*x.shape[:-1], n)
    m = math.prod(x.shape[:-1])
    x2d = x.reshape(m, k)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y.reshape(out_shape)
    if k == 0:  # an empty sum: y = bias (or 0)
        if bias is None:
            y.zero_()
        else:
            y.copy_(bias.expand(m, n))
        return y.reshape(out_shape)
    if packed.stride(1) != 1:
        packed = packed.contiguous()
    cb, offset = container_bits(bits), code_offset(bits)
    group = _group_args(scales, zeros, group_size)
    has_bias = bias is not None
    bias_args = (bias, bias.stride(0)) if has_bias else (scales, 0)
    limit = GEMV_MAX_M if gemv_max_m is None else gemv_max_m
    if m <= min(limit, 65535):  # rows of x are the GEMV grid's y dimension (CUDA: <= 65535)
        nsplit = splits if splits is not None else split_k(m, n, k, x.device)
        blocks = triton.cdiv(k, BLOCK_K)
        per_split = triton.cdiv(blocks, nsplit)
        nsplit = triton.cdiv(blocks, per_split)
        final = nsplit == 1
        out = y if final else torch.empty((nsplit, m, n), dtype=torch.float32, device=x.device)
        stride_os, stride_om = (0, y.stride(0)) if final else (out.stride(0), out.stride(1))
        grid = (triton.cdiv(n, GEMV_BLOCK_N), m, nsplit)
        xqn, xqp = qrange(x_bits, x_signed)
        _gemv_kernel[grid](
            x2d, x2d.stride(0), x2d.stride(1), packed, packed.stride(0), *group, *bias_args,
            out, stride_os, stride_om, scales if x_step is None else x_step, n, k, per_split,
            CB=cb, OFFSET=offset, GROUP=group_size, HAS_ZEROS=zeros is not None,
            HAS_BIAS=has_bias, FINAL=final, QUANT_X=x_step is not None, XQN=float(xqn),
            XQP=float(xqp), X_BINARY=is_binary(x_bits, x_signed), BLOCK_N=GEMV_BLOCK_N,
            num_warps=GEMV_WARPS)
        if not final:
            _split_k_finish_kernel[(triton.cdiv(n, FINISH_BLOCK_N), m)](
                out, out.stride(0), out.stride(1), *bias_args, y, y.stride(0), n, nsplit,
                HAS_BIAS=has_bias, BLOCK_N=FINISH_BLOCK_N, num_warps=4)
        return y.reshape(out_shape)
    block_m, block_n, kstep, warps, stages = gemm_config(m, x.dtype, cb, group_size)
    if x_step is not None:  # codes in x's dtype (|k| <= 255: exact in fp16 and bf16)
        x2d = input_codes(x2d, x_step, x_bits, x_signed).to(x.dtype)
    if zeros is not None:
        xsum = step_sums(x2d, kstep)
        xsum_args = (xsum, xsum.stride(0))
    else:
        xsum_args = (scales, 0)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _gemm_kernel[grid](
        x2d, x2d.stride(0), x2d.stride(1), packed, packed.stride(0), *group, *xsum_args,
        *bias_args, y, y.stride(0), scales if x_step is None else x_step, m, n, k, CB=cb,
        OFFSET=offset, GROUP=group_size, HAS_ZEROS=zeros is not None, HAS_BIAS=has_bias,
        SCALE_X=x_step is not None, DOT_IEEE=x.dtype == torch.float32,
        KSTEP=kstep, BLOCK_M=block_m, BLOCK_N=block_n, GROUP_M=GEMM_GROUP_M, num_warps=warps,
        num_stages=stages)
    return y.reshape(out_shape)


def gemm_config(m: int, dtype: torch.dtype, cb: int, group_size: int):
    """(BLOCK_M, BLOCK_N, KSTEP, num_warps, num_stages) of the tiled GEMM. fp16/bf16 run
    tensor-core dots (wgmma on sm_90); fp32 runs an FMA dot whose operands live in registers,
    hence its smaller tile and depth. Chosen so ptxas reports no spills for sm_90
    (compile_check); not yet timed on a GPU."""
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    if dtype == torch.float32:
        kstep = min(128 * cb // 8, group_size or 128, 16)
        return (32, 32, kstep, 4, 2) if block_m < 64 else (64, 64, kstep, 8, 2)
    kstep = min(128 * cb // 8, group_size or 128, GEMM_KSTEP)
    return block_m, GEMM_BLOCK_N, kstep, 8 if block_m == 64 else 4, GEMM_STAGES


def input_codes(x2d: torch.Tensor, x_step: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """fp32 codes of x at the input quantizer (the GEMM's stage; a bad step gives NaN codes)."""
    s = x_step.reshape(())
    s = torch.where((s > 0) & (s <= _FLT_MAX), s, float("nan"))
    return codes_float(x2d.float() / s, bits, signed)


def step_sums(x2d: torch.Tensor, kstep: int) -> torch.Tensor:
    """fp32 [M, K_padded / kstep] sums of x over the GEMM's K steps (the zeros' term)."""
    m, k = x2d.shape
    kp = triton.cdiv(k, BLOCK_K) * BLOCK_K
    padded = torch.nn.functional.pad(x2d.float(), (0, kp - k))
    return padded.view(m, kp // kstep, kstep).sum(-1)


def _decode(packed, scales, zeros, bits, group_size, k, codes):
    n = packed.shape[0]
    out = torch.empty((n, k), dtype=torch.int8 if codes else torch.float32, device=packed.device)
    if n == 0 or k == 0:
        return out
    if packed.stride(1) != 1:
        packed = packed.contiguous()
    cb = container_bits(bits)
    group = _group_args(scales, zeros, group_size) if scales is not None else (packed, 0, 0) * 2
    block_n = 16
    _dequantize_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, BLOCK_K))](
        packed, packed.stride(0), *group, out, out.stride(0), n, k, CB=cb,
        OFFSET=code_offset(bits), GROUP=group_size, HAS_ZEROS=zeros is not None, CODES=codes,
        BLOCK_N=block_n, num_warps=4)
    return out


def unpack_weight(packed, bits, shape):
    """int8 codes [N, K] of a packed weight (the exact inverse of pack_weight)."""
    op = "unpack_weight"
    n, k = shape
    check_packed(op, packed, k, bits)
    if packed.shape[0] != n:
        fail(op, f"packed has {packed.shape[0]} rows but shape asks for N={n}")
    return _decode(packed, None, None, bits, 0, k, codes=True)


def dequantize_weight(packed, scales, zeros, bits, group_size, k):
    """fp32 weights [N, K]: q * s (per-tensor) or (u - z) * scale per group, as the reference."""
    op = "dequantize_weight"
    check_packed(op, packed, k, bits)
    check_scales(op, packed, scales, zeros, k, group_size, packed.device)
    return _decode(packed, scales, zeros, bits, group_size, k, codes=False)
