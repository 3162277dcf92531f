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
# quant_stats and quantize_codes are non-differentiable (Autograd fallthrough in C++).

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
    return _ops.coupled_quant.default(x, steps, list(bits), sel, signed, grad_scale)


def coupled_quant_multi(
    x: Tensor,
    steps: Tensor,
    bits: Sequence[int],
    signed: bool = True,
    grad_scale: float = 1.0,
) -> Tensor:
    """All K fake-quantized versions of ``x``, stacked as [K, *x.shape], from one read of x."""
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
    return _ops.quant_stats.default(x, steps, list(bits), signed, delta)


def quantize_codes(x: Tensor, step: Tensor, bits: int, signed: bool = True) -> Tensor:
    """Integer codes of ``x`` at ``bits`` with one fp32 ``step``: int8 when ``signed``, uint8
    otherwise (unsigned 8-bit codes reach 255). NaN maps to code 0."""
    return _ops.quantize_codes.default(x, step, bits, signed)


def cpu_capability() -> str:
    """The ISA level whose CPU kernels run here (ATEN_CPU_CAPABILITY can lower it)."""
    return torch.backends.cpu.get_cpu_capability()


__all__ = [
    "coupled_quant",
    "coupled_quant_multi",
    "quant_stats",
    "quantize_codes",
    "cpu_capability",
]
