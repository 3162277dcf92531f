"""CUDA kernels (csrc/cuda) against rfq/reference.py on the GPU: exact codes, y and dx; step
gradients within the spec tolerance; every dtype, bits 1..8, signed/unsigned, shapes 0/1/odd/
multi-tile, non-contiguous and misaligned inputs; NaN for bad steps (CUDA never syncs to raise);
zero host syncs (F5); opcheck; torch.compile without recompiles; packed weights;
batch_norm_quant against the CPU op and rfq.reference.batch_norm_quant_from_stats.

Skipped as a whole where CUDA is unavailable. The CPU-side test files that take the `device`
fixture (tests/ops/test_lsq_*.py) also run on CUDA when it is present.
"""

import re
from pathlib import Path

import pytest
import torch

from lsq_cases import ALL_BITS, DTYPES, abs_step_terms, assert_step_grad_close, make_x, steps_for
from rfq import ops
from rfq import reference as ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA is not available (no GPU or a CPU build of torch)")

DEV = "cuda"
TILE = 2048  # csrc/cuda/common.cuh kTile: one reduction partial per tile
# empty, one element, odd, one full tile, one tile + 1, several tiles with an odd tail
SHAPES = [(0,), (1,), (7,), (3, 5, 9), (TILE,), (TILE + 1,), (3 * TILE + 7,), (33, 257)]
LAYOUTS = ["contiguous", "transposed", "strided", "misaligned", "channels_last"]
REGISTRATION = Path(__file__).resolve().parents[2] / "csrc" / "registration.cpp"
OPS = re.findall(r'm\.def\(\s*"(\w+)\(', REGISTRATION.read_text())


@pytest.fixture(autouse=True)
def _cuda_backend():
    """These files measure the C++/CUDA kernels, whatever RFQ_GPU_BACKEND routes wrappers to."""
    choose = getattr(ops, "gpu_backend", None)  # rfq.ops' cuda/triton switch, where present
    if choose is None:
        yield
    else:
        with choose("cuda"):
            yield


