"""The Python index of ``torch.ops.rfq``: fake kernels, autograd formulas and typed wrappers.

Schemas and kernels are C++ (csrc/registration.cpp, csrc/cpu, csrc/cuda); this module adds what
torch.compile and autograd need, in Python, as torchao and pytorch/extension-cpp do. Backwards are
themselves rfq ops, so compiled graphs stay fused. Method code calls these wrappers, never the
kernels' internals. Semantics: ../shared/spec/kernels.md §1-2; oracle: rfq/reference.py.

Conventions shared by the LSQ family:
    x      fp32 / bf16 / fp16 tensor of any shape and strides
    steps  fp32 [K] step sizes, one per candidate in ``bits`` (K <= 8), on x's device
    bits   candidate bit-widths, each in 1..8; signed 1-bit means binary codes {-1, +1}
    sel    0-dim int64 tensor on x's device selecting the candidate (read in-kernel: changing
           it with ``sel.fill_(j)`` neither syncs the host nor recompiles)
    signed True: range [-2^(b-1), 2^(b-1)-1] (weights); False: [0, 2^b-1] (activations)
"""

from __future__ import annotations

import contextlib
import os
from typing import Sequence

import torch
from torch import Tensor

from rfq import _C  # noqa: F401  (registers the schemas and kernels)

_ops = torch.ops.rfq

# ---- fake kernels (metadata only; must match the layouts the C++ kernels produce) -----------
# They are also the Meta kernels: a call mixing a meta tensor with real ones dispatches here, so
# they check devices like the C++ wrappers do instead of returning uninitialized memory.


def _check_devices(op: str, x: Tensor, **others: Tensor) -> None:
    for name, t in others.items():
        if t.device != x.device:
            raise RuntimeError(f"rfq.{op}: {name} must be on x's device ({x.device}), got {t.device}")


@torch.library.register_fake("rfq::coupled_quant")
def _coupled_quant_fake(x, steps, bits, sel, signed=True, grad_scale=1.0):
    _check_devices("coupled_quant", x, steps=steps, sel=sel)
    return torch.empty_like(x)


@torch.library.register_fake("rfq::coupled_quant_backward")
def _coupled_quant_backward_fake(grad_y, x, steps, bits, sel, signed, grad_scale):
    _check_devices("coupled_quant_backward", x, steps=steps, sel=sel, grad_y=grad_y)
    return torch.empty_like(x), steps.new_empty(steps.shape)


@torch.library.register_fake("rfq::coupled_quant_multi")
def _coupled_quant_multi_fake(x, steps, bits, signed=True, grad_scale=1.0):
    _check_devices("coupled_quant_multi", x, steps=steps)
    return x.new_empty((steps.shape[0], *x.shape))


@torch.library.register_fake("rfq::coupled_quant_multi_backward")
def _coupled_quant_multi_backward_fake(grad_y, x, steps, bits, signed, grad_scale):
    _check_devices("coupled_quant_multi_backward", x, steps=steps, grad_y=grad_y)
    return x.new_empty(x.shape), steps.new_empty(steps.shape)


@torch.library.register_fake("rfq::quant_stats")
def _quant_stats_fake(x, steps, bits, signed=True, delta=0.125):
    _check_devices("quant_stats", x, steps=steps)
    return steps.new_empty(steps.shape), steps.new_empty(steps.shape)


@torch.library.register_fake("rfq::quantize_codes")
def _quantize_codes_fake(x, step, bits, signed=True):
    _check_devices("quantize_codes", x, step=step)
    return torch.empty_like(x, dtype=torch.int8 if signed else torch.uint8)


