"""integer_conv2d: the convolution of unsigned input codes with signed weight codes, scaled by
both steps, against the float64 convolution of the dequantized tensors: exact where every
product and sum is representable (power-of-two steps), to fp32 rounding otherwise; on the fast
(oneDNN integer) path and on the fallback (float convolution of the dequantized codes)."""

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings

from rfq import ops
from rfq.ops import integer_conv


@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 1, 2, 4]))
    depthwise = groups > 1 and draw(st.booleans())
    c_in = groups * (1 if depthwise else draw(st.integers(1, 5)))
    c_out = c_in if depthwise else groups * draw(st.integers(1, 5))
    k = draw(st.sampled_from([1, 3, 5]))
    dilation = draw(st.sampled_from([1, 1, 2]))
    reach = dilation * (k - 1) + 1
    padding = draw(st.integers(0, k // 2))
    size = draw(st.integers(max(1, reach - 2 * padding), 12))
    return dict(n=draw(st.integers(1, 3)), c_in=c_in, c_out=c_out, k=k, size=size,
                stride=draw(st.sampled_from([1, 2])), padding=padding, dilation=dilation,
                groups=groups, a_bits=draw(st.integers(1, 8)), w_bits=draw(st.integers(1, 8)),
                bias=draw(st.booleans()), channels_last=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))


def make(case, power_of_two: bool):
    g = torch.Generator().manual_seed(case["seed"])
    a_hi, w_hi = 2 ** case["a_bits"] - 1, 2 ** (case["w_bits"] - 1)
    x = torch.randint(0, a_hi + 1, (case["n"], case["c_in"], case["size"], case["size"]),
                      generator=g, dtype=torch.uint8)
    if case["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    shape = (case["c_out"], case["c_in"] // case["groups"], case["k"], case["k"])
    if case["w_bits"] == 1:  # binary codes {-1, +1}
        w = torch.randint(0, 2, shape, generator=g, dtype=torch.int8) * 2 - 1
    else:
        w = torch.randint(-w_hi, w_hi, shape, generator=g, dtype=torch.int8)
    if power_of_two:
        xs, ws = 2.0 ** -int(torch.randint(1, 8, (), generator=g)), 2.0 ** -int(
            torch.randint(1, 8, (), generator=g))
        bias = torch.randint(-8, 9, (case["c_out"],), generator=g).float() / 4
    else:
        xs, ws = (float(torch.rand((), generator=g)) * 0.2 + 1e-3 for _ in range(2))
        bias = torch.randn(case["c_out"], generator=g)
    return x, xs, w.to(torch.int8), ws, bias if case["bias"] else None


def reference(case, x, xs, w, ws, bias):
    return F.conv2d(x.double() * xs, w.double() * ws, None if bias is None else bias.double(),
                    case["stride"], case["padding"], case["dilation"], case["groups"])


def run(case, x, xs, w, ws, bias):
    packed = ops.pack_conv_codes(w, ws, case["stride"], case["padding"], case["dilation"],
                                 case["groups"], bias)
    return ops.integer_conv2d(x, xs, packed)


@pytest.fixture(params=["fast", "fallback"])
def path(request, monkeypatch):
    if request.param == "fast":
        if not ops.integer_conv_fast("cpu"):
            pytest.skip("no integer convolution on this CPU (needs x86 oneDNN with VNNI)")
    else:
        monkeypatch.setattr(integer_conv, "integer_conv_fast", lambda device="cpu": False)
    return request.param


# the monkeypatched fallback holds for every example
fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@fixture_ok
@given(case=conv_cases())
def test_power_of_two_steps_give_the_exact_convolution(path, case):
    x, xs, w, ws, bias = make(case, power_of_two=True)
    y = run(case, x, xs, w, ws, bias)
    expected = reference(case, x, xs, w, ws, bias)
    assert y.dtype == torch.float32 and y.shape == expected.shape
    assert torch.equal(y.double(), expected)


@fixture_ok
@given(case=conv_cases())
def test_any_steps_match_the_float64_convolution_to_fp32_rounding(path, case):
    x, xs, w, ws, bias = make(case, power_of_two=False)
    y = run(case, x, xs, w, ws, bias)
    expected = reference(case, x, xs, w, ws, bias)
    # the magnitude sum bounds the rounding of any summation order
    magnitude = F.conv2d(x.double() * xs, w.double().abs() * ws, None, case["stride"],
                         case["padding"], case["dilation"], case["groups"])
    if bias is not None:
        magnitude = magnitude + bias.double().abs().view(1, -1, 1, 1)
    assert ((y.double() - expected).abs() <= 4e-7 * magnitude + 1e-30).all()


def test_channels_last_input_gives_a_channels_last_output(path):
    case = dict(n=2, c_in=8, c_out=8, k=3, size=6, stride=1, padding=1, dilation=1, groups=1,
                a_bits=4, w_bits=4, bias=False, channels_last=True, seed=0)
    x, xs, w, ws, bias = make(case, power_of_two=True)
    assert run(case, x, xs, w, ws, bias).is_contiguous(memory_format=torch.channels_last)


def test_the_fast_path_sums_8_bit_extremes_exactly():
    """255 x -128 over a 3x3x64 window: 16-bit pair sums would saturate."""
    if not ops.integer_conv_fast("cpu"):
        pytest.skip("no integer convolution on this CPU")
    x = torch.full((1, 64, 3, 3), 255, dtype=torch.uint8)
    w = torch.full((2, 64, 3, 3), -128, dtype=torch.int8)
    y = ops.integer_conv2d(x, 1.0, ops.pack_conv_codes(w, 1.0))
    assert ops.pack_conv_codes(w, 1.0).fast
    assert y.flatten().tolist() == [255 * -128 * 9 * 64] * 2


def test_bad_arguments_name_the_argument():
    w = torch.zeros(4, 4, 3, 3, dtype=torch.int8)
    x = torch.zeros(1, 4, 5, 5, dtype=torch.uint8)
    packed = ops.pack_conv_codes(w, 0.1, padding=1)
    cases = [
        (lambda: ops.pack_conv_codes(w.float(), 0.1), "codes must be an int8"),
        (lambda: ops.pack_conv_codes(w[0], 0.1), "codes must be an int8"),
        (lambda: ops.pack_conv_codes(w, 0.0), "scale must be a positive finite"),
        (lambda: ops.pack_conv_codes(w, float("nan")), "scale must be a positive finite"),
        (lambda: ops.pack_conv_codes(w, 0.1, stride=0), "stride and dilation must be positive"),
        (lambda: ops.pack_conv_codes(w, 0.1, padding=-1), "padding must be"),
        (lambda: ops.pack_conv_codes(w, 0.1, stride=(1, 2, 3)), "stride must be"),
        (lambda: ops.pack_conv_codes(w, 0.1, groups=3), "groups must be a positive divisor"),
        (lambda: ops.pack_conv_codes(w, 0.1, bias=torch.zeros(3)), "bias must be a float"),
        (lambda: ops.integer_conv2d(x, 0.1, w), "weight must come from pack_conv_codes"),
        (lambda: ops.integer_conv2d(x.to(torch.int8), 0.1, packed), "x_codes must be a uint8"),
        (lambda: ops.integer_conv2d(x[0], 0.1, packed), "x_codes must be a uint8"),
        (lambda: ops.integer_conv2d(x[:, :3], 0.1, packed), "x_codes has 3 channels"),
        (lambda: ops.integer_conv2d(x, -1.0, packed), "x_scale must be a positive finite"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
