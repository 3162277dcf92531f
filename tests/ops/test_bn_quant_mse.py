"""rfq.batch_norm_quant_mse: batch_norm_quant plus a feature MSE of its BN output z to a teacher
(IDM's term), without writing z.

Exact: y, mean and var are batch_norm_quant's bit for bit; with a teacher equal to z (the
reference's z for the op's statistics) the MSE is exactly 0 and every gradient is
batch_norm_quant's bit for bit. Otherwise the MSE matches an fp64 one to fp32 rounding, and the
gradients match autograd through rfq.reference's twin."""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import assume, given, settings

from rfq import ops
from rfq import reference as ref
from test_bn_quant import EPS, make

OP, BACKWARD = torch.ops.rfq.batch_norm_quant_mse, torch.ops.rfq.batch_norm_quant_mse_backward


def teacher_like(x, seed=0, layout=None):
    g = torch.Generator().manual_seed(seed + 7)
    t = torch.randn(x.shape, generator=g, dtype=torch.float32)
    if layout == "channels_last":
        t = t.to(memory_format=torch.channels_last)
    return t.to(x.device)


def reference_z(x, w, b, mean, var):
    """rfq.reference's BN output for the given statistics (the z the op quantizes)."""
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    invstd = 1 / torch.sqrt((var + EPS).double()).float()
    alpha = w * invstd
    return x * alpha.view(shape) + (b - mean * alpha).view(shape)


@pytest.mark.parametrize("shape,layout", [((128, 16, 28, 28), "channels_last"),
                                          ((4, 24, 5, 5), "contiguous"), ((64, 24), "contiguous"),
                                          ((8, 5, 7), "contiguous"), ((2, 3, 70, 70), "transposed"),
                                          ((2, 1300, 2, 2), "channels_last")], ids=str)
def test_outputs_are_batch_norm_quants_plus_the_mse(shape, layout):
    x, w, b = make(shape, layout)
    t = teacher_like(x, layout="channels_last" if len(shape) == 4 else None)
    steps = torch.tensor([0.4, 0.05])
    for sel, signed in ((0, False), (1, True)):
        sel = torch.tensor(sel)
        y, mean, var, mse = ops.batch_norm_quant_mse(x, w, b, EPS, steps, [2, 6], sel, t, signed)
        y0, mean0, var0 = ops.batch_norm_quant(x, w, b, EPS, steps, [2, 6], sel, signed)
        assert torch.equal(y, y0) and torch.equal(mean, mean0) and torch.equal(var, var0)
        assert mse.shape == () and mse.dtype == torch.float32
        want = ((reference_z(x, w, b, mean, var).double() - t.double()) ** 2).mean()
        torch.testing.assert_close(mse.double(), want, rtol=2e-6, atol=0)
        _, _, _, mse_ref = ref.batch_norm_quant_mse(x, w, b, EPS, steps, [2, 6], sel, t, signed,
                                                    stats=(mean, var))
        torch.testing.assert_close(mse, mse_ref, rtol=2e-6, atol=0)


def test_a_teacher_equal_to_z_gives_zero_and_the_plain_gradients():
    """Constructed: z - teacher is exactly 0, so the MSE is 0 and the extra gradient term
    vanishes: every gradient is batch_norm_quant's, bit for bit, whatever grad_mse is."""
    for shape, layout in (((16, 8, 6, 6), "channels_last"), ((12, 5, 7), "contiguous")):
        x, w, b = make(shape, layout)
        steps, sel = torch.tensor([0.3, 0.07]), torch.tensor(1)
        _, mean, var = ops.batch_norm_quant(x, w, b, EPS, steps, [3, 5], sel)
        z = reference_z(x, w, b, mean, var)
        y, _, _, mse = ops.batch_norm_quant_mse(x, w, b, EPS, steps, [3, 5], sel, z)
        assert float(mse) == 0.0
        g = torch.randn(y.shape)
        plain = torch.ops.rfq.batch_norm_quant_backward(g, x, w, b, mean, var, EPS, steps,
                                                        [3, 5], sel, False, 0.5)
        got = BACKWARD(g, torch.tensor(123.0), x, w, b, mean, var, EPS, steps, [3, 5], sel, z,
                       False, 0.5)
        assert all(torch.equal(a, c) for a, c in zip(got, plain))


