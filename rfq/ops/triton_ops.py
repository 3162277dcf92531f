"""``torch.ops.rfq_triton.*``: the Triton kernels (rfq.triton_kernels) as PyTorch custom ops.

Each op is a ``torch.library.custom_op`` whose CUDA implementation is a Triton launcher, plus a
CPU kernel built on rfq/reference.py, a fake kernel and (for the differentiable ops) an autograd
formula made of rfq_triton ops, so ``opcheck`` and ``torch.compile(fullgraph=True)`` work on
CPU as on GPU (spec §7). The CPU kernels exist for those checks: ``rfq.ops`` always sends CPU
tensors to the C++ ops and CUDA tensors here only when ``rfq.ops.set_gpu_backend("triton")``
selects it.

Importing this module registers the ops and does not import triton: the launchers are imported
on the first CUDA call. Semantics are the C++ ops' (spec §1-3), with the GPU convention for
values the host never reads: a bad step (!(s > 0) or not finite) or an out-of-range ``sel``
gives NaN in y, dx and the step gradient, NaN mse/share, code 0. The CPU kernels follow the same
convention, so an op means the same on every device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rfq import reference as ref
from rfq.ops.ste import input_range_mask
from rfq.triton_kernels import checks

_NAN = float("nan")
_FLT_MAX = 3.4028234663852886e38
_PT2 = (torch.Tag.pt2_compliant_tag,)


def _lsq():
    from rfq.triton_kernels import lsq  # triton is imported here, on the first CUDA call

    return lsq


def _packed():
    from rfq.triton_kernels import packed

    return packed


def _step_ok(s: Tensor) -> Tensor:
    return (s > 0) & (s <= _FLT_MAX)


def _selected_ok(steps: Tensor, sel: Tensor) -> tuple[int, bool]:
    """CPU only (values are free to read there): sel as an int and whether it and its step are
    usable."""
    j = int(sel.reshape(()))
    if not 0 <= j < steps.numel():
        return j, False
    return j, bool(_step_ok(steps[j]))


def _like(x: Tensor, value: Tensor) -> Tensor:
    """value (x's shape) in the layout the fake and CUDA kernels give: empty_like(x)."""
    out = torch.empty_like(x, dtype=value.dtype)
    out.copy_(value)
    return out


# ---- coupled_quant -----------------------------------------------------------------------------


@torch.library.custom_op(
    "rfq_triton::coupled_quant", mutates_args=(), device_types="cuda", tags=_PT2,
    schema="(Tensor x, Tensor steps, int[] bits, Tensor sel, bool signed=True, "
           "float grad_scale=1.0) -> Tensor")
def coupled_quant(x, steps, bits, sel, signed=True, grad_scale=1.0):
    return _lsq().coupled_quant(x, steps, bits, sel, signed, grad_scale)


@coupled_quant.register_kernel("cpu")
def _coupled_quant_cpu(x, steps, bits, sel, signed=True, grad_scale=1.0):
    op = "coupled_quant"
    checks.check_x(op, x)
    checks.check_steps(op, x, steps, bits)
    checks.check_sel(op, x, sel)
    _, ok = _selected_ok(steps, sel)
    if not ok:
        return torch.full_like(x, _NAN)
    return _like(x, ref.coupled_quant(x, steps, bits, sel.reshape(()), signed))


@coupled_quant.register_fake
def _coupled_quant_fake(x, steps, bits, sel, signed=True, grad_scale=1.0):
    return torch.empty_like(x)


@torch.library.custom_op(
    "rfq_triton::coupled_quant_backward", mutates_args=(), device_types="cuda", tags=_PT2,
    schema="(Tensor grad_y, Tensor x, Tensor steps, int[] bits, Tensor sel, bool signed, "
           "float grad_scale) -> (Tensor, Tensor)")
def coupled_quant_backward(grad_y, x, steps, bits, sel, signed, grad_scale):
    return _lsq().coupled_quant_backward(grad_y, x, steps, bits, sel, signed, grad_scale)


@coupled_quant_backward.register_kernel("cpu")
def _coupled_quant_backward_cpu(grad_y, x, steps, bits, sel, signed, grad_scale):
    op = "coupled_quant_backward"
    checks.check_x(op, x)
    checks.check_steps(op, x, steps, bits)
    checks.check_sel(op, x, sel)
    checks.check_grad(op, grad_y, x, x.shape)
    checks.check_grad_scale(op, grad_scale)
    j, ok = _selected_ok(steps, sel)
    if not 0 <= j < steps.numel():
        return torch.full_like(x, _NAN), torch.full_like(steps, _NAN)
    grad_x, grad_steps = ref.coupled_quant_backward(grad_y, x, steps, bits, sel.reshape(()),
                                                    signed, grad_scale)
    if not ok:  # a bad selected step: NaN dx and NaN in its slot
        grad_x = torch.full_like(grad_x, _NAN)
        grad_steps[j] = _NAN
    return _like(x, grad_x), grad_steps.contiguous()


@coupled_quant_backward.register_fake
def _coupled_quant_backward_fake(grad_y, x, steps, bits, sel, signed, grad_scale):
    return torch.empty_like(x), steps.new_empty(steps.shape)


def _coupled_quant_setup(ctx, inputs, output):
    x, steps, bits, sel, signed, grad_scale = inputs
    ctx.save_for_backward(x, steps, sel)
    ctx.bits, ctx.signed, ctx.grad_scale = bits, signed, grad_scale


def _coupled_quant_grad(ctx, grad_y):
    x, steps, sel = ctx.saved_tensors
    grad_x, grad_steps = coupled_quant_backward(grad_y, x, steps, ctx.bits, sel, ctx.signed,
                                                ctx.grad_scale)
    return grad_x, grad_steps, None, None, None, None


coupled_quant.register_autograd(_coupled_quant_grad, setup_context=_coupled_quant_setup)


# ---- coupled_quant_multi -------------------------------------------------------------------------


@torch.library.custom_op(
    "rfq_triton::coupled_quant_multi", mutates_args=(), device_types="cuda", tags=_PT2,
    schema="(Tensor x, Tensor steps, int[] bits, bool signed=True, float grad_scale=1.0) "
           "-> Tensor")
def coupled_quant_multi(x, steps, bits, signed=True, grad_scale=1.0):
    return _lsq().coupled_quant_multi(x, steps, bits, signed, grad_scale)


@coupled_quant_multi.register_kernel("cpu")
def _coupled_quant_multi_cpu(x, steps, bits, signed=True, grad_scale=1.0):
    op = "coupled_quant_multi"
    checks.check_x(op, x)
    checks.check_steps(op, x, steps, bits)
    y = ref.coupled_quant_multi(x, steps, bits, signed).contiguous()
    return torch.where(_step_ok(steps).reshape(-1, *([1] * x.dim())), y, _NAN).contiguous()


@coupled_quant_multi.register_fake
def _coupled_quant_multi_fake(x, steps, bits, signed=True, grad_scale=1.0):
    return x.new_empty((steps.shape[0], *x.shape))


@torch.library.custom_op(
    "rfq_triton::coupled_quant_multi_backward", mutates_args=(), device_types="cuda", tags=_PT2,
    schema="(Tensor grad_y, Tensor x, Tensor steps, int[] bits, bool signed, float grad_scale) "
           "-> (Tensor, Tensor)")
def coupled_quant_multi_backward(grad_y, x, steps, bits, signed, grad_scale):
    return _lsq().coupled_quant_multi_backward(grad_y, x, steps, bits, signed, grad_scale)


@coupled_quant_multi_backward.register_kernel("cpu")
def _coupled_quant_multi_backward_cpu(grad_y, x, steps, bits, signed, grad_scale):
    op = "coupled_quant_multi_backward"
    checks.check_x(op, x)
    checks.check_steps(op, x, steps, bits)
    checks.check_grad(op, grad_y, x, (len(bits), *x.shape))
    checks.check_grad_scale(op, grad_scale)
    grad_x, grad_steps = ref.coupled_quant_multi_backward(grad_y, x, steps, bits, signed,
                                                          grad_scale)
    ok = _step_ok(steps)
    grad_steps = torch.where(ok, grad_steps, _NAN)
    if not bool(ok.all()):
        grad_x = torch.full_like(grad_x, _NAN)
    return grad_x.contiguous(), grad_steps.contiguous()


@coupled_quant_multi_backward.register_fake
def _coupled_quant_multi_backward_fake(grad_y, x, steps, bits, signed, grad_scale):
    return x.new_empty(x.shape), steps.new_empty(steps.shape)


def _coupled_quant_multi_setup(ctx, inputs, output):
    x, steps, bits, signed, grad_scale = inputs
    ctx.save_for_backward(x, steps)
    ctx.bits, ctx.signed, ctx.grad_scale = bits, signed, grad_scale


def _coupled_quant_multi_grad(ctx, grad_y):
    x, steps = ctx.saved_tensors
    grad_x, grad_steps = coupled_quant_multi_backward(grad_y, x, steps, ctx.bits, ctx.signed,
                                                      ctx.grad_scale)
    return grad_x, grad_steps, None, None, None


coupled_quant_multi.register_autograd(_coupled_quant_multi_grad,
                                      setup_context=_coupled_quant_multi_setup)


# ---- quant_stats, quantize_codes (not differentiable) --------------------------------------------


@torch.library.custom_op(
    "rfq_triton::quant_stats", mutates_args=(), device_types="cuda", tags=_PT2,
    schema="(Tensor x, Tensor steps, int[] bits, bool signed=True, float delta=0.125) "
           "-> (Tensor, Tensor)")
def quant_stats(x, steps, bits, signed=True, delta=0.125):
    return _lsq().quant_stats(x, steps, bits, signed, delta)


@quant_stats.register_kernel("cpu")
def _quant_stats_cpu(x, steps, bits, signed=True, delta=0.125):
    op = "quant_stats"
    checks.check_x(op, x)
    checks.check_steps(op, x, steps, bits)
    checks.check_delta(op, delta)
    mse, share = ref.quant_stats(x, steps, bits, signed, delta)
    ok = _step_ok(steps)
    return torch.where(ok, mse, _NAN), torch.where(ok, share, _NAN)


@quant_stats.register_fake
def _quant_stats_fake(x, steps, bits, signed=True, delta=0.125):
    return steps.new_empty(steps.shape), steps.new_empty(steps.shape)


@torch.library.custom_op(
    "rfq_triton::quantize_codes", mutates_args=(), device_types="cuda", tags=_PT2,
    schema="(Tensor x, Tensor step, int bits, bool signed=True) -> Tensor")
def quantize_codes(x, step, bits, signed=True):
    return _lsq().quantize_codes(x, step, bits, signed)


@quantize_codes.register_kernel("cpu")
def _quantize_codes_cpu(x, step, bits, signed=True):
    op = "quantize_codes"
    checks.check_x(op, x)
    checks.check_bit(op, "bits", bits)
    checks.check_step(op, x, step)
    dtype = torch.int8 if signed else torch.uint8
    if not bool(_step_ok(step.reshape(()))):
        return torch.zeros_like(x, dtype=dtype)
    return _like(x, ref.quantize_codes(x, step, bits, signed))


@quantize_codes.register_fake
def _quantize_codes_fake(x, step, bits, signed=True):
    return torch.empty_like(x, dtype=torch.int8 if signed else torch.uint8)


# ---- packed weights ----------------------------------------------------------------------------


@torch.library.custom_op(
    "rfq_triton::packed_linear", mutates_args=(), device_types="cuda", tags=_PT2,
    schema="(Tensor x, Tensor packed, Tensor scales, Tensor? zeros, int bits, int group_size, "
           "Tensor? bias=None, Tensor? x_step=None, int x_bits=8, bool x_signed=False) -> Tensor")
def packed_linear(x, packed, scales, zeros, bits, group_size, bias=None, x_step=None, x_bits=8,
                  x_signed=False):
    return _packed().packed_linear(x, packed, scales, zeros, bits, group_size, bias, x_step,
                                   x_bits, x_signed)


@packed_linear.register_kernel("cpu")
def _packed_linear_cpu(x, packed, scales, zeros, bits, group_size, bias=None, x_step=None,
                       x_bits=8, x_signed=False):
    checks.check_linear("packed_linear", x, packed, scales, zeros, bits, group_size, bias)
    checks.check_input_quant("packed_linear", x, x_step, x_bits)
    y = ref.packed_linear(x, packed.contiguous(), scales, zeros, bits, group_size, bias, x_step,
                          x_bits, x_signed)
    if x_step is not None and not bool(_step_ok(x_step.reshape(()))):
        y = torch.full_like(y, _NAN)
    return y.contiguous()


@packed_linear.register_fake
def _packed_linear_fake(x, packed, scales, zeros, bits, group_size, bias=None, x_step=None,
                        x_bits=8, x_signed=False):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@torch.library.custom_op(
    "rfq_triton::dequantize_weight", mutates_args=(), device_types="cuda", tags=_PT2,
    schema="(Tensor packed, Tensor scales, Tensor? zeros, int bits, int group_size, int k) "
           "-> Tensor")
def dequantize_weight(packed, scales, zeros, bits, group_size, k):
    return _packed().dequantize_weight(packed, scales, zeros, bits, group_size, k)


@dequantize_weight.register_kernel("cpu")
def _dequantize_weight_cpu(packed, scales, zeros, bits, group_size, k):
    op = "dequantize_weight"
    checks.check_packed(op, packed, k, bits)
    checks.check_scales(op, packed, scales, zeros, k, group_size, packed.device)
    w = ref.dequantize_weight(packed.contiguous(), scales, bits, (packed.shape[0], k), group_size,
                              zeros)
    return w.contiguous()


@dequantize_weight.register_fake
def _dequantize_weight_fake(packed, scales, zeros, bits, group_size, k):
    return packed.new_empty((packed.shape[0], k), dtype=torch.float32)


def _packed_linear_setup(ctx, inputs, output):
    x, packed, scales, zeros, bits, group_size, bias, x_step, x_bits, x_signed = inputs
    ctx.save_for_backward(packed, scales, zeros, x if x_step is not None else None, x_step)
    ctx.bits, ctx.group_size, ctx.k, ctx.x_dtype = bits, group_size, x.shape[-1], x.dtype
    ctx.x_bits, ctx.x_signed = x_bits, x_signed


def _packed_linear_grad(ctx, grad_y):
    # The packed weight is frozen (deployment); only x gets a gradient: dx = dy @ dequant(W),
    # masked by the fused input quantizer's range (rfq.ops.autograd).
    packed, scales, zeros, x, x_step = ctx.saved_tensors
    w = dequantize_weight(packed, scales, zeros, ctx.bits, ctx.group_size, ctx.k)
    grad_x = grad_y.float() @ w
    if x_step is not None:
        grad_x = grad_x * input_range_mask(x, x_step, ctx.x_bits, ctx.x_signed)
    return grad_x.to(ctx.x_dtype), None, None, None, None, None, None, None, None, None


packed_linear.register_autograd(_packed_linear_grad, setup_context=_packed_linear_setup)
