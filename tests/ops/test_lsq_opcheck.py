"""torch.library.opcheck on every op (schema, fake kernel, autograd registration, AOT dispatch),
and gradient values through the autograd registration against autograd through the reference."""

import pytest
import torch

from rfq import ops
from rfq import reference as ref


def samples(device, dtype, requires_grad):
    g = torch.Generator().manual_seed(0)
    for shape in [(5,), (3, 4, 5), (0, 2)]:
        x = (torch.randn(shape, generator=g) * 2).to(dtype).to(device)
        x.requires_grad_(requires_grad)
        steps = torch.tensor([0.3, 0.1, 0.05], device=device, requires_grad=requires_grad)
        yield x, steps


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck_coupled_quant(device, dtype, requires_grad):
    for x, steps in samples(device, dtype, requires_grad):
        sel = torch.tensor(1, device=device)
        torch.library.opcheck(torch.ops.rfq.coupled_quant.default,
                              (x, steps, [2, 4, 6], sel, True, 0.5))
        torch.library.opcheck(torch.ops.rfq.coupled_quant_multi.default,
                              (x, steps, [2, 4, 6], False, 1.0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_backward_and_nondifferentiable_ops(device, dtype):
    for x, steps in samples(device, dtype, requires_grad=False):
        sel = torch.tensor(0, device=device)
        grad = torch.randn(x.shape).to(dtype).to(device)
        grads = torch.randn((3, *x.shape)).to(dtype).to(device)
        skip = ("test_autograd_registration",)  # backward ops are not differentiated again
        utils = [u for u in torch.library._OPCHECK_DEFAULT_UTILS if u not in skip]
        torch.library.opcheck(torch.ops.rfq.coupled_quant_backward.default,
                              (grad, x, steps, [2, 4, 6], sel, True, 1.0), test_utils=utils)
        torch.library.opcheck(torch.ops.rfq.coupled_quant_multi_backward.default,
                              (grads, x, steps, [2, 4, 6], True, 1.0), test_utils=utils)
    for x, steps in samples(device, dtype, requires_grad=True):
        torch.library.opcheck(torch.ops.rfq.quant_stats.default, (x, steps, [2, 4, 6], True, 0.1))
        torch.library.opcheck(torch.ops.rfq.quantize_codes.default, (x, steps[:1], 4, True))
        torch.library.opcheck(torch.ops.rfq.quantize_codes.default, (x, steps[:1], 8, False))
        mse, share = ops.quant_stats(x, steps, [2, 4, 6])
        assert not mse.requires_grad and not share.requires_grad


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("grad_scale", [1.0, 0.37])
def test_gradients_match_autograd_through_reference(device, signed, grad_scale):
    """The registered backward equals autograd of the plain expression (rounding STE, clamp)."""
    g = torch.Generator().manual_seed(3)
    bits = [2, 3, 5]
    x0 = torch.randn(4, 33, generator=g).to(device) * 0.6
    s0 = torch.tensor([0.4, 0.2, 0.05], device=device)
    gy = torch.randn(4, 33, generator=g).to(device)
    for j in range(len(bits)):
        sel = torch.tensor(j, device=device)
        x, s = x0.clone().requires_grad_(), s0.clone().requires_grad_()
        ops.coupled_quant(x, s, bits, sel, signed, grad_scale).backward(gy)
        xr, sr = x0.clone().requires_grad_(), s0.clone().requires_grad_()
        ref.coupled_quant(xr, sr, bits, sel, signed, grad_scale).backward(gy)
        # autograd forms (gy * s) / s for dx, one rounding away from the exact gy
        torch.testing.assert_close(x.grad, xr.grad, rtol=1e-6, atol=0)
        torch.testing.assert_close(s.grad, sr.grad, rtol=1e-5, atol=1e-5)

    x, s = x0.clone().requires_grad_(), s0.clone().requires_grad_()
    gys = torch.randn(3, 4, 33, generator=g).to(device)
    ops.coupled_quant_multi(x, s, bits, signed, grad_scale).backward(gys)
    xr, sr = x0.clone().requires_grad_(), s0.clone().requires_grad_()
    ref.coupled_quant_multi(xr, sr, bits, signed, grad_scale).backward(gys)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad, sr.grad, rtol=1e-5, atol=1e-5)