def arrange(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Same values as x in another memory layout (strided and misaligned ones take the kernels'
    scalar paths; channels_last must be kept as it is)."""
    if layout == "transposed" and x.dim() >= 2:
        return x.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "strided" and x.dim() >= 1:
        wide = torch.zeros((*x.shape[:-1], x.shape[-1] * 2), dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]
    if layout == "misaligned":  # contiguous, but the data pointer is off by one element
        flat = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
        flat[1:] = x.reshape(-1)
        return flat[1:].view(x.shape)
    if layout == "channels_last" and x.dim() == 3:
        return x.unsqueeze(0).contiguous(memory_format=torch.channels_last)[0]
    return x


def test_every_declared_op_has_a_cuda_kernel():
    assert OPS, "no ops parsed from csrc/registration.cpp"
    for name in OPS:
        dump = torch._C._dispatch_dump(f"rfq::{name}")
        assert re.search(r"^CUDA: registered at", dump, re.M), (
            f"rfq::{name} has no CUDA kernel: rebuild with RFQ_CUDA=1 "
            "(pip install -e . --no-build-isolation)")


# ---- exactness ----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_coupled_quant_forward_backward(shape, dtype, bits, signed):
    cands = sorted({bits, 4, 2})
    j = cands.index(bits)
    steps = steps_for(cands, signed, pow2=bits % 2 == 0, device=DEV)
    x = make_x(shape, dtype, bits, signed, steps[j].item(), DEV, seed=bits)
    sel = torch.tensor(j, device=DEV)
    y = ops.coupled_quant(x, steps, cands, sel, signed)
    assert y.dtype == dtype and y.shape == x.shape and y.device.type == DEV
    assert torch.equal(y, ref.coupled_quant(x, steps, cands, sel, signed))

    g = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(dtype).to(DEV)
    gx, gs = torch.ops.rfq.coupled_quant_backward(g, x, steps, cands, sel, signed, 0.5)
    rgx, rgs = ref.coupled_quant_backward(g, x, steps, cands, sel, signed, 0.5)
    assert torch.equal(gx, rgx)
    assert torch.all(gs[[i for i in range(len(cands)) if i != j]] == 0)
    assert_step_grad_close(gs, rgs, 0.5 * abs_step_terms(g, x, steps[j], bits, signed))

    codes = ops.quantize_codes(x, steps[j:j + 1], bits, signed)
    assert torch.equal(codes, ref.quantize_codes(x, steps[j:j + 1], bits, signed))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 7, 9), (3, 2, TILE + 3)], ids=str)
def test_layouts(layout, dtype, shape):
    steps = torch.tensor([0.3, 0.07], device=DEV)
    base = make_x(shape, dtype, 4, True, 0.07, DEV, seed=4)
    x = arrange(base, layout)
    sel = torch.tensor(1, device=DEV)
    y = ops.coupled_quant(x, steps, [2, 4], sel, True)
    assert torch.equal(y, ref.coupled_quant(x, steps, [2, 4], sel, True))
    if layout != "strided":
        assert y.stride() == x.stride()  # dense layouts (channels_last) are kept
    g = arrange(torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEV),
                layout)
    gx, gs = torch.ops.rfq.coupled_quant_backward(g, x, steps, [2, 4], sel, True, 1.0)
    rgx, rgs = ref.coupled_quant_backward(g, x, steps, [2, 4], sel, True, 1.0)
    assert torch.equal(gx, rgx)
    assert_step_grad_close(gs, rgs, abs_step_terms(g, x, steps[1], 4, True))
    ys = ops.coupled_quant_multi(x, steps, [2, 4], False)
    assert torch.equal(ys, ref.coupled_quant_multi(x, steps, [2, 4], False))
    mse, share = ops.quant_stats(x, steps, [2, 4], True)
    rmse, rshare = ref.quant_stats(x, steps, [2, 4], True)
    assert torch.equal(share, rshare)
    torch.testing.assert_close(mse, rmse, rtol=1e-5, atol=1e-12)
    assert torch.equal(ops.quantize_codes(x, steps[1:], 4, True),
                       ref.quantize_codes(x, steps[1:], 4, True))


# K planes whose size n is or is not a multiple of the vector width (vector vs scalar paths).
@pytest.mark.parametrize("shape", [(0,), (1,), (13,), (TILE,), (2 * TILE + 5,), (4, 1031)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cands", [[6, 5, 4, 3, 2], [1, 2, 8], [3], [1, 2, 3, 4, 5, 6, 7, 8]],
                         ids=str)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_multi_and_stats(shape, dtype, cands, signed):
    steps = steps_for(cands, signed, pow2=False, device=DEV)
    x = make_x(shape, dtype, min(cands), signed, steps.max().item(), DEV, seed=11)
    ys = ops.coupled_quant_multi(x, steps, cands, signed)
    assert torch.equal(ys, ref.coupled_quant_multi(x, steps, cands, signed))
    g = torch.randn((len(cands), *shape), generator=torch.Generator().manual_seed(5))
    g = g.to(dtype).to(DEV)
    gx, gs = torch.ops.rfq.coupled_quant_multi_backward(g, x, steps, cands, signed, 2.0)
    rgx, rgs = ref.coupled_quant_multi_backward(g, x, steps, cands, signed, 2.0)
    assert torch.equal(gx, rgx)
    scale = torch.stack([2.0 * abs_step_terms(g[j], x, steps[j], b, signed)
                         for j, b in enumerate(cands)])
    assert_step_grad_close(gs, rgs, scale)
    for delta in (0.0, 0.125, 0.5):
        mse, share = ops.quant_stats(x, steps, cands, signed, delta)
        rmse, rshare = ref.quant_stats(x, steps, cands, signed, delta)
        assert torch.equal(share, rshare)  # exact counts
        torch.testing.assert_close(mse, rmse, rtol=1e-5, atol=1e-12)


def test_many_tiles_step_gradient_and_determinism():
    """Thousands of partials in the finalize pass; two runs give identical bits."""
    cands = [6, 5, 4, 3, 2]
    steps = steps_for(cands, True, pow2=False, device=DEV)
    x = make_x((3_000_017,), torch.float32, 4, True, steps[2].item(), DEV, seed=21)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(DEV)
    sel = torch.tensor(2, device=DEV)
    one = torch.ops.rfq.coupled_quant_backward(g, x, steps, cands, sel, True, 1.0)
    two = torch.ops.rfq.coupled_quant_backward(g, x, steps, cands, sel, True, 1.0)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    rgx, rgs = ref.coupled_quant_backward(g, x, steps, cands, sel, True, 1.0)
    assert torch.equal(one[0], rgx)
    assert_step_grad_close(one[1], rgs, abs_step_terms(g, x, steps[2], 4, True))
    gk = torch.randn((5, *x.shape), generator=torch.Generator().manual_seed(3)).to(DEV)
    a = torch.ops.rfq.coupled_quant_multi_backward(gk, x, steps, cands, True, 1.0)
    b = torch.ops.rfq.coupled_quant_multi_backward(gk, x, steps, cands, True, 1.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    s1, s2 = ops.quant_stats(x, steps, cands), ops.quant_stats(x, steps, cands)
    assert torch.equal(s1[0], s2[0]) and torch.equal(s1[1], s2[1])
    assert torch.equal(s1[1], ref.quant_stats(x, steps, cands)[1])


def test_grid_stride_beyond_the_block_limit():
    """More tiles than the grid's 65,536 blocks: every kernel loops over tiles."""
    free, _ = torch.cuda.mem_get_info()
    if free < 12 << 30:
        pytest.skip("needs ~12 GB of free GPU memory")
    n = 65_536 * TILE + 4_099
    steps = torch.tensor([0.05, 0.2], device=DEV)
    x = (torch.randn(n, device=DEV) * 0.3).to(torch.bfloat16)
    sel = torch.tensor(0, device=DEV)
    y = ops.coupled_quant(x, steps, [5, 3], sel)
    assert torch.equal(y, ref.coupled_quant(x, steps, [5, 3], sel))
    del y
    mse, share = ops.quant_stats(x, steps, [5, 3])
    rmse, rshare = ref.quant_stats(x, steps, [5, 3])
    assert torch.equal(share, rshare)
    torch.testing.assert_close(mse, rmse, rtol=1e-5, atol=0)
    g = torch.ones_like(x)
    gx, gs = torch.ops.rfq.coupled_quant_backward(g, x, steps, [5, 3], sel, True, 1.0)
    rgx, rgs = ref.coupled_quant_backward(g, x, steps, [5, 3], sel, True, 1.0)
    assert torch.equal(gx, rgx)
    assert_step_grad_close(gs, rgs, abs_step_terms(g, x, steps[0], 5, True))


def test_binary_ties_and_nan_inputs():
    s = torch.tensor([0.5], device=DEV)
    sel = torch.tensor(0, device=DEV)
    x = torch.tensor([-2.0, -0.5, -0.25, -0.0, 0.0, 0.1, 0.5, 0.75], device=DEV)
    assert ops.coupled_quant(x, s, [1], sel, True).tolist() == [-0.5, -0.5, -0.5, 0.5, 0.5, 0.5,
                                                                0.5, 0.5]
    ties = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 6.5, 7.5], device=DEV)
    assert ops.quantize_codes(ties, torch.tensor([1.0], device=DEV), 4, True).tolist() == [
        -2, -2, 0, 0, 2, 2, 4, 6, 7]
    xn = torch.tensor([float("nan"), 1.0, float("inf"), -float("inf")], device=DEV)
    for bits, signed in [(4, True), (1, True), (3, False)]:
        y = ops.coupled_quant(xn, s, [bits], sel, signed)
        r = ref.coupled_quant(xn, s, [bits], sel, signed)
        assert y[0].isnan() and torch.equal(y[1:], r[1:])
        assert torch.equal(ops.quantize_codes(xn, s, bits, signed),
                           ref.quantize_codes(xn, s, bits, signed))


def test_division_is_correctly_rounded():
    x = torch.randn(1_000_003, generator=torch.Generator().manual_seed(0)).to(DEV) * 10
    for s in [0.1, 0.37, 1 / 3, 3.3e-3]:
        st = torch.tensor([s], device=DEV)
        exact = (x.double() / st.double()).float()  # fp64 then fp32: the correctly rounded x/s
        codes = ops.quantize_codes(x, st, 8, True)
        assert torch.equal(codes, torch.clamp(exact, -128, 127).round().to(torch.int8))


# ---- bad steps and sel: NaN instead of an error (no sync) ----------------------------------------
@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), float("inf")])
def test_bad_steps_give_nan(bad):
    x = torch.randn(3000, device=DEV)
    g = torch.randn(3000, device=DEV)
    steps = torch.tensor([0.25, bad, 0.1], device=DEV)
    bits = [2, 4, 6]
    y = ops.coupled_quant(x, steps, bits, torch.tensor(1, device=DEV))
    assert y.isnan().all()
    gx, gs = torch.ops.rfq.coupled_quant_backward(g, x, steps, bits, torch.tensor(1, device=DEV),
                                                  True, 1.0)
    assert gx.isnan().all() and gs[1].isnan() and gs[0] == 0 and gs[2] == 0
    # an unused bad step does not matter, as on CPU
    y0 = ops.coupled_quant(x, steps, bits, torch.tensor(0, device=DEV))
    assert torch.equal(y0, ref.coupled_quant(x, steps, bits, torch.tensor(0)))
    ys = ops.coupled_quant_multi(x, steps, bits)
    assert ys[1].isnan().all() and not ys[[0, 2]].isnan().any()
    gk = torch.randn(3, 3000, device=DEV)
    gx, gs = torch.ops.rfq.coupled_quant_multi_backward(gk, x, steps, bits, True, 1.0)
    assert gx.isnan().all() and gs[1].isnan() and torch.isfinite(gs[[0, 2]]).all()
    mse, share = ops.quant_stats(x, steps, bits)
    assert mse[1].isnan() and share[1].isnan() and torch.isfinite(mse[[0, 2]]).all()
    codes = ops.quantize_codes(x, steps[1:2], 4)
    assert torch.all(codes == 0)


