"""Argument checks of the rfq_triton ops, shared by the Triton launchers and the ops' CPU kernels.

Metadata only (dtype, shape, device agreement; no tensor values, so no host syncs). Every error
is a RuntimeError that starts with the op name and names the argument, as the C++ ops' do.
Importing this module does not import triton.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from rfq.ops.layout import GROUP_SIZES, MAX_BITS, MAX_CANDIDATES, MIN_BITS, packed_row_bytes

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fail(op: str, message: str):
    raise RuntimeError(f"rfq_triton.{op}: {message}")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---- LSQ family ---------------------------------------------------------------------------------


def check_x(op: str, x: torch.Tensor):
    if x.dtype not in FLOAT_DTYPES:
        fail(op, f"x must be float32, bfloat16 or float16, got {x.dtype}")


def check_bit(op: str, name: str, b: int):
    if not MIN_BITS <= b <= MAX_BITS:
        fail(op, f"{name} must be in {MIN_BITS}..{MAX_BITS}, got {b}")


def check_steps(op: str, x: torch.Tensor, steps: torch.Tensor, bits: Sequence[int]):
    if steps.device != x.device:
        fail(op, f"steps must be on x's device ({x.device}), got {steps.device}")
    if steps.dtype != torch.float32:
        fail(op, f"steps must be float32, got {steps.dtype}")
    if steps.dim() != 1:
        fail(op, f"steps must be 1-D [K], got shape {list(steps.shape)}")
    if steps.numel() == 0:
        fail(op, "steps is empty: one step per candidate bit is needed")
    if len(bits) == 0:
        fail(op, "bits is empty: at least one candidate bit-width is needed")
    if steps.numel() != len(bits):
        fail(op, f"steps has K={steps.numel()} entries but bits lists {len(bits)} candidates")
    if len(bits) > MAX_CANDIDATES:
        fail(op, f"at most {MAX_CANDIDATES} candidate bits, got {len(bits)}")
    for b in bits:
        check_bit(op, "bits", b)


def check_sel(op: str, x: torch.Tensor, sel: torch.Tensor):
    if sel.device != x.device:
        fail(op, f"sel must be on x's device ({x.device}), got {sel.device}")
    if sel.dtype != torch.int64:
        fail(op, f"sel must be int64, got {sel.dtype}")
    if sel.numel() != 1:
        fail(op, f"sel must hold one index, got shape {list(sel.shape)}")


def check_grad(op: str, grad: torch.Tensor, x: torch.Tensor, shape):
    if grad.device != x.device:
        fail(op, f"grad_y must be on x's device ({x.device}), got {grad.device}")
    if grad.dtype != x.dtype:
        fail(op, f"grad_y must have x's dtype ({x.dtype}), got {grad.dtype}")
    if tuple(grad.shape) != tuple(shape):
        fail(op, f"grad_y must have shape {list(shape)}, got {list(grad.shape)}")


def check_grad_scale(op: str, grad_scale: float):
    if not math.isfinite(grad_scale):
        fail(op, f"grad_scale must be finite, got {grad_scale}")


def check_delta(op: str, delta: float):
    if not 0.0 <= delta <= 0.5:
        fail(op, f"delta must be in [0, 0.5], got {delta}")


def check_step(op: str, x: torch.Tensor, step: torch.Tensor):
    if step.device != x.device:
        fail(op, f"step must be on x's device ({x.device}), got {step.device}")
    if step.dtype != torch.float32:
        fail(op, f"step must be float32, got {step.dtype}")
    if step.numel() != 1:
        fail(op, f"step must hold one value, got shape {list(step.shape)}")


# ---- packed weights -----------------------------------------------------------------------------


def check_packed(op: str, packed: torch.Tensor, k: int, bits: int):
    check_bit(op, "bits", bits)
    if packed.dtype != torch.uint8:
        fail(op, f"packed must be uint8 (from pack_weight), got {packed.dtype}")
    if packed.dim() != 2:
        fail(op, f"packed must be 2-D [N, row_bytes], got shape {list(packed.shape)}")
    if packed.shape[1] != packed_row_bytes(k, bits):
        fail(op, f"packed rows hold {packed.shape[1]} bytes but K={k} at {bits} bits needs "
                 f"{packed_row_bytes(k, bits)} (wrong bits, K or layout)")


def check_scales(op: str, packed, scales, zeros, k: int, group_size: int, device):
    if group_size not in GROUP_SIZES:
        fail(op, f"group_size must be 0 (per-tensor) or 32, 64, 128, got {group_size}")
    for name, t in (("packed", packed), ("scales", scales), ("zeros", zeros)):
        if t is not None and t.device != device:
            fail(op, f"{name} must be on x's device ({device}), got {t.device}")
    if not scales.is_floating_point():
        fail(op, f"scales must be floating point, got {scales.dtype}")
    if group_size == 0:
        if scales.numel() != 1:
            fail(op, f"per-tensor scales must hold one value, got shape {list(scales.shape)}")
        if zeros is not None:
            fail(op, "zeros need group-wise scales (group_size 32/64/128)")
        return
    n, groups = packed.shape[0], cdiv(k, group_size)
    if scales.dim() != 2 or tuple(scales.shape) != (n, groups):
        fail(op, f"scales must be [N, ceil(K/group_size)] = [{n}, {groups}], got "
                 f"{list(scales.shape)}")
    if zeros is not None:
        if zeros.shape != scales.shape:
            fail(op, f"zeros must have scales' shape {list(scales.shape)}, got "
                     f"{list(zeros.shape)}")
        if not zeros.is_floating_point():
            fail(op, "zeros must be floating point")


def check_linear(op: str, x, packed, scales, zeros, bits: int, group_size: int, bias):
    if x.dtype not in FLOAT_DTYPES:
        fail(op, f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() < 1:
        fail(op, "x must have a last dimension K, got a 0-dim tensor")
    k = x.shape[-1]
    check_packed(op, packed, k, bits)
    check_scales(op, packed, scales, zeros, k, group_size, x.device)
    n = packed.shape[0]
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != n:
            fail(op, f"bias must be [N] = [{n}], got {list(bias.shape)}")
        if bias.device != x.device:
            fail(op, f"bias must be on x's device ({x.device}), got {bias.device}")
        if not bias.is_floating_point():
            fail(op, f"bias must be floating point, got {bias.dtype}")


def check_input_quant(op: str, x, x_step, x_bits: int):
    """packed_linear's fused input quantizer (the C++ check_input_quant)."""
    if x_step is None:
        return
    check_bit(op, "x_bits", x_bits)
    if x_step.device != x.device:
        fail(op, f"x_step must be on x's device ({x.device}), got {x_step.device}")
    if x_step.dtype != torch.float32:
        fail(op, f"x_step must be float32, got {x_step.dtype}")
    if x_step.numel() != 1:
        fail(op, f"x_step must hold one value, got shape {list(x_step.shape)}")
