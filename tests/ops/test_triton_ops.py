"""The torch.ops.rfq_triton custom ops on CPU: opcheck, autograd, torch.compile."""

from __future__ import annotations

import pytest
import torch

from triton_cases import (  # noqa: F401  (skips this module without triton)
    packed_case,
)
from rfq import reference as ref  # noqa: E402


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
        torch.library.opcheck(rt.packed_linear.default,  # the fused input quantizer
                              (x, w, scales, zeros, 4, 64, None, torch.tensor([0.2]), 3, True))
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
    x_step, xr = torch.tensor([0.2]), (x.detach() * 3).requires_grad_()  # some past the range
    xt = xr.detach().clone().requires_grad_()
    torch.ops.rfq_triton.packed_linear(xt, w, scales, None, 4, 0, None, x_step, 3, True).sum().backward()
    wd = ref.dequantize_weight(w, scales, 4, (8, 64))
    torch.nn.functional.linear(ref.lsq_fake_quant(xr, x_step.reshape(()), 3, True), wd).sum().backward()
    torch.testing.assert_close(xt.grad, xr.grad)


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
    """tests/ops/test_compile.py's model on the rfq_triton ops (their CPU kernels)."""

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


