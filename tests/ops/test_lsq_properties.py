"""Hypothesis property tests of the quantizer, and layouts (non-contiguous, channels_last)."""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

from lsq_cases import assert_step_grad_close, abs_step_terms
from rfq import ops
from rfq import reference as ref

dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
shapes = st.lists(st.sampled_from([0, 1, 2, 3, 5, 17, 64, 129]), min_size=0, max_size=3)
layouts = st.sampled_from(["contiguous", "transposed", "strided", "expanded"])


def arrange(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Same values as x, in a non-contiguous layout."""
    if layout == "transposed" and x.dim() >= 2:
        return x.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "strided":
        wide = torch.zeros((*x.shape[:-1], x.shape[-1] * 2) if x.dim() else (2,), dtype=x.dtype)
        if x.dim() == 0:
            return x
        wide[..., ::2] = x
        return wide[..., ::2]
    if layout == "expanded" and x.dim() >= 1 and x.shape[0] == 1:
        return x.expand(3, *x.shape[1:])
    return x


@st.composite
def quant_case(draw):
    bits = draw(st.integers(1, 8))
    signed = draw(st.booleans())
    dtype = draw(dtypes)
    shape = draw(shapes)
    step = draw(st.floats(2.0**-10, 8.0, allow_nan=False, allow_infinity=False, width=32))
    seed = draw(st.integers(0, 2**16))
    spread = draw(st.floats(0.1, 300.0))
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * spread * step).to(dtype)
    x = arrange(x, draw(layouts))
    return x, torch.tensor([step], dtype=torch.float32), bits, signed


@given(quant_case())
def test_forward_matches_reference_and_is_a_valid_quantizer(case):
    x, steps, bits, signed = case
    sel = torch.tensor(0)
    y = ops.coupled_quant(x, steps, [bits], sel, signed)
    assert torch.equal(y, ref.coupled_quant(x, steps, [bits], sel, signed))
    codes = ops.quantize_codes(x, steps, bits, signed)
    assert torch.equal(codes, ref.quantize_codes(x, steps, bits, signed))
    qn, qp = ref.qrange(bits, signed)
    if codes.numel():
        assert qn <= int(codes.min()) and int(codes.max()) <= qp
    # y is exactly the codes times the step (one rounding to x's dtype)
    assert torch.equal(y, (codes.float() * steps[0]).to(x.dtype))
    # monotone: larger x never gets a smaller code
    flat_x, flat_c = x.float().reshape(-1), codes.reshape(-1).long()
    order = torch.argsort(flat_x, stable=True)
    assert torch.all(flat_c[order].diff() >= 0)
    if x.dtype == torch.float32:
        # idempotent, and within half a step inside the range
        assert torch.equal(ops.coupled_quant(y, steps, [bits], sel, signed), y)
        v = x / steps[0]
        inside = (v >= qn) & (v <= qp)
        if not (signed and bits == 1):
            assert torch.all((y - x).abs()[inside] <= steps[0] / 2 * (1 + 1e-6))


@given(quant_case(), st.floats(0.0, 4.0))
def test_backward_matches_reference(case, grad_scale):
    x, steps, bits, signed = case
    sel = torch.tensor(0)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)
    gx, gs = torch.ops.rfq.coupled_quant_backward(g, x, steps, [bits], sel, signed, grad_scale)
    rgx, rgs = ref.coupled_quant_backward(g, x, steps, [bits], sel, signed, grad_scale)
    assert torch.equal(gx, rgx)
    assert gx.shape == x.shape
    assert_step_grad_close(gs, rgs, grad_scale * abs_step_terms(g, x, steps[0], bits, signed))


@given(quant_case(), st.floats(0.0, 0.5))
def test_stats_match_reference(case, delta):
    x, steps, bits, signed = case
    cands = sorted({bits, 2, 8})
    steps = steps.repeat(len(cands)) * torch.tensor([2.0 ** -i for i in range(len(cands))])
    mse, share = ops.quant_stats(x, steps, cands, signed, delta)
    rmse, rshare = ref.quant_stats(x, steps, cands, signed, delta)
    assert torch.equal(share, rshare)
    torch.testing.assert_close(mse, rmse, rtol=1e-5, atol=1e-30)
    assert torch.all((share >= 0) & (share <= 1))


def test_dense_layouts_are_kept():
    """channels_last activations stay channels_last (no copy), and so do their gradients."""
    x = torch.randn(2, 8, 5, 7).to(memory_format=torch.channels_last)
    steps, sel = torch.tensor([0.1]), torch.tensor(0)
    y = ops.coupled_quant(x, steps, [4], sel, False)
    assert y.stride() == x.stride()
    assert torch.equal(y, ref.coupled_quant(x, steps, [4], sel, False))
    xg = x.clone().requires_grad_()
    ops.coupled_quant(xg, steps, [4], sel, False).sum().backward()  # expanded grad_y
    assert xg.grad.stride() == x.stride()
    codes = ops.quantize_codes(x, steps, 4, False)
    assert codes.stride() == x.stride()


def test_non_dense_input_is_handled():
    base = torch.randn(6, 10)
    x = base[::2, 1::3]  # neither contiguous nor dense
    steps, sel = torch.tensor([0.2, 0.05]), torch.tensor(1)
    y = ops.coupled_quant(x, steps, [2, 6], sel)
    assert y.is_contiguous()
    assert torch.equal(y, ref.coupled_quant(x.contiguous(), steps, [2, 6], sel))
    ys = ops.coupled_quant_multi(x, steps, [2, 6])
    assert torch.equal(ys, ref.coupled_quant_multi(x.contiguous(), steps, [2, 6]))


@pytest.mark.parametrize("signed", [True, False])
def test_matches_pytorch_learnable_op_where_spec_says_they_agree(signed):
    """Spec §1.1 matched comparison: power-of-two step, fp32, zero_point 0, b >= 2. Codes and y
    are bit-equal; dx and ds agree outside the half-step bands beyond each range end."""
    bits = 4
    qn, qp = ref.qrange(bits, signed)
    s = torch.tensor([0.125])
    x = (torch.rand(50_000, generator=torch.Generator().manual_seed(0)) * (qp - qn + 6) + qn - 3)
    x = (x * s).requires_grad_()
    sl = s.clone().requires_grad_()
    zp = torch.zeros(1, requires_grad=True)
    theirs = torch._fake_quantize_learnable_per_tensor_affine(x, sl, zp, qn, qp, 1.0)
    ours = ops.coupled_quant(x, s, [bits], torch.tensor(0), signed)
    assert torch.equal(ours, theirs)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    theirs.backward(g)
    gx, gs = torch.ops.rfq.coupled_quant_backward(g, x.detach(), s, [bits], torch.tensor(0),
                                                  signed, 1.0)
    v = x.detach() / s
    band = ((v > qp) & (v < qp + 0.5)) | ((v >= qn - 0.5) & (v < qn))
    assert torch.equal(gx[~band], x.grad[~band])
    h = torch.where((v >= qn) & (v <= qp), v.round() - v, torch.clamp(v, qn, qp).round())
    outside_band = (g.double() * h.double())[~band].sum()
    band_theirs = (g.double() * (v.round() - v).double())[band].sum()
    torch.testing.assert_close(sl.grad.double(), (outside_band + band_theirs).reshape(1),
                               rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gs.double(), (g.double() * h.double()).sum().reshape(1),
                               rtol=1e-5, atol=1e-4)
