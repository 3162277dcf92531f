"""packed_linear's fused input quantizer (x_step, x_bits, x_signed): the deployed layer's LSQ
input fake quantization inside the packed op, against the reference composition and against
exact integer arithmetic where every product and sum is representable."""

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings

from packed_cases import assert_linear_close
from rfq import ops
from rfq import reference as ref
from rfq.nn.packed import PackedLayer
from rfq.ops.layout import qrange

fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture,
                                             HealthCheck.too_slow], deadline=None)


def random_codes(n, k, bits, g):
    lo, hi = (-1, 1) if bits == 1 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    codes = torch.randint(lo, hi + 1, (n, k), generator=g, dtype=torch.int8)
    return torch.where(codes == 0, 1, codes).to(torch.int8) if bits == 1 else codes


def fake_quant(x, step, bits, signed):
    """The unfused input quantizer in fp32 (codes times step)."""
    return ref.codes_float(x.float() / step.reshape(()), bits, signed) * step.reshape(())


@pytest.mark.parametrize("m", [1, 3, 17, 40, 300])  # small-M kernels, tiles, dequantize + MKL
@pytest.mark.parametrize("w_bits", [1, 2, 4, 8])
@pytest.mark.parametrize("x_bits, x_signed", [(1, True), (2, False), (4, True), (8, False),
                                              (8, True)])
def test_power_of_two_steps_give_the_exact_integer_product(m, w_bits, x_bits, x_signed):
    g = torch.Generator().manual_seed(m * 100 + w_bits * 10 + x_bits)
    n, k = 21, 333
    codes = random_codes(n, k, w_bits, g)
    packed = ops.pack_weight(codes, w_bits)
    x_step, w_step = torch.tensor([0.125]), torch.tensor([2.0 ** -6])
    x = torch.randn(m, k, generator=g) * 40 * x_step  # past the clipping range at low bits
    y = ops.packed_linear(x, packed, w_step, w_bits, x_step=x_step, x_bits=x_bits,
                          x_signed=x_signed)
    k_x = ref.codes_float(x / x_step, x_bits, x_signed).double()
    exact = (k_x @ codes.double().t()) * (0.125 * 2.0 ** -6)  # |sums| < 2^24: exact in fp32
    assert torch.equal(y, exact.float())


@fixture_ok
@given(m=st.integers(0, 20), n=st.integers(1, 40), k=st.integers(1, 400),
       w_bits=st.sampled_from([1, 2, 3, 4, 5, 8]), x_bits=st.integers(1, 8),
       x_signed=st.booleans(), group_size=st.sampled_from([0, 32, 64, 128]),
       with_zeros=st.booleans(), with_bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       step=st.floats(0.01, 2.0), seed=st.integers(0, 2 ** 16))
