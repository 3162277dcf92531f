"""Shared inputs of the Triton tests (tests/triton_kernels, tests/ops/test_triton_ops.py,
tests/ops/test_gpu_backend.py): markers, shapes, dtypes and packed-weight cases.

On CPU the Triton launchers run under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported) against rfq/reference.py: fp32 and fp16 only (the
interpreter's bf16 is wrong), small shapes. The interpreter divides with NumPy, so tl.div_rn vs
plain `/` and bf16 are GPU tests. GPU tests (compiled Triton on CUDA tensors) need
TRITON_INTERPRET=0; on a machine with CUDA a normal run starts them in a child process
(tests/triton_kernels/test_triton_gpu.py). Importing this module skips the importing test module
when triton is not installed.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
from rfq import ops  # noqa: E402
from rfq import reference as ref  # noqa: E402
from rfq.ops import triton_ops  # noqa: E402,F401  (registers torch.ops.rfq_triton)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HAS_CUDA = torch.cuda.is_available()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

interpreter = pytest.mark.skipif(
    not INTERPRET, reason="CPU launcher tests need TRITON_INTERPRET=1 (set by conftest.py)")
gpu = pytest.mark.skipif(
    INTERPRET or not HAS_CUDA,
    reason="compiled Triton on CUDA: needs a GPU and TRITON_INTERPRET=0 (a normal run on a CUDA "
           "machine starts these in a child process)")

DTYPES = [torch.float32, torch.float16]  # the interpreter's bf16 is wrong
ALL_BITS = list(range(1, 9))
# 0, 1, odd, multi-dim, empty-inside, and more than one 2048-element tile with a tail
SHAPES = [(0,), (1,), (7,), (3, 5, 9), (2, 0, 3), (4133,)]
CANDIDATE_SETS = [[6, 5, 4, 3, 2], [1, 2, 8]]  # K = 5 as RFQuant trains; binary and 8-bit
SMALL_BLOCK = 64  # launcher override: many programs on small inputs
NAN = float("nan")


def cases_for(dtype):
    """(power-of-two step, shape) runs: every shape in fp32 with exact ties; fp16 (whose rounding
    of y and widening of x are the only differences) on the multi-dim and multi-tile ones."""
    shapes = SHAPES if dtype == torch.float32 else [(3, 5, 9), (4133,)]
    return [(True, s) for s in shapes] + [(False, (4133,))]


def grads_like(shape, dtype, seed=7, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).to(device)


def random_codes(n, k, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    lo, hi = ref.qrange(bits, True)
    codes = torch.randint(lo, hi + 1, (n, k), generator=g, dtype=torch.int8)
    return torch.where(codes == 0, 1, codes).to(torch.int8) if bits == 1 else codes


def packed_case(bits, group_size, with_zeros, n=33, k=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = random_codes(n, k, bits, seed)
    w = ops.pack_weight(codes, bits)
    if group_size:
        groups = -(-k // group_size)
        scales = (torch.rand(n, groups, generator=g) * 0.1 + 0.01).to(torch.bfloat16)
        zeros = ((torch.rand(n, groups, generator=g) * 4).to(torch.float16) if with_zeros
                 else None)
    else:
        scales, zeros = torch.tensor([0.05]), None
    return codes, w, scales, zeros


def weight_magnitude(codes, scales, zeros, bits, group_size):
    """(|q| + |z - offset|) * |scale| >= |w|: the size of the terms the kernels add (zeros enter
    the GEMM as a separate - (z - offset) * sum(x) term)."""
    q = codes.float().abs()
    if group_size == 0:
        return q * scales.float().abs().reshape(())
    k = codes.shape[1]
    scale = scales.float().abs().repeat_interleave(group_size, 1)[:, :k]
    if zeros is None:
        return q * scale
    zq = (zeros.float() - ref.code_offset(bits)).abs().repeat_interleave(group_size, 1)[:, :k]
    return (q + zq) * scale


def assert_linear_close(y, want, x2d, magnitude, rounding=2.0**-24):
    """|y - ref| <= one output ulp + 2 (K + 16) u (|x| @ magnitude^T): two fp32 sums of K
    products in different orders (any order is within K u of the exact sum), plus the scale and
    bias roundings. u = 2^-24 (fp32 round to nearest); GPU tensor cores pass 2^-23, as they may
    truncate inside a dot."""
    k = x2d.shape[-1]
    ulp = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[y.dtype]
    mag = x2d.float().abs() @ magnitude.t()
    tol = ulp * want.float().abs() + 2 * (k + 16) * rounding * mag + 1e-30
    err = (y.float() - want.float()).abs()
    assert torch.all(err <= tol), f"max err {err.max().item()} at tol {tol.flatten()[err.argmax()]}"
