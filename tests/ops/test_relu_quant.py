"""rfq.relu_quant: a residual block's ReLU and the next conv's unsigned input quantizer from one
read of x. Exact against the two ops it replaces (rfq.reference), forward and backward, on
every dtype, with either gradient missing."""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from lsq_cases import abs_step_terms, assert_step_grad_close
from rfq import ops
from rfq import reference as ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def arrange(x, layout):
    if layout == "channels_last" and x.dim() == 4:
        return x.to(memory_format=torch.channels_last)
    if layout == "transposed" and x.dim() >= 2:
        return x.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "strided" and x.dim() >= 1:
        wide = torch.zeros((*x.shape[:-1], x.shape[-1] * 2), dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


@settings(max_examples=80, deadline=None)
@given(shape=st.lists(st.sampled_from([0, 1, 2, 3, 5, 17, 64, 129]), min_size=1, max_size=4),
       dtype=st.sampled_from(DTYPES), bits=st.integers(1, 8), step=st.floats(1e-3, 4.0),
       layout=st.sampled_from(["contiguous", "channels_last", "transposed", "strided"]),
       grads=st.sampled_from(["both", "relu", "quant"]), seed=st.integers(0, 2**16))
def test_exact_against_the_two_ops(shape, dtype, bits, step, layout, grads, seed):
    g = torch.Generator().manual_seed(seed)
    x = arrange((torch.randn(shape, generator=g) * 3).to(dtype), layout)
    steps, sel = torch.tensor([step, 0.25]), torch.tensor(0)
    cands = [bits, 4]
    r, y = ops.relu_quant(x, steps, cands, sel)
    rr, ry = ref.relu_quant(x, steps, cands, sel)
    assert torch.equal(r, rr) and torch.equal(y, ry)
    assert r.stride() == y.stride() == torch.empty_like(x).stride()
    gr = torch.randn(shape, generator=g).to(dtype) if grads != "quant" else None
    gy = torch.randn(shape, generator=g).to(dtype) if grads != "relu" else None
    gx, gs = torch.ops.rfq.relu_quant_backward(gr, gy, x, steps, cands, sel, 0.5)
    rgx, rgs = ref.relu_quant_backward(gr, gy, x, steps, cands, sel, 0.5)
    assert torch.equal(gx, rgx)
    if gy is None:
        assert torch.equal(gs, torch.zeros(2))
    else:
        assert_step_grad_close(gs, rgs, 0.5 * abs_step_terms(gy, x, steps[0], cands[0], False))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_autograd_matches_autograd_through_the_two_ops(dtype):
    g = torch.Generator().manual_seed(1)
    x0 = (torch.randn(8, 6, 5, 5, generator=g) * 2).to(dtype)
    w_r, w_y = torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g)
    outs = []
    for fn in (ops.relu_quant, ref.relu_quant):
        x = x0.clone().requires_grad_(True)
        steps = torch.tensor([0.3, 0.1], requires_grad=True)
        r, y = fn(x, steps, [3, 5], torch.tensor(1), 0.5)
        ((r.float() * w_r).sum() + (y.float() * w_y).sum()).backward()
        outs.append((x.grad, steps.grad))
    # autograd through the reference multiplies by s / s (lsq_fake_quant's chain): not exact
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5 if dtype == torch.float32
                               else 1e-2, atol=0)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-4)
    # one output unused: its gradient is None inside (no zeros tensor), the result the same
    x = x0.clone().requires_grad_(True)
    r, y = ops.relu_quant(x, torch.tensor([0.3, 0.1]), [3, 5], torch.tensor(1))
    (r.float() * w_r).sum().backward()
    assert torch.equal(x.grad, torch.where(x0 > 0, w_r.to(dtype), torch.zeros((), dtype=dtype)))


def test_nan_and_zero():
    x = torch.tensor([float("nan"), 0.0, -0.0, -1.0, 0.375, 100.0])
    r, y = ops.relu_quant(x, torch.tensor([0.5]), [2], torch.tensor(0))
    assert torch.isnan(r[0]) and torch.isnan(y[0])
    assert r[1:].tolist() == [0.0, 0.0, 0.0, 0.375, 100.0]
    assert y[1:].tolist() == [0.0, 0.0, 0.0, 0.5, 1.5]


@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck(device, requires_grad):
    for shape in [(5,), (3, 4, 5), (0, 2), (2, 3, 4, 4)]:
        x = (torch.randn(shape) * 2).to(device).requires_grad_(requires_grad)
        steps = torch.tensor([0.3, 0.1], device=device, requires_grad=requires_grad)
        sel = torch.tensor(1, device=device)
        torch.library.opcheck(torch.ops.rfq.relu_quant.default, (x, steps, [2, 4], sel, 0.5))
        g = torch.randn(shape, device=device)
        for gr, gy in ((g, g), (None, g), (g, None)):
            torch.library.opcheck(torch.ops.rfq.relu_quant_backward.default,
                                  (gr, gy, x.detach(), steps.detach(), [2, 4], sel, 0.5),
                                  test_utils=("test_schema", "test_faketensor",
                                              "test_aot_dispatch_static"))


def test_bad_arguments_name_the_argument():
    x, s, sel = torch.randn(4, 4), torch.tensor([0.3]), torch.tensor(0)
    with pytest.raises(RuntimeError, match="rfq.relu_quant: x must be float32, bfloat16"):
        ops.relu_quant(x.double(), s, [4], sel)
    with pytest.raises(RuntimeError, match=r"rfq.relu_quant: steps\[0\] must be a finite positive"):
        ops.relu_quant(x, torch.tensor([0.0]), [4], sel)
    with pytest.raises(RuntimeError, match="rfq.relu_quant: sel=3 is out of range"):
        ops.relu_quant(x, s, [4], torch.tensor(3))
    bw = torch.ops.rfq.relu_quant_backward
    with pytest.raises(RuntimeError, match="rfq.relu_quant_backward: grad_y must have shape"):
        bw(None, torch.randn(3), x, s, [4], sel, 1.0)
    with pytest.raises(RuntimeError, match="rfq.relu_quant_backward: grad_y must have x's dtype"):
        bw(x.half(), None, x, s, [4], sel, 1.0)
