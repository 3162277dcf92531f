"""Tolerance of packed_linear against fp32 dequantize + F.linear, shared by the packed tests."""

import torch

# one ulp of the output dtype (both sides round an fp32 result; neighbours may differ by one)
DTYPE_TOL = {torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def activation_error_bound(x2d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[M, N] bound of the AVX512 kernel's int16 activation rounding: each x is quantized per
    128-element block with step max|x_block| / 32767, so |dx| <= max|x_block| / 65534; the bound
    takes twice that, times |w|."""
    m, k = x2d.shape
    kp = -(-k // 128) * 128
    xp = torch.zeros(m, kp)
    xp[:, :k] = x2d.float().abs()
    block_max = xp.reshape(m, kp // 128, 128).amax(-1).repeat_interleave(128, 1)[:, :k]
    return (block_max / 32767) @ w.abs().t()


def assert_linear_close(y, want, x2d, w):
    """|y - ref| <= eps(dtype)|ref| + 2e-5 (|x| @ |w|^T) + the activation rounding bound."""
    tol = (DTYPE_TOL[y.dtype] * want.float().abs() + 2e-5 * (x2d.float().abs() @ w.abs().t())
           + activation_error_bound(x2d, w) + 1e-6)
    err = (y.float() - want.float()).abs()
    assert torch.all(err <= tol), f"max err {err.max().item()} (tol {tol.flatten()[err.argmax()]})"
