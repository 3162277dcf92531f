"""Triton kernels (rfq.triton_kernels), their custom ops (torch.ops.rfq_triton) and the GPU
backend switch of rfq.ops.

On CPU the Triton launchers run under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported) against rfq/reference.py: fp32 and fp16 only (the
interpreter's bf16 is wrong), small shapes. The interpreter divides with NumPy, so tl.div_rn vs
plain `/` and bf16 are GPU tests; test_kernels_compile_for_sm90 compiles the kernels for an H100
target without a GPU and checks the PTX (div.rn, no FMA contraction, the rounding constant).

GPU tests (compiled Triton on CUDA tensors) need TRITON_INTERPRET=0; on a machine with CUDA a
normal run starts them in a child process (test_gpu_suite_in_compiled_mode). Directly:
    TRITON_INTERPRET=0 python -m pytest tests/test_triton.py -k gpu
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
import triton.language as tl  # noqa: E402

from lsq_cases import abs_step_terms, assert_step_grad_close, make_x, steps_for  # noqa: E402
from rfq import ops  # noqa: E402
from rfq import reference as ref  # noqa: E402
from rfq.ops import triton_ops  # noqa: E402,F401  (registers torch.ops.rfq_triton)
from rfq.triton_kernels import lsq, packed  # noqa: E402

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


# ---- LSQ launchers vs the reference (interpreter) ---------------------------------------------


@interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_coupled_quant_forward_backward(dtype, bits, signed):
    cands = sorted({bits, 4, 2})  # bits sits at some slot of a K-vector
    j = cands.index(bits)
    for pow2, shape in cases_for(dtype):
        steps = steps_for(cands, signed, pow2)
        x = make_x(shape, dtype, bits, signed, steps[j].item(), seed=bits)
        sel = torch.tensor(j)
        y = lsq.coupled_quant(x, steps, cands, sel, signed)
        assert y.dtype == dtype and y.shape == x.shape
        assert torch.equal(y, ref.coupled_quant(x, steps, cands, sel, signed))

        grad_y = grads_like(shape, dtype)
        gx, gs = lsq.coupled_quant_backward(grad_y, x, steps, cands, sel, signed, 0.37)
        rgx, rgs = ref.coupled_quant_backward(grad_y, x, steps, cands, sel, signed, 0.37)
        assert torch.equal(gx, rgx)
        assert gs.dtype == torch.float32 and gs.shape == steps.shape
        assert torch.all(gs[[i for i in range(len(cands)) if i != j]] == 0)
        scale = 0.37 * abs_step_terms(grad_y, x, steps[j], bits, signed)
        assert_step_grad_close(gs, rgs, scale)


@interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_quantize_codes(dtype, bits, signed):
    step = steps_for([bits], signed, pow2=True)
    for shape in SHAPES:
        x = make_x(shape, dtype, bits, signed, step.item(), seed=3)
        codes = lsq.quantize_codes(x, step, bits, signed)
        assert codes.dtype == (torch.int8 if signed else torch.uint8)
        assert torch.equal(codes, ref.quantize_codes(x, step, bits, signed))
        y = lsq.coupled_quant(x, step, [bits], torch.tensor(0), signed)
        assert torch.equal(y, (codes.float() * step).to(dtype))  # y is the codes times s


@interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cands", CANDIDATE_SETS, ids=str)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_coupled_quant_multi(dtype, cands, signed):
    for pow2, shape in cases_for(dtype):
        steps = steps_for(cands, signed, pow2)
        x = make_x(shape, dtype, min(cands), signed, steps.max().item(), seed=11)
        ys = lsq.coupled_quant_multi(x, steps, cands, signed)
        assert ys.shape == (len(cands), *shape) and ys.is_contiguous()
        assert torch.equal(ys, ref.coupled_quant_multi(x, steps, cands, signed))
        for j in range(len(cands)) if shape == (3, 5, 9) else ():  # = the one-candidate kernel
            assert torch.equal(ys[j], lsq.coupled_quant(x, steps, cands, torch.tensor(j), signed))

        grad_y = grads_like((len(cands), *shape), dtype, seed=5)
        gx, gs = lsq.coupled_quant_multi_backward(grad_y, x, steps, cands, signed, 2.0)
        rgx, rgs = ref.coupled_quant_multi_backward(grad_y, x, steps, cands, signed, 2.0)
        assert torch.equal(gx, rgx)
        scale = torch.stack([2.0 * abs_step_terms(grad_y[j], x, steps[j], b, signed)
                             for j, b in enumerate(cands)])
        assert_step_grad_close(gs, rgs, scale)


@interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cands", CANDIDATE_SETS, ids=str)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_quant_stats(dtype, cands, signed):
    steps = steps_for(cands, signed, pow2=False)
    for _, shape in cases_for(dtype)[:-1]:
        x = make_x(shape, dtype, min(cands), signed, steps.max().item(), seed=13)
        for delta in (0.125, 0.0, 0.5) if shape in [(3, 5, 9), (4133,)] else (0.125,):
            mse, share = lsq.quant_stats(x, steps, cands, signed, delta)
            rmse, rshare = ref.quant_stats(x, steps, cands, signed, delta)
            assert torch.equal(share, rshare)  # exact counts
            torch.testing.assert_close(mse, rmse, rtol=1e-5, atol=1e-12)
            if x.numel() == 0:
                assert torch.all(mse == 0) and torch.all(share == 0)


@interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_small_tiles(dtype):
    """A 64-element tile: 17 programs with a tail, 17 fp32 partials per candidate."""
    cands = [6, 5, 4, 3, 2]
    steps = steps_for(cands, True, pow2=False)
    x = make_x((1071,), dtype, 2, True, steps[-1].item(), seed=21)
    sel = torch.tensor(3)
    b = SMALL_BLOCK
    assert torch.equal(lsq.coupled_quant(x, steps, cands, sel, block=b),
                       ref.coupled_quant(x, steps, cands, sel))
    g = grads_like(x.shape, dtype)
    gx, gs = lsq.coupled_quant_backward(g, x, steps, cands, sel, True, 1.0, block=b)
    rgx, rgs = ref.coupled_quant_backward(g, x, steps, cands, sel, True, 1.0)
    assert torch.equal(gx, rgx)
    assert_step_grad_close(gs, rgs, abs_step_terms(g, x, steps[3], 3, True))
    assert torch.equal(lsq.coupled_quant_multi(x, steps, cands, block=b),
                       ref.coupled_quant_multi(x, steps, cands))
    gk = grads_like((5, *x.shape), dtype, seed=2)
    gx, gs = lsq.coupled_quant_multi_backward(gk, x, steps, cands, True, 1.0, block=b)
    rgx, rgs = ref.coupled_quant_multi_backward(gk, x, steps, cands, True, 1.0)
    assert torch.equal(gx, rgx)
    assert_step_grad_close(gs, rgs, torch.stack(
        [abs_step_terms(gk[j], x, steps[j], c, True) for j, c in enumerate(cands)]))
    mse, share = lsq.quant_stats(x, steps, cands, block=b)
    rmse, rshare = ref.quant_stats(x, steps, cands)
    assert torch.equal(share, rshare)
    torch.testing.assert_close(mse, rmse, rtol=1e-5, atol=0)
    assert torch.equal(lsq.quantize_codes(x, steps[:1], 6, block=b),
                       ref.quantize_codes(x, steps[:1], 6))


@interpreter
def test_second_pass_spans_several_blocks(monkeypatch):
    """More partials than one RBLOCK of the fixed-order second pass: 100 tiles, RBLOCK 32."""
    monkeypatch.setattr(lsq, "RBLOCK", 32)
    n = 100 * 16 - 3
    steps = torch.tensor([0.11])
    x = make_x((n,), torch.float32, 4, True, 0.11, seed=4)
    g = grads_like(x.shape, torch.float32, seed=8)
    _, gs = lsq.coupled_quant_backward(g, x, steps, [4], torch.tensor(0), True, 1.0, block=16)
    _, rgs = ref.coupled_quant_backward(g, x, steps, [4], torch.tensor(0), True, 1.0)
    assert_step_grad_close(gs, rgs, abs_step_terms(g, x, steps[0], 4, True))
    mse, share = lsq.quant_stats(x, steps, [4], block=16)
    rmse, rshare = ref.quant_stats(x, steps, [4])
    assert torch.equal(share, rshare)
    torch.testing.assert_close(mse, rmse, rtol=1e-5, atol=0)


def _layouts(x4d: torch.Tensor):
    """Same values in other layouts: dense non-contiguous (kept) and non-dense (copied)."""
    yield "channels_last", x4d.to(memory_format=torch.channels_last), True
    yield "transposed", x4d.transpose(1, 3).contiguous().transpose(1, 3), True
    wide = torch.zeros(*x4d.shape[:-1], 2 * x4d.shape[-1], dtype=x4d.dtype)
    wide[..., ::2] = x4d
    yield "strided", wide[..., ::2], False
    yield "expanded", x4d[:1].expand(*x4d.shape), False


@interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layouts(dtype):
    """Dense layouts are kept for y, dx and codes (as the C++ kernels do); other strides are
    copied once; grad_y in another layout than x still lines up element by element."""
    steps = torch.tensor([0.2, 0.05])
    base = make_x((2, 3, 5, 7), dtype, 4, True, 0.05, seed=9)
    sel = torch.tensor(1)
    for name, x, dense in _layouts(base):
        y = lsq.coupled_quant(x, steps, [2, 4], sel)
        assert torch.equal(y, ref.coupled_quant(x, steps, [2, 4], sel)), name
        if dense:
            assert y.stride() == x.stride(), name
        g = grads_like(x.shape, dtype).contiguous()  # x's layout differs from g's
        gx, gs = lsq.coupled_quant_backward(g, x, steps, [2, 4], sel, True, 1.0)
        rgx, rgs = ref.coupled_quant_backward(g, x, steps, [2, 4], sel, True, 1.0)
        assert torch.equal(gx, rgx), name
        assert_step_grad_close(gs, rgs, abs_step_terms(g, x, steps[1], 4, True))
        codes = lsq.quantize_codes(x, steps[1:], 4)
        assert torch.equal(codes, ref.quantize_codes(x, steps[1:], 4)), name
        assert torch.equal(lsq.coupled_quant_multi(x, steps, [2, 4]),
                           ref.coupled_quant_multi(x, steps, [2, 4])), name
        gk = grads_like((2, *x.shape), dtype).transpose(1, 2).contiguous().transpose(1, 2)
        gx, _ = lsq.coupled_quant_multi_backward(gk, x, steps, [2, 4], True, 1.0)
        assert torch.equal(gx, ref.coupled_quant_multi_backward(gk, x, steps, [2, 4], True,
                                                                1.0)[0]), name
        mse, share = lsq.quant_stats(x, steps, [2, 4])
        assert torch.equal(share, ref.quant_stats(x, steps, [2, 4])[1]), name
    # a strided steps vector and a step with a storage offset are read in place
    wide = torch.tensor([0.2, -1.0, 0.05, -1.0])
    x = base.reshape(-1)
    assert torch.equal(lsq.coupled_quant(x, wide[::2], [2, 4], sel),
                       ref.coupled_quant(x, wide[::2].contiguous(), [2, 4], sel))
    assert torch.equal(lsq.quantize_codes(x, wide[2:3], 4), ref.quantize_codes(x, wide[2:3], 4))


@interpreter
def test_binary_definition_and_ties():
    s = torch.tensor([0.5])
    x = torch.tensor([-2.0, -0.5, -0.25, -0.0, 0.0, 0.1, 0.5, 0.75])
    sel = torch.tensor(0)
    assert lsq.coupled_quant(x, s, [1], sel, True).tolist() == [-0.5] * 3 + [0.5] * 5
    assert lsq.quantize_codes(x, s, 1, True).tolist() == [-1] * 3 + [1] * 5
    gx, gs = lsq.coupled_quant_backward(torch.ones_like(x), x, s, [1], sel, True, 1.0)
    assert gx.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    assert gs.item() == pytest.approx(-1 + 0 - 0.5 + 1 + 1 + 0.8 + 0 + 1, rel=1e-6)
    ties = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 6.5, 7.5])
    assert lsq.quantize_codes(ties, torch.tensor([1.0]), 4, True).tolist() == [
        -2, -2, 0, 0, 2, 2, 4, 6, 7]  # half to even; 7.5 clips to 7 first


@interpreter
def test_nan_and_inf_inputs():
    s = torch.tensor([0.25])
    x = torch.tensor([NAN, 1.0, float("inf"), -float("inf")])
    sel = torch.tensor(0)
    for bits, signed in [(4, True), (1, True), (3, False)]:
        y = lsq.coupled_quant(x, s, [bits], sel, signed)
        r = ref.coupled_quant(x, s, [bits], sel, signed)
        assert y[0].isnan() and torch.equal(y[1:], r[1:])  # infinities clip to the range ends
        assert torch.equal(lsq.quantize_codes(x, s, bits, signed),
                           ref.quantize_codes(x, s, bits, signed))  # NaN -> code 0
        gx, gs = lsq.coupled_quant_backward(torch.ones(4), x, s, [bits], sel, signed, 1.0)
        assert gx[0] == 0 and gs.isnan().all()  # no gradient to NaN x; its h is NaN


# ---- bad steps and sel: NaN, never a sync (spec §1 "Bad steps") ------------------------------

BAD_STEPS = [0.0, -0.5, NAN, float("inf"), -float("inf")]


@interpreter
@pytest.mark.parametrize("bad", BAD_STEPS, ids=str)
def test_bad_selected_step_gives_nan(bad):
    x = make_x((300,), torch.float32, 4, True, 0.1, seed=1)
    steps = torch.tensor([0.3, bad, 0.1])
    sel = torch.tensor(1)
    g = grads_like(x.shape, torch.float32)
    assert lsq.coupled_quant(x, steps, [2, 4, 6], sel).isnan().all()
    gx, gs = lsq.coupled_quant_backward(g, x, steps, [2, 4, 6], sel, True, 1.0)
    assert gx.isnan().all() and gs[1].isnan() and gs[0] == 0 and gs[2] == 0
    # the other candidates do not care: only the selected step is read
    ok = lsq.coupled_quant(x, steps, [2, 4, 6], torch.tensor(2))
    assert torch.equal(ok, ref.coupled_quant(x, steps, [2, 4, 6], torch.tensor(2)))
    # empty x: still NaN in the selected slot (the step is bad whatever x holds)
    _, gs = lsq.coupled_quant_backward(x[:0], x[:0], steps, [2, 4, 6], sel, True, 1.0)
    assert gs[1].isnan() and gs[0] == 0 and gs[2] == 0
    assert torch.equal(lsq.quantize_codes(x, steps[1:2], 4), torch.zeros(300, dtype=torch.int8))


@interpreter
@pytest.mark.parametrize("bad", BAD_STEPS, ids=str)
def test_bad_step_in_multi_and_stats(bad):
    x = make_x((300,), torch.float16, 4, True, 0.1, seed=2)
    steps = torch.tensor([0.3, bad, 0.1])
    cands = [2, 4, 6]
    ys = lsq.coupled_quant_multi(x, steps, cands)
    want = ref.coupled_quant_multi(x, steps, cands)
    assert ys[1].isnan().all() and torch.equal(ys[0], want[0]) and torch.equal(ys[2], want[2])
    g = grads_like((3, 300), torch.float16)
    gx, gs = lsq.coupled_quant_multi_backward(g, x, steps, cands, True, 1.0)
    rgx, rgs = ref.coupled_quant_multi_backward(g, x, steps, cands, True, 1.0)
    assert gx.isnan().all() and gs[1].isnan()  # dx sums every plane: one bad step spoils it
    torch.testing.assert_close(gs[[0, 2]], rgs[[0, 2]], rtol=1e-5, atol=1e-5)
    mse, share = lsq.quant_stats(x, steps, cands)
    rmse, rshare = ref.quant_stats(x, steps, cands)
    assert mse[1].isnan() and share[1].isnan()
    assert torch.equal(share[[0, 2]], rshare[[0, 2]])


@interpreter
@pytest.mark.parametrize("sel", [-1, 3, 100])
def test_out_of_range_sel_gives_nan(sel):
    x = make_x((100,), torch.float32, 4, True, 0.1, seed=3)
    steps = torch.tensor([0.3, 0.2, 0.1])
    s = torch.tensor(sel)
    assert lsq.coupled_quant(x, steps, [2, 4, 6], s).isnan().all()
    gx, gs = lsq.coupled_quant_backward(x, x, steps, [2, 4, 6], s, True, 1.0)
    assert gx.isnan().all() and gs.isnan().all()


# ---- packed weights (interpreter) ----------------------------------------------------------------


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


# ---- the custom ops on CPU: opcheck, autograd, torch.compile -------------------------------------

OPCHECK_DTYPES = [torch.float32, torch.float16]


def samples(dtype, requires_grad):
    g = torch.Generator().manual_seed(0)
    for shape in [(3, 4, 5), (0, 2)]:
        x = (torch.randn(shape, generator=g) * 2).to(dtype).requires_grad_(requires_grad)
        steps = torch.tensor([0.3, 0.1, 0.05], requires_grad=requires_grad)
        yield x, steps


@pytest.mark.parametrize("dtype", OPCHECK_DTYPES, ids=str)
def test_opcheck_rfq_triton_ops(dtype):
    rt = torch.ops.rfq_triton
    no_autograd = [u for u in torch.library._OPCHECK_DEFAULT_UTILS
                   if u != "test_autograd_registration"]
    for rg in (True, False):
        for x, steps in samples(dtype, rg):
            torch.library.opcheck(rt.coupled_quant.default,
                                  (x, steps, [2, 4, 6], torch.tensor(1), True, 0.5))
            torch.library.opcheck(rt.coupled_quant_multi.default, (x, steps, [2, 4, 6], False, 1.0))
    if dtype != torch.float32:
        return  # the other ops' CPU kernels treat every dtype alike
    for x, steps in samples(dtype, False):
        grad = torch.randn(x.shape).to(dtype)
        torch.library.opcheck(rt.coupled_quant_backward.default,
                              (grad, x, steps, [2, 4, 6], torch.tensor(0), True, 1.0),
                              test_utils=no_autograd)
        torch.library.opcheck(rt.coupled_quant_multi_backward.default,
                              (torch.stack([grad] * 3), x, steps, [2, 4, 6], True, 1.0),
                              test_utils=no_autograd)
        torch.library.opcheck(rt.quant_stats.default, (x, steps, [2, 4, 6], True, 0.1))
        torch.library.opcheck(rt.quantize_codes.default, (x, steps[:1], 4, True))
        torch.library.opcheck(rt.quantize_codes.default, (x, steps[:1], 8, False))
    codes, w, scales, zeros = packed_case(4, 64, True, n=6, k=150)
    for rg in (True, False):
        x = torch.randn(3, 150).requires_grad_(rg)
        torch.library.opcheck(rt.packed_linear.default, (x, w, scales, zeros, 4, 64, None))
        torch.library.opcheck(rt.packed_linear.default,
                              (x, w, torch.tensor([0.1]), None, 4, 0, torch.randn(6)))
    torch.library.opcheck(rt.dequantize_weight.default, (w, scales, zeros, 4, 64, 150))


@pytest.mark.parametrize("signed", [True, False])
def test_op_gradients_match_autograd_through_reference(signed):
    """The rfq_triton autograd registrations against autograd of the plain expression."""
    g = torch.Generator().manual_seed(3)
    bits = [2, 3, 5]
    x0 = torch.randn(4, 33, generator=g) * 0.6
    s0 = torch.tensor([0.4, 0.2, 0.05])
    gy = torch.randn(4, 33, generator=g)
    for j in range(len(bits)):
        sel = torch.tensor(j)
        x, s = x0.clone().requires_grad_(), s0.clone().requires_grad_()
        torch.ops.rfq_triton.coupled_quant(x, s, bits, sel, signed, 0.37).backward(gy)
        xr, sr = x0.clone().requires_grad_(), s0.clone().requires_grad_()
        ref.coupled_quant(xr, sr, bits, sel, signed, 0.37).backward(gy)
        torch.testing.assert_close(x.grad, xr.grad, rtol=1e-6, atol=0)
        torch.testing.assert_close(s.grad, sr.grad, rtol=1e-5, atol=1e-5)
    x, s = x0.clone().requires_grad_(), s0.clone().requires_grad_()
    gys = torch.randn(3, 4, 33, generator=g)
    torch.ops.rfq_triton.coupled_quant_multi(x, s, bits, signed, 1.0).backward(gys)
    xr, sr = x0.clone().requires_grad_(), s0.clone().requires_grad_()
    ref.coupled_quant_multi(xr, sr, bits, signed, 1.0).backward(gys)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad, sr.grad, rtol=1e-5, atol=1e-5)
    codes, w, scales, _ = packed_case(4, 0, False, n=8, k=64)
    x = torch.randn(3, 64, requires_grad=True)
    torch.ops.rfq_triton.packed_linear(x, w, scales, None, 4, 0).sum().backward()
    torch.testing.assert_close(x.grad, (codes.float() * 0.05).sum(0).expand(3, 64))


def test_op_cpu_kernels_follow_the_gpu_nan_convention():
    rt = torch.ops.rfq_triton
    x = torch.randn(20)
    steps = torch.tensor([0.3, 0.0])
    assert rt.coupled_quant(x, steps, [2, 4], torch.tensor(1)).isnan().all()
    assert rt.coupled_quant(x, steps, [2, 4], torch.tensor(2)).isnan().all()
    gx, gs = rt.coupled_quant_backward(x, x, steps, [2, 4], torch.tensor(1), True, 1.0)
    assert gx.isnan().all() and gs[1].isnan() and gs[0] == 0
    ys = rt.coupled_quant_multi(x, steps, [2, 4])
    assert ys[1].isnan().all() and not ys[0].isnan().any()
    mse, share = rt.quant_stats(x, steps, [2, 4])
    assert mse[1].isnan() and share[1].isnan() and not mse[0].isnan()
    assert torch.equal(rt.quantize_codes(x, steps[1:], 4), torch.zeros(20, dtype=torch.int8))


class TritonOpsMLP(torch.nn.Module):
    """tests/test_compile.py's model on the rfq_triton ops (their CPU kernels)."""

    def __init__(self, bits=(2, 3, 4, 5, 6)):
        super().__init__()
        self.bits = list(bits)
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(32, 16, generator=g) * 0.3)
        self.w2 = torch.nn.Parameter(torch.randn(10, 32, generator=g) * 0.3)
        self.s_w = torch.nn.Parameter(torch.full((2, len(bits)), 0.05))
        self.s_a = torch.nn.Parameter(torch.full((2, len(bits)), 0.1))
        self.register_buffer("sel", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        cq = torch.ops.rfq_triton.coupled_quant
        x = cq(x.relu(), self.s_a[0], self.bits, self.sel, False)
        h = torch.nn.functional.linear(x, cq(self.w1, self.s_w[0], self.bits, self.sel, True))
        h = cq(h.relu(), self.s_a[1], self.bits, self.sel, False)
        y = torch.nn.functional.linear(h, cq(self.w2, self.s_w[1], self.bits, self.sel, True))
        multi = torch.ops.rfq_triton.coupled_quant_multi(self.w2, self.s_w[1], self.bits)
        return y + multi.sum() * 1e-3


def test_compile_fullgraph_through_rfq_triton_ops():
    torch._dynamo.reset()
    eager, compiled_model = TritonOpsMLP(), TritonOpsMLP()
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True)
    g = torch.Generator().manual_seed(1)
    x, target = torch.randn(8, 16, generator=g), torch.randint(0, 10, (8,), generator=g)

    def step(model):
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    step(compiled)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for j in [3, 0, 4]:  # re-selecting the bit-width does not recompile
            eager.sel.fill_(j)
            compiled_model.sel.fill_(j)
            (le, ge), (lc, gc) = step(eager), step(compiled)
            torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
            for a, b in zip(gc, ge):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    codes, w, scales, zeros = packed_case(2, 32, True, n=10, k=64)

    step = torch.tensor([0.05])

    def f(x):
        mse, share = torch.ops.rfq_triton.quant_stats(x, torch.tensor([0.2, 0.05]), [2, 4])
        y = torch.ops.rfq_triton.packed_linear(torch.relu(x), w, scales, zeros, 2, 32)
        return y.softmax(-1), mse, share, torch.ops.rfq_triton.quantize_codes(x, step, 4)

    x = torch.randn(4, 64)
    for a, b in zip(torch.compile(f, fullgraph=True)(x), f(x)):
        torch.testing.assert_close(a, b)


