"""Errors of the Triton launchers and rfq_triton ops name the op and the argument."""

from __future__ import annotations

import math

import pytest
import torch

from triton_cases import (  # noqa: F401  (skips this module without triton)
    INTERPRET,
    packed_case,
    triton_ops,
)
from rfq.triton_kernels import lsq, packed  # noqa: E402


# ---- errors name the op and the argument ---------------------------------------------------------

X = torch.randn(10)
STEPS = torch.tensor([0.5, 0.25])
SEL = torch.tensor(1)


@pytest.mark.parametrize("call, match", [
    (lambda f: f.coupled_quant(X.long(), STEPS, [2, 4], SEL), "x must be float32"),
    (lambda f: f.coupled_quant(X, STEPS.double(), [2, 4], SEL), "steps must be float32"),
    (lambda f: f.coupled_quant(X, STEPS[:1], [2, 4], SEL), "steps has K=1 entries but bits"),
    (lambda f: f.coupled_quant(X, STEPS, [2, 9], SEL), "bits must be in 1..8, got 9"),
    (lambda f: f.coupled_quant(X, STEPS, [2, 4], SEL.int()), "sel must be int64"),
    (lambda f: f.coupled_quant(X, torch.full((9,), 0.1), [2] * 9, SEL), "at most 8"),
    (lambda f: f.coupled_quant_backward(X[:3], X, STEPS, [2, 4], SEL, True, 1.0),
     "grad_y must have shape"),
    (lambda f: f.coupled_quant_backward(X, X, STEPS, [2, 4], SEL, True, math.inf),
     "grad_scale must be finite"),
    (lambda f: f.coupled_quant_multi_backward(X, X, STEPS, [2, 4], True, 1.0),
     r"grad_y must have shape \[2, 10\]"),
    (lambda f: f.quant_stats(X, STEPS, [2, 4], True, 0.7), r"delta must be in \[0, 0.5\]"),
    (lambda f: f.quantize_codes(X, STEPS, 4), "step must hold one value"),
])
@pytest.mark.parametrize("impl", ["launcher", "op (CPU kernel)"])
def test_errors_name_op_and_argument(call, match, impl):
    if impl == "launcher" and not INTERPRET:
        pytest.skip("launchers on CPU tensors need the interpreter")
    target = lsq if impl == "launcher" else triton_ops
    with pytest.raises(RuntimeError, match=f"rfq_triton.[a-z_]+: {match}"):
        call(target)


def test_packed_errors_name_op_and_argument():
    codes, w, scales, zeros = packed_case(4, 32, True, n=8, k=70)
    x = torch.randn(2, 70)
    for f in ([packed] if INTERPRET else []) + [triton_ops]:
        def pl(*args, f=f, **kw):
            return f.packed_linear(*args, **kw)

        with pytest.raises(RuntimeError, match="rfq_triton.packed_linear: packed rows hold 64"):
            pl(torch.randn(2, 200), w, scales, zeros, 4, 32)
        with pytest.raises(RuntimeError, match="group_size must be 0"):
            pl(x, w, scales, zeros, 4, 48)
        with pytest.raises(RuntimeError, match=r"scales must be \[N, ceil"):
            pl(x, w, scales[:, :2], None, 4, 32)
        with pytest.raises(RuntimeError, match="zeros must have scales' shape"):
            pl(x, w, scales, zeros[:, :2], 4, 32)
        with pytest.raises(RuntimeError, match="zeros need group-wise scales"):
            pl(x, w, torch.tensor([0.1]), zeros, 4, 0)
        with pytest.raises(RuntimeError, match=r"bias must be \[N\] = \[8\]"):
            pl(x, w, scales, zeros, 4, 32, torch.ones(9))
        with pytest.raises(RuntimeError, match="x must be float32"):
            pl(x.double(), w, scales, zeros, 4, 32)
        with pytest.raises(RuntimeError, match="packed must be uint8"):
            pl(x, w.to(torch.int8), scales, zeros, 4, 32)


