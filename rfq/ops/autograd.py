"""Autograd of ``torch.ops.rfq``. Backwards are themselves rfq ops, so compiled graphs stay fused;
only x and the small step/sel tensors are saved: no activation-sized intermediate.
"""

from __future__ import annotations

import torch

from rfq.ops.packed import dequantize_weight
from rfq.ops.ste import input_range_mask

_ops = torch.ops.rfq


# coupled_quant's, relu_quant's and batch_norm_quant's autograd is C++ (csrc/autograd.cpp): they
# run on every layer and pass, often on small tensors, where a Python setup_context and backward
# would cost more than the kernels.


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
    "rfq::coupled_quant_multi",
    _coupled_quant_multi_backward,
    setup_context=_coupled_quant_multi_setup,
)
# quant_stats, quantize_codes, pack_weight, unpack_weight: non-differentiable (C++ fallthrough).


def _csq_weight_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # p, q, m, scale, beta: no weight-sized intermediate


def _csq_weight_backward(ctx, grad_w):
    p, q, m, scale, beta = ctx.saved_tensors
    dp, dq, dm, dscale = _ops.csq_weight_backward.default(grad_w.contiguous(), p, q, m, scale,
                                                          beta)
    return dp, dq, dm, dscale, None


torch.library.register_autograd(
    "rfq::csq_weight", _csq_weight_backward, setup_context=_csq_weight_setup
)


def _packed_linear_setup(ctx, inputs, output):
    x, packed, scales, zeros, bits, group_size, bias, x_step, x_bits, x_signed = inputs
    quantized = x_step is not None  # dx then passes the input quantizer's clipped STE: keep x
    ctx.save_for_backward(packed, scales, zeros, x if quantized else None, x_step)
    ctx.bits, ctx.group_size, ctx.x_shape, ctx.x_dtype = bits, group_size, x.shape, x.dtype
    ctx.x_bits, ctx.x_signed = x_bits, x_signed


def _packed_linear_backward(ctx, grad_y):
    # The packed weight is frozen (deployment); only x gets a gradient: dx = dy @ dequant(W),
    # times the input quantizer's range mask when it is fused (its step is frozen too).
    packed, scales, zeros, x, x_step = ctx.saved_tensors
    w = dequantize_weight(packed, scales, ctx.bits, (packed.shape[0], ctx.x_shape[-1]),
                          ctx.group_size, zeros)
    grad_x = grad_y.float() @ w
    if x_step is not None:
        grad_x = grad_x * input_range_mask(x, x_step, ctx.x_bits, ctx.x_signed)
    return grad_x.to(ctx.x_dtype), None, None, None, None, None, None, None, None, None


torch.library.register_autograd(
    "rfq::packed_linear", _packed_linear_backward, setup_context=_packed_linear_setup
)