# ---- the backend switch --------------------------------------------------------------------------


@pytest.fixture
def restore_backend():
    saved = {f: ops.get_gpu_backend(f) for f in ops.GPU_FAMILIES}
    yield
    for f, b in saved.items():
        ops.set_gpu_backend(b, f)


def test_switch_set_get_and_context_manager(restore_backend):
    ops.set_gpu_backend("cuda")
    assert [ops.get_gpu_backend(f) for f in ("lsq", "packed")] == ["cuda", "cuda"]
    ops.set_gpu_backend("triton", "packed")
    assert [ops.get_gpu_backend(f) for f in ("lsq", "packed")] == ["cuda", "triton"]
    with ops.gpu_backend("triton"):
        assert ops.get_gpu_backend("lsq") == "triton"
        with ops.gpu_backend("cuda", family="packed"):
            assert [ops.get_gpu_backend(f) for f in ("lsq", "packed")] == ["triton", "cuda"]
        assert ops.get_gpu_backend("packed") == "triton"
    assert [ops.get_gpu_backend(f) for f in ("lsq", "packed")] == ["cuda", "triton"]
    with pytest.raises(KeyError):
        with ops.gpu_backend("triton", "lsq"):
            raise KeyError("inside")
    assert ops.get_gpu_backend("lsq") == "cuda"  # restored when the block raises
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.set_gpu_backend("cutlass")
    with pytest.raises(ValueError, match="family must be one of"):
        ops.set_gpu_backend("triton", "conv")
    with pytest.raises(ValueError, match="family must be one of"):
        ops.get_gpu_backend(None)


