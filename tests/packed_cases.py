"""Tolerance of packed_linear against fp32 dequantize + F.linear, shared by the packed tests.

The bound is derived from what the kernels do (README "Packed weights"):
- AVX512 rounds x to int16 per 128-element block with step sx = max|x_block| / 32767, so each
  element is off by at most sx/2 (plus ~1e-7 max|x_block| from the fp32 step itself); the error
  reaches y through the codes times their scale, q*s. The bound takes sx (twice that) times |q*s|.
- Both sides accumulate in fp32 in different orders: 2e-5 * sum |x| |w| covers it, with |w|
  counted as |q*s| + |(offset - z)*s| because zero points are applied as a separate fp32 term.
- The output is rounded once to x's dtype: one ulp of it.
"""

import torch

# one ulp of the output dtype (both sides round an fp32 result; neighbours may differ by one)
DTYPE_TOL = {torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def activation_error_bound(x2d: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """[M, N] bound of the AVX512 kernel's int16 activation rounding: each x is quantized per
    128-element block with step max|x_block| / 32767, so |dx| <= max|x_block| / 65534; the bound
    takes twice that, times |q*s| (the weights the rounded x multiplies)."""
    m, k = x2d.shape
    kp = -(-k // 128) * 128
    xp = torch.zeros(m, kp, device=x2d.device)
    xp[:, :k] = x2d.float().abs()
    block_max = xp.reshape(m, kp // 128, 128).amax(-1).repeat_interleave(128, 1)[:, :k]
    return (block_max / 32767) @ wq.abs().t()


def assert_linear_close(y, want, x2d, w, wq=None):
    """|y - ref| <= eps(dtype)|ref| + 2e-5 |x| @ (|wq| + |w - wq|)^T + the activation rounding
    bound. w: the dequantized weights; wq: their part without zero points, q*s (= w when the
    weights have no zeros)."""
    wq = w if wq is None else wq
    wabs = wq.abs() + (w - wq).abs()
    tol = (DTYPE_TOL[y.dtype] * want.float().abs() + 2e-5 * (x2d.float().abs() @ wabs.t())
           + activation_error_bound(x2d, wq) + 1e-6)
    err = (y.float() - want.float()).abs()
    assert torch.all(err <= tol), f"max err {err.max().item()} (tol {tol.flatten()[err.argmax()]})"
