"""The Triton packed-weight launchers against rfq/reference.py (interpreter)."""

from __future__ import annotations

import pytest
import torch

from triton_cases import (  # noqa: F401  (skips this module without triton)
    DTYPES,
    assert_linear_close,
    interpreter,
    packed_case,
    weight_magnitude,
)
from rfq import ops  # noqa: E402
from rfq import reference as ref  # noqa: E402
from rfq.triton_kernels import packed  # noqa: E402


# ---- packed weights (interpreter) ----------------------------------------------------------------


PACKED_MODES = [(0, False), (32, False), (64, True), (128, False), (128, True), (32, True)]
# (m, path): 1 row direct, 3 rows split over K, 17 rows tiled GEMM
PATHS = [(1, dict(splits=1)), (3, dict()), (17, dict())]


PACKED_BITS = [1, 2, 3, 4, 5, 8]  # binary, 2-bit; 3, 4 in 4-bit fields; 5, 8 in int8
COMBOS = [(d, p) for d in DTYPES for p in PATHS]


@interpreter
@pytest.mark.parametrize("bits", PACKED_BITS)
@pytest.mark.parametrize("group_size, with_zeros", PACKED_MODES)
def test_packed_linear_matches_reference(bits, group_size, with_zeros):
    """Each (bits, scale mode) case runs one path in fp32 and in fp16; the path rotates with
    bits and mode, so every bits x path and mode x path pair is covered (the interpreter is
    slow)."""
    codes, w, scales, zeros = packed_case(bits, group_size, with_zeros, seed=bits)
    magnitude = weight_magnitude(codes, scales, zeros, bits, group_size)
    bias = torch.randn(codes.shape[0], generator=torch.Generator().manual_seed(1))
    turn = PACKED_BITS.index(bits) + PACKED_MODES.index((group_size, with_zeros))
    for i in (turn % 6, (turn + 3) % 6):
        dtype, (m, path) = COMBOS[i]
        x = torch.randn(m, codes.shape[1], generator=torch.Generator().manual_seed(i)).to(dtype)
        b = bias if (turn + i) % 2 == 0 else None
        if path == {} and m == 3:
            assert packed.split_k(m, codes.shape[0], codes.shape[1], x.device) > 1
        y = packed.packed_linear(x, w, scales, zeros, bits, group_size, b, **path)
        want = ref.packed_linear(x, w, scales, zeros, bits, group_size, b)
        assert y.shape == (m, codes.shape[0]) and y.dtype == dtype
        assert_linear_close(y, want, x, magnitude)


@interpreter
@pytest.mark.parametrize("x_bits, x_signed", [(1, True), (4, False), (8, True)])
@pytest.mark.parametrize("group_size, with_zeros", [(0, False), (64, True)])
def test_packed_linear_fused_input_quantizer(x_bits, x_signed, group_size, with_zeros):
    """x_step: codes in registers (GEMV, direct and split over K) or the launcher's code stage
    (GEMM), the step after the sums; against the reference; a bad step gives NaN (the GPU
    convention)."""
    codes, w, scales, zeros = packed_case(4, group_size, with_zeros, n=19, k=333, seed=x_bits)
    magnitude = weight_magnitude(codes, scales, zeros, 4, group_size)
    x_step = torch.tensor([0.25])
    for i, (dtype, (m, path)) in enumerate(COMBOS):
        x = torch.randn(m, 333, generator=torch.Generator().manual_seed(i)) * 2 ** x_bits / 8
        x = x.to(dtype)
        y = packed.packed_linear(x, w, scales, zeros, 4, group_size, None, x_step, x_bits,
                                 x_signed, **path)
        want = ref.packed_linear(x, w, scales, zeros, 4, group_size, None, x_step, x_bits,
                                 x_signed)
        xq = ref.codes_float(x.float() / 0.25, x_bits, x_signed) * 0.25
        assert y.shape == (m, 19) and y.dtype == dtype
        assert_linear_close(y, want, xq, magnitude)
    bad = packed.packed_linear(x, w, scales, zeros, 4, group_size, None, torch.tensor([0.0]),
                               x_bits, x_signed)
    assert torch.isnan(bad).all()


@interpreter
@pytest.mark.parametrize("bits", [1, 4, 8])  # the three containers
@pytest.mark.parametrize("group_size, with_zeros", PACKED_MODES)
def test_dequantize_and_unpack_are_exact(bits, group_size, with_zeros):
    codes, w, scales, zeros = packed_case(bits, group_size, with_zeros, n=19, k=333, seed=3)
    assert torch.equal(packed.unpack_weight(w, bits, codes.shape), codes)
    want = ref.dequantize_weight(w, scales, bits, codes.shape, group_size, zeros)
    assert torch.equal(packed.dequantize_weight(w, scales, zeros, bits, group_size, 333), want)


@interpreter
def test_packed_linear_shapes_and_layouts():
    codes, w, scales, zeros = packed_case(4, 64, True, n=40, k=256, seed=5)
    magnitude = weight_magnitude(codes, scales, zeros, 4, 64)
    x = torch.randn(2, 256, 3).transpose(1, 2)  # [2, 3, 256], non-contiguous
    bias = torch.randn(40).to(torch.bfloat16)
    for path in (dict(gemv_max_m=8), dict(gemv_max_m=0)):  # 6 rows on either kernel
        y = packed.packed_linear(x, w, scales, zeros, 4, 64, bias, **path)
        want = ref.packed_linear(x, w, scales, zeros, 4, 64, bias)
        assert y.shape == (2, 3, 40)
        assert_linear_close(y.reshape(6, 40), want.reshape(6, 40), x.reshape(6, 256), magnitude)
    wide = torch.zeros(40, 2 * w.shape[1], dtype=torch.uint8)
    wide[:, ::2] = w  # a non-contiguous packed tensor is copied once
    y = packed.packed_linear(x[0], wide[:, ::2], scales, zeros, 4, 64)
    assert_linear_close(y, ref.packed_linear(x[0], w, scales, zeros, 4, 64), x[0], magnitude)
    assert packed.packed_linear(x[:, :0], w, scales, zeros, 4, 64).shape == (2, 0, 40)
    empty_n = ops.pack_weight(codes[:0], 4)
    assert packed.packed_linear(x, empty_n, scales[:0], None, 4, 64).shape == (2, 3, 0)
    # K = 0: an empty sum, y = bias
    w0 = ops.pack_weight(torch.zeros(5, 0, dtype=torch.int8), 4)
    b5 = torch.randn(5)
    y0 = packed.packed_linear(torch.randn(3, 0), w0, torch.tensor([0.1]), None, 4, 0, b5)
    assert torch.equal(y0, b5.expand(3, 5))


@interpreter
def test_packed_linear_many_tiles():
    """Several GEMM tiles in both dimensions (swizzled program order) and a split-K finish over
    many splits."""
    codes, w, scales, zeros = packed_case(2, 128, False, n=130, k=640, seed=6)
    magnitude = weight_magnitude(codes, scales, zeros, 2, 128)
    x = torch.randn(70, 640).to(torch.float16)
    y = packed.packed_linear(x, w, scales, zeros, 2, 128)
    assert_linear_close(y, ref.packed_linear(x, w, scales, zeros, 2, 128), x, magnitude)
    y = packed.packed_linear(x[:2], w, scales, zeros, 2, 128, splits=5)
    assert_linear_close(y, ref.packed_linear(x[:2], w, scales, zeros, 2, 128), x[:2], magnitude)


