"""Compiled Triton on CUDA tensors (skipped without a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from triton_cases import (  # noqa: F401  (skips this module without triton)
    HAS_CUDA,
    INTERPRET,
    ROOT,
    assert_linear_close,
    gpu,
    grads_like,
    packed_case,
    triton,
    weight_magnitude,
)
from rfq import ops  # noqa: E402
from rfq import reference as ref  # noqa: E402
import triton.language as tl  # noqa: E402
from lsq_cases import abs_step_terms, assert_step_grad_close, make_x, steps_for  # noqa: E402
from rfq.triton_kernels import lsq  # noqa: E402


# ---- GPU (compiled Triton, CUDA tensors) ---------------------------------------------------------


@pytest.mark.skipif(not HAS_CUDA or not INTERPRET,
                    reason="needs CUDA; in compiled mode the gpu tests run directly")
def test_gpu_suite_in_compiled_mode():
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", __file__, "-k", "gpu_"],
                         env=env, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]


GPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_gpu_lsq_exact(dtype, signed):
    """Every LSQ op on CUDA (bf16 included) against the reference, bit-exact codes/y/dx."""
    for cands in ([6, 5, 4, 3, 2], [1, 8]):
        for pow2, shape in [(True, (1,)), (True, (3, 1000, 7)), (False, (1_000_003,))]:
            steps = steps_for(cands, signed, pow2, "cuda")
            x = make_x(shape, dtype, min(cands), signed, steps.max().item(), "cuda", seed=1)
            sel = torch.tensor(len(cands) - 1, device="cuda")
            with ops.gpu_backend("triton"):
                y = ops.coupled_quant(x, steps, cands, sel, signed)
                ys = ops.coupled_quant_multi(x, steps, cands, signed)
                mse, share = ops.quant_stats(x, steps, cands, signed)
                codes = ops.quantize_codes(x, steps[:1], cands[0], signed)
            assert torch.equal(y, ref.coupled_quant(x, steps, cands, sel, signed))
            assert torch.equal(ys, ref.coupled_quant_multi(x, steps, cands, signed))
            rmse, rshare = ref.quant_stats(x, steps, cands, signed)
            assert torch.equal(share, rshare)
            torch.testing.assert_close(mse, rmse, rtol=1e-5, atol=1e-12)
            assert torch.equal(codes, ref.quantize_codes(x, steps[:1], cands[0], signed))
            g = grads_like(shape, dtype, device="cuda")
            gx, gs = torch.ops.rfq_triton.coupled_quant_backward(g, x, steps, cands, sel, signed,
                                                                 0.5)
            rgx, rgs = ref.coupled_quant_backward(g, x, steps, cands, sel, signed, 0.5)
            assert torch.equal(gx, rgx)
            b = cands[-1]
            assert_step_grad_close(gs, rgs, 0.5 * abs_step_terms(g, x, steps[-1], b, signed))
            gk = grads_like((len(cands), *shape), dtype, device="cuda")
            gx, gs = torch.ops.rfq_triton.coupled_quant_multi_backward(gk, x, steps, cands,
                                                                       signed, 1.0)
            rgx, rgs = ref.coupled_quant_multi_backward(gk, x, steps, cands, signed, 1.0)
            assert torch.equal(gx, rgx)
            assert_step_grad_close(gs, rgs, torch.stack(
                [abs_step_terms(gk[j], x, steps[j], c, signed) for j, c in enumerate(cands)]))


@triton.jit
def _plain_division(x_ptr, out_ptr, s, n, BLOCK: tl.constexpr):
    # The hazard the kernels avoid: `/` on fp32 is div.full.f32 (<= 2 ulp) on NVIDIA GPUs.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(out_ptr + offs, x / s, mask=offs < n)


@gpu
def test_gpu_division_is_correctly_rounded():
    """Quotients next to a rounding tie: codes match the correctly rounded reference, while
    Triton's plain `/` misrounds some of the same quotients (so the test can tell them apart)."""
    g = torch.Generator().manual_seed(0)
    n = 1 << 22
    steps = [0.1, 0.37, 1 / 3, 3.3e-3]
    for s in steps:
        # x = (k + 1/2) s, nudged by a few ulps: x / s lands within ulps of a tie
        k = torch.randint(-120, 120, (n,), generator=g).float()
        x = ((k + 0.5) * s).cuda()
        x = torch.nextafter(x, x + torch.randint(-1, 2, (n,), generator=g).float().cuda() * 1e30)
        step = torch.tensor([s], device="cuda")
        exact = (x.double() / step.double()).float()  # fp32 step, correctly rounded quotient
        with ops.gpu_backend("triton", "lsq"):
            codes = ops.quantize_codes(x, step, 8, True)
        assert torch.equal(codes, torch.clamp(exact, -128, 127).round().to(torch.int8))
        assert torch.equal(x / step, exact)  # torch's CUDA division is IEEE too
    plain = torch.empty_like(x)
    _plain_division[(triton.cdiv(n, 1024),)](x, plain, step.item(), n, BLOCK=1024)
    assert not torch.equal(plain, exact), "div.full.f32 matched div.rn on every quotient here"