def test_switch_env_var_forms(restore_backend):
    for value, want in [("triton", ["triton", "triton"]), ("cuda", ["cuda", "cuda"]),
                        ("lsq=triton", ["triton", "cuda"]),
                        ("cuda, packed=triton", ["cuda", "triton"])]:
        ops.set_gpu_backend("cuda")
        ops._backend_from_env(value)
        assert [ops.get_gpu_backend(f) for f in ("lsq", "packed")] == want, value
    with pytest.raises(RuntimeError, match="RFQ_GPU_BACKEND='lsq=tvm'.*backend must be one of"):
        ops._backend_from_env("lsq=tvm")


@pytest.mark.parametrize("env, want", [(None, "cuda cuda False"),
                                       ("packed=triton", "cuda triton True")])
def test_switch_env_var_at_import(env, want):
    """RFQ_GPU_BACKEND is read at import; import rfq never imports triton, and registers the
    rfq_triton ops only when the Triton backend is chosen."""
    code = ("import sys, rfq; from rfq import ops; "
            "print(ops.get_gpu_backend('lsq'), ops.get_gpu_backend('packed'), "
            "'rfq.triton_ops' in sys.modules, 'triton' in sys.modules)")
    environ = {k: v for k, v in os.environ.items() if k != "RFQ_GPU_BACKEND"}
    if env:
        environ["RFQ_GPU_BACKEND"] = env
    out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == want.split() + ["False"]