def test_out_of_range_sel_gives_nan():
    x, steps = torch.randn(100, device=DEV), torch.tensor([0.25, 0.1], device=DEV)
    for j in (2, -1):
        sel = torch.tensor(j, device=DEV)
        assert ops.coupled_quant(x, steps, [2, 4], sel).isnan().all()
        gx, gs = torch.ops.rfq.coupled_quant_backward(x, x, steps, [2, 4], sel, True, 1.0)
        assert gx.isnan().all() and gs.isnan().all()


def test_argument_errors_match_cpu():
    x, steps = torch.randn(10, device=DEV), torch.tensor([0.5, 0.25], device=DEV)
    sel = torch.tensor(1, device=DEV)
    with pytest.raises(RuntimeError, match="rfq.coupled_quant: bits must be in 1..8, got 9"):
        ops.coupled_quant(x, steps, [2, 9], sel)
    with pytest.raises(RuntimeError, match="rfq.coupled_quant: sel must be int64"):
        ops.coupled_quant(x, steps, [2, 4], sel.int())
    with pytest.raises(RuntimeError, match=r"rfq.coupled_quant: steps must be on x's device"):
        ops.coupled_quant(x, steps.cpu(), [2, 4], sel)
    with pytest.raises(RuntimeError, match=r"rfq.coupled_quant: sel must be on x's device"):
        ops.coupled_quant(x, steps, [2, 4], sel.cpu())
    with pytest.raises(RuntimeError, match="rfq.quant_stats: delta must be in"):
        ops.quant_stats(x, steps, [2, 4], delta=0.75)
    with pytest.raises(RuntimeError, match="grad_y must have x's dtype"):
        torch.ops.rfq.coupled_quant_backward(x.double(), x, steps, [2, 4], sel, True, 1.0)
    with pytest.raises(RuntimeError, match="rfq.quantize_codes: step must hold one value"):
        ops.quantize_codes(x, steps, 4)


# ---- batch_norm_quant (fp32): the CUDA op against the CPU op and rfq/reference.py ---------------
BN_EPS = 1e-5
# Rows geometry (channels innermost: 2-D, channels_last, [N, C, 1, 1]) and planes (contiguous,
# 3-D): one and several reduction chunks per channel (rows: 128 rows per chunk at C >= 32, 512
# at C = 5; planes: 4096 values), channel tiles of 32 filled or not; a dense layout that is
# neither contiguous nor channels_last (copied to contiguous).
BN_CASES = [((37, 24), "contiguous"), ((3000, 5), "contiguous"), ((4, 6, 5, 7), "contiguous"),
            ((4, 6, 5, 7), "channels_last"), ((40, 70, 6, 6), "channels_last"),
            ((3, 5, 4099), "contiguous"), ((8, 16, 1, 300), "contiguous"),
            ((2, 3, 1, 1), "contiguous"), ((16, 40, 9, 9), "transposed")]


