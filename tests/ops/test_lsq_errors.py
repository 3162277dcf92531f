"""Bad input raises an error that names the op and the argument; never a crash or garbage."""

import pytest
import torch

from rfq import ops

X = torch.randn(10)
STEPS = torch.tensor([0.5, 0.25])
BITS = [2, 4]
SEL = torch.tensor(1)


def cq(**kw):
    args = dict(x=X, steps=STEPS, bits=BITS, sel=SEL, signed=True)
    args.update(kw)
    return ops.coupled_quant(**args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=torch.randint(0, 5, (10,))), "x must be float32, bfloat16 or float16"),
        (dict(x=torch.randn(10, dtype=torch.float64)), "x must be float32"),
        (dict(steps=STEPS.double()), "steps must be float32"),
        (dict(steps=torch.empty(0), bits=[]), "steps is empty"),
        (dict(steps=torch.tensor([0.5, 0.25, 0.1])), "steps has K=3 entries but bits lists 2"),
        (dict(steps=STEPS.reshape(1, 2)), "steps must be 1-D"),
        (dict(bits=[2, 9]), "bits must be in 1..8, got 9"),
        (dict(bits=[0, 4]), "bits must be in 1..8, got 0"),
        (dict(steps=torch.tensor([0.5, 0.0])), r"steps\[1\] must be a finite positive step"),
        (dict(steps=torch.tensor([0.5, -1.0])), r"steps\[1\] must be a finite positive step"),
        (dict(steps=torch.tensor([0.5, float("nan")])), r"steps\[1\] must be a finite positive"),
        (dict(steps=torch.tensor([0.5, float("inf")])), r"steps\[1\] must be a finite positive"),
        (dict(sel=torch.tensor(2)), "sel=2 is out of range for K=2"),
        (dict(sel=torch.tensor(-1)), "sel=-1 is out of range"),
        (dict(sel=torch.tensor(1, dtype=torch.int32)), "sel must be int64"),
        (dict(sel=torch.tensor([0, 1])), "sel must hold one index"),
        (dict(steps=torch.full((9,), 0.1), bits=[1, 2, 3, 4, 5, 6, 7, 8, 8]), "at most 8"),
    ],
)
def test_coupled_quant_rejects(kwargs, match):
    with pytest.raises(RuntimeError, match=f"rfq.coupled_quant: {match}"):
        cq(**kwargs)


def test_only_the_selected_step_must_be_valid():
    """Unused candidates may hold any value (e.g. a frozen bit's stale step)."""
    y = cq(steps=torch.tensor([float("nan"), 0.25]))
    assert torch.isfinite(y).all()


def test_backward_rejects_bad_grad_and_scale():
    bwd = torch.ops.rfq.coupled_quant_backward
    with pytest.raises(RuntimeError, match="grad_y must have shape"):
        bwd(torch.randn(11), X, STEPS, BITS, SEL, True, 1.0)
    with pytest.raises(RuntimeError, match="grad_y must have x's dtype"):
        bwd(torch.randn(10).double(), X, STEPS, BITS, SEL, True, 1.0)
    with pytest.raises(RuntimeError, match="grad_scale must be finite"):
        bwd(torch.randn(10), X, STEPS, BITS, SEL, True, float("nan"))
    mbwd = torch.ops.rfq.coupled_quant_multi_backward
    with pytest.raises(RuntimeError, match=r"grad_y must have shape \[2, 10\]"):
        mbwd(torch.randn(10), X, STEPS, BITS, True, 1.0)


def test_multi_and_stats_check_every_step():
    bad = torch.tensor([0.5, -0.25])
    with pytest.raises(RuntimeError, match=r"rfq.coupled_quant_multi: steps\[1\]"):
        ops.coupled_quant_multi(X, bad, BITS)
    with pytest.raises(RuntimeError, match=r"rfq.quant_stats: steps\[1\]"):
        ops.quant_stats(X, bad, BITS)
    with pytest.raises(RuntimeError, match="rfq.quant_stats: delta must be in"):
        ops.quant_stats(X, STEPS, BITS, delta=0.75)
    with pytest.raises(RuntimeError, match="rfq.quant_stats: bits must be in 1..8"):
        ops.quant_stats(X, STEPS, [3, 12])


def test_quantize_codes_rejects():
    with pytest.raises(RuntimeError, match="rfq.quantize_codes: bits must be in 1..8"):
        ops.quantize_codes(X, STEPS[:1], 0)
    with pytest.raises(RuntimeError, match="step must hold one value"):
        ops.quantize_codes(X, STEPS, 4)
    with pytest.raises(RuntimeError, match="step must be float32"):
        ops.quantize_codes(X, STEPS[:1].double(), 4)
    with pytest.raises(RuntimeError, match="step must be a finite positive"):
        ops.quantize_codes(X, torch.tensor([float("nan")]), 4)
    with pytest.raises(RuntimeError, match="x must be float32"):
        ops.quantize_codes(X.long(), STEPS[:1], 4)


def test_empty_tensors_work():
    x = torch.empty(0, 3)
    y = cq(x=x)
    assert y.shape == (0, 3)
    xr = x.clone().requires_grad_()
    steps = STEPS.clone().requires_grad_()
    ops.coupled_quant(xr, steps, BITS, SEL).sum().backward()
    assert xr.grad.shape == (0, 3) and torch.equal(steps.grad, torch.zeros(2))
    mse, share = ops.quant_stats(x, STEPS, BITS)
    assert torch.equal(mse, torch.zeros(2)) and torch.equal(share, torch.zeros(2))
    assert ops.coupled_quant_multi(x, STEPS, BITS).shape == (2, 0, 3)


def test_device_mismatch_is_named_without_a_gpu():
    """A meta tensor among CPU ones routes the call to the fake kernels: they must refuse it."""
    meta = torch.device("meta")
    with pytest.raises(RuntimeError, match="rfq.coupled_quant: steps must be on x's device"):
        cq(steps=STEPS.to(meta))
    with pytest.raises(RuntimeError, match="rfq.coupled_quant: sel must be on x's device"):
        cq(sel=SEL.to(meta))
    with pytest.raises(RuntimeError, match="rfq.quant_stats: steps must be on x's device"):
        ops.quant_stats(X, STEPS.to(meta), BITS)
    with pytest.raises(RuntimeError, match="rfq.quantize_codes: step must be on x's device"):
        ops.quantize_codes(X.to(meta), STEPS[:1], 4)
    with pytest.raises(RuntimeError, match="rfq.coupled_quant_multi: steps must be on x's"):
        ops.coupled_quant_multi(X, STEPS.to(meta), BITS)
    with pytest.raises(RuntimeError, match="coupled_quant_backward: grad_y must be on x's"):
        torch.ops.rfq.coupled_quant_backward(torch.randn(10, device=meta), X, STEPS, BITS, SEL,
                                             True, 1.0)


def test_all_meta_inputs_give_metadata():
    meta = torch.device("meta")
    y = cq(x=X.to(meta), steps=STEPS.to(meta), sel=SEL.to(meta))
    assert y.device == meta and y.shape == X.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device mismatch needs a second device")
def test_device_mismatch_is_named():
    with pytest.raises(RuntimeError, match="steps must be on x's device"):
        cq(x=X.cuda())
    with pytest.raises(RuntimeError, match="sel must be on x's device"):
        cq(x=X.cuda(), steps=STEPS.cuda())
