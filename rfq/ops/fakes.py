"""Fake kernels of ``torch.ops.rfq``: output metadata for torch.compile and meta tensors.

They must give the layouts the C++ kernels produce. They are also the Meta kernels: a call mixing
a meta tensor with real ones dispatches here, so they check devices like the C++ wrappers do
instead of returning uninitialized memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rfq.ops.layout import packed_row_bytes


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


@torch.library.register_fake("rfq::relu_quant")
def _relu_quant_fake(x, steps, bits, sel, grad_scale=1.0):
    _check_devices("relu_quant", x, steps=steps, sel=sel)
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.register_fake("rfq::relu_quant_backward")
def _relu_quant_backward_fake(grad_r, grad_y, x, steps, bits, sel, grad_scale):
    grads = {n: g for n, g in (("grad_r", grad_r), ("grad_y", grad_y)) if g is not None}
    _check_devices("relu_quant_backward", x, steps=steps, sel=sel, **grads)
    return torch.empty_like(x), steps.new_empty(steps.shape)


def _bn_like(x: Tensor) -> Tensor:
    """batch_norm_quant's output layout: 4-D channels_last stays, the rest is contiguous."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.empty_like(x, memory_format=torch.channels_last)
    return x.new_empty(x.shape)


@torch.library.register_fake("rfq::batch_norm_quant")
def _batch_norm_quant_fake(x, weight, bias, eps, steps, bits, sel, signed=False, grad_scale=1.0):
    _check_devices("batch_norm_quant", x, weight=weight, bias=bias, steps=steps, sel=sel)
    return _bn_like(x), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


@torch.library.register_fake("rfq::batch_norm_quant_backward")
def _batch_norm_quant_backward_fake(grad_y, x, weight, bias, mean, var, eps, steps, bits, sel,
                                    signed, grad_scale):
    _check_devices("batch_norm_quant_backward", x, grad_y=grad_y, weight=weight, bias=bias,
                   mean=mean, var=var, steps=steps, sel=sel)
    return (_bn_like(x), weight.new_empty(weight.shape), weight.new_empty(weight.shape),
            steps.new_empty(steps.shape))


@torch.library.register_fake("rfq::batch_norm_quant_mse")
def _batch_norm_quant_mse_fake(x, weight, bias, eps, steps, bits, sel, teacher, signed=False,
                               grad_scale=1.0):
    _check_devices("batch_norm_quant_mse", x, weight=weight, bias=bias, steps=steps, sel=sel,
                   teacher=teacher)
    return (_bn_like(x), weight.new_empty(weight.shape), weight.new_empty(weight.shape),
            weight.new_empty(()))


@torch.library.register_fake("rfq::batch_norm_quant_mse_backward")
def _batch_norm_quant_mse_backward_fake(grad_y, grad_mse, x, weight, bias, mean, var, eps, steps,
                                        bits, sel, teacher, signed, grad_scale):
    _check_devices("batch_norm_quant_mse_backward", x, grad_y=grad_y, grad_mse=grad_mse,
                   weight=weight, bias=bias, mean=mean, var=var, steps=steps, sel=sel,
                   teacher=teacher)
    return (_bn_like(x), weight.new_empty(weight.shape), weight.new_empty(weight.shape),
            steps.new_empty(steps.shape))


@torch.library.register_fake("rfq::batch_norm_add")
def _batch_norm_add_fake(x, weight, bias, eps, residual):
    _check_devices("batch_norm_add", x, weight=weight, bias=bias, residual=residual)
    return _bn_like(x), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


@torch.library.register_fake("rfq::batch_norm_add_backward")
def _batch_norm_add_backward_fake(grad_y, x, weight, mean, var, eps):
    _check_devices("batch_norm_add_backward", x, grad_y=grad_y, weight=weight, mean=mean,
                   var=var)
    return _bn_like(x), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


@torch.library.register_fake("rfq::quantize_codes")
def _quantize_codes_fake(x, step, bits, signed=True):
    _check_devices("quantize_codes", x, step=step)
    return torch.empty_like(x, dtype=torch.int8 if signed else torch.uint8)


@torch.library.register_fake("rfq::pack_weight")
def _pack_weight_fake(codes, bits):
    return codes.new_empty((codes.shape[0], packed_row_bytes(codes.shape[1], bits)),
                           dtype=torch.uint8)


@torch.library.register_fake("rfq::unpack_weight")
def _unpack_weight_fake(packed, bits, shape):
    return packed.new_empty(shape, dtype=torch.int8)


@torch.library.register_fake("rfq::packed_linear")
def _packed_linear_fake(x, packed, scales, zeros, bits, group_size, bias=None, x_step=None,
                        x_bits=8, x_signed=False):
    others = dict(packed=packed, scales=scales)
    for name, t in (("zeros", zeros), ("bias", bias), ("x_step", x_step)):
        if t is not None:
            others[name] = t
    _check_devices("packed_linear", x, **others)
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def _check_csq(op: str, p: Tensor, **others: Tensor) -> None:
    for name, t in others.items():
        if t.device != p.device:
            raise RuntimeError(f"rfq.{op}: {name} must be on p's device ({p.device}), got {t.device}")


@torch.library.register_fake("rfq::csq_weight")
def _csq_weight_fake(p, q, m, scale, beta):
    _check_csq("csq_weight", p, q=q, m=m, scale=scale, beta=beta)
    return p.new_empty(p.shape[1:])


@torch.library.register_fake("rfq::csq_weight_backward")
def _csq_weight_backward_fake(grad_w, p, q, m, scale, beta):
    _check_csq("csq_weight_backward", p, grad_w=grad_w, q=q, m=m, scale=scale, beta=beta)
    return p.new_empty(p.shape), p.new_empty(p.shape), m.new_empty(m.shape), \
        scale.new_empty(scale.shape)
