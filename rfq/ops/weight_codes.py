"""Per-tensor data-free weight quantizers of DF-MPC (spec methods_seeds.md §A.2), as integer codes
plus one scale, so the deploy path can store the codes themselves.

    ternary   delta = 0.7 mean|W|, T = sign(W) [|W| > delta], alpha = mean|W| over |W| > delta;
              W_hat = alpha T (codes in {-1, 0, 1}; the "2-bit" low layer)
    dorefa k  s = max|W|, n = round((2^k - 1) (W / (2 s) + 1/2)) in [0, 2^k - 1];
              W_hat = s (2 n / (2^k - 1) - 1): 2^k levels, no exact zero (k = 3..8)

Plain PyTorch: one pass of a few elementwise ops per weight tensor, run once per model, so a fused
kernel would not pay (the whole ResNet-18 compensation is timed in bench/). ``round`` is
half-to-even, as everywhere in rfq. Oracle: ``rfq.reference.ternary_quant`` / ``dorefa_quant``.
"""

from __future__ import annotations

import torch
from torch import Tensor

TERNARY_THRESHOLD = 0.7  # delta = 0.7 mean|W| (TWN's rule, as DF-MPC uses it)
DOREFA_BITS = range(3, 9)


def _check_weight(w: Tensor, fn: str) -> None:
    if not isinstance(w, Tensor) or not w.is_floating_point():
        raise TypeError(f"rfq.{fn}: w must be a floating-point tensor, got "
                        f"{getattr(w, 'dtype', type(w).__name__)}")
    if w.numel() == 0:
        raise ValueError(f"rfq.{fn}: w is empty")
    if not torch.isfinite(w).all():
        raise ValueError(f"rfq.{fn}: w has NaN or infinite entries")


def ternary_codes(w: Tensor) -> tuple[Tensor, Tensor]:
    """int8 codes in {-1, 0, 1} (w's shape) and the fp32 0-dim scale alpha."""
    _check_weight(w, "ternary_codes")
    a = w.detach().float().abs()
    kept = a > TERNARY_THRESHOLD * a.mean()
    codes = torch.where(kept, torch.sign(w.detach().float()), 0.0).to(torch.int8)
    # an all-zero tensor keeps nothing: alpha = 0 reproduces it exactly
    alpha = torch.where(kept, a, 0.0).sum() / kept.sum().clamp_min(1)
    return codes, alpha


def dorefa_codes(w: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """uint8 codes n in [0, 2^bits - 1] (w's shape) and the fp32 0-dim scale s = max|w|."""
    if bits not in DOREFA_BITS:
        raise ValueError(f"rfq.dorefa_codes: bits must be in 3..8, got {bits}")
    _check_weight(w, "dorefa_codes")
    x = w.detach().float()
    s = x.abs().max()
    levels = (1 << bits) - 1
    safe = torch.where(s > 0, s, 1.0)  # an all-zero tensor: every code maps to s * (..) = 0
    n = torch.round(levels * (x / (2 * safe) + 0.5)).clamp_(0, levels)
    return n.to(torch.uint8), s


def dequantize_ternary(codes: Tensor, alpha: Tensor) -> Tensor:
    return alpha * codes.float()


def dequantize_dorefa(codes: Tensor, scale: Tensor, bits: int) -> Tensor:
    levels = (1 << bits) - 1
    return scale * (2 * codes.float() / levels - 1)


__all__ = ["TERNARY_THRESHOLD", "ternary_codes", "dorefa_codes", "dequantize_ternary",
           "dequantize_dorefa"]
