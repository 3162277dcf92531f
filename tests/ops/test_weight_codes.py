"""DF-MPC's ternary and DoReFa weight codes against the spec's formulas (rfq.reference)."""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from rfq import ops
from rfq import reference as ref

shapes = st.lists(st.sampled_from([1, 2, 3, 7, 16, 33]), min_size=1, max_size=4)
dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


def weight(shape, dtype, seed, spread):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * spread).to(dtype)


@settings(max_examples=150, deadline=None)
@given(shapes, dtypes, st.integers(0, 2**16), st.floats(1e-3, 10.0))
def test_ternary_equals_the_formula(shape, dtype, seed, spread):
    w = weight(shape, dtype, seed, spread)
    codes, alpha = ops.ternary_codes(w)
    assert codes.dtype == torch.int8 and codes.shape == w.shape
    assert set(codes.unique().tolist()) <= {-1, 0, 1}
    # codes exact; alpha is a mean, summed in another order by the oracle: within fp32 rounding
    expected = ref.ternary_quant(w)
    assert torch.equal(torch.sign(expected).to(torch.int8), codes)
    assert torch.allclose(ops.dequantize_ternary(codes, alpha), expected, rtol=1e-6, atol=0)


@settings(max_examples=150, deadline=None)
@given(shapes, dtypes, st.integers(3, 8), st.integers(0, 2**16), st.floats(1e-3, 10.0))
def test_dorefa_equals_the_formula(shape, dtype, bits, seed, spread):
    w = weight(shape, dtype, seed, spread)
    codes, s = ops.dorefa_codes(w, bits)
    assert codes.dtype == torch.uint8 and codes.shape == w.shape
    assert 0 <= int(codes.min()) and int(codes.max()) <= 2**bits - 1
    assert float(s) == float(w.float().abs().max())
    w_hat = ops.dequantize_dorefa(codes, s, bits)
    assert torch.equal(w_hat, ref.dorefa_quant(w, bits))
    # 2^k levels and no exact zero; every entry within half a level of w (plus fp32 rounding of
    # the scaled value and of the dequantization: measured up to 2.5e-5 of the half level)
    assert not (w_hat == 0).any()
    assert (w_hat - w.float()).abs().max() <= s / (2**bits - 1) * (1 + 1e-4)


def test_extreme_values_take_the_end_codes():
    w = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])
    codes, s = ops.dorefa_codes(w, 3)
    assert codes.tolist() == [0, 2, 4, 5, 7]  # round(7 (w/4 + 1/2)): 0, 1.75, 3.5 (even: 4), 5.25, 7
    assert float(s) == 2.0
    t, alpha = ops.ternary_codes(w)
    assert t.tolist() == [-1, -1, 0, 1, 1] and float(alpha) == 1.5  # delta = 0.7 * 1.2 = 0.84


def test_all_zero_weights_stay_zero():
    w = torch.zeros(4, 3)
    codes, alpha = ops.ternary_codes(w)
    assert float(alpha) == 0 and not ops.dequantize_ternary(codes, alpha).any()
    codes, s = ops.dorefa_codes(w, 4)
    assert float(s) == 0 and not ops.dequantize_dorefa(codes, s, 4).any()


@pytest.mark.parametrize("call, match", [
    (lambda: ops.dorefa_codes(torch.randn(3), 2), "bits must be in 3..8"),
    (lambda: ops.dorefa_codes(torch.randn(3), 9), "bits must be in 3..8"),
    (lambda: ops.ternary_codes(torch.arange(3)), "w must be a floating-point tensor"),
    (lambda: ops.ternary_codes(torch.tensor([1.0, float("nan")])), "NaN or infinite"),
    (lambda: ops.dorefa_codes(torch.empty(0), 4), "w is empty"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