def _traced_ops(fn, *args):
    from torch.fx.experimental.proxy_tensor import make_fx

    graph = make_fx(fn, tracing_mode="fake")(*args)
    return [str(n.target) for n in graph.graph.nodes if n.op == "call_function"
            and str(n.target).startswith("rfq")]


def _fake_cuda_inputs():
    """CUDA tensors without a GPU: fake tensors carry the device, so routing can be traced (as
    long as the traced code does not view them: slicing a fake CUDA tensor needs CUDA)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return (torch.empty(6, 64, device="cuda"),  # x
                torch.empty(2, device="cuda"),  # steps
                torch.empty((), dtype=torch.long, device="cuda"),  # sel
                torch.empty(4, 64, dtype=torch.uint8, device="cuda"),  # packed weight
                torch.empty(1, device="cuda"),  # one scale / step
                torch.empty(2, 6, 64, device="cuda"),  # grad of a K=2 multi output
                torch.empty(6, 4, device="cuda"))  # grad of the packed_linear output


def _all_wrappers(x, steps, sel, packed_w, scale, *_):
    return (ops.coupled_quant(x, steps, [4, 2], sel), ops.coupled_quant_multi(x, steps, [4, 2]),
            ops.quant_stats(x, steps, [4, 2]), ops.quantize_codes(x, scale, 4),
            ops.packed_linear(x, packed_w, scale, 4))


WRAPPED = ["coupled_quant", "coupled_quant_multi", "quant_stats", "quantize_codes",
           "packed_linear"]


def test_switch_routes_cuda_tensors_per_family(restore_backend):
    args = _fake_cuda_inputs()
    ops.set_gpu_backend("cuda")
    assert _traced_ops(_all_wrappers, *args) == [f"rfq.{n}.default" for n in WRAPPED]
    ops.set_gpu_backend("triton", "lsq")
    assert _traced_ops(_all_wrappers, *args) == (
        [f"rfq_triton.{n}.default" for n in WRAPPED[:4]] + ["rfq.packed_linear.default"])
    with ops.gpu_backend("triton", "packed"):
        assert _traced_ops(_all_wrappers, *args)[-1] == "rfq_triton.packed_linear.default"
    ops.set_gpu_backend("cuda", "lsq")
    assert _traced_ops(_all_wrappers, *args) == [f"rfq.{n}.default" for n in WRAPPED]


def test_backward_formulas_use_triton_ops():
    """The rfq_triton autograd formulas call rfq_triton backward ops (traced on fake CUDA
    tensors; the autograd engine itself needs a real device)."""
    from types import SimpleNamespace

    def backwards(x, steps, sel, packed_w, scale, grad_multi, grad_linear):
        ctx = SimpleNamespace(saved_tensors=(x, steps, sel), bits=[4, 2], signed=True,
                              grad_scale=1.0)
        one = triton_ops._coupled_quant_grad(ctx, x)
        ctx.saved_tensors = (x, steps)
        multi = triton_ops._coupled_quant_multi_grad(ctx, grad_multi)
        ctx = SimpleNamespace(saved_tensors=(packed_w, scale, None), bits=4, group_size=0, k=64,
                              x_dtype=x.dtype)
        lin = triton_ops._packed_linear_grad(ctx, grad_linear)
        return one[:2], multi[:2], lin[0]

    assert _traced_ops(backwards, *_fake_cuda_inputs()) == [
        "rfq_triton.coupled_quant_backward.default",
        "rfq_triton.coupled_quant_multi_backward.default",
        "rfq_triton.dequantize_weight.default"]


def test_switch_never_routes_cpu_tensors(restore_backend):
    """CPU tensors take the C++ ops under either backend: the C++ CPU kernel raises for a zero
    step, where the rfq_triton CPU kernel would return NaN."""
    x, steps = torch.randn(5), torch.tensor([0.0])
    for backend in ("cuda", "triton"):
        ops.set_gpu_backend(backend)
        with pytest.raises(RuntimeError, match=r"rfq.coupled_quant: steps\[0\] must be"):
            ops.coupled_quant(x, steps, [4], torch.tensor(0))
        assert _traced_ops(_all_wrappers, torch.randn(6, 64), torch.tensor([0.1, 0.2]),
                           torch.tensor(0), ops.pack_weight(torch.zeros(4, 64, dtype=torch.int8),
                                                            4), torch.tensor([0.1])) == [
            f"rfq.{n}.default" for n in WRAPPED]


# ---- offline GPU compile check ----------------------------------------------------------------


def test_kernels_compile_for_sm90():
    """Every kernel family compiles for sm_90 (Triton's own ptxas), and the PTX has only
    correctly rounded division, no FMA in the LSQ kernels, and the rounding constant."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "rfq.triton_kernels.compile_check", "--quick"],
                         env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 with problems" in out.stdout


def test_compile_check_detects_approximate_division():
    """The PTX check itself can fail: plain `/` (div.full.f32) and an FMA are caught."""
    from rfq.triton_kernels import compile_check

    assert compile_check.check_ptx("_forward_kernel", "div.rn.f32 add 0f4B400000 0fCB400000",
                                   {"BIN": (False,)}) == []
    problems = compile_check.check_ptx("_forward_kernel", "div.full.f32 %r1, %r2, %r3; "
                                       "fma.rn.f32 %r4", {"BIN": (False,)})
    assert len(problems) == 4


# ---- GPU (compiled Triton, CUDA tensors) ---------------------------------------------------------


@pytest.mark.skipif(not HAS_CUDA or not INTERPRET,
                    reason="needs CUDA; in compiled mode the gpu tests run directly")
def test_gpu_suite_in_compiled_mode():
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", __file__, "-k", "gpu_"],
                         env=env, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]


GPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_gpu_lsq_exact(dtype, signed):
    """Every LSQ op on CUDA (bf16 included) against the reference, bit-exact codes/y/dx."""
    for cands in ([6, 5, 4, 3, 2], [1, 8]):
        for pow2, shape in [(True, (1,)), (True, (3, 1000, 7)), (False, (1_000_003,))]:
            steps = steps_for(cands, signed, pow2, "cuda")
            x = make_x(shape, dtype, min(cands), signed, steps.max().item(), "cuda", seed=1)
            sel = torch.tensor(len(cands) - 1, device="cuda")
            with ops.gpu_backend("triton"):
                y = ops.coupled_quant(x, steps, cands, sel, signed)
                ys = ops.coupled_quant_multi(x, steps, cands, signed)
                mse, share = ops.quant_stats(x, steps, cands, signed)
                codes = ops.quantize_codes(x, steps[:1], cands[0], signed)
            assert torch.equal(y, ref.coupled_quant(x, steps, cands, sel, signed))
            assert torch.equal(ys, ref.coupled_quant_multi(x, steps, cands, signed))
            rmse, rshare = ref.quant_stats(x, steps, cands, signed)
            assert torch.equal(share, rshare)
            torch.testing.assert_close(mse, rmse, rtol=1e-5, atol=1e-12)
            assert torch.equal(codes, ref.quantize_codes(x, steps[:1], cands[0], signed))
            g = grads_like(shape, dtype, device="cuda")
            gx, gs = torch.ops.rfq_triton.coupled_quant_backward(g, x, steps, cands, sel, signed,
                                                                 0.5)
            rgx, rgs = ref.coupled_quant_backward(g, x, steps, cands, sel, signed, 0.5)
            assert torch.equal(gx, rgx)
            b = cands[-1]
            assert_step_grad_close(gs, rgs, 0.5 * abs_step_terms(g, x, steps[-1], b, signed))
            gk = grads_like((len(cands), *shape), dtype, device="cuda")
            gx, gs = torch.ops.rfq_triton.coupled_quant_multi_backward(gk, x, steps, cands,
                                                                       signed, 1.0)
            rgx, rgs = ref.coupled_quant_multi_backward(gk, x, steps, cands, signed, 1.0)
            assert torch.equal(gx, rgx)
            assert_step_grad_close(gs, rgs, torch.stack(
                [abs_step_terms(gk[j], x, steps[j], c, signed) for j, c in enumerate(cands)]))


