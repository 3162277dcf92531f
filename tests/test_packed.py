"""Packed int2/int4/int8 weights: exact pack/unpack (byte-exact against the reference layout),
packed_linear and the conv path against fp32 dequantize + F.linear / F.conv2d, bad input,
opcheck and torch.compile."""

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given

from rfq import ops
from packed_cases import assert_linear_close
from rfq import reference as ref


def signed_range(bits):
    return (-1, 1) if bits == 1 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def random_codes(n, k, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    lo, hi = signed_range(bits)
    codes = torch.randint(lo, hi + 1, (n, k), generator=g, dtype=torch.int8)
    if bits == 1:
        codes = torch.where(codes == 0, 1, codes).to(torch.int8)  # binary: -1 or +1
    return codes


@given(st.integers(1, 8), st.integers(0, 9), st.integers(0, 300), st.integers(0, 2**16))
def test_pack_unpack_round_trip_and_layout(bits, n, k, seed):
    codes = random_codes(n, k, bits, seed)
    packed = ops.pack_weight(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (n, ops.packed_row_bytes(k, bits))
    assert packed.shape[1] % 64 == 0
    assert torch.equal(packed, ref.pack_weight(codes, bits))  # byte-exact layout
    assert torch.equal(ops.unpack_weight(packed, bits, (n, k)), codes)


def test_layout_is_the_documented_one():
    """4-bit: byte j = element j (low nibble) | element j+64 (high), offset-binary u = q + 8.
    2-bit: byte j = j | j+32 << 2 | j+64 << 4 | j+96 << 6, u = q + 2. K pads with q = 0."""
    codes = torch.zeros(1, 130, dtype=torch.int8)
    codes[0, 0], codes[0, 64], codes[0, 129] = -8, 7, 3
    p4 = ops.pack_weight(codes, 4)
    assert p4.shape == (1, 128)
    assert p4[0, 0].item() == (0 | (15 << 4))  # u(-8)=0 low, u(7)=15 high
    assert p4[0, 1].item() == (8 | (8 << 4))  # zeros
    assert p4[0, 64 + 1].item() == (11 | (8 << 4))  # element 129 = block 1, j=1: u(3)=11
    c2 = torch.zeros(1, 128, dtype=torch.int8)
    c2[0, 5], c2[0, 37], c2[0, 69], c2[0, 101] = -2, -1, 0, 1
    p2 = ops.pack_weight(c2, 2)
    assert p2.shape == (1, 64)  # 32 bytes, row padded to 64
    assert p2[0, 5].item() == (0 | (1 << 2) | (2 << 4) | (3 << 6))



@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("group_size, with_zeros", [(0, False), (32, False), (64, True),
                                                    (128, False), (128, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m", [0, 1, 3, 17, 40])  # 40: the dequantize + MKL path
def test_packed_linear_matches_reference(bits, group_size, with_zeros, dtype, m):
    g = torch.Generator().manual_seed(bits * 100 + m)
    n, k = 33, 300  # odd N, K not a multiple of any group
    codes = random_codes(n, k, bits, seed=m)
    packed = ops.pack_weight(codes, bits)
    if group_size:
        groups = -(-k // group_size)
        scales = (torch.rand(n, groups, generator=g) * 0.1 + 0.01).to(torch.bfloat16)
        zeros = (torch.rand(n, groups, generator=g) * 4).to(torch.bfloat16) if with_zeros else None
    else:
        scales, zeros = torch.tensor([0.05]), None
    bias = torch.randn(n, generator=g)
    x = torch.randn(m, k, generator=g).to(dtype)
    y = ops.packed_linear(x, packed, scales, bits, group_size, zeros, bias)
    want = ref.packed_linear(x, packed, scales, zeros, bits, group_size, bias)
    assert y.shape == (m, n) and y.dtype == dtype
    w = ref.dequantize_weight(packed, scales, bits, (n, k), group_size, zeros)
    assert_linear_close(y, want, x, w)
    assert torch.equal(ops.dequantize_weight(packed, scales, bits, (n, k), group_size, zeros), w)


def test_packed_linear_batched_and_noncontiguous_x():
    codes = random_codes(16, 256, 4)
    packed, s = ops.pack_weight(codes, 4), torch.tensor([0.02])
    x = torch.randn(2, 256, 3).transpose(1, 2)  # [2, 3, 256], non-contiguous
    y = ops.packed_linear(x, packed, s, 4)
    assert y.shape == (2, 3, 16)
    want = ref.packed_linear(x, packed, s, None, 4, 0)
    assert_linear_close(y.reshape(6, 16), want.reshape(6, 16), x.reshape(6, 256),
                        codes.float() * 0.02)


def test_packed_linear_gradient_reaches_x():
    codes = random_codes(8, 64, 4)
    packed, s = ops.pack_weight(codes, 4), torch.tensor([0.1])
    x = torch.randn(3, 64, requires_grad=True)
    ops.packed_linear(x, packed, s, 4).sum().backward()
    torch.testing.assert_close(x.grad, (codes.float() * 0.1).sum(0).expand(3, 64))


CONV_CASES = [  # (x shape, weight shape, stride, padding, groups): ResNet-20/18, MobileNetV2
    ((2, 16, 8, 8), (16, 16, 3, 3), 1, 1, 1),
    ((1, 512, 7, 7), (512, 512, 3, 3), 1, 1, 1),
    ((1, 64, 4, 4), (128, 64, 3, 3), 2, 1, 1),  # M = 4 < 32: unfold + packed_linear
    ((1, 320, 7, 7), (1280, 320, 1, 1), 1, 0, 1),
    ((2, 32, 6, 6), (32, 1, 3, 3), 1, 1, 32),  # depthwise
]


@pytest.mark.parametrize("xs, ws, stride, padding, groups", CONV_CASES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packed_conv2d_matches_conv_on_dequantized_weight(xs, ws, stride, padding, groups, bits):
    g = torch.Generator().manual_seed(0)
    k = ws[1] * ws[2] * ws[3]
    codes = random_codes(ws[0], k, bits)
    packed, s = ops.pack_weight(codes, bits), torch.tensor([0.01])
    x = torch.randn(xs, generator=g)
    bias = torch.randn(ws[0], generator=g)
    y = ops.packed_conv2d(x, packed, s, bits, ws, bias=bias, stride=stride, padding=padding,
                          groups=groups)
    w = (codes.float() * 0.01).reshape(ws)
    want = F.conv2d(x, w, bias, stride, padding, 1, groups)
    # per output channel: the int16 activation rounding (global max|x| bounds every block's)
    bound = x.abs().max() / 32767 * w.abs().reshape(ws[0], -1).sum(1)
    tol = 1e-4 * (1 + want.abs()) + bound.reshape(1, -1, 1, 1)
    assert torch.all((y - want).abs() <= tol)


def test_packed_errors_name_the_argument():
    codes = random_codes(4, 10, 4)
    packed, s = ops.pack_weight(codes, 4), torch.tensor([0.1])
    x = torch.randn(2, 10)
    with pytest.raises(RuntimeError, match=r"rfq.pack_weight: codes\[0, 0\] = 9 is not a signed"):
        ops.pack_weight(torch.full((1, 3), 9, dtype=torch.int8), 4)
    with pytest.raises(RuntimeError, match="binary: -1 or \\+1"):
        ops.pack_weight(torch.zeros(1, 3, dtype=torch.int8), 1)
    with pytest.raises(RuntimeError, match="codes must be int8"):
        ops.pack_weight(codes.float(), 4)
    with pytest.raises(RuntimeError, match="codes must be 2-D"):
        ops.pack_weight(codes.reshape(-1), 4)
    with pytest.raises(RuntimeError, match="rfq.pack_weight: bits must be in 1..8"):
        ops.pack_weight(codes, 9)
    with pytest.raises(RuntimeError, match="packed rows hold 64 bytes but K=200"):
        ops.packed_linear(torch.randn(2, 200), packed, s, 4)
    with pytest.raises(RuntimeError, match="packed rows hold 64 bytes but K=10 at 8 bits"):
        ops.packed_linear(x, packed, s, 8)
    with pytest.raises(RuntimeError, match="group_size must be 0"):
        ops.packed_linear(x, packed, s, 4, group_size=48)
    with pytest.raises(RuntimeError, match="per-tensor scales must hold one value"):
        ops.packed_linear(x, packed, torch.ones(4, 1), 4)
    with pytest.raises(RuntimeError, match="zeros need group-wise scales"):
        ops.packed_linear(x, packed, s, 4, zeros=torch.ones(4, 1))
    with pytest.raises(RuntimeError, match=r"scales must be \[N, ceil\(K/group_size\)\]"):
        ops.packed_linear(x, packed, torch.ones(4, 2), 4, group_size=32)
    with pytest.raises(RuntimeError, match="zeros must have scales' shape"):
        ops.packed_linear(x, packed, torch.ones(4, 1), 4, 32, zeros=torch.ones(4, 2))
    with pytest.raises(RuntimeError, match=r"bias must be \[N\]"):
        ops.packed_linear(x, packed, s, 4, bias=torch.ones(5))
    with pytest.raises(RuntimeError, match="x must be float32"):
        ops.packed_linear(x.long(), packed, s, 4)
    with pytest.raises(RuntimeError, match="packed has 4 rows but shape asks for N=5"):
        ops.unpack_weight(packed, 4, (5, 10))
    with pytest.raises(RuntimeError, match="packed must be uint8"):
        ops.unpack_weight(packed.to(torch.int8), 4, (4, 10))
    with pytest.raises(ValueError, match="rfq.packed_conv2d: x must be"):
        ops.packed_conv2d(torch.randn(1, 3, 4, 4), packed, s, 4, (4, 2, 1, 5))


def test_opcheck_packed_ops():
    codes = random_codes(6, 150, 4)
    packed = ops.pack_weight(codes, 4)
    torch.library.opcheck(torch.ops.rfq.pack_weight.default, (codes, 4))
    torch.library.opcheck(torch.ops.rfq.unpack_weight.default, (packed, 4, [6, 150]))
    for rg in (False, True):
        x = torch.randn(3, 150, requires_grad=rg)
        torch.library.opcheck(torch.ops.rfq.packed_linear.default,
                              (x, packed, torch.tensor([0.1]), None, 4, 0, None))
        torch.library.opcheck(torch.ops.rfq.packed_linear.default,
                              (x, packed, torch.rand(6, 3), torch.rand(6, 3), 4, 64,
                               torch.randn(6)))


def test_compile_fullgraph_over_packed_module():
    torch._dynamo.reset()
    codes = random_codes(10, 64, 2)
    packed, s = ops.pack_weight(codes, 2), torch.tensor([0.3])

    def f(x):
        return ops.packed_linear(torch.relu(x), packed, s, 2).softmax(-1)

    x = torch.randn(4, 64)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))
