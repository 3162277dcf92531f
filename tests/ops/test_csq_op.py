"""csq_weight (CSQ's bit-level weight, spec methods_seeds.md §C.1): the fused forward and backward
against autograd through rfq.reference.csq_weight, gradcheck in fp64, opcheck, saturated gates,
property tests over shapes, planes, dtypes and temperatures, and every argument error."""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from rfq import ops
from rfq import reference as ref

DTYPES = [torch.float32, torch.float64]


def make(shape, planes, dtype, device, beta=3.0, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    p, q = ((torch.randn((planes, *shape), generator=g) * 2).to(dtype).to(device)
            for _ in range(2))
    m = torch.randn(planes, generator=g).to(dtype).to(device)
    scale = torch.tensor(0.8, dtype=dtype, device=device)
    leaves = [t.requires_grad_(requires_grad) for t in (p, q, m, scale)]
    return (*leaves, torch.tensor(beta, dtype=dtype, device=device))


def tolerances(dtype):
    # The kernels and torch compute the same formulas; the vector exp and the order of the
    # chain rule's products may differ in the last bits.
    return dict(rtol=2e-6, atol=2e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)


def assert_grads_close(got, want, dtype):
    """dp, dq elementwise; dm and dscale are sums over every weight, whose fp32 summation
    orders differ (torch's reduction against the op's fixed chunks)."""
    fp32 = dtype == torch.float32
    for name, a, b in zip("p q m scale".split(), got, want):
        assert a.shape == b.shape, name
        reduction = name in ("m", "scale")
        torch.testing.assert_close(a, b, rtol=(1e-4 if reduction else 1e-5) if fp32 else 1e-10,
                                   atol=(1e-5 if reduction else 1e-6) if fp32 else 1e-13,
                                   msg=name)


def grads_of(fn, args, grad_w):
    leaves = [a.detach().clone().requires_grad_(True) for a in args[:4]]
    fn(*leaves, args[4]).backward(grad_w)
    return [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("planes", [2, 3, 6, 8])
@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (10, 64), (4_099,), (0, 3)])
def test_forward_and_backward_match_reference(device, dtype, planes, shape):
    args = make(shape, planes, dtype, device)
    w = ops.csq_weight(*args)
    assert w.shape == shape and w.dtype == dtype and w.is_contiguous()
    torch.testing.assert_close(w, ref.csq_weight(*args), **tolerances(dtype))
    gw = torch.randn(shape, dtype=dtype, device=device)
    assert_grads_close(grads_of(ops.csq_weight, args, gw), grads_of(ref.csq_weight, args, gw),
                       dtype)


def test_gradcheck_fp64(device):
    args = make((3, 4, 5), 3, torch.float64, device, beta=1.7, requires_grad=True)
    assert torch.autograd.gradcheck(ops.csq_weight, args)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(device, dtype):
    for shape in [(5, 3, 3, 3), (7,), (0, 4)]:
        for requires_grad in (True, False):
            args = make(shape, 4, dtype, device, requires_grad=requires_grad)
            torch.library.opcheck(torch.ops.rfq.csq_weight.default, args)
        args = make(shape, 4, dtype, device)
        gw = torch.randn(shape, dtype=dtype, device=device)
        torch.library.opcheck(torch.ops.rfq.csq_weight_backward.default, (gw, *args),
                              test_utils=("test_schema", "test_faketensor",
                                          "test_aot_dispatch_dynamic"))


def test_saturated_gates_give_integer_codes_times_step(device):
    """|beta x| large makes every gate exactly 0 or 1 in fp32: the soft weight is then
    scale * n / (2^N - 1) for the hard codes n, up to the rounding of the plane coefficients."""
    planes = 8
    g = torch.Generator().manual_seed(3)
    p = (torch.randint(0, 2, (planes, 300), generator=g) * 2 - 1).float().to(device)
    q = (torch.randint(0, 2, (planes, 300), generator=g) * 2 - 1).float().to(device)
    m = torch.tensor([1, 1, -1, 1, -1, -1, 1, 1.0], device=device)
    scale, beta = torch.tensor(0.5, device=device), torch.tensor(200.0, device=device)
    w = ops.csq_weight(p, q, m, scale, beta)
    assert torch.equal(w, ref.csq_weight(p, q, m, scale, beta))
    codes = ref.csq_codes(p, q, m)
    torch.testing.assert_close(w, 0.5 * codes.float() / 255, rtol=1e-6, atol=1e-7)
    # gradients vanish with the gates saturated (the relaxation has hardened)
    dp, dq, dm, _ = torch.ops.rfq.csq_weight_backward(torch.ones_like(w), p, q, m, scale, beta)
    assert dp.abs().max() == 0 and dq.abs().max() == 0 and dm.abs().max() == 0


