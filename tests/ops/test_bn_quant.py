"""rfq.batch_norm_quant: training-mode BatchNorm fused with the next layer's LSQ quantizer.

Exact: for the op's own batch statistics, y equals rfq.reference's composition bit for bit
(same fp32 operations, no FMA). The statistics match fp64 ones to fp32 rounding, and against
ATen's unfused F.batch_norm + coupled_quant the codes differ only where z sits on a rounding
boundary within fp32 noise. Gradients against autograd through the reference."""

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

from rfq import ops
from rfq import reference as ref

EPS = 1e-5


def make(shape, layout="contiguous", seed=0, scale=2.0, shift=0.5, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale + shift
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "transposed":  # dense but neither contiguous nor channels_last
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "strided":
        wide = torch.zeros(*shape[:-1], shape[-1] * 2)
        wide[..., ::2] = x
        x = wide[..., ::2]
    c = shape[1]
    w = torch.rand(c, generator=g) + 0.5
    b = torch.randn(c, generator=g) * 0.3
    return x.to(device), w.to(device), b.to(device)


def fp64_stats(x):
    dims = [0, *range(2, x.dim())]
    xd = x.double()
    mean = xd.mean(dims)
    var = xd.var(dims, unbiased=False)
    return mean.float(), var.float()


def check_forward(x, w, b, steps, bits, sel, signed):
    y, mean, var = ops.batch_norm_quant(x, w, b, EPS, steps, bits, sel, signed)
    want = ref.batch_norm_quant_from_stats(x, w, b, mean, var, EPS, steps, bits, sel, signed)
    assert torch.equal(y, want)
    m64, v64 = fp64_stats(x)
    torch.testing.assert_close(mean, m64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var, v64, rtol=2e-6, atol=1e-7)
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    assert y.is_contiguous(memory_format=torch.channels_last) if cl else y.is_contiguous()
    return y, mean, var


SHAPES = [(128, 16, 28, 28), (4, 24, 5, 5), (3, 7, 1, 1), (64, 24), (8, 5, 7), (2, 3, 70, 70),
          (5, 1, 3, 3), (2, 1300, 2, 2)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed", "strided"])
def test_forward_exact_for_its_statistics(shape, layout):
    if layout == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last is 4-D")
    x, w, b = make(shape, layout)
    steps = torch.tensor([0.4, 0.11, 0.013])
    for bits, signed in (([2, 4, 8], False), ([1, 3, 5], True), ([1, 2, 3], False)):
        for j in range(3):
            check_forward(x, w, b, steps, bits, torch.tensor(j), signed)


@settings(max_examples=60, deadline=None)
@given(n=st.sampled_from([2, 3, 17, 64]), c=st.sampled_from([1, 3, 16, 17, 40]),
       hw=st.sampled_from([None, (1, 1), (3, 5), (8, 8)]),
       layout=st.sampled_from(["contiguous", "channels_last", "transposed"]),
       bits=st.integers(1, 8), signed=st.booleans(), step=st.floats(1e-3, 2.0),
       shift=st.floats(-50, 50), seed=st.integers(0, 2**16))
def test_property_forward_and_gradients(n, c, hw, layout, bits, signed, step, shift, seed):
    shape = (n, c) if hw is None else (n, c, *hw)
    if layout == "channels_last" and hw is None:
        layout = "contiguous"
    x, w, b = make(shape, layout, seed=seed, shift=shift)
    steps = torch.tensor([step, 0.5])
    sel = torch.tensor(0)
    y, mean, var = check_forward(x, w, b, steps, [bits, 4], sel, signed)
    check_gradients(x, w, b, steps, [bits, 4], sel, signed, grad_scale=0.7, seed=seed)


def check_gradients(x, w, b, steps, bits, sel, signed, grad_scale=1.0, seed=0):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b, steps)]
    y, mean, var = ops.batch_norm_quant(*leaves[:3], EPS, leaves[3], bits, sel, signed,
                                        grad_scale)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1))
    y.backward(g)
    rleaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b, steps)]
    yr, _, _ = ref.batch_norm_quant(*rleaves[:3], EPS, rleaves[3], bits, sel, signed,
                                    grad_scale, stats=(mean, var))
    yr.backward(g)
    n = x.numel() // x.shape[1]
    # dx = alpha (g - mean(g) - xhat mean(g xhat)) cancels to ~0 when a channel has few values:
    # its fp32 noise scales with alpha * |g|, not with the (tiny) result
    alpha = (w / torch.sqrt(var + EPS)).abs().max()
    dx_noise = 1e-6 * float(alpha) * float(g.abs().max()) * (n ** 0.5)
    for name, got, leaf in zip("xwbs", (v.grad for v in leaves), rleaves):
        # sums of n fp32 terms in different orders; the step's sum spans every element
        atol = 1e-5 * (n ** 0.5) * max(float(leaf.grad.abs().max()), 1e-3)
        atol += dx_noise if name == "x" else 0.0
        torch.testing.assert_close(got, leaf.grad, rtol=1e-4, atol=atol, msg=name)
    assert not mean.requires_grad and not var.requires_grad