@gpu
def test_gpu_no_host_syncs():
    """F5: forward and backward through the Triton ops never sync the host."""
    x = torch.randn(1 << 20, device="cuda", requires_grad=True)
    steps = torch.tensor([0.1, 0.05, 0.02], device="cuda", requires_grad=True)
    sel = torch.tensor(1, device="cuda")
    codes = torch.randint(-8, 8, (256, 512), dtype=torch.int8)
    w = ops.pack_weight(codes, 4).cuda()
    xs = torch.randn(4, 512, device="cuda", dtype=torch.float16)
    scales = torch.tensor([0.02], device="cuda")

    def step():
        y = ops.coupled_quant(x, steps, [2, 4, 8], sel) + ops.coupled_quant_multi(
            x, steps, [2, 4, 8]).sum(0)
        y.sum().backward()
        ops.quant_stats(x.detach(), steps.detach(), [2, 4, 8])
        ops.quantize_codes(x.detach(), steps.detach()[:1], 2)
        ops.packed_linear(xs, w, scales, 4)
        sel.fill_(2)

    with ops.gpu_backend("triton"):
        step()  # compiles the kernels
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)


@gpu
def test_gpu_offsets_past_2_to_31():
    """int64 offsets: codes and a second multi-plane beyond 2^31 elements (about 11 GB)."""
    n = (1 << 31) + 4099
    x = torch.empty(n, dtype=torch.float16, device="cuda").uniform_(-1, 1)
    step = torch.tensor([0.01], device="cuda")
    codes = lsq.quantize_codes(x, step, 8, True)
    tail = slice(n - 10_000, n)
    assert torch.equal(codes[tail], ref.quantize_codes(x[tail], step, 8, True))
    del codes
    half = (1 << 30) + 77
    ys = lsq.coupled_quant_multi(x[:half], torch.tensor([0.01, 0.02], device="cuda"), [8, 4])
    assert torch.equal(ys[1, -10_000:], ref.coupled_quant(x[half - 10_000:half], torch.tensor(
        [0.01, 0.02], device="cuda"), [8, 4], torch.tensor(1, device="cuda")))


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("bits, group_size, with_zeros", [(4, 0, False), (4, 128, True),
                                                          (2, 128, True), (8, 32, False)])
def test_gpu_packed_linear(dtype, bits, group_size, with_zeros):
    """Every path on CUDA vs fp32 dequantize + F.linear: fp32 within the derived bound, fp16/bf16
    within G14's relative MAE (<= 1e-3 fp16, <= 4e-3 bf16) and the derived bound plus one ulp."""
    codes, w, scales, zeros = packed_case(bits, group_size, with_zeros, n=1000, k=4096, seed=2)
    magnitude = weight_magnitude(codes, scales, zeros, bits, group_size)
    w, scales = w.cuda(), scales.cuda()
    zeros = zeros.cuda() if zeros is not None else None
    for m in (1, 3, 16, 64, 300):
        x = torch.randn(m, 4096, device="cuda").to(dtype)
        with ops.gpu_backend("triton", "packed"):
            y = ops.packed_linear(x, w, scales, bits, group_size, zeros)
        want = ref.packed_linear(x.cpu(), w.cpu(), scales.cpu(), zeros if zeros is None
                                 else zeros.cpu(), bits, group_size).to(y.device)
        rounding = 2.0**-24 if dtype == torch.float32 else 2.0**-23
        assert_linear_close(y.cpu(), want.cpu(), x.cpu(), magnitude, rounding)
        mae = (y.float() - want.float()).abs().mean() / want.float().abs().mean()
        assert mae <= {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 4e-3}[dtype]
        x_step = torch.tensor([0.25], device="cuda")  # fused input quantizer, 5-bit signed
        with ops.gpu_backend("triton", "packed"):
            y = ops.packed_linear(x, w, scales, bits, group_size, zeros, None, x_step, 5, True)
        want = ref.packed_linear(x.cpu(), w.cpu(), scales.cpu(), zeros if zeros is None
                                 else zeros.cpu(), bits, group_size, None, x_step.cpu(), 5, True)
        xq = ref.codes_float(x.cpu().float() / 0.25, 5, True) * 0.25
        assert_linear_close(y.cpu(), want, xq, magnitude, rounding)


@gpu
def test_gpu_launch_count():
    """F10: K=5 forward + backward of a weight is 3 kernels (multi forward, multi backward, the
    fixed-order step-gradient pass), within the <= 4 launch target."""
    x = torch.randn(589_824, device="cuda", requires_grad=True)
    steps = torch.tensor([0.1, 0.05, 0.02, 0.01, 0.005], device="cuda", requires_grad=True)
    g = torch.randn(5, 589_824, device="cuda")

    def run():
        with ops.gpu_backend("triton", "lsq"):
            y = ops.coupled_quant_multi(x, steps, [6, 5, 4, 3, 2])
        torch.autograd.grad(y, (x, steps), g)

    run()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = [n for n in names if "kernel" in n]
    assert 1 <= len(kernels) <= 4, names
