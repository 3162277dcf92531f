"""Input builders and comparison helpers shared by the LSQ op tests."""

from __future__ import annotations

import torch

from rfq import reference as ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ALL_BITS = list(range(1, 9))
# 0-element, 1, odd, multi-dim, and >1 reduction chunk (4096) with an odd tail.
SHAPES = [(0,), (1,), (7,), (3, 5, 9), (2, 0, 3), (4133,)]


def step_for(bits: int, signed: bool, pow2: bool) -> float:
    """A step that puts a standard normal x across most of the code range."""
    qn, qp = ref.qrange(bits, signed)
    s = 3.0 / max(qp, 1)
    if pow2:
        return 2.0 ** round(torch.log2(torch.tensor(s)).item())
    return s * 1.0371  # not a power of two: x/s is not exact


def make_x(shape, dtype, bits, signed, step, device="cpu", seed=0) -> torch.Tensor:
    """Values over the whole clipping range and beyond it, with exact ties and exact bounds."""
    g = torch.Generator().manual_seed(seed)
    qn, qp = ref.qrange(bits, signed)
    n = 1
    for d in shape:
        n *= d
    u = torch.rand(n, generator=g) * (qp - qn + 4) + (qn - 2)  # in units of the step
    pick = torch.rand(n, generator=g)
    ties = torch.floor(u) + 0.5  # x/s exactly on a rounding tie (when s is a power of two)
    bounds = torch.where(pick < 0.5, float(qn), float(qp))  # exactly on the range ends
    u = torch.where(pick < 0.15, ties, u)
    u = torch.where((pick >= 0.15) & (pick < 0.2), bounds, u)
    x = (u * step).reshape(shape)
    return x.to(dtype).to(device)


def steps_for(bits_list, signed, pow2, device="cpu") -> torch.Tensor:
    return torch.tensor([step_for(b, signed, pow2) for b in bits_list], device=device)


def assert_step_grad_close(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor):
    """Spec §1 tolerance: |got - ref| <= 1e-5 |ref| + 1e-6 sum|dy h| (fp32 partials vs fp64)."""
    got, want, scale = got.double().cpu(), want.double().cpu(), scale.double().cpu()
    tol = 1e-5 * want.abs() + 1e-6 * scale + 1e-12
    assert torch.all((got - want).abs() <= tol), f"step grads {got} vs reference {want}"


def abs_step_terms(grad_y, x, step, bits, signed) -> torch.Tensor:
    """sum |dy * h|: the scale of the step-gradient sum, for its tolerance."""
    qn, qp = ref.qrange(bits, signed)
    v = x.float() / step
    k = ref.codes_float(v, bits, signed)
    h = torch.where((v >= qn) & (v <= qp), k - v, k)
    return (grad_y.double() * h.double()).abs().sum()