@pytest.mark.parametrize("shape,layout", [((32, 16, 9, 9), "channels_last"),
                                          ((6, 5, 11, 3), "contiguous"), ((100, 24), "contiguous")])
@pytest.mark.parametrize("bits,signed", [(3, False), (1, True), (8, False)])
def test_gradients_match_autograd_through_reference(shape, layout, bits, signed):
    x, w, b = make(shape, layout)
    steps = torch.tensor([0.9, 0.2, 0.05])
    for j in range(3):
        check_gradients(x, w, b, steps, [bits, 2, 6], torch.tensor(j), signed, grad_scale=0.5)


def test_step_gradient_only_in_the_selected_slot_and_weight_bias_sums():
    x, w, b = make((16, 4, 6, 6), "channels_last")
    steps = torch.tensor([0.3, 0.1, 0.05])
    g = torch.randn(x.shape).to(memory_format=torch.channels_last)
    y, mean, var = ops.batch_norm_quant(x, w, b, EPS, steps, [2, 3, 4], torch.tensor(1), False)
    gx, gw, gb, gs = torch.ops.rfq.batch_norm_quant_backward(
        g, x, w, b, mean, var, EPS, steps, [2, 3, 4], torch.tensor(1), False, 1.0)
    assert gs[0] == 0 and gs[2] == 0 and gs[1] != 0
    # constructed: with every z inside the range the quantizer's gradient is the identity, so
    # dbias is sum(g) per channel and dx sums to 0 per channel (BN's gradient is centred)
    wide = torch.tensor([100.0])
    xs = torch.randn(8, 3, 5, 5) * 0.1
    w3, b3 = torch.ones(3), torch.full((3,), 1e4)  # z ~ 1e4: well inside [0, 255 * 100]
    y, mean, var = ops.batch_norm_quant(xs, w3, b3, EPS, wide, [8], torch.tensor(0), False)
    g = torch.randn(xs.shape)
    gx, gw, gb, _ = torch.ops.rfq.batch_norm_quant_backward(
        g, xs, w3, b3, mean, var, EPS, wide, [8], torch.tensor(0), False, 1.0)
    torch.testing.assert_close(gb, g.sum((0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx.sum((0, 2, 3)), torch.zeros(3), rtol=0, atol=1e-3)


def test_against_the_unfused_aten_composition():
    """F.batch_norm (training) then coupled_quant: the same codes except where z is within
    fp32 noise of a rounding boundary; the same running-statistic inputs."""
    x, w, b = make((128, 16, 14, 14), "channels_last", shift=3.0)
    steps = torch.tensor([0.05, 0.2])
    for j, signed in ((0, False), (1, True)):
        sel = torch.tensor(j)
        y, mean, var = ops.batch_norm_quant(x, w, b, EPS, steps, [4, 2], sel, signed)
        z = F.batch_norm(x, None, None, w, b, True, 0.0, EPS)
        y_unfused = ops.coupled_quant(z, steps, [4, 2], sel, signed)
        differ = y != y_unfused
        assert differ.float().mean() < 1e-4
        v = z[differ] / steps[j]
        assert torch.all((v - v.floor() - 0.5).abs() < 1e-3)  # only on .5 boundaries
        assert torch.all((y - y_unfused).abs()[differ] <= steps[j] * 1.0001)
        # ATen's saved statistics (native_batch_norm, fp32 sums) agree to their rounding; ours
        # match fp64 ones more closely (check_forward)
        _, save_mean, save_invstd = torch.native_batch_norm(x, w, b, None, None, True, 0.0, EPS)
        torch.testing.assert_close(mean, save_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(1 / torch.sqrt(var + EPS), save_invstd, rtol=1e-5, atol=0)


def test_results_do_not_depend_on_the_thread_count():
    x, w, b = make((64, 16, 20, 20), "channels_last")
    xc, _, _ = make((64, 16, 20, 20), "contiguous")
    steps = torch.tensor([0.1])
    g = torch.randn(x.shape)
    threads = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            res = []
            for xx in (x, xc):
                y, m, v = ops.batch_norm_quant(xx, w, b, EPS, steps, [4], torch.tensor(0))
                res += [y, m, v, *torch.ops.rfq.batch_norm_quant_backward(
                    g, xx, w, b, m, v, EPS, steps, [4], torch.tensor(0), False, 1.0)]
            outs.append(res)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_nan_input_and_binary_codes():
    x, w, b = make((4, 3, 5, 5))
    x[1, 2, 3, 4] = float("nan")
    y, mean, var = ops.batch_norm_quant(x, w, b, EPS, torch.tensor([0.5]), [4], torch.tensor(0))
    assert torch.isnan(mean[2]) and torch.isnan(y[:, 2]).all()  # the channel's statistics
    assert not torch.isnan(y[:, :2]).any()
    x, w, b = make((4, 3, 5, 5))
    y, _, _ = ops.batch_norm_quant(x, w, b, EPS, torch.tensor([0.5]), [1], torch.tensor(0), True)
    assert set(y.unique().tolist()) == {-0.5, 0.5}  # binary: sign, no zero


@pytest.mark.parametrize("requires_grad", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(device, requires_grad, layout):
    for shape in [(4, 3, 5, 5), (6, 8), (2, 5, 7)]:
        if layout == "channels_last" and len(shape) != 4:
            continue
        x, w, b = make(shape, layout, device=device)
        steps = torch.tensor([0.3, 0.1], device=device)
        sel = torch.tensor(1, device=device)
        for t in (x, w, b, steps):
            t.requires_grad_(requires_grad)
        torch.library.opcheck(torch.ops.rfq.batch_norm_quant.default,
                              (x, w, b, EPS, steps, [2, 4], sel, False, 0.5))
        with torch.no_grad():
            y, mean, var = ops.batch_norm_quant(x, w, b, EPS, steps, [2, 4], sel)
        g = torch.randn(shape, device=device)
        torch.library.opcheck(torch.ops.rfq.batch_norm_quant_backward.default,
                              (g, x.detach(), w.detach(), b.detach(), mean, var, EPS,
                               steps.detach(), [2, 4], sel, False, 0.5),
                              test_utils=("test_schema", "test_faketensor",
                                          "test_aot_dispatch_static"))


def test_compiles_fullgraph():
    x, w, b = make((8, 4, 6, 6), "channels_last")
    steps, sel = torch.tensor([0.2, 0.05]), torch.tensor(1)
    fn = torch.compile(lambda x: ops.batch_norm_quant(x, w, b, EPS, steps, [2, 4], sel)[0],
                       fullgraph=True, backend="aot_eager")
    assert torch.equal(fn(x), ops.batch_norm_quant(x, w, b, EPS, steps, [2, 4], sel)[0])


def bad_calls():
    x, w, b = make((4, 3, 5, 5))
    s, sel = torch.tensor([0.3, 0.1]), torch.tensor(0)
    yield "x must be float32", (x.double(), w, b, EPS, s, [2, 4], sel)
    yield r"x must be \[N, C, \.\.\.\] \(at least 2 dims\)", (x.flatten(), w, b, EPS, s, [2, 4], sel)
    yield "x needs more than one value per channel", (x[:1, :, :1, :1], w, b, EPS, s, [2, 4], sel)
    yield r"weight must be \[C\]", (x, w[:2], b, EPS, s, [2, 4], sel)
    yield "bias must be float32", (x, w, b.double(), EPS, s, [2, 4], sel)
    yield "eps must be finite", (x, w, b, float("nan"), s, [2, 4], sel)
    yield "eps must be finite", (x, w, b, -1.0, s, [2, 4], sel)
    yield "steps has K=2", (x, w, b, EPS, s, [2, 4, 6], sel)
    yield r"steps\[1\] must be a finite positive", (x, w, b, EPS, torch.tensor([0.3, -1.0]), [2, 4],
                                                     torch.tensor(1))
    yield "sel=2 is out of range", (x, w, b, EPS, s, [2, 4], torch.tensor(2))
    yield "bits must be in 1..8", (x, w, b, EPS, s, [2, 9], sel)


@pytest.mark.parametrize("match,args", list(bad_calls()), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_arguments_name_the_argument(match, args):
    with pytest.raises(RuntimeError, match=f"rfq.batch_norm_quant: {match}"):
        ops.batch_norm_quant(*args)


def test_backward_checks_its_statistics_and_gradient():
    x, w, b = make((4, 3, 5, 5))
    s, sel = torch.tensor([0.3]), torch.tensor(0)
    _, mean, var = ops.batch_norm_quant(x, w, b, EPS, s, [4], sel)
    bw = torch.ops.rfq.batch_norm_quant_backward
    with pytest.raises(RuntimeError, match=r"batch_norm_quant_backward: var must be float32 \[C\]"):
        bw(torch.randn(x.shape), x, w, b, mean, var[:2], EPS, s, [4], sel, False, 1.0)
    with pytest.raises(RuntimeError, match="batch_norm_quant_backward: grad_y must have shape"):
        bw(torch.randn(4, 3), x, w, b, mean, var, EPS, s, [4], sel, False, 1.0)
    with pytest.raises(RuntimeError, match="batch_norm_quant_backward: grad_scale must be finite"):
        bw(torch.randn(x.shape), x, w, b, mean, var, EPS, s, [4], sel, False, float("inf"))