@triton.jit
def _plain_division(x_ptr, out_ptr, s, n, BLOCK: tl.constexpr):
    # The hazard the kernels avoid: `/` on fp32 is div.full.f32 (<= 2 ulp) on NVIDIA GPUs.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(out_ptr + offs, x / s, mask=offs < n)


@gpu
def test_gpu_division_is_correctly_rounded():
    """Quotients next to a rounding tie: codes match the correctly rounded reference, while
    Triton's plain `/` misrounds some of the same quotients (so the test can tell them apart)."""
    g = torch.Generator().manual_seed(0)
    n = 1 << 22
    steps = [0.1, 0.37, 1 / 3, 3.3e-3]
    for s in steps:
        # x = (k + 1/2) s, nudged by a few ulps: x / s lands within ulps of a tie
        k = torch.randint(-120, 120, (n,), generator=g).float()
        x = ((k + 0.5) * s).cuda()
        x = torch.nextafter(x, x + torch.randint(-1, 2, (n,), generator=g).float().cuda() * 1e30)
        step = torch.tensor([s], device="cuda")
        exact = (x.double() / step.double()).float()  # fp32 step, correctly rounded quotient
        with ops.gpu_backend("triton", "lsq"):
            codes = ops.quantize_codes(x, step, 8, True)
        assert torch.equal(codes, torch.clamp(exact, -128, 127).round().to(torch.int8))
        assert torch.equal(x / step, exact)  # torch's CUDA division is IEEE too
    plain = torch.empty_like(x)
    _plain_division[(triton.cdiv(n, 1024),)](x, plain, step.item(), n, BLOCK=1024)
    assert not torch.equal(plain, exact), "div.full.f32 matched div.rn on every quotient here"


