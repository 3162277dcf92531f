"""rfq.batch_norm_add: training-mode BatchNorm plus a residual (a residual block's last BN and its
shortcut add) in one pass, no quantizer.

Exact: mean and var are batch_norm_quant's bit for bit (the same statistics kernel); for them, y
equals rfq.reference's composition (z + residual, each fp32 operation rounded) bit for bit; and
where every z lies inside a quantizer's range, batch_norm_quant's backward passes dy through
unchanged, so its dx, dweight and dbias equal this op's bit for bit. Otherwise the gradients
match autograd through the reference, and the output matches ATen's F.batch_norm + add to fp32
rounding."""

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings

from rfq import ops
from rfq import reference as ref
from test_bn_quant import EPS, SHAPES, make

BACKWARD = torch.ops.rfq.batch_norm_add_backward


def residual_like(x, seed=0, layout="contiguous"):
    r, _, _ = make(tuple(x.shape), layout, seed=seed + 11, scale=1.5, shift=-0.25)
    return r.to(x.device)


def check_forward(x, w, b, r):
    y, mean, var = ops.batch_norm_add(x, w, b, EPS, r)
    want, _, _ = ref.batch_norm_add(x, w, b, EPS, r, stats=(mean, var))
    assert torch.equal(y, want)
    _, mean_q, var_q = ops.batch_norm_quant(x, w, b, EPS, torch.tensor([0.1]), [4],
                                            torch.tensor(0))
    assert torch.equal(mean, mean_q) and torch.equal(var, var_q)
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    assert y.is_contiguous(memory_format=torch.channels_last) if cl else y.is_contiguous()
    return y, mean, var


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed", "strided"])
def test_forward_exact_for_its_statistics(shape, layout):
    if layout == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last is 4-D")
    x, w, b = make(shape, layout)
    for r_layout in ("contiguous", "channels_last" if len(shape) == 4 else "transposed"):
        check_forward(x, w, b, residual_like(x, layout=r_layout))


def test_a_zero_residual_gives_the_bn_output_and_aten_agrees():
    """Constructed: with residual 0 the output is the reference's BN output z itself; against
    ATen's F.batch_norm (its own fp32 statistics) + add it agrees to fp32 rounding."""
    x, w, b = make((128, 16, 14, 14), "channels_last", shift=3.0)
    y, mean, var = ops.batch_norm_add(x, w, b, EPS, torch.zeros_like(x))
    z, _, _ = ref.batch_norm_add(x, w, b, EPS, torch.zeros_like(x), stats=(mean, var))
    assert torch.equal(y, z)
    r = residual_like(x, layout="channels_last")
    y, _, _ = ops.batch_norm_add(x, w, b, EPS, r)
    torch.testing.assert_close(y, F.batch_norm(x, None, None, w, b, True, 0.0, EPS) + r,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,layout", [((16, 8, 6, 6), "channels_last"),
                                          ((12, 5, 7), "contiguous"), ((40, 19), "contiguous"),
                                          ((2, 3, 70, 70), "contiguous")], ids=str)
def test_backward_is_batch_norm_quants_where_nothing_is_clipped(shape, layout):
    """Constructed: an 8-bit signed quantizer with a step so large that every z / s lies in
    [-128, 127] passes dy through unchanged, so batch_norm_quant_backward's dx, dweight and
    dbias are this op's bit for bit (the same two passes with g = dy)."""
    x, w, b = make(shape, layout)
    r = residual_like(x)
    y, mean, var = ops.batch_norm_add(x, w, b, EPS, r)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    got = BACKWARD(g, x, w, mean, var, EPS)
    steps, sel = torch.tensor([1.0]), torch.tensor(0)
    assert (((y - r) / steps).abs() < 100).all()  # z = y - r up to rounding: well inside
    want = torch.ops.rfq.batch_norm_quant_backward(g, x, w, b, mean, var, EPS, steps, [8], sel,
                                                   True, 1.0)
    assert all(torch.equal(a, c) for a, c in zip(got, want[:3]))


def check_gradients(x, w, b, r, seed=0):
    leaves = [v.detach().clone().requires_grad_(True) for v in (x, w, b, r)]
    y, mean, var = ops.batch_norm_add(*leaves[:3], EPS, leaves[3])
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1))
    (y * g).sum().backward()
    rleaves = [v.detach().clone().requires_grad_(True) for v in (x, w, b, r)]
    yr, _, _ = ref.batch_norm_add(*rleaves[:3], EPS, rleaves[3], stats=(mean, var))
    (yr * g).sum().backward()
    assert torch.equal(y, yr)
    n = x.numel() // x.shape[1]
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    # dx = alpha (g - mean(g) - xhat mean(g xhat)) cancels to ~0 when a channel has few values:
    # its fp32 noise scales with alpha * |g|, not with the (tiny) result
    alpha = float((w / torch.sqrt(var + EPS)).abs().max())
    dx_noise = 1e-6 * alpha * float(g.abs().max()) * (n ** 0.5)
    # dweight and dbias sum n terms g * xhat and g: their fp32 noise scales with the terms,
    # which may cancel to a sum far smaller than each
    xhat = (x - mean.view(shape)) / torch.sqrt(var + EPS).view(shape)
    term = {"x": 0.0, "w": float((g * xhat).abs().max()), "b": float(g.abs().max())}
    for name, got, leaf in zip("xwbr", (v.grad for v in leaves), rleaves):
        if name == "r":  # the output's gradient itself
            assert torch.equal(got, g)
            continue
        atol = 1e-5 * (n ** 0.5) * max(float(leaf.grad.abs().max()), 1e-3)
        atol += 1e-6 * (n ** 0.5) * term[name] + (dx_noise if name == "x" else 0.0)
        torch.testing.assert_close(got, leaf.grad, rtol=1e-4, atol=atol, msg=name)
    assert not mean.requires_grad and not var.requires_grad