def test_fused_matches_the_reference_composition(m, n, k, w_bits, x_bits, x_signed, group_size,
                                                 with_zeros, with_bias, dtype, step, seed):
    g = torch.Generator().manual_seed(seed)
    packed = ops.pack_weight(random_codes(n, k, w_bits, g), w_bits)
    groups = -(-k // group_size) if group_size else 1
    scales = torch.rand(n, groups, generator=g) * 0.1 + 0.01 if group_size else torch.tensor([0.05])
    zeros = torch.rand(n, groups, generator=g) * 3 if group_size and with_zeros else None
    bias = torch.randn(n, generator=g) if with_bias else None
    x_step = torch.tensor([step])
    x = (torch.randn(m, k, generator=g) * step * 2 ** x_bits / 3).to(dtype)
    y = ops.packed_linear(x, packed, scales, w_bits, group_size, zeros, bias, x_step, x_bits,
                          x_signed)
    want = ref.packed_linear(x, packed, scales, zeros, w_bits, group_size, bias, x_step, x_bits,
                             x_signed)
    assert y.shape == (m, n) and y.dtype == dtype
    w = ref.dequantize_weight(packed, scales, w_bits, (n, k), group_size, zeros)
    wq = ref.dequantize_weight(packed, scales, w_bits, (n, k), group_size, None)
    assert_linear_close(y, want, fake_quant(x, x_step, x_bits, x_signed), w, wq)
    if dtype == torch.float32:  # the unfused pair (bf16/fp16 would round k * step to x's dtype)
        unfused = ops.packed_linear(ops.packed.quantize_input(x, x_step, x_bits, x_signed),
                                    packed, scales, w_bits, group_size, zeros, bias)
        assert_linear_close(y, unfused, fake_quant(x, x_step, x_bits, x_signed), w, wq)


def test_codes_edges_nan_clipping_and_binary_zero():
    packed = ops.pack_weight(torch.ones(2, 4, dtype=torch.int8), 4)
    s1 = torch.tensor([1.0])
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, -100.0, 0.5, 1.5],
                      [float("nan"), 1.0, 1.0, 1.0]])
    # binary: 0 -> +1 (the sign rule), so a row of zeros sums to 4 codes of +1
    y = ops.packed_linear(x[:2], packed, s1, 4, x_step=s1, x_bits=1, x_signed=True)
    assert y[0].tolist() == [4.0, 4.0] and y[1].tolist() == [2.0, 2.0]
    # unsigned 2-bit: 100 -> 3, -100 -> 0, 0.5 -> 0 (half to even), 1.5 -> 2
    y = ops.packed_linear(x[1:2], packed, s1, 4, x_step=s1, x_bits=2, x_signed=False)
    assert y.tolist() == [[5.0, 5.0]]
    y = ops.packed_linear(x[2:], packed, s1, 4, x_step=s1, x_bits=4, x_signed=True)
    assert torch.isnan(y).all()


def test_bad_input_quantizer_arguments_name_the_argument():
    packed = ops.pack_weight(torch.ones(2, 4, dtype=torch.int8), 4)
    x, s = torch.randn(3, 4), torch.tensor([0.1])
    for bad, match in [(torch.tensor([0.0]), "x_step must be a finite positive step size, got 0"),
                       (torch.tensor([-1.0]), "x_step must be a finite positive"),
                       (torch.tensor([float("inf")]), "x_step must be a finite positive"),
                       (torch.tensor([float("nan")]), "x_step must be a finite positive"),
                       (torch.tensor([0.1], dtype=torch.float64), "x_step must be float32"),
                       (torch.tensor([0.1, 0.2]), "x_step must hold one value")]:
        with pytest.raises(RuntimeError, match=f"rfq.packed_linear: {match}"):
            ops.packed_linear(x, packed, s, 4, x_step=bad, x_bits=4)
    for bits in (0, 9):
        with pytest.raises(RuntimeError, match=f"rfq.packed_linear: x_bits must be in 1..8, got {bits}"):
            ops.packed_linear(x, packed, s, 4, x_step=s, x_bits=bits)
    with pytest.raises(RuntimeError, match="x_step must be on x's device"):
        ops.packed_linear(x, packed, s, 4, x_step=torch.tensor([0.1], device="meta"), x_bits=4)


@pytest.mark.parametrize("x_bits, x_signed", [(4, False), (1, True), (3, True)])
def test_gradient_is_the_clipped_straight_through_one(x_bits, x_signed):
    g = torch.Generator().manual_seed(x_bits)
    codes = random_codes(7, 90, 4, g)
    packed, s = ops.pack_weight(codes, 4), torch.tensor([0.07])
    x_step = torch.tensor([0.3])
    x = (torch.randn(5, 90, generator=g) * 2).requires_grad_(True)
    gy = torch.randn(5, 7, generator=g)
    ops.packed_linear(x, packed, s, 4, x_step=x_step, x_bits=x_bits, x_signed=x_signed).backward(gy)
    x_ref = x.detach().clone().requires_grad_(True)
    w = ref.dequantize_weight(packed, s, 4, (7, 90))
    F.linear(ref.lsq_fake_quant(x_ref, x_step.reshape(()), x_bits, x_signed), w).backward(gy)
    qn, qp = qrange(x_bits, x_signed)
    assert ((x.detach() / 0.3 < qn) | (x.detach() / 0.3 > qp)).any()  # the mask matters here
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_opcheck_and_compile_with_the_input_quantizer():
    g = torch.Generator().manual_seed(0)
    packed = ops.pack_weight(random_codes(6, 150, 4, g), 4)
    x_step = torch.tensor([0.2])
    for rg in (False, True):
        x = torch.randn(3, 150, generator=g).requires_grad_(rg)
        torch.library.opcheck(torch.ops.rfq.packed_linear.default,
                              (x, packed, torch.tensor([0.1]), None, 4, 0, None, x_step, 3, True))
    torch._dynamo.reset()

    def f(x):
        return ops.packed_linear(x, packed, torch.tensor([0.1]), 4, x_step=x_step, x_bits=4)

    x = torch.randn(2, 150, generator=g)
    assert torch.equal(torch.compile(f, fullgraph=True)(x), f(x))