@gpu
def test_gpu_no_host_syncs():
    """F5: forward and backward through the Triton ops never sync the host."""
    x = torch.randn(1 << 20, device="cuda", requires_grad=True)
    steps = torch.tensor([0.1, 0.05, 0.02], device="cuda", requires_grad=True)
    sel = torch.tensor(1, device="cuda")
    codes = torch.randint(-8, 8, (256, 512), dtype=torch.int8)
    w = ops.pack_weight(codes, 4).cuda()
    xs = torch.randn(4, 512, device="cuda", dtype=torch.float16)
    scales = torch.tensor([0.02], device="cuda")

    def step():
        y = ops.coupled_quant(x, steps, [2, 4, 8], sel) + ops.coupled_quant_multi(
            x, steps, [2, 4, 8]).sum(0)
        y.sum().backward()
        ops.quant_stats(x.detach(), steps.detach(), [2, 4, 8])
        ops.quantize_codes(x.detach(), steps.detach()[:1], 2)
        ops.packed_linear(xs, w, scales, 4)
        sel.fill_(2)

    with ops.gpu_backend("triton"):
        step()  # compiles the kernels
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)


@gpu
def test_gpu_offsets_past_2_to_31():
    """int64 offsets: codes and a second multi-plane beyond 2^31 elements (about 11 GB)."""
    n = (1 << 31) + 4099
    x = torch.empty(n, dtype=torch.float16, device="cuda").uniform_(-1, 1)
    step = torch.tensor([0.01], device="cuda")
    codes = lsq.quantize_codes(x, step, 8, True)
    tail = slice(n - 10_000, n)
    assert torch.equal(codes[tail], ref.quantize_codes(x[tail], step, 8, True))
    del codes
    half = (1 << 30) + 77
    ys = lsq.coupled_quant_multi(x[:half], torch.tensor([0.01, 0.02], device="cuda"), [8, 4])
    assert torch.equal(ys[1, -10_000:], ref.coupled_quant(x[half - 10_000:half], torch.tensor(
        [0.01, 0.02], device="cuda"), [8, 4], torch.tensor(1, device="cuda")))


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("bits, group_size, with_zeros", [(4, 0, False), (4, 128, True),
                                                          (2, 128, True), (8, 32, False)])