def packed_row_bytes(k: int, bits: int) -> int:
    """Bytes per packed row (csrc/packed_layout.h): K padded to 128-element blocks of 32, 64 or
    128 bytes (2-bit, 4-bit, int8 container), the row padded to 64 bytes."""
    container = 2 if bits <= 2 else (4 if bits <= 4 else 8)
    raw = -(-k // 128) * 128 * container // 8
    return -(-raw // 64) * 64


@torch.library.register_fake("rfq::pack_weight")
def _pack_weight_fake(codes, bits):
    return codes.new_empty((codes.shape[0], packed_row_bytes(codes.shape[1], bits)),
                           dtype=torch.uint8)


@torch.library.register_fake("rfq::unpack_weight")
def _unpack_weight_fake(packed, bits, shape):
    return packed.new_empty(shape, dtype=torch.int8)


@torch.library.register_fake("rfq::packed_linear")
def _packed_linear_fake(x, packed, scales, zeros, bits, group_size, bias=None):
    others = dict(packed=packed, scales=scales)
    if zeros is not None:
        others["zeros"] = zeros
    if bias is not None:
        others["bias"] = bias
    _check_devices("packed_linear", x, **others)
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


# ---- autograd -------------------------------------------------------------------------------
# Only x and the small step/sel tensors are saved: no activation-sized intermediate.


def _coupled_quant_setup(ctx, inputs, output):
    x, steps, bits, sel, signed, grad_scale = inputs
    ctx.save_for_backward(x, steps, sel)
    ctx.bits, ctx.signed, ctx.grad_scale = bits, signed, grad_scale


def _coupled_quant_backward(ctx, grad_y):
    x, steps, sel = ctx.saved_tensors
    grad_x, grad_steps = _ops.coupled_quant_backward.default(
        grad_y, x, steps, ctx.bits, sel, ctx.signed, ctx.grad_scale
    )
    return grad_x, grad_steps, None, None, None, None


def _coupled_quant_multi_setup(ctx, inputs, output):
    x, steps, bits, signed, grad_scale = inputs
    ctx.save_for_backward(x, steps)
    ctx.bits, ctx.signed, ctx.grad_scale = bits, signed, grad_scale


def _coupled_quant_multi_backward(ctx, grad_y):
    x, steps = ctx.saved_tensors
    grad_x, grad_steps = _ops.coupled_quant_multi_backward.default(
        grad_y, x, steps, ctx.bits, ctx.signed, ctx.grad_scale
    )
    return grad_x, grad_steps, None, None, None


torch.library.register_autograd(
    "rfq::coupled_quant", _coupled_quant_backward, setup_context=_coupled_quant_setup
)
torch.library.register_autograd(
    "rfq::coupled_quant_multi",
    _coupled_quant_multi_backward,
    setup_context=_coupled_quant_multi_setup,
)
# quant_stats, quantize_codes, pack_weight, unpack_weight: non-differentiable (C++ fallthrough).


def _packed_linear_setup(ctx, inputs, output):
    x, packed, scales, zeros, bits, group_size, bias = inputs
    ctx.save_for_backward(packed, scales, zeros)
    ctx.bits, ctx.group_size, ctx.x_shape, ctx.x_dtype = bits, group_size, x.shape, x.dtype


def _packed_linear_backward(ctx, grad_y):
    # The packed weight is frozen (deployment); only x gets a gradient: dx = dy @ dequant(W).
    packed, scales, zeros = ctx.saved_tensors
    w = dequantize_weight(packed, scales, ctx.bits, (packed.shape[0], ctx.x_shape[-1]),
                          ctx.group_size, zeros)
    grad_x = (grad_y.float() @ w).to(ctx.x_dtype)
    return grad_x, None, None, None, None, None, None


torch.library.register_autograd(
    "rfq::packed_linear", _packed_linear_backward, setup_context=_packed_linear_setup
)

# ---- GPU backend switch -------------------------------------------------------------------------
# CUDA tensors go to the C++/CUDA kernels (torch.ops.rfq, "cuda") or to the Triton kernels
# (torch.ops.rfq_triton, "triton"), chosen per op family: "lsq" (coupled_quant, coupled_quant_multi,
# quant_stats, quantize_codes) and "packed" (packed_linear). CPU tensors always take the C++ ops.
# The default stays "cuda" until GPU measurements show Triton faster; RFQ_GPU_BACKEND sets it at
# import ("triton", or per family: "lsq=triton,packed=cuda"). A wrapper pays one global bool test
# on the default path; torch.compile guards on it, so switching recompiles instead of going stale.

GPU_BACKENDS = ("cuda", "triton")
GPU_FAMILIES = ("lsq", "packed")
_triton_lsq = False
_triton_packed = False


def _triton_ops():
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        raise RuntimeError("rfq.ops.set_gpu_backend: the triton backend needs the triton package "
                           "(pip install triton), which is not installed")
    from rfq import triton_ops  # registers torch.ops.rfq_triton.*

    return triton_ops


def set_gpu_backend(backend: str, family: str | None = None) -> None:
    """Routes CUDA tensors of one op family ("lsq" or "packed"; None: both) to the C++/CUDA
    kernels ("cuda", the default) or the Triton kernels ("triton")."""
    global _triton_lsq, _triton_packed
    if backend not in GPU_BACKENDS:
        raise ValueError(f"rfq.ops.set_gpu_backend: backend must be one of {GPU_BACKENDS}, "
                         f"got {backend!r}")
    if family is not None and family not in GPU_FAMILIES:
        raise ValueError(f"rfq.ops.set_gpu_backend: family must be one of {GPU_FAMILIES} or None, "
                         f"got {family!r}")
    if backend == "triton":
        _triton_ops()
    use_triton = backend == "triton"
    if family in (None, "lsq"):
        _triton_lsq = use_triton
    if family in (None, "packed"):
        _triton_packed = use_triton


def get_gpu_backend(family: str) -> str:
    """The backend CUDA tensors of ``family`` ("lsq" or "packed") go to."""
    if family not in GPU_FAMILIES:
        raise ValueError(f"rfq.ops.get_gpu_backend: family must be one of {GPU_FAMILIES}, "
                         f"got {family!r}")
    return "triton" if (_triton_lsq if family == "lsq" else _triton_packed) else "cuda"


@contextlib.contextmanager
def gpu_backend(backend: str, family: str | None = None):
    """``with rfq.ops.gpu_backend("triton"):`` set_gpu_backend for the block, then restore the
    previous choice of every family (also when the block raises)."""
    saved = {f: get_gpu_backend(f) for f in GPU_FAMILIES}
    set_gpu_backend(backend, family)
    try:
        yield
    finally:
        for f, b in saved.items():
            set_gpu_backend(b, f)


def _backend_from_env(value: str) -> None:
    """RFQ_GPU_BACKEND: "cuda", "triton", or comma-separated family=backend pairs."""
    for item in (v.strip() for v in value.split(",")):
        if not item:
            continue
        family, _, backend = item.rpartition("=")
        try:
            set_gpu_backend(backend.strip(), family.strip() or None)
        except (ValueError, RuntimeError) as err:
            raise RuntimeError(f"RFQ_GPU_BACKEND={value!r}: {err}") from None


if os.environ.get("RFQ_GPU_BACKEND"):
    _backend_from_env(os.environ["RFQ_GPU_BACKEND"])

# ---- typed wrappers -------------------------------------------------------------------------


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
    if _triton_lsq and x.is_cuda:
        return torch.ops.rfq_triton.coupled_quant.default(x, steps, list(bits), sel, signed,
                                                          grad_scale)
    return _ops.coupled_quant.default(x, steps, list(bits), sel, signed, grad_scale)


def coupled_quant_multi(
    x: Tensor,
    steps: Tensor,
    bits: Sequence[int],
    signed: bool = True,
    grad_scale: float = 1.0,
) -> Tensor:
    """All K fake-quantized versions of ``x``, stacked as [K, *x.shape], from one read of x."""
    if _triton_lsq and x.is_cuda:
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
    if _triton_lsq and x.is_cuda:
        return torch.ops.rfq_triton.quant_stats.default(x, steps, list(bits), signed, delta)
    return _ops.quant_stats.default(x, steps, list(bits), signed, delta)


def quantize_codes(x: Tensor, step: Tensor, bits: int, signed: bool = True) -> Tensor:
    """Integer codes of ``x`` at ``bits`` with one fp32 ``step``: int8 when ``signed``, uint8
    otherwise (unsigned 8-bit codes reach 255). NaN maps to code 0."""
    if _triton_lsq and x.is_cuda:
        return torch.ops.rfq_triton.quantize_codes.default(x, step, bits, signed)
    return _ops.quantize_codes.default(x, step, bits, signed)


def pack_weight(codes: Tensor, bits: int) -> Tensor:
    """Signed int8 codes [N, K] (e.g. ``quantize_codes`` of a weight, convs flattened to
    [C_out, C_in*kh*kw]) -> uint8 [N, packed_row_bytes(K, bits)] in the packed layout."""
    return _ops.pack_weight.default(codes, bits)


def unpack_weight(packed: Tensor, bits: int, shape: Sequence[int]) -> Tensor:
    """Exact inverse of ``pack_weight``: int8 codes of shape [N, K]."""
    return _ops.unpack_weight.default(packed, bits, list(shape))


def _container_offset(bits: int) -> int:
    return 2 if bits <= 2 else (8 if bits <= 4 else 0)


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
    u = q + _container_offset(bits)
    return (u - zeros.float().repeat_interleave(group_size, dim=1)[:, :k]) * scale


def packed_linear(
    x: Tensor,
    packed: Tensor,
    scales: Tensor,
    bits: int,
    group_size: int = 0,
    zeros: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """y = x @ dequant(W)^T (+ bias) from packed weights, without materializing W for small M.

    group_size 0: per-tensor LSQ step (``scales`` holds one value, no zeros); 32/64/128: scales
    (and optional zeros, in offset-binary units) of shape [N, ceil(K/group_size)]. x: [..., K]
    fp32/bf16/fp16; output [..., N] in x's dtype, fp32 accumulation. Differentiable in x only.
    """
    if _triton_packed and x.is_cuda:
        return torch.ops.rfq_triton.packed_linear.default(x, packed, scales, zeros, bits,
                                                          group_size, bias)
    return _ops.packed_linear.default(x, packed, scales, zeros, bits, group_size, bias)


# Below this many output positions a packed conv runs as unfold + packed_linear (the weight is
# read packed); above it the packed kernel would dequantize anyway, so dequantize once and let
# oneDNN's direct convolution run.
_CONV_PACKED_MAX_M = 32


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
) -> Tensor:
    """conv2d with a packed weight of logical shape ``weight_shape`` = (C_out, C_in/groups, kh,
    kw), packed as [C_out, C_in/groups*kh*kw]. Same arguments as ``F.conv2d`` otherwise."""
    import torch.nn.functional as F

    c_out, c_in_g, kh, kw = weight_shape
    if x.dim() != 4 or x.shape[1] != c_in_g * groups:
        raise ValueError(f"rfq.packed_conv2d: x must be [B, {c_in_g * groups}, H, W], "
                         f"got {tuple(x.shape)}")
    pair = torch.nn.modules.utils._pair
    stride, padding, dilation = pair(stride), pair(padding), pair(dilation)
    b, _, h, w = x.shape
    h_out = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if groups == 1 and b * h_out * w_out < _CONV_PACKED_MAX_M:
        cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
        y = packed_linear(cols.transpose(1, 2), packed, scales, bits, group_size, zeros, bias)
        return y.transpose(1, 2).reshape(b, c_out, h_out, w_out)
    weight = dequantize_weight(packed, scales, bits, (c_out, c_in_g * kh * kw), group_size, zeros)
    return F.conv2d(x, weight.reshape(weight_shape).to(x.dtype), bias, stride, padding, dilation,
                    groups)


def cpu_capability() -> str:
    """The ISA level whose CPU kernels run here (ATEN_CPU_CAPABILITY can lower it)."""
    return torch.backends.cpu.get_cpu_capability()


__all__ = [
    "set_gpu_backend",
    "get_gpu_backend",
    "gpu_backend",
    "pack_weight",
    "unpack_weight",
    "dequantize_weight",
    "packed_linear",
    "packed_conv2d",
    "packed_row_bytes",
    "coupled_quant",
    "coupled_quant_multi",
    "quant_stats",
    "quantize_codes",
    "cpu_capability",
]