def bn_inputs(shape, layout="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    shift = (torch.rand(c, generator=g) * 4 - 2).view([1, c] + [1] * (len(shape) - 2))
    x = torch.randn(shape, generator=g) * 2 + shift  # channel means away from 0
    w = torch.rand(c, generator=g) + 0.5
    b = torch.randn(c, generator=g) * 0.3
    x = bn_arrange(x, layout)
    return x.to(DEV), w.to(DEV), b.to(DEV)


def bn_arrange(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    return t


def bn_channel_sum(t):
    """Per-channel sums of a [N, C, ...] tensor in fp64 (tolerance scales)."""
    return t.double().transpose(0, 1).reshape(t.shape[1], -1).sum(1)


def bn_z(x, w, b, mean, var):
    """z = x * alpha + beta with the ops' fp32 operations (CPU tensors)."""
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    invstd = 1 / torch.sqrt(var + BN_EPS)
    alpha = w * invstd
    beta = b - mean * alpha
    return x * alpha.view(shape) + beta.view(shape), ((x - mean.view(shape)) * invstd.view(shape))


def assert_sums_close(got, want, scale):
    got, want = got.double().cpu(), want.double().cpu()
    tol = 1e-4 * want.abs() + 1e-6 * scale.cpu() + 1e-12
    assert torch.all((got - want).abs() <= tol), f"{got} vs {want}"


def bn_check(x, w, b, cands, j, signed, grad_scale=0.5, seed=0):
    """Forward and backward on the GPU against the CPU op and the reference; returns all outputs."""
    steps = steps_for(cands, signed, pow2=False, device=DEV)
    sel = torch.tensor(j, device=DEV)
    y, mean, var = torch.ops.rfq.batch_norm_quant(x, w, b, BN_EPS, steps, cands, sel, signed, 1.0)
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    assert y.device.type == DEV and y.dtype == torch.float32 and y.shape == x.shape
    assert y.is_contiguous(memory_format=torch.channels_last) if cl else y.is_contiguous()
    assert mean.shape == var.shape == (x.shape[1],)
    xc, wc, bc, sc, selc = x.cpu(), w.cpu(), b.cpu(), steps.cpu(), sel.cpu()
    mc, vc = mean.cpu(), var.cpu()
    # statistics: the fp64 ones rounded to fp32 (up to an ulp); the CPU's (fp32 chunk sums)
    dims = [0, *range(2, x.dim())]
    m64 = xc.double().mean(dims)
    v64 = xc.double().var(dims, unbiased=False)
    torch.testing.assert_close(mc, m64.float(), rtol=2.4e-7, atol=1e-7)
    torch.testing.assert_close(vc, v64.float(), rtol=2.4e-7, atol=0)
    _, cmean, cvar = torch.ops.rfq.batch_norm_quant(xc, wc, bc, BN_EPS, sc, cands, selc, signed)
    torch.testing.assert_close(mc, cmean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(vc, cvar, rtol=2e-6, atol=1e-7)
    # y: exactly the reference's for the op's own statistics
    want = ref.batch_norm_quant_from_stats(xc, wc, bc, mc, vc, BN_EPS, sc, cands, selc, signed)
    assert torch.equal(y.cpu(), want)

    gy = bn_arrange(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1)),
                    "channels_last" if cl else "contiguous").to(DEV)
    grads = torch.ops.rfq.batch_norm_quant_backward(gy, x, w, b, mean, var, BN_EPS, steps, cands,
                                                    sel, signed, grad_scale)
    gx, gw, gb, gs = grads
    assert gx.shape == x.shape and (gx.is_contiguous(memory_format=torch.channels_last) if cl
                                    else gx.is_contiguous())
    # the CPU op on the same inputs and statistics
    cgx, cgw, cgb, cgs = torch.ops.rfq.batch_norm_quant_backward(
        gy.cpu(), xc, wc, bc, mc, vc, BN_EPS, sc, cands, selc, signed, grad_scale)
    z, xhat = bn_z(xc, wc, bc, mc, vc)
    g = gy.cpu()
    torch.testing.assert_close(gx.cpu(), cgx, rtol=1e-4, atol=1e-5 * float(cgx.abs().max()))
    assert_sums_close(gb, cgb, bn_channel_sum(g.abs()))
    assert_sums_close(gw, cgw, bn_channel_sum((g * xhat).abs()))
    assert torch.all(gs[[i for i in range(len(cands)) if i != j]] == 0)
    assert_step_grad_close(gs, cgs, grad_scale * abs_step_terms(g, z, sc[j], cands[j], signed))
    return (y, mean, var) + tuple(grads)


@pytest.mark.parametrize("case", BN_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_batch_norm_quant_matches_cpu_and_reference(case, bits, signed):
    shape, layout = case
    x, w, b = bn_inputs(shape, layout, seed=bits)
    cands = sorted({bits, 2, 4})
    bn_check(x, w, b, cands, cands.index(bits), signed, seed=bits)


@pytest.mark.parametrize("case", BN_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_batch_norm_quant_mse_matches_cpu(case, signed):
    """The teacher's MSE and its gradient term on the GPU against the CPU op (same statistics);
    y, mean and var are batch_norm_quant's bit for bit; two runs give the same bits."""
    shape, layout = case
    x, w, b = bn_inputs(shape, layout, seed=5)
    cands = [2, 4, 6]
    steps = steps_for(cands, signed, pow2=False, device=DEV)
    sel = torch.tensor(1, device=DEV)
    t = bn_arrange(torch.randn(x.shape, generator=torch.Generator().manual_seed(6)),
                   "contiguous").to(DEV)
    y, mean, var, mse = torch.ops.rfq.batch_norm_quant_mse(x, w, b, BN_EPS, steps, cands, sel, t,
                                                           signed)
    plain = torch.ops.rfq.batch_norm_quant(x, w, b, BN_EPS, steps, cands, sel, signed)
    assert all(torch.equal(a, c) for a, c in zip((y, mean, var), plain))
    xc, wc, bc, sc, selc, tc = x.cpu(), w.cpu(), b.cpu(), steps.cpu(), sel.cpu(), t.cpu()
    _, _, _, cmse = ref.batch_norm_quant_mse(xc, wc, bc, BN_EPS, sc, cands, selc, tc, signed,
                                             stats=(mean.cpu(), var.cpu()))
    torch.testing.assert_close(mse.cpu(), cmse, rtol=2e-6, atol=0)
    gy = bn_arrange(torch.randn(x.shape, generator=torch.Generator().manual_seed(7)),
                    layout).to(DEV)
    gm = torch.tensor(3.0, device=DEV)
    grads = torch.ops.rfq.batch_norm_quant_mse_backward(gy, gm, x, w, b, mean, var, BN_EPS, steps,
                                                        cands, sel, t, signed, 0.5)
    cgrads = torch.ops.rfq.batch_norm_quant_mse_backward(
        gy.cpu(), gm.cpu(), xc, wc, bc, mean.cpu(), var.cpu(), BN_EPS, sc, cands, selc, tc,
        signed, 0.5)
    for a, c in zip(grads, cgrads):
        torch.testing.assert_close(a.cpu(), c, rtol=1e-4, atol=1e-5 * (float(c.abs().max()) + 1))
    again = torch.ops.rfq.batch_norm_quant_mse_backward(gy, gm, x, w, b, mean, var, BN_EPS, steps,
                                                        cands, sel, t, signed, 0.5)
    assert all(torch.equal(a, c) for a, c in zip(grads, again))
    assert torch.equal(mse, torch.ops.rfq.batch_norm_quant_mse(x, w, b, BN_EPS, steps, cands, sel,
                                                               t, signed)[3])


@pytest.mark.parametrize("case", BN_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_batch_norm_add_matches_cpu_and_reference(case):
    """batch_norm_add on the GPU: mean and var are batch_norm_quant's bit for bit, y is the
    reference's z + residual for them bit for bit, the gradients match the CPU op's, and two
    runs give the same bits."""
    shape, layout = case
    x, w, b = bn_inputs(shape, layout, seed=8)
    r = bn_arrange(torch.randn(x.shape, generator=torch.Generator().manual_seed(9)),
                   "contiguous").to(DEV)
    y, mean, var = torch.ops.rfq.batch_norm_add(x, w, b, BN_EPS, r)
    steps = steps_for([4], False, pow2=False, device=DEV)
    _, mq, vq = torch.ops.rfq.batch_norm_quant(x, w, b, BN_EPS, steps, [4],
                                               torch.tensor(0, device=DEV), False)
    assert torch.equal(mean, mq) and torch.equal(var, vq)
    xc, wc, bc, rc = x.cpu(), w.cpu(), b.cpu(), r.cpu()
    want, _, _ = ref.batch_norm_add(xc, wc, bc, BN_EPS, rc, stats=(mean.cpu(), var.cpu()))
    assert torch.equal(y.cpu(), want)
    gy = bn_arrange(torch.randn(x.shape, generator=torch.Generator().manual_seed(10)),
                    layout).to(DEV)
    grads = torch.ops.rfq.batch_norm_add_backward(gy, x, w, mean, var, BN_EPS)
    cgrads = torch.ops.rfq.batch_norm_add_backward(gy.cpu(), xc, wc, mean.cpu(), var.cpu(),
                                                   BN_EPS)
    for a, c in zip(grads, cgrads):
        torch.testing.assert_close(a.cpu(), c, rtol=1e-4, atol=1e-5 * (float(c.abs().max()) + 1))
    again = torch.ops.rfq.batch_norm_add_backward(gy, x, w, mean, var, BN_EPS)
    assert all(torch.equal(a, c) for a, c in zip(grads, again))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batch_norm_quant_many_chunks_is_deterministic(layout):
    """Hundreds of partials per channel (rows) / per channel chunks (planes); two runs give the
    same bits."""
    x, w, b = bn_inputs((256, 48, 16, 16), layout, seed=3)
    one = bn_check(x, w, b, [6, 4, 2], 1, True, grad_scale=1.0, seed=3)
    steps = steps_for([6, 4, 2], True, pow2=False, device=DEV)
    sel = torch.tensor(1, device=DEV)
    y, mean, var = torch.ops.rfq.batch_norm_quant(x, w, b, BN_EPS, steps, [6, 4, 2], sel, True)
    gy = bn_arrange(torch.randn(x.shape, generator=torch.Generator().manual_seed(4)),
                    layout).to(DEV)
    two = (y, mean, var) + tuple(torch.ops.rfq.batch_norm_quant_backward(
        gy, x, w, b, mean, var, BN_EPS, steps, [6, 4, 2], sel, True, 1.0))
    assert all(torch.equal(a, c) for a, c in zip(one[:3], two[:3]))
    three = torch.ops.rfq.batch_norm_quant_backward(gy, x, w, b, mean, var, BN_EPS, steps,
                                                    [6, 4, 2], sel, True, 1.0)
    assert all(torch.equal(a, c) for a, c in zip(two[3:], three))


@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), float("inf")])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batch_norm_quant_bad_step_gives_nan(bad, layout):
    x, w, b = bn_inputs((4, 6, 5, 5), layout)
    gy = bn_arrange(torch.randn(x.shape), layout).to(DEV)
    steps = torch.tensor([0.25, bad, 0.1], device=DEV)
    bits = [2, 4, 6]
    sel = torch.tensor(1, device=DEV)
    y, mean, var = torch.ops.rfq.batch_norm_quant(x, w, b, BN_EPS, steps, bits, sel, True)
    assert y.isnan().all()
    good = torch.ops.rfq.batch_norm_quant(x, w, b, BN_EPS, steps, bits, torch.tensor(0, device=DEV),
                                          True)
    assert torch.equal(mean, good[1]) and torch.equal(var, good[2])  # statistics need no step
    gx, gw, gb, gs = torch.ops.rfq.batch_norm_quant_backward(gy, x, w, b, mean, var, BN_EPS,
                                                             steps, bits, sel, True, 1.0)
    assert gx.isnan().all() and gw.isnan().all() and gb.isnan().all()
    assert gs[1].isnan() and gs[0] == 0 and gs[2] == 0
    # an unused bad step does not matter
    want = ref.batch_norm_quant_from_stats(x.cpu(), w.cpu(), b.cpu(), good[1].cpu(),
                                           good[2].cpu(), BN_EPS, steps.cpu(), bits,
                                           torch.tensor(0), True)
    assert torch.equal(good[0].cpu(), want)
    # an out-of-range sel: every output that depends on the step is NaN
    for j in (3, -1):
        sel = torch.tensor(j, device=DEV)
        y, mean, var = torch.ops.rfq.batch_norm_quant(x, w, b, BN_EPS, steps, bits, sel, True)
        assert y.isnan().all() and torch.isfinite(mean).all() and torch.isfinite(var).all()
        gx, gw, gb, gs = torch.ops.rfq.batch_norm_quant_backward(gy, x, w, b, mean, var, BN_EPS,
                                                                 steps, bits, sel, True, 1.0)
        assert gx.isnan().all() and gw.isnan().all() and gb.isnan().all() and gs.isnan().all()


def test_batch_norm_quant_no_host_syncs():
    x, w, b = bn_inputs((32, 24, 7, 7), "channels_last")
    xc, _, _ = bn_inputs((8, 24, 7, 7), "contiguous")
    steps = torch.tensor([0.3, 0.1], device=DEV)
    sel = torch.zeros((), dtype=torch.long, device=DEV)

    def work():
        for xx in (x, xc):
            y, mean, var = torch.ops.rfq.batch_norm_quant(xx, w, b, BN_EPS, steps, [2, 4], sel)
            torch.ops.rfq.batch_norm_quant_backward(y, xx, w, b, mean, var, BN_EPS, steps,
                                                    [2, 4], sel, False, 1.0)

    work()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        work()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


# ---- zero host syncs (F5) ----------------------------------------------------------------------
def test_no_host_syncs_in_fused_ops():
    bits = [6, 5, 4, 3, 2]
    x = torch.randn(64, 4099, device=DEV, requires_grad=True)
    steps = torch.full((5,), 0.05, device=DEV, requires_grad=True)
    sel = torch.zeros((), dtype=torch.long, device=DEV)
    g = torch.randn(64, 4099, device=DEV)
    gk = torch.randn(5, 64, 4099, device=DEV)
    xs = torch.randn(3, 4096, device=DEV, dtype=torch.bfloat16)
    codes = torch.randint(-8, 8, (256, 4096), dtype=torch.int8)
    packed = ops.pack_weight(codes, 4).to(DEV)
    scales = torch.rand(256, 32, device=DEV)
    xl = torch.randn(40, 4096, device=DEV, dtype=torch.bfloat16)

    def work(js):
        for j in js:
            sel.fill_(j)
            y = ops.coupled_quant(x, steps, bits, sel)
            dx, ds = torch.autograd.grad(y, (x, steps), g)
            ym = ops.coupled_quant_multi(x, steps, bits)
            dx, ds = torch.autograd.grad(ym, (x, steps), gk)
            ops.quant_stats(x.detach(), steps.detach(), bits)
            ops.quantize_codes(x.detach(), steps.detach()[j:j + 1], bits[j])
        ops.packed_linear(xs, packed, scales, 4, 128)  # GEMV path
        ops.packed_linear(xl, packed, scales, 4, 128)  # dequantize + matmul path
        ops.unpack_weight(packed, 4, (256, 4096))

    work([2])  # one-time setup (cuBLAS handle, allocator pools) happens outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        work([3, 0, 4, 1])
        with pytest.raises(RuntimeError, match="synchroniz"):  # the check is live
            sel.item()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_fwd_bwd_launch_counts():
    """F10: ResNet-18 weight (589,824 elements), K=5 fwd+bwd in <= 4 kernel launches; a tensor
    that fits one tile needs one launch per pass."""
    from torch.profiler import ProfilerActivity, profile

    def launches(fn):
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        if not kernels:
            pytest.skip("the profiler recorded no CUDA activity (CUPTI unavailable)")
        return len(kernels)

    bits = [6, 5, 4, 3, 2]
    for n, most in [(589_824, 4), (TILE, 2)]:
        x = torch.randn(n, device=DEV, requires_grad=True)
        steps = torch.full((5,), 0.05, device=DEV, requires_grad=True)
        gk = torch.randn(5, n, device=DEV)

        def step():
            torch.autograd.grad(ops.coupled_quant_multi(x, steps, bits), (x, steps), gk)

        assert launches(step) <= most, f"n={n}"


# ---- opcheck and torch.compile -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_packed_ops(dtype):
    codes = torch.randint(-8, 8, (24, 200), dtype=torch.int8, device=DEV)
    torch.library.opcheck(torch.ops.rfq.pack_weight.default, (codes, 4))
    packed = ops.pack_weight(codes, 4)
    torch.library.opcheck(torch.ops.rfq.unpack_weight.default, (packed, 4, [24, 200]))
    scales = torch.rand(24, 7, device=DEV)
    zeros = torch.rand(24, 7, device=DEV) * 15
    bias = torch.randn(24, device=DEV)
    for m in (1, 20):
        x = torch.randn(m, 200, device=DEV).to(dtype).requires_grad_()
        torch.library.opcheck(torch.ops.rfq.packed_linear.default,
                              (x, packed, scales, zeros, 4, 32, bias))


def test_compile_fullgraph_on_cuda_without_recompiles():
    from test_compile import TinyQuantMLP, run_step

    torch._dynamo.reset()
    eager = TinyQuantMLP().to(DEV)
    model = TinyQuantMLP().to(DEV)
    model.load_state_dict(eager.state_dict())
    compiled = torch.compile(model, fullgraph=True)
    g = torch.Generator().manual_seed(1)
    x, target = torch.randn(8, 16, generator=g).to(DEV), torch.randint(0, 10, (8,), generator=g)
    target = target.to(DEV)
    run_step(compiled, x, target)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for j in [3, 0, 4, 1, 2, 4]:
            eager.sel.fill_(j)
            model.sel.fill_(j)
            loss_e, grads_e = run_step(eager, x, target)
            loss_c, grads_c = run_step(compiled, x, target)
            torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
            for a, b in zip(grads_c, grads_e):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ---- packed weights ----------------------------------------------------------------------------
def random_codes(n, k, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-1, 1) if bits == 1 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    codes = torch.randint(lo, hi + 1, (n, k), generator=g, dtype=torch.int8)
    if bits == 1:
        codes = torch.where(codes == 0, 1, codes).to(torch.int8)
    return codes


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("n, k", [(0, 5), (3, 0), (1, 1), (5, 127), (7, 128), (9, 300), (64, 4096)])
def test_pack_unpack_match_cpu_layout(bits, n, k):
    codes = random_codes(n, k, bits, seed=bits)
    packed = ops.pack_weight(codes.to(DEV), bits)
    assert packed.device.type == DEV
    assert torch.equal(packed.cpu(), ref.pack_weight(codes, bits))  # byte-exact layout
    assert torch.equal(ops.unpack_weight(packed, bits, (n, k)).cpu(), codes)
    if n > 1:  # a row slice of a packed tensor (offset storage) unpacks the same
        assert torch.equal(ops.unpack_weight(packed[1:], bits, (n - 1, k)).cpu(), codes[1:])


def test_pack_rejects_bad_codes_like_cpu():
    codes = random_codes(4, 50, 4)
    codes[2, 17] = 9
    codes[3, 1] = -9
    msg = r"rfq.pack_weight: codes\[2, 17\] = 9 is not a signed 4-bit code \(range \[-8, 7\]\)"
    with pytest.raises(RuntimeError, match=msg):
        ops.pack_weight(codes, 4)
    with pytest.raises(RuntimeError, match=msg):
        ops.pack_weight(codes.to(DEV), 4)
    binary = torch.ones(2, 3, dtype=torch.int8)
    binary[1, 2] = 0
    with pytest.raises(RuntimeError, match=r"codes\[1, 2\] = 0 .*binary: -1 or \+1"):
        ops.pack_weight(binary.to(DEV), 1)


# Output tolerance against fp32 dequantize + F.linear. Both sides round an fp32 result once, so
# neighbours may differ by one output ulp; the GEMV kernel sums in fp32 in another order (a few
# fp32 ulps of sum |x||w|); the matmul path also rounds the weight to x's dtype (half an ulp per
# weight, and cuBLAS may reduce fp16 partly in fp16): 2 half-ulps of sum |x||w| (+|bias|).
OUT_ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
HALF_ULP = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def assert_packed_close(y, want, x2d, w, bias, matmul_path):
    mag = x2d.float().abs() @ w.abs().t()
    if bias is not None:
        mag = mag + bias.float().abs()
    rel = (2 * HALF_ULP[y.dtype] if matmul_path else 0.0) + 8e-6
    tol = OUT_ULP[y.dtype] * want.float().abs() + rel * mag + 1e-6
    err = (y.float() - want.float()).abs()
    worst = err.argmax()
    assert torch.all(err <= tol), (f"max err {err.max().item()} vs tol "
                                   f"{tol.flatten()[worst].item()} (matmul path: {matmul_path})")


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("group_size, with_zeros", [(0, False), (32, False), (64, True),
                                                    (128, False), (128, True)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 3, 16, 17, 64])
def test_packed_linear_matches_dequantize_linear(bits, group_size, with_zeros, dtype, m):
    n, k = 37, 300  # odd N, K not a multiple of 128 (padding) nor of the vector width
    g = torch.Generator().manual_seed(bits * 100 + m)
    codes = random_codes(n, k, bits, seed=bits)
    packed = ops.pack_weight(codes, bits).to(DEV)
    groups = -(-k // group_size) if group_size else 1
    scales = (torch.rand((n, groups) if group_size else (1,), generator=g) * 0.02 + 0.001)
    zeros = (torch.rand(n, groups, generator=g) * 2 ** ref.container_bits(bits)
             if with_zeros else None)
    bias = torch.randn(n, generator=g).to(DEV)
    scales = scales.to(DEV)
    zeros = zeros.to(DEV) if zeros is not None else None
    x = torch.randn(m, k, generator=g).to(dtype).to(DEV)
    for b in (None, bias):
        y = ops.packed_linear(x, packed, scales, bits, group_size, zeros, b)
        assert y.dtype == dtype and y.shape == (m, n)
        want = ref.packed_linear(x, packed, scales, zeros, bits, group_size, b)
        w = ref.dequantize_weight(packed.cpu(), scales.cpu(), bits, (n, k), group_size,
                                  None if zeros is None else zeros.cpu()).to(DEV)
        assert_packed_close(y, want, x, w, b, matmul_path=m > 16)
    x_step = torch.tensor([0.3], device=DEV)  # the fused input quantizer (codes stage on CUDA)
    y = ops.packed_linear(x, packed, scales, bits, group_size, zeros, bias, x_step, 4, False)
    want = ref.packed_linear(x, packed, scales, zeros, bits, group_size, bias, x_step, 4, False)
    xq = ref.codes_float(x.float() / 0.3, 4, False) * 0.3
    assert y.dtype == dtype and y.shape == (m, n)
    assert_packed_close(y, want, xq.to(dtype), w, bias, matmul_path=m > 16)


@pytest.mark.parametrize("shape", [(4096, 4096), (1000, 512), (11, 4608)])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("m", [1, 16, 64])
def test_packed_linear_large_shapes(shape, bits, m):
    n, k = shape
    codes = random_codes(n, k, bits, seed=3)
    packed = ops.pack_weight(codes.to(DEV), bits)
    scales = (torch.rand(n, k // 128, generator=torch.Generator().manual_seed(0)) * 0.01).to(
        torch.bfloat16).to(DEV)
    x = torch.randn(2, m, k, device=DEV, dtype=torch.float16)  # 3-D input: 2*m rows
    y = ops.packed_linear(x, packed, scales, bits, 128)
    assert y.shape == (2, m, n)
    want = ref.packed_linear(x, packed, scales, None, bits, 128)
    w = ref.dequantize_weight(packed.cpu(), scales.cpu(), bits, (n, k), 128).to(DEV)
    assert_packed_close(y.reshape(-1, n), want.reshape(-1, n), x.reshape(-1, k), w, None,
                        matmul_path=2 * m > 16)


def test_packed_linear_gradient_and_empty():
    codes = random_codes(8, 130, 4)
    packed = ops.pack_weight(codes, 4).to(DEV)
    scales = torch.tensor([0.05], device=DEV)
    x = torch.randn(3, 130, device=DEV, requires_grad=True)
    ops.packed_linear(x, packed, scales, 4).sum().backward()
    w = (codes.float() * 0.05).to(DEV)
    torch.testing.assert_close(x.grad, torch.ones(3, 8, device=DEV) @ w)
    assert ops.packed_linear(torch.empty(0, 130, device=DEV), packed, scales, 4).shape == (0, 8)


# ---- relu_quant: the CUDA op against the CPU op on the same inputs ----------------------------
# (csrc/cuda/relu_quant.cu). r, y and dx bit-exact; the step gradient within the spec tolerance
# (fp32 per-tile partials vs the CPU's chunk partials); grad_r / grad_y each present or None.
RELU_SHAPES = [(0,), (1,), (7,), (3, 5, 9), (TILE,), (TILE + 1,), (3 * TILE + 7,), (33, 257)]
RELU_GRADS = [(True, True), (True, False), (False, True), (False, False)]


def relu_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """arrange(), plus real 4-D channels_last."""
    if layout == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return arrange(x, layout)


def relu_check(x, steps, cands, j, grad_scale=0.5, seed=0, grad_layout=None):
    """relu_quant and every gradient combination of its backward on the GPU against the CPU op on
    the same inputs; returns the outputs."""
    sel = torch.tensor(j, device=DEV)
    xc, sc, selc = x.cpu(), steps.cpu(), sel.cpu()
    r, y = torch.ops.rfq.relu_quant(x, steps, cands, sel, grad_scale)
    cr, cy = torch.ops.rfq.relu_quant(xc, sc, cands, selc, grad_scale)
    for out in (r, y):
        assert out.device.type == DEV and out.dtype == x.dtype and out.shape == x.shape
        assert out.stride() == torch.empty_like(x).stride()  # dense layouts are kept
    assert torch.equal(r.cpu(), cr) and torch.equal(y.cpu(), cy)
    assert torch.equal(r, torch.relu(x))
    # y is coupled_quant's (signed = False), to the bit
    assert torch.equal(y, torch.ops.rfq.coupled_quant(x, steps, cands, sel, False, grad_scale))

    g = torch.Generator().manual_seed(seed)
    gr0 = torch.randn(x.shape, generator=g).to(x.dtype)
    gy0 = torch.randn(x.shape, generator=g).to(x.dtype)
    place = (lambda t: relu_layout(t.to(DEV), grad_layout)) if grad_layout else (
        lambda t: torch.empty_like(x).copy_(t.to(DEV)))  # x's own layout
    outs = [r, y]
    for has_r, has_y in RELU_GRADS:
        gr = place(gr0) if has_r else None
        gy = place(gy0) if has_y else None
        gx, gs = torch.ops.rfq.relu_quant_backward(gr, gy, x, steps, cands, sel, grad_scale)
        cgx, cgs = torch.ops.rfq.relu_quant_backward(
            gr.cpu() if has_r else None, gy.cpu() if has_y else None, xc, sc, cands, selc,
            grad_scale)
        case = f"grad_r={has_r} grad_y={has_y}"
        assert gx.dtype == x.dtype and gx.shape == x.shape, case
        assert gx.stride() == torch.empty_like(x).stride(), case
        assert torch.equal(gx.cpu(), cgx), case
        assert gs.dtype == torch.float32 and gs.shape == (len(cands),), case
        others = [i for i in range(len(cands)) if i != j]
        assert torch.all(gs[others] == 0), case
        if has_y:
            assert_step_grad_close(gs, cgs, grad_scale * abs_step_terms(gy0, xc, sc[j], cands[j],
                                                                         False))
            # the same step gradient and y-part of dx as coupled_quant_backward
            qx, qs = torch.ops.rfq.coupled_quant_backward(gy, x, steps, cands, sel, False,
                                                          grad_scale)
            assert torch.equal(gs, qs), case
            if not has_r:
                assert torch.equal(gx, qx), case
        else:
            assert torch.equal(gs, torch.zeros_like(gs)), case
        outs += [gx, gs]
    return outs


@pytest.mark.parametrize("shape", RELU_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_relu_quant_matches_cpu(shape, dtype, bits):
    cands = sorted({bits, 2, 4})
    j = cands.index(bits)
    steps = steps_for(cands, False, pow2=bits % 2 == 0, device=DEV)
    x = make_x(shape, dtype, bits, False, steps[j].item(), DEV, seed=bits)  # < 0, 0, ties, bounds
    relu_check(x, steps, cands, j, seed=bits)


# contiguous, transposed, strided (copied), misaligned (scalar paths), channels_last (3-D view
# and real 4-D); gradients in x's layout or in another one (copied into x's).
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 7, 9), (3, 2, TILE + 3), (4, 6, 5, 7), (2, 16, 9, 33)],
                         ids=str)
def test_relu_quant_layouts_match_cpu(layout, dtype, shape):
    cands = [2, 3, 6]
    steps = steps_for(cands, False, pow2=False, device=DEV)
    x = relu_layout(make_x(shape, dtype, 3, False, steps[1].item(), DEV, seed=5), layout)
    relu_check(x, steps, cands, 1, grad_scale=0.25, seed=6)
    relu_check(x, steps, cands, 1, grad_scale=1.0, seed=7, grad_layout="contiguous")
    if layout == "contiguous":
        relu_check(x, steps, cands, 1, seed=8, grad_layout="misaligned")


def test_relu_quant_many_tiles_is_deterministic():
    """Thousands of per-tile partials in the finalize pass; two runs give identical bits."""
    cands = [6, 5, 4, 3, 2]
    steps = steps_for(cands, False, pow2=False, device=DEV)
    x = make_x((3_000_017,), torch.float32, 4, False, steps[2].item(), DEV, seed=21)
    one = relu_check(x, steps, cands, 2, grad_scale=1.0, seed=22)
    two = relu_check(x, steps, cands, 2, grad_scale=1.0, seed=22)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_relu_quant_nan_inf_and_zero():
    x = torch.tensor([float("nan"), 0.0, -0.0, -1.0, 0.375, 100.0, float("inf"), -float("inf"),
                      0.25, 0.75], device=DEV)
    steps, sel = torch.tensor([0.5], device=DEV), torch.tensor(0, device=DEV)
    r, y = ops.relu_quant(x, steps, [2], sel)
    assert r[0].isnan() and y[0].isnan()
    assert r[1:].tolist() == [0.0, 0.0, 0.0, 0.375, 100.0, float("inf"), 0.0, 0.25, 0.75]
    assert y[1:].tolist() == [0.0, 0.0, 0.0, 0.5, 1.5, 1.5, 0.0, 0.0, 1.0]  # ties to even
    cr, cy = ops.relu_quant(x.cpu(), steps.cpu(), [2], sel.cpu())
    torch.testing.assert_close(r.cpu(), cr, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(y.cpu(), cy, rtol=0, atol=0, equal_nan=True)
    g = torch.arange(1.0, 11.0, device=DEV)
    for gr, gy in ((g, g), (g, None), (None, g)):
        gx, _ = torch.ops.rfq.relu_quant_backward(gr, gy, x, steps, [2], sel, 1.0)
        cgx, _ = torch.ops.rfq.relu_quant_backward(
            None if gr is None else gr.cpu(), None if gy is None else gy.cpu(), x.cpu(),
            steps.cpu(), [2], sel.cpu(), 1.0)
        torch.testing.assert_close(gx.cpu(), cgx, rtol=0, atol=0, equal_nan=True)


# ---- relu_quant: bad steps and sel give NaN (no sync); r needs no step ----------------------
@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_relu_quant_bad_step_gives_nan(bad, dtype):
    x = torch.randn(3000, device=DEV).to(dtype)
    gr, gy = torch.randn(3000, device=DEV).to(dtype), torch.randn(3000, device=DEV).to(dtype)
    relu_grad = torch.where(x > 0, gr, torch.zeros((), dtype=dtype, device=DEV))
    steps = torch.tensor([0.25, bad, 0.1], device=DEV)
    bits = [2, 4, 6]
    bw = torch.ops.rfq.relu_quant_backward
    sel = torch.tensor(1, device=DEV)
    r, y = ops.relu_quant(x, steps, bits, sel)
    assert torch.equal(r, torch.relu(x)) and y.isnan().all()
    for a, b in ((gr, gy), (None, gy)):
        gx, gs = bw(a, b, x, steps, bits, sel, 1.0)
        assert gx.isnan().all() and gs[1].isnan() and gs[0] == 0 and gs[2] == 0
    gx, gs = bw(gr, None, x, steps, bits, sel, 1.0)  # no grad_y: the step is not needed
    assert torch.equal(gx, relu_grad) and torch.equal(gs, torch.zeros(3, device=DEV))
    # an unused bad step does not matter, as on CPU
    sel0 = torch.tensor(0, device=DEV)
    r0, y0 = ops.relu_quant(x, steps, bits, sel0)
    cr0, cy0 = ops.relu_quant(x.cpu(), steps.cpu(), bits, sel0.cpu())
    assert torch.equal(r0.cpu(), cr0) and torch.equal(y0.cpu(), cy0)
    gx, gs = bw(gr, gy, x, steps, bits, sel0, 1.0)
    cgx, cgs = bw(gr.cpu(), gy.cpu(), x.cpu(), steps.cpu(), bits, sel0.cpu(), 1.0)
    assert torch.equal(gx.cpu(), cgx) and torch.isfinite(gs).all()
    # an out-of-range sel: y, dx and every step gradient are NaN (grad_y given); r is relu(x)
    for j in (3, -1):
        sel = torch.tensor(j, device=DEV)
        r, y = ops.relu_quant(x, steps, bits, sel)
        assert torch.equal(r, torch.relu(x)) and y.isnan().all()
        for a, b in ((gr, gy), (None, gy)):
            gx, gs = bw(a, b, x, steps, bits, sel, 1.0)
            assert gx.isnan().all() and gs.isnan().all()
        gx, gs = bw(gr, None, x, steps, bits, sel, 1.0)
        assert torch.equal(gx, relu_grad) and torch.equal(gs, torch.zeros(3, device=DEV))


def test_relu_quant_autograd_matches_cpu():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 8, 7, 7, generator=g).contiguous(memory_format=torch.channels_last)
    w_r, w_y = torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g)
    grads = {}
    for dev in ("cpu", DEV):
        x = x0.to(dev).requires_grad_(True)
        steps = torch.tensor([0.3, 0.1], device=dev, requires_grad=True)
        r, y = ops.relu_quant(x, steps, [3, 5], torch.tensor(1, device=dev), 0.5)
        ((r * w_r.to(dev)).sum() + (y * w_y.to(dev)).sum()).backward()
        grads[dev] = (x.grad.cpu(), steps.grad.cpu())
    assert torch.equal(grads[DEV][0], grads["cpu"][0])
    torch.testing.assert_close(grads[DEV][1], grads["cpu"][1], rtol=1e-5, atol=1e-4)


def test_relu_quant_no_host_syncs():
    x = torch.randn(64, 4099, device=DEV)
    xs = torch.randn(300, device=DEV, dtype=torch.bfloat16)  # one tile: no finalize launch
    steps = torch.tensor([0.3, 0.1, 0.05], device=DEV)
    sel = torch.zeros((), dtype=torch.long, device=DEV)

    def work(js):
        for j in js:
            sel.fill_(j)
            for xx in (x, xs):
                r, y = ops.relu_quant(xx, steps, [2, 4, 6], sel)
                for gr, gy in ((r, y), (r, None), (None, y), (None, None)):
                    torch.ops.rfq.relu_quant_backward(gr, gy, xx, steps, [2, 4, 6], sel, 1.0)

    work([0])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        work([2, 1])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
