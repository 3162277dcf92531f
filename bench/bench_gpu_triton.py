"""Triton kernels (torch.ops.rfq_triton) vs the CUDA kernels (torch.ops.rfq) vs the baselines on a
GPU: targets F1, F3, F8 (fused LSQ) and G1, G4, G8 (packed matmul) of
../shared/spec/kernels.md §6.2-6.3. Skipped without CUDA or without triton.

Roles: "rfq" is the Triton implementation (what the ratio table divides by); "CUDA kernels" is
the C++/CUDA implementation of the same op (present only where rfq._C was built with CUDA);
"learnable op" is torch._fake_quantize_learnable_per_tensor_affine; "fp16 F.linear" is cuBLAS on
the dequantized weight. Timing: triton.testing.do_bench (L2 flushed before every call), its
samples become the benchmark's rounds, so bench/conftest.py's table (baseline median / rfq median,
same run) and --ratio-json work as for the CPU benches. For the smallest cases the rfq row also
records do_bench_cudagraph's median (launch overhead removed) in extra_info. Timings are never
assertions. The ops are called directly (torch.ops.rfq_triton / torch.ops.rfq), so the result
does not depend on rfq.ops' backend switch or RFQ_GPU_BACKEND.

    pytest bench/bench_gpu_triton.py                      # ratio table at the end
    RFQ_BENCH_SMOKE=1 pytest bench/bench_gpu_triton.py    # smaller sizes, fewer shapes
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available (GPU bench)"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                       reason="triton is not installed"),
]

from gpu_timing import (BITS5, DEV, count_host_syncs, count_launches, fwd_bwd,  # noqa: E402
                        lsq_inputs, record_samples, samples_ms, versions)
from rfq import ops  # noqa: E402
from rfq import reference as ref  # noqa: E402

SMOKE = bool(os.environ.get("RFQ_BENCH_SMOKE"))
QN4, QP4 = ref.qrange(4, True)
GROUP = 128
LARGE = 4_194_304 if SMOKE else 16_777_216
SMALL = [4096, 589_824]  # 64x64; a ResNet-18 3x3 512->512 weight
LLM = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # (N, K) of K -> N


def _rt():
    from rfq.ops import triton_ops  # noqa: F401  (registers torch.ops.rfq_triton)

    return torch.ops.rfq_triton


def has_cuda_kernels(op: str) -> bool:
    """Whether rfq._C carries a CUDA kernel for rfq::op (a CUDA build of the extension)."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"rfq::{op}", "CUDA")
    except RuntimeError:
        return False


def cudagraph_ms(fn):
    """do_bench_cudagraph's median, or None where fn cannot be captured (host syncs)."""
    import triton.testing

    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))
    except Exception:  # noqa: BLE001 - capture fails for code that syncs; nothing to record
        torch.cuda.synchronize()
        return None


def run(benchmark, fn, *, group, role, target, floor, min_bytes=0, graph=False, **extra):
    """Times fn on the GPU; the do_bench samples become this benchmark's rounds."""
    benchmark.group = group
    benchmark.extra_info.update(role=role, target=target, floor=floor, min_bytes=min_bytes,
                                **versions(), **extra)
    fn()  # first call compiles (Triton JIT, torch.compile) and fills caches
    torch.cuda.synchronize()
    if benchmark.disabled:  # CI smoke pass (--benchmark-disable): one call is enough
        return
    if role == "rfq":
        benchmark.extra_info["launches"] = count_launches(fn)
        benchmark.extra_info["host_syncs"] = count_host_syncs(fn)
        if graph:
            benchmark.extra_info["cudagraph_ms"] = cudagraph_ms(fn)
    record_samples(benchmark, fn, samples_ms(fn))


def skip_without_cuda_kernels(impl, op):
    if impl == "CUDA kernels" and not has_cuda_kernels(op):
        pytest.skip(f"rfq._C has no CUDA kernel for rfq::{op} (CPU-only build)")


# ---- fused LSQ: F1, F3 (one bit) and F8 (K = 5) --------------------------------------------------


def one_bit_impl(impl, sel, zero_point):
    if impl == "rfq":
        op = _rt().coupled_quant.default
        return lambda x, s: op(x, s, [4], sel, True, 1.0)
    if impl == "CUDA kernels":
        op = torch.ops.rfq.coupled_quant.default
        return lambda x, s: op(x, s, [4], sel, True, 1.0)
    return lambda x, s: torch._fake_quantize_learnable_per_tensor_affine(x, s, zero_point, QN4,
                                                                          QP4, 1.0)


def k5_impl(impl, zero_point):
    if impl == "rfq":
        op = _rt().coupled_quant_multi.default
        return lambda x, s: op(x, s, BITS5, True, 1.0)
    if impl == "CUDA kernels":
        op = torch.ops.rfq.coupled_quant_multi.default
        return lambda x, s: op(x, s, BITS5, True, 1.0)

    def five_learnable(x, s):
        return [torch._fake_quantize_learnable_per_tensor_affine(
            x, s[j:j + 1], zero_point, *ref.qrange(b, True), 1.0) for j, b in enumerate(BITS5)]

    return five_learnable