CONV_CASES = [  # (x shape, weight shape, stride, padding, groups)
    ((1, 64, 4, 4), (32, 64, 3, 3), 1, 1, 1),  # M = 16: unfold + fused packed_linear
    ((1, 96, 4, 4), (40, 96, 1, 1), 1, 0, 1),  # 1x1 over positions, fused
    ((2, 16, 8, 8), (16, 16, 3, 3), 1, 1, 1),  # M = 128: dense conv, quantized before it
    ((1, 8, 6, 6), (8, 1, 3, 3), 1, 1, 8),  # depthwise: dense
]


@pytest.mark.parametrize("xs, ws, stride, padding, groups", CONV_CASES)
@pytest.mark.parametrize("x_bits, x_signed", [(4, False), (1, True), (8, True)])
def test_packed_conv2d_fuses_where_it_reads_packed(xs, ws, stride, padding, groups, x_bits,
                                                   x_signed):
    g = torch.Generator().manual_seed(1)
    k = ws[1] * ws[2] * ws[3]
    codes = random_codes(ws[0], k, 4, g)
    packed, s = ops.pack_weight(codes, 4), torch.tensor([2.0 ** -6])
    x_step = torch.tensor([0.25])
    x = torch.randn(xs, generator=g) * 2
    y = ops.packed_conv2d(x, packed, s, 4, ws, stride=stride, padding=padding, groups=groups,
                          x_step=x_step, x_bits=x_bits, x_signed=x_signed)
    # power-of-two steps: the fake-quantized conv in fp64 is exact, so both sides are too
    xq = fake_quant(x, x_step, x_bits, x_signed).double()
    want = F.conv2d(xq, (codes.double() * 2.0 ** -6).reshape(ws), None, stride, padding, 1, groups)
    assert torch.equal(y, want.float())


def test_packed_layer_makes_one_call_when_it_reads_packed(monkeypatch):
    g = torch.Generator().manual_seed(2)
    codes = random_codes(32, 64 * 9, 4, g)
    layer = PackedLayer("conv", codes, 4, (32, 64, 3, 3), torch.tensor([0.01]), None, a_bit=4,
                        a_step=torch.tensor([0.25]), stride=(1, 1), padding=(1, 1),
                        dilation=(1, 1))
    x_small, x_big = torch.randn(1, 64, 4, 4, generator=g), torch.randn(1, 64, 12, 12, generator=g)
    want_small, want_big = layer(x_small), layer(x_big)

    def no_separate_quantizer(*args, **kwargs):
        raise AssertionError("the input quantizer ran as its own op")

    monkeypatch.setattr(ops, "coupled_quant", no_separate_quantizer)
    assert torch.equal(layer(x_small), want_small)  # 16 positions: packed, quantizer fused
    with pytest.raises(AssertionError, match="its own op"):
        layer(x_big)  # 144 positions: a dense conv, the quantizer runs before it
    xq = fake_quant(x_small, torch.tensor([0.25]), 4, False).double()
    w = (codes.double() * 0.01).reshape(32, 64, 3, 3)
    torch.testing.assert_close(want_small.double(), F.conv2d(xq, w, None, 1, 1), rtol=1e-6,
                               atol=1e-5)