def test_gpu_packed_linear(dtype, bits, group_size, with_zeros):
    """Every path on CUDA vs fp32 dequantize + F.linear: fp32 within the derived bound, fp16/bf16
    within G14's relative MAE (<= 1e-3 fp16, <= 4e-3 bf16) and the derived bound plus one ulp."""
    codes, w, scales, zeros = packed_case(bits, group_size, with_zeros, n=1000, k=4096, seed=2)
    magnitude = weight_magnitude(codes, scales, zeros, bits, group_size)
    w, scales = w.cuda(), scales.cuda()
    zeros = zeros.cuda() if zeros is not None else None
    for m in (1, 3, 16, 64, 300):
        x = torch.randn(m, 4096, device="cuda").to(dtype)
        with ops.gpu_backend("triton", "packed"):
            y = ops.packed_linear(x, w, scales, bits, group_size, zeros)
        want = ref.packed_linear(x.cpu(), w.cpu(), scales.cpu(), zeros if zeros is None
                                 else zeros.cpu(), bits, group_size).to(y.device)
        rounding = 2.0**-24 if dtype == torch.float32 else 2.0**-23
        assert_linear_close(y.cpu(), want.cpu(), x.cpu(), magnitude, rounding)
        mae = (y.float() - want.float()).abs().mean() / want.float().abs().mean()
        assert mae <= {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 4e-3}[dtype]


@gpu
def test_gpu_launch_count():
    """F10: K=5 forward + backward of a weight is 3 kernels (multi forward, multi backward, the
    fixed-order step-gradient pass), within the <= 4 launch target."""
    x = torch.randn(589_824, device="cuda", requires_grad=True)
    steps = torch.tensor([0.1, 0.05, 0.02, 0.01, 0.005], device="cuda", requires_grad=True)
    g = torch.randn(5, 589_824, device="cuda")

    def run():
        with ops.gpu_backend("triton", "lsq"):
            y = ops.coupled_quant_multi(x, steps, [6, 5, 4, 3, 2])
        torch.autograd.grad(y, (x, steps), g)

    run()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = [n for n in names if "kernel" in n]
    assert 1 <= len(kernels) <= 4, names