def check_gradients(x, w, b, t, steps, bits, sel, signed, grad_mse, grad_scale=1.0, seed=0):
    leaves = [v.detach().clone().requires_grad_(True) for v in (x, w, b, steps)]
    y, mean, var, mse = ops.batch_norm_quant_mse(*leaves[:3], EPS, leaves[3], bits, sel, t,
                                                 signed, grad_scale)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1))
    ((y * g).sum() + grad_mse * mse).backward()
    rleaves = [v.detach().clone().requires_grad_(True) for v in (x, w, b, steps)]
    yr, _, _, mse_r = ref.batch_norm_quant_mse(*rleaves[:3], EPS, rleaves[3], bits, sel, t,
                                               signed, grad_scale, stats=(mean, var))
    ((yr * g).sum() + grad_mse * mse_r).backward()
    n = x.numel() // x.shape[1]
    # dx = alpha (g - mean(g) - xhat mean(g xhat)) cancels to ~0 when a channel has few values:
    # its fp32 noise scales with alpha * |g|, not with the (tiny) result
    alpha = (w / torch.sqrt(var + EPS)).abs().max()
    z = reference_z(x, w, b, mean, var)
    g_z = float(g.abs().max()) + 2 * abs(grad_mse) / x.numel() * float((z - t).abs().max())
    dx_noise = 1e-6 * float(alpha) * g_z * (n ** 0.5)
    for name, got, leaf in zip("xwbs", (v.grad for v in leaves), rleaves):
        # sums of n fp32 terms in different orders; the step's sum spans every element
        atol = 1e-5 * (n ** 0.5) * max(float(leaf.grad.abs().max()), 1e-3)
        atol += dx_noise if name == "x" else 0.0
        torch.testing.assert_close(got, leaf.grad, rtol=1e-4, atol=atol, msg=name)
    assert not mean.requires_grad and not var.requires_grad


@settings(max_examples=50, deadline=None)
@given(n=st.sampled_from([2, 3, 17, 64]), c=st.sampled_from([1, 3, 16, 17, 40]),
       hw=st.sampled_from([None, (1, 1), (3, 5), (8, 8)]),
       layout=st.sampled_from(["contiguous", "channels_last", "transposed"]),
       teacher_cl=st.booleans(), bits=st.integers(1, 8), signed=st.booleans(),
       step=st.floats(1e-3, 2.0), shift=st.floats(-20, 20),
       grad_mse=st.sampled_from([0.0, 0.01, 1.0, 50.0]), seed=st.integers(0, 2**16))
def test_property_gradients_against_the_reference(n, c, hw, layout, teacher_cl, bits, signed,
                                                  step, shift, grad_mse, seed):
    shape = (n, c) if hw is None else (n, c, *hw)
    # two values per channel can have a variance near 0, where dx is fp32 cancellation noise
    # times a huge 1/std: such draws test that noise, not the teacher's term
    assume(n * (1 if hw is None else hw[0] * hw[1]) >= 8)
    if layout == "channels_last" and hw is None:
        layout = "contiguous"
    x, w, b = make(shape, layout, seed=seed, shift=shift)
    t = teacher_like(x, seed, "channels_last" if teacher_cl and hw else None) + shift * 0.1
    check_gradients(x, w, b, t, torch.tensor([step, 0.5]), [bits, 4], torch.tensor(0), signed,
                    grad_mse, grad_scale=0.7, seed=seed)


def test_unused_outputs_get_zero_gradients():
    x, w, b = make((8, 4, 5, 5), "channels_last")
    t = teacher_like(x)
    steps, sel = torch.tensor([0.2]), torch.tensor(0)
    # only the MSE used: the gradients are the MSE's alone (y's gradient is zero)
    xr = x.clone().requires_grad_(True)
    _, mean, var, mse = ops.batch_norm_quant_mse(xr, w, b, EPS, steps, [4], sel, t)
    (gx,) = torch.autograd.grad(mse, xr)
    want = BACKWARD(torch.zeros_like(x), torch.tensor(1.0), x, w, b, mean, var, EPS, steps, [4],
                    sel, t, False, 1.0)[0]
    assert torch.equal(gx, want)
    # only y used: batch_norm_quant's gradient exactly
    xr = x.clone().requires_grad_(True)
    y, _, _, _ = ops.batch_norm_quant_mse(xr, w, b, EPS, steps, [4], sel, t)
    g = torch.randn(y.shape)
    (gx,) = torch.autograd.grad(y, xr, g)
    plain = torch.ops.rfq.batch_norm_quant_backward(g, x, w, b, mean, var, EPS, steps, [4], sel,
                                                    False, 1.0)[0]
    assert torch.equal(gx, plain)


