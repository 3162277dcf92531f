"""Packed int2/int4/int8 weights: exact pack/unpack (byte-exact against the reference layout),
packed_linear and the conv path against fp32 dequantize + F.linear / F.conv2d, bad input,
opcheck and torch.compile. Tests that call ops run on every device of conftest's `device`
fixture; CUDA runs are skipped while an op has no CUDA kernel."""

import os
import subprocess
import sys
import textwrap

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings

from rfq import ops
from packed_cases import assert_linear_close
from rfq import reference as ref

# the device fixture is the same for every hypothesis example
fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture,
                                             HealthCheck.too_slow])


def need_kernel(device, *op_names):
    """Skips a CUDA run until every op it calls has a CUDA kernel."""
    if device == "cuda":
        for name in op_names:
            if not torch._C._dispatch_has_kernel_for_dispatch_key(f"rfq::{name}", "CUDA"):
                pytest.skip(f"rfq.{name} has no CUDA kernel yet")
    return device


def signed_range(bits):
    return (-1, 1) if bits == 1 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def random_codes(n, k, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    lo, hi = signed_range(bits)
    codes = torch.randint(lo, hi + 1, (n, k), generator=g, dtype=torch.int8)
    if bits == 1:
        codes = torch.where(codes == 0, 1, codes).to(torch.int8)  # binary: -1 or +1
    return codes


@fixture_ok
@given(st.integers(1, 8), st.integers(0, 9), st.integers(0, 300), st.integers(0, 2**16))
def test_pack_unpack_round_trip_and_layout(device, bits, n, k, seed):
    need_kernel(device, "pack_weight", "unpack_weight")
    codes = random_codes(n, k, bits, seed)
    packed = ops.pack_weight(codes.to(device), bits)
    assert packed.dtype == torch.uint8 and packed.device.type == device
    assert packed.shape == (n, ops.packed_row_bytes(k, bits))
    assert packed.shape[1] % 64 == 0
    assert torch.equal(packed.cpu(), ref.pack_weight(codes, bits))  # byte-exact layout
    assert torch.equal(ops.unpack_weight(packed, bits, (n, k)).cpu(), codes)


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



def make_scales(n, k, group_size, with_zeros, g, dtype=torch.bfloat16):
    if not group_size:
        return torch.tensor([0.05]).to(dtype), None
    groups = -(-k // group_size)
    scales = (torch.rand(n, groups, generator=g) * 0.1 + 0.01).to(dtype)
    zeros = (torch.rand(n, groups, generator=g) * 4).to(dtype) if with_zeros else None
    return scales, zeros


def check_linear(device, x, packed, scales, zeros, bits, group_size, bias=None):
    """packed_linear on `device` against the fp32 reference (computed on the CPU)."""
    n, k = packed.shape[0], x.shape[-1]
    move = (lambda t: None if t is None else t.to(device))
    y = ops.packed_linear(move(x), move(packed), move(scales), bits, group_size, move(zeros),
                          move(bias))
    assert y.shape == (*x.shape[:-1], n) and y.dtype == x.dtype and y.device.type == device
    want = ref.packed_linear(x, packed, scales, zeros, bits, group_size, bias)
    w = ref.dequantize_weight(packed, scales, bits, (n, k), group_size, zeros)
    wq = ref.dequantize_weight(packed, scales, bits, (n, k), group_size, None)
    assert_linear_close(y.cpu().reshape(-1, n), want.reshape(-1, n), x.reshape(-1, k), w, wq)
    return y.cpu()


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("group_size, with_zeros", [(0, False), (32, False), (64, True),
                                                    (128, False), (128, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m", [0, 1, 3, 17, 40])  # 40: dequantize + MKL below AVX512
def test_packed_linear_matches_reference(device, bits, group_size, with_zeros, dtype, m):
    need_kernel(device, "packed_linear")
    g = torch.Generator().manual_seed(bits * 100 + m)
    n, k = 33, 300  # odd N, K not a multiple of any group
    codes = random_codes(n, k, bits, seed=m)
    packed = ops.pack_weight(codes, bits)
    scales, zeros = make_scales(n, k, group_size, with_zeros, g)
    bias = torch.randn(n, generator=g)
    x = torch.randn(m, k, generator=g).to(dtype)
    check_linear(device, x, packed, scales, zeros, bits, group_size, bias)
    w = ref.dequantize_weight(packed, scales, bits, (n, k), group_size, zeros)
    assert torch.equal(ops.dequantize_weight(packed, scales, bits, (n, k), group_size, zeros), w)


# Shapes past the kernels' blocking: K chunks (activations kept in L1), row blocks (packed rows
# kept in L2), row and activation tiles with remainders, and 2-bit units of two blocks with an
# odd block count. M = 1 takes one-row tiles from 1 KB packed rows on (K >= 2048 at 4 bits) and
# multi-row tiles below.
BIG_CASES = [(1, 9, 13_100), (1, 203, 2_100), (2, 37, 4_100), (5, 203, 3_300), (9, 70, 1_000), (31, 5, 4_000),
             (3, 7, 10), (1, 5, 64), (4, 3, 129)]


@pytest.mark.parametrize("m, n, k", BIG_CASES)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [0, 32, 128])
def test_packed_linear_blocking(device, m, n, k, bits, group_size):
    need_kernel(device, "packed_linear")
    g = torch.Generator().manual_seed(m * 1000 + n + bits)
    packed = ops.pack_weight(random_codes(n, k, bits, seed=k), bits)
    scales, _ = make_scales(n, k, group_size, False, g)
    check_linear(device, torch.randn(m, k, generator=g) * 3, packed, scales, None, bits,
                 group_size)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16,
                                         torch.float64], ids=str)
@pytest.mark.parametrize("m", [1, 6])
def test_packed_linear_scale_dtypes(device, scale_dtype, m):
    """Scales are read in their own dtype (float64 is converted once)."""
    need_kernel(device, "packed_linear")
    g = torch.Generator().manual_seed(5)
    n, k = 21, 700
    packed = ops.pack_weight(random_codes(n, k, 4), 4)
    for group_size in (0, 64, 128):
        scales, zeros = make_scales(n, k, group_size, group_size == 64, g, scale_dtype)
        check_linear(device, torch.randn(m, k, generator=g), packed, scales, zeros, 4,
                     group_size)


def test_packed_linear_outlier_blocks_and_zero_blocks(device):
    """Each 128-element block has its own int16 step: a huge block and an all-zero block leave
    the others exact to their own bound."""
    need_kernel(device, "packed_linear")
    g = torch.Generator().manual_seed(9)
    n, k = 40, 640
    packed = ops.pack_weight(random_codes(n, k, 4), 4)
    scales, _ = make_scales(n, k, 128, False, g)
    for m in (1, 7):
        x = torch.randn(m, k, generator=g)
        x[:, 0:128] *= 1e4
        x[:, 256:384] = 0
        x[:, 500] = 1e-30
        check_linear(device, x, packed, scales, None, 4, 128)


@pytest.mark.parametrize("m", [1, 4, 40])
def test_packed_linear_nan_in_x_gives_nan_rows(device, m):
    """A NaN (or inf) in x makes that activation row's outputs NaN, as fp32 F.linear does for
    NaN; the other rows are unaffected."""
    need_kernel(device, "packed_linear")
    g = torch.Generator().manual_seed(2)
    n, k = 19, 300
    packed = ops.pack_weight(random_codes(n, k, 4), 4)
    scales, _ = make_scales(n, k, 128, False, g)
    x = torch.randn(m, k, generator=g)
    x[0, 150] = float("nan")
    y = ops.packed_linear(x.to(device), packed.to(device), scales.to(device), 4, 128).cpu()
    assert torch.isnan(y[0]).all()
    if m > 1:
        x[0] = 0
        want = check_linear("cpu", x, packed, scales, None, 4, 128)
        assert torch.allclose(y[1:], want[1:]) and not torch.isnan(y[1:]).any()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packed_linear_same_bits_on_1_and_2_threads(bits):
    """Every output comes from one tile in a fixed order, whatever the thread count."""
    g = torch.Generator().manual_seed(bits)
    packed = ops.pack_weight(random_codes(300, 1000, bits), bits)
    scales, _ = make_scales(300, 1000, 128, False, g)
    before = torch.get_num_threads()
    try:
        for m in (1, 5, 40):
            x = torch.randn(m, 1000, generator=g)
            torch.set_num_threads(1)
            one = ops.packed_linear(x, packed, scales, bits, 128)
            torch.set_num_threads(2)
            assert torch.equal(ops.packed_linear(x, packed, scales, bits, 128), one)
    finally:
        torch.set_num_threads(before)


def test_packed_linear_batched_and_noncontiguous_x(device):
    need_kernel(device, "packed_linear")
    codes = random_codes(16, 256, 4)
    packed, s = ops.pack_weight(codes, 4), torch.tensor([0.02])
    x = torch.randn(2, 256, 3).transpose(1, 2)  # [2, 3, 256], non-contiguous
    y = check_linear(device, x, packed, s, None, 4, 0)
    assert y.shape == (2, 3, 16)


@pytest.mark.parametrize("group_size", [0, 32])
def test_packed_linear_empty_k_gives_bias(device, group_size):
    """K = 0: the product is empty, so y is the bias broadcast over every row of x."""
    need_kernel(device, "packed_linear")
    packed = ops.pack_weight(torch.zeros(5, 0, dtype=torch.int8), 4)
    scales = torch.tensor([0.1]) if group_size == 0 else torch.ones(5, 0)
    bias = torch.arange(5, dtype=torch.float32)
    x = torch.randn(2, 3, 0)
    y = ops.packed_linear(x.to(device), packed.to(device), scales.to(device), 4, group_size,
                          None, bias.to(device))
    assert y.shape == (2, 3, 5)
    assert torch.equal(y.cpu(), bias.expand(2, 3, 5))
    assert torch.equal(ref.packed_linear(x, packed, scales, None, 4, group_size, bias), y.cpu())


def test_packed_linear_gradient_reaches_x(device):
    need_kernel(device, "packed_linear", "unpack_weight")
    codes = random_codes(8, 64, 4)
    packed, s = ops.pack_weight(codes, 4).to(device), torch.tensor([0.1], device=device)
    x = torch.randn(3, 64, device=device, requires_grad=True)
    ops.packed_linear(x, packed, s, 4).sum().backward()
    torch.testing.assert_close(x.grad.cpu(), (codes.float() * 0.1).sum(0).expand(3, 64))


# The ISA levels are covered by tests/ops/test_cpu_isa.py. These run the kernel variants a machine
# does not pick by default: the AVX512 kernels without VNNI (vpmaddwd), and the dequantize + MKL
# path (whole weight, and row tiles for weights past 16 MB of fp32) that the AVX512 level only
# takes when RFQ_PACKED_GEMM_MIN_M asks for it.
VARIANT_CHECK = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, TESTS_DIR)
    import torch
    from packed_cases import assert_linear_close
    from rfq import ops, reference as ref
    g = torch.Generator().manual_seed(0)
    for bits in (2, 4, 8):
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        for n, k, ms in ((37, 1300, (1, 6)), (4100, 1100, (3,))):
            codes = torch.randint(lo, hi + 1, (n, k), generator=g, dtype=torch.int8)
            packed = ops.pack_weight(codes, bits)
            for group_size in ((0, 32, 64, 128) if n < 100 else (128,)):
                groups = -(-k // group_size) if group_size else 1
                scales = (torch.rand(n, groups, generator=g) + 0.5 if group_size
                          else torch.tensor([0.3]))
                zeros = torch.rand(n, groups, generator=g) * 3 if group_size == 64 else None
                w = ref.dequantize_weight(packed, scales, bits, (n, k), group_size, zeros)
                wq = ref.dequantize_weight(packed, scales, bits, (n, k), group_size, None)
                for m in ms:
                    x = torch.randn(m, k, generator=g)
                    y = ops.packed_linear(x, packed, scales, bits, group_size, zeros)
                    want = ref.packed_linear(x, packed, scales, zeros, bits, group_size)
                    assert_linear_close(y, want, x, w, wq)
    print("ok")
    """
)


@pytest.mark.parametrize("env", [{"RFQ_PACKED_VNNI": "0"}, {"RFQ_PACKED_GEMM_MIN_M": "2"}],
                         ids=["no-vnni", "dequantize-mkl"])
def test_packed_linear_kernel_variants(env):
    if "RFQ_PACKED_VNNI" in env and ops.cpu_capability() != "AVX512":
        pytest.skip("only AVX512 kernels have a VNNI variant")
    script = VARIANT_CHECK.replace("TESTS_DIR", repr(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    out = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, **env),
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == ["ok"], out.stderr[-3000:]


CONV_CASES = [  # (x shape, weight shape, stride, padding, groups): ResNet-20/18, MobileNetV2
    ((2, 16, 8, 8), (16, 16, 3, 3), 1, 1, 1),
    ((1, 512, 7, 7), (512, 512, 3, 3), 1, 1, 1),
    ((1, 64, 4, 4), (128, 64, 3, 3), 2, 1, 1),  # M = 4 < 32: unfold + packed_linear
    ((1, 320, 7, 7), (1280, 320, 1, 1), 1, 0, 1),
    ((2, 32, 6, 6), (32, 1, 3, 3), 1, 1, 32),  # depthwise
    ((1, 96, 4, 4), (160, 96, 1, 1), 1, 0, 1),  # 1x1, M = 16: positions as rows, no unfold
    ((1, 64, 7, 7), (128, 64, 1, 1), 2, 0, 1),  # strided 1x1 (a ResNet-18 shortcut), M = 16
]


@pytest.mark.parametrize("xs, ws, stride, padding, groups", CONV_CASES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packed_conv2d_matches_conv_on_dequantized_weight(device, xs, ws, stride, padding, groups,
                                                          bits):
    need_kernel(device, "packed_linear", "unpack_weight")
    g = torch.Generator().manual_seed(0)
    k = ws[1] * ws[2] * ws[3]
    codes = random_codes(ws[0], k, bits)
    packed, s = ops.pack_weight(codes, bits), torch.tensor([0.01])
    x = torch.randn(xs, generator=g)
    bias = torch.randn(ws[0], generator=g)
    y = ops.packed_conv2d(x.to(device), packed.to(device), s.to(device), bits, ws,
                          bias=bias.to(device), stride=stride, padding=padding,
                          groups=groups).cpu()
    w = (codes.float() * 0.01).reshape(ws)
    want = F.conv2d(x, w, bias, stride, padding, 1, groups)
    # per output channel: the int16 activation rounding (global max|x| bounds every block's)
    bound = x.abs().max() / 32767 * w.abs().reshape(ws[0], -1).sum(1)
    tol = 1e-4 * (1 + want.abs()) + bound.reshape(1, -1, 1, 1)
    assert torch.all((y - want).abs() <= tol)


def test_packed_errors_name_the_argument(device):
    need_kernel(device, "pack_weight", "unpack_weight", "packed_linear")
    codes = random_codes(4, 10, 4).to(device)
    packed, s = ops.pack_weight(codes, 4), torch.tensor([0.1], device=device)
    x = torch.randn(2, 10, device=device)
    with pytest.raises(RuntimeError, match=r"rfq.pack_weight: codes\[0, 0\] = 9 is not a signed"):
        ops.pack_weight(torch.full((1, 3), 9, dtype=torch.int8, device=device), 4)
    with pytest.raises(RuntimeError, match="binary: -1 or \\+1"):
        ops.pack_weight(torch.zeros(1, 3, dtype=torch.int8, device=device), 1)
    with pytest.raises(RuntimeError, match="codes must be int8"):
        ops.pack_weight(codes.float(), 4)
    with pytest.raises(RuntimeError, match="codes must be 2-D"):
        ops.pack_weight(codes.reshape(-1), 4)
    with pytest.raises(RuntimeError, match="rfq.pack_weight: bits must be in 1..8"):
        ops.pack_weight(codes, 9)
    with pytest.raises(RuntimeError, match="packed rows hold 64 bytes but K=200"):
        ops.packed_linear(torch.randn(2, 200, device=device), packed, s, 4)
    with pytest.raises(RuntimeError, match="packed rows hold 64 bytes but K=10 at 8 bits"):
        ops.packed_linear(x, packed, s, 8)
    with pytest.raises(RuntimeError, match="group_size must be 0"):
        ops.packed_linear(x, packed, s, 4, group_size=48)
    with pytest.raises(RuntimeError, match="per-tensor scales must hold one value"):
        ops.packed_linear(x, packed, torch.ones(4, 1, device=device), 4)
    with pytest.raises(RuntimeError, match="zeros need group-wise scales"):
        ops.packed_linear(x, packed, s, 4, zeros=torch.ones(4, 1, device=device))
    with pytest.raises(RuntimeError, match=r"scales must be \[N, ceil\(K/group_size\)\]"):
        ops.packed_linear(x, packed, torch.ones(4, 2, device=device), 4, group_size=32)
    with pytest.raises(RuntimeError, match="zeros must have scales' shape"):
        ops.packed_linear(x, packed, torch.ones(4, 1, device=device), 4, 32, zeros=torch.ones(4, 2, device=device))
    with pytest.raises(RuntimeError, match=r"bias must be \[N\]"):
        ops.packed_linear(x, packed, s, 4, bias=torch.ones(5, device=device))
    with pytest.raises(RuntimeError, match="x must be float32"):
        ops.packed_linear(x.long(), packed, s, 4)
    with pytest.raises(RuntimeError, match="packed has 4 rows but shape asks for N=5"):
        ops.unpack_weight(packed, 4, (5, 10))
    with pytest.raises(RuntimeError, match="packed must be uint8"):
        ops.unpack_weight(packed.to(torch.int8), 4, (4, 10))
    with pytest.raises(ValueError, match="rfq.packed_conv2d: x must be"):
        ops.packed_conv2d(torch.randn(1, 3, 4, 4, device=device), packed, s, 4, (4, 2, 1, 5))


def test_opcheck_packed_ops(device):
    need_kernel(device, "pack_weight", "unpack_weight", "packed_linear")
    codes = random_codes(6, 150, 4).to(device)
    packed = ops.pack_weight(codes, 4)
    torch.library.opcheck(torch.ops.rfq.pack_weight.default, (codes, 4))
    torch.library.opcheck(torch.ops.rfq.unpack_weight.default, (packed, 4, [6, 150]))
    rand = (lambda *shape: torch.rand(*shape, device=device))
    for rg in (False, True):
        x = torch.randn(3, 150, device=device, requires_grad=rg)
        torch.library.opcheck(torch.ops.rfq.packed_linear.default,
                              (x, packed, torch.tensor([0.1], device=device), None, 4, 0, None))
        torch.library.opcheck(torch.ops.rfq.packed_linear.default,
                              (x, packed, rand(6, 3), rand(6, 3), 4, 64, rand(6)))


def test_compile_fullgraph_over_packed_module(device):
    need_kernel(device, "packed_linear")
    torch._dynamo.reset()
    codes = random_codes(10, 64, 2)
    packed, s = ops.pack_weight(codes, 2).to(device), torch.tensor([0.3], device=device)

    def f(x):
        return ops.packed_linear(torch.relu(x), packed, s, 2).softmax(-1)

    x = torch.randn(4, 64, device=device)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))