def test_gates_approach_zero_and_one_as_beta_grows(device):
    """The mean distance of g(beta x) from {0, 1} shrinks monotonically with beta."""
    p = torch.linspace(-1, 1, 1001, device=device)
    p = p[p.abs() > 0.01]
    dist = []
    for beta in (1.0, 10.0, 50.0, 200.0):
        g = torch.sigmoid(beta * p)
        dist.append(torch.minimum(g, 1 - g).mean().item())
    assert all(a > b for a, b in zip(dist, dist[1:])) and dist[-1] < 1e-3
    # and the op's weight converges to the hard one
    planes = 4
    pq = torch.randn(2, planes, 200, generator=torch.Generator().manual_seed(1)).to(device)
    m, s = torch.tensor([2.0, 1.0, -1.0, 0.5], device=device), torch.tensor(1.0, device=device)
    hard = s * ref.csq_codes(pq[0], pq[1], m).float() / (2 ** planes - 1)
    errs = [(ops.csq_weight(pq[0], pq[1], m, s, torch.tensor(b, device=device)) - hard).abs()
            .max().item() for b in (1.0, 10.0, 100.0, 1000.0, 1e5)]
    assert all(a >= b for a, b in zip(errs, errs[1:])) and errs[-1] < 1e-3 < errs[0]


def test_non_contiguous_inputs(device):
    args = make((6, 5), 3, torch.float32, device)
    p_t = args[0].transpose(1, 2).contiguous().transpose(1, 2)
    assert not p_t.is_contiguous()
    torch.testing.assert_close(ops.csq_weight(p_t, *args[1:]), ref.csq_weight(*args),
                               **tolerances(torch.float32))


def test_reductions_do_not_depend_on_thread_count():
    args = make((70_000,), 6, torch.float32, "cpu")
    gw = torch.randn(70_000)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.rfq.csq_weight_backward(gw, *args)
        torch.set_num_threads(2)
        two = torch.ops.rfq.csq_weight_backward(gw, *args)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.sampled_from([0, 1, 2, 3, 7, 17, 130]), min_size=1, max_size=3),
       planes=st.integers(2, 8), dtype=st.sampled_from(DTYPES),
       beta=st.sampled_from([1.0, 2.5, 37.0, 200.0]), seed=st.integers(0, 100))
def test_property_matches_reference(shape, planes, dtype, beta, seed):
    args = make(tuple(shape), planes, dtype, "cpu", beta=beta, seed=seed)
    torch.testing.assert_close(ops.csq_weight(*args), ref.csq_weight(*args), **tolerances(dtype))
    gw = torch.randn(tuple(shape), dtype=dtype)
    assert_grads_close(grads_of(ops.csq_weight, args, gw), grads_of(ref.csq_weight, args, gw),
                       dtype)


def _args(**change):
    args = dict(zip(("p", "q", "m", "scale", "beta"), make((4, 3), 3, torch.float32, "cpu")))
    args.update(change)
    return args


@pytest.mark.parametrize("change, match", [
    (dict(p=torch.zeros(1, 4, 3), q=torch.zeros(1, 4, 3), m=torch.zeros(1)),
     r"p must have N in 2\.\.8 bit planes \(dim 0\), got 1"),
    (dict(p=torch.zeros(9, 4, 3), q=torch.zeros(9, 4, 3), m=torch.zeros(9)),
     r"p must have N in 2\.\.8 bit planes \(dim 0\), got 9"),
    (dict(p=torch.zeros(())), r"p must be \[N, \*shape\]"),
    (dict(q=torch.zeros(3, 4, 4)), r"q must have p's shape"),
    (dict(m=torch.zeros(4)), r"m must be \[N\] = \[3\]"),
    (dict(scale=torch.ones(2)), r"scale must hold one value"),
    (dict(beta=torch.ones(2)), r"beta must hold one value"),
    (dict(p=torch.zeros(3, 4, 3, dtype=torch.int32)), r"p must be float32 or float64"),
    (dict(p=torch.zeros(3, 4, 3, dtype=torch.float16)), r"p must be float32 or float64"),
    (dict(q=torch.zeros(3, 4, 3, dtype=torch.float64)), r"q must have p's dtype"),
    (dict(beta=torch.tensor(1.0, dtype=torch.float64)), r"beta must have p's dtype"),
])
def test_bad_arguments_name_the_argument(change, match):
    with pytest.raises(RuntimeError, match=r"rfq\.csq_weight: " + match):
        ops.csq_weight(**_args(**change))


def test_bad_grad_names_grad_w():
    args = make((4, 3), 3, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=r"rfq\.csq_weight_backward: grad_w must have shape"):
        torch.ops.rfq.csq_weight_backward(torch.zeros(3, 4), *args)
    with pytest.raises(RuntimeError, match=r"grad_w must have p's dtype"):
        torch.ops.rfq.csq_weight_backward(torch.zeros(4, 3, dtype=torch.float64), *args)


def test_large_layer_takes_the_streaming_store_path():
    """Gradients of >= 8 MB are written with non-temporal stores; same values."""
    for n in (300_000, 300_001):  # aligned rows; unaligned rows and a masked tail
        args = make((n,), 8, torch.float32, "cpu", seed=5)
        gw = torch.randn(n)
        assert_grads_close(grads_of(ops.csq_weight, args, gw),
                           grads_of(ref.csq_weight, args, gw), torch.float32)