def test_results_do_not_depend_on_the_thread_count():
    x, w, b = make((64, 16, 20, 20), "channels_last")
    t = teacher_like(x)
    steps, sel = torch.tensor([0.1]), torch.tensor(0)
    g = torch.randn(x.shape)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y, m, v, mse = OP(x, w, b, EPS, steps, [4], sel, t)
            outs.append([y, m, v, mse, *BACKWARD(g, torch.tensor(0.3), x, w, b, m, v, EPS, steps,
                                                 [4], sel, t, False, 1.0)])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, c) for a, c in zip(*outs))


@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck(device, requires_grad):
    for shape, layout in (((4, 3, 5, 5), "channels_last"), ((6, 8), "contiguous")):
        x, w, b = make(shape, layout, device=device)
        t = teacher_like(x)
        steps = torch.tensor([0.3, 0.1], device=device)
        sel = torch.tensor(1, device=device)
        for v in (x, w, b, steps):
            v.requires_grad_(requires_grad)
        torch.library.opcheck(OP.default, (x, w, b, EPS, steps, [2, 4], sel, t, False, 0.5))
        with torch.no_grad():
            _, mean, var, _ = OP(x, w, b, EPS, steps, [2, 4], sel, t)
        g = torch.randn(shape, device=device)
        torch.library.opcheck(BACKWARD.default,
                              (g, torch.tensor(0.7, device=device), x.detach(), w.detach(),
                               b.detach(), mean, var, EPS, steps.detach(), [2, 4], sel, t, False,
                               0.5),
                              test_utils=("test_schema", "test_faketensor",
                                          "test_aot_dispatch_static"))


def test_compiles_fullgraph():
    x, w, b = make((8, 4, 6, 6), "channels_last")
    t = teacher_like(x)
    steps, sel = torch.tensor([0.2, 0.05]), torch.tensor(1)
    fn = torch.compile(lambda x: ops.batch_norm_quant_mse(x, w, b, EPS, steps, [2, 4], sel, t),
                       fullgraph=True, backend="aot_eager")
    got, want = fn(x), ops.batch_norm_quant_mse(x, w, b, EPS, steps, [2, 4], sel, t)
    assert all(torch.equal(a, c) for a, c in zip(got, want))


def test_bad_arguments_name_the_argument():
    x, w, b = make((4, 3, 5, 5))
    t = teacher_like(x)
    s, sel = torch.tensor([0.3]), torch.tensor(0)
    with pytest.raises(RuntimeError, match=r"rfq.batch_norm_quant_mse: teacher must have x's shape"):
        OP(x, w, b, EPS, s, [4], sel, t[:2])
    with pytest.raises(RuntimeError, match="rfq.batch_norm_quant_mse: teacher must be float32"):
        OP(x, w, b, EPS, s, [4], sel, t.double())
    with pytest.raises(RuntimeError, match="rfq.batch_norm_quant_mse: x must be float32"):
        OP(x.double(), w, b, EPS, s, [4], sel, t)
    _, mean, var, _ = OP(x, w, b, EPS, s, [4], sel, t)
    g = torch.randn(x.shape)
    with pytest.raises(RuntimeError, match="batch_norm_quant_mse_backward: grad_mse must be one"):
        BACKWARD(g, torch.ones(2), x, w, b, mean, var, EPS, s, [4], sel, t, False, 1.0)
    with pytest.raises(RuntimeError, match="batch_norm_quant_mse_backward: teacher must have"):
        BACKWARD(g, torch.tensor(1.0), x, w, b, mean, var, EPS, s, [4], sel, t[:1], False, 1.0)
