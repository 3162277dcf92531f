"""The Triton LSQ launchers against rfq/reference.py (interpreter), and bad steps/sel: NaN, never a sync."""

from __future__ import annotations

import pytest
import torch

from triton_cases import (  # noqa: F401  (skips this module without triton)
    ALL_BITS,
    CANDIDATE_SETS,
    DTYPES,
    NAN,
    SHAPES,
    SMALL_BLOCK,
    cases_for,
    grads_like,
    interpreter,
)
from rfq import reference as ref  # noqa: E402
from lsq_cases import abs_step_terms, assert_step_grad_close, make_x, steps_for  # noqa: E402
from rfq.triton_kernels import lsq  # noqa: E402


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