@settings(max_examples=60, deadline=None)
@given(n=st.sampled_from([2, 3, 17, 64]), c=st.sampled_from([1, 3, 16, 17, 40]),
       hw=st.sampled_from([None, (1, 1), (3, 5), (8, 8)]),
       layout=st.sampled_from(["contiguous", "channels_last", "transposed"]),
       residual_cl=st.booleans(), shift=st.floats(-50, 50), seed=st.integers(0, 2**16))
def test_property_forward_and_gradients(n, c, hw, layout, residual_cl, shift, seed):
    shape = (n, c) if hw is None else (n, c, *hw)
    # two values per channel can have a variance near 0, where dx is fp32 cancellation noise
    # times a huge 1/std
    assume(n * (1 if hw is None else hw[0] * hw[1]) >= 8)
    if layout == "channels_last" and hw is None:
        layout = "contiguous"
    x, w, b = make(shape, layout, seed=seed, shift=shift)
    r = residual_like(x, seed, "channels_last" if residual_cl and hw else "contiguous")
    check_forward(x, w, b, r)
    check_gradients(x, w, b, r, seed)


def test_results_do_not_depend_on_the_thread_count():
    x, w, b = make((64, 16, 20, 20), "channels_last")
    xc, _, _ = make((64, 16, 20, 20), "contiguous")
    r = residual_like(x)
    g = torch.randn(x.shape)
    threads = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            res = []
            for xx in (x, xc):
                y, m, v = ops.batch_norm_add(xx, w, b, EPS, r)
                res += [y, m, v, *BACKWARD(g, xx, w, m, v, EPS)]
            outs.append(res)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_nan_stays_in_its_channel():
    x, w, b = make((4, 3, 5, 5))
    x[1, 2, 3, 4] = float("nan")
    y, mean, _ = ops.batch_norm_add(x, w, b, EPS, residual_like(x))
    assert torch.isnan(mean[2]) and torch.isnan(y[:, 2]).all()
    assert not torch.isnan(y[:, :2]).any()


@pytest.mark.parametrize("requires_grad", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(device, requires_grad, layout):
    for shape in [(4, 3, 5, 5), (6, 8), (2, 5, 7)]:
        if layout == "channels_last" and len(shape) != 4:
            continue
        x, w, b = make(shape, layout, device=device)
        r = residual_like(x, layout=layout)
        for t in (x, w, b, r):
            t.requires_grad_(requires_grad)
        torch.library.opcheck(torch.ops.rfq.batch_norm_add.default, (x, w, b, EPS, r))
        with torch.no_grad():
            _, mean, var = ops.batch_norm_add(x, w, b, EPS, r)
        g = torch.randn(shape, device=device)
        torch.library.opcheck(BACKWARD.default, (g, x.detach(), w.detach(), mean, var, EPS),
                              test_utils=("test_schema", "test_faketensor",
                                          "test_aot_dispatch_static"))


def test_compiles_fullgraph():
    x, w, b = make((8, 4, 6, 6), "channels_last")
    r = residual_like(x)
    fn = torch.compile(lambda x: ops.batch_norm_add(x, w, b, EPS, r)[0], fullgraph=True,
                       backend="aot_eager")
    assert torch.equal(fn(x), ops.batch_norm_add(x, w, b, EPS, r)[0])


def bad_calls():
    x, w, b = make((4, 3, 5, 5))
    r = residual_like(x)
    yield "x must be float32", (x.double(), w, b, EPS, r)
    yield "x needs more than one value per channel", (x[:1, :, :1, :1], w, b, EPS, r[:1, :, :1, :1])
    yield r"weight must be \[C\]", (x, w[:2], b, EPS, r)
    yield "bias must be float32", (x, w, b.double(), EPS, r)
    yield "eps must be finite", (x, w, b, float("inf"), r)
    yield "residual must be float32", (x, w, b, EPS, r.double())
    yield r"residual must have x's shape \[4, 3, 5, 5\], got \[4, 3, 5\]", (x, w, b, EPS, r[..., 0])


@pytest.mark.parametrize("match,args", list(bad_calls()), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_arguments_name_the_argument(match, args):
    with pytest.raises(RuntimeError, match=f"rfq.batch_norm_add: {match}"):
        ops.batch_norm_add(*args)


def test_backward_checks_its_statistics_and_gradient():
    x, w, b = make((4, 3, 5, 5))
    _, mean, var = ops.batch_norm_add(x, w, b, EPS, residual_like(x))
    with pytest.raises(RuntimeError, match=r"batch_norm_add_backward: var must be float32 \[C\]"):
        BACKWARD(torch.randn(x.shape), x, w, mean, var[:2], EPS)
    with pytest.raises(RuntimeError, match="batch_norm_add_backward: grad_y must have shape"):
        BACKWARD(torch.randn(4, 3), x, w, mean, var, EPS)
    with pytest.raises(RuntimeError, match=r"batch_norm_add_backward: weight must be \[C\]"):
        BACKWARD(torch.randn(x.shape), x, w[:1], mean, var, EPS)