# F1 (>= 16M elements) and F3 (<= 1M): 1 bit fwd+bwd fp32
@pytest.mark.parametrize("n", [LARGE] + SMALL)
@pytest.mark.parametrize("impl", ["rfq", "CUDA kernels", "learnable op"])
def bench_triton_one_bit_fwd_bwd(benchmark, n, impl):
    skip_without_cuda_kernels(impl, "coupled_quant")
    x, steps, grad = lsq_inputs(n)
    sel = torch.zeros((), dtype=torch.long, device=DEV)
    zero_point = torch.zeros(1, device=DEV, requires_grad=True)
    fn = one_bit_impl(impl, sel, zero_point)
    large = n >= 16_000_000 or (SMOKE and n == LARGE)
    run(benchmark, lambda: fwd_bwd(fn, x, steps, grad), group=f"Triton 1-bit fwd+bwd n={n}",
        role=impl, target="F1" if large else "F3", floor=">=2.0x" if large else ">=3x",
        min_bytes=20 * n, graph=not large)


# F8: K=5 {6..2} fwd+bwd, gradients summed into one dx (52 B/element at fp32)
@pytest.mark.parametrize("n", [589_824, 6_422_528] + ([] if SMOKE else [LARGE]))
@pytest.mark.parametrize("impl", ["rfq", "CUDA kernels", "5x learnable op"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def bench_triton_k5_fwd_bwd(benchmark, n, impl, dtype):
    if dtype != torch.float32 and impl == "5x learnable op":
        pytest.skip("the learnable op's backward is fp32 only")
    skip_without_cuda_kernels(impl, "coupled_quant_multi")
    x, steps, grad = lsq_inputs(n, k=5, dtype=dtype)
    zero_point = torch.zeros(1, device=DEV, requires_grad=True)
    fn = k5_impl(impl, zero_point)
    suffix = "" if dtype == torch.float32 else " bf16"
    run(benchmark, lambda: fwd_bwd(fn, x, steps, grad),
        group=f"Triton K=5 fwd+bwd n={n}{suffix}", role=impl, target="F8", floor=">=3x",
        min_bytes=52 * n * x.element_size() // 4, graph=n <= 589_824)


# ---- packed matmul: G1, G4 (int4 g128 scale+zero), G8 (int2 g128) --------------------------------


def packed_weight(n, k, bits, dtype=torch.float16):
    g = torch.Generator().manual_seed(bits)
    lo, hi = ref.qrange(bits, True)
    codes = torch.randint(lo, hi + 1, (n, k), generator=g, dtype=torch.int8)
    if bits == 1:
        codes = torch.where(codes == 0, 1, codes).to(torch.int8)
    packed = ops.pack_weight(codes, bits).to(DEV)  # one-off export step, on the CPU
    scales = (torch.rand(n, k // GROUP, generator=g) * 0.01 + 1e-3).to(dtype).to(DEV)
    zeros = (torch.rand(n, k // GROUP, generator=g) * (2 ** ref.container_bits(bits) - 1))
    return packed, scales, zeros.to(dtype).to(DEV)


def packed_bytes(packed, scales, zeros, m, k, n, x_bytes=2):
    meta = scales.numel() * scales.element_size() + zeros.numel() * zeros.element_size()
    return packed.numel() + meta + m * k * x_bytes + m * n * x_bytes


def linear_case(n, k, m, bits, impl, dtype=torch.float16):
    x = torch.randn(m, k, device=DEV, dtype=dtype)
    packed, scales, zeros = packed_weight(n, k, bits, dtype)
    nbytes = packed_bytes(packed, scales, zeros, m, k, n)
    if impl == "rfq":
        op = _rt().packed_linear.default
        return (lambda: op(x, packed, scales, zeros, bits, GROUP, None)), nbytes
    if impl == "CUDA kernels":
        op = torch.ops.rfq.packed_linear.default
        return (lambda: op(x, packed, scales, zeros, bits, GROUP, None)), nbytes
    w = _rt().dequantize_weight(packed, scales, zeros, bits, GROUP, k).to(dtype)
    return (lambda: F.linear(x, w)), nbytes


PACKED_IMPLS = ["rfq", "CUDA kernels", "fp16 F.linear"]


# G1 (M=1, LLM suite) and G4 (M=16): int4 g128 with scale and zero, fp16 activations
@pytest.mark.parametrize("n, k", LLM[:2] if SMOKE else LLM, ids=str)
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("impl", PACKED_IMPLS)
def bench_triton_int4_small_m(benchmark, n, k, m, impl):
    skip_without_cuda_kernels(impl, "packed_linear")
    fn, nbytes = linear_case(n, k, m, 4, impl)
    run(benchmark, fn, group=f"Triton int4 g128 M={m} {k}->{n}", role=impl,
        target="G1" if m == 1 else "G4", floor=">=2.5x" if m == 1 else ">=2.0x",
        min_bytes=nbytes, graph=m == 1)


# G8: int2 g128 M=1 vs fp16
@pytest.mark.parametrize("n, k", LLM[:2], ids=str)
@pytest.mark.parametrize("impl", PACKED_IMPLS)
def bench_triton_int2_m1(benchmark, n, k, impl):
    skip_without_cuda_kernels(impl, "packed_linear")
    fn, nbytes = linear_case(n, k, 1, 2, impl)
    run(benchmark, fn, group=f"Triton int2 g128 M=1 {k}->{n}", role=impl, target="G8",
        floor=">=4.5x", min_bytes=nbytes, graph=True)
