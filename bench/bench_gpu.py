"""CUDA kernels vs their named baselines on a GPU (targets F1, F3, F5, F8, F10, G1, G3, G4, G6/G7,
G8 of ../shared/spec/kernels.md §6.2-6.3). Skipped without CUDA.

Timing and records: bench/gpu_timing.py (do_bench with L2 flushed, or CUDA events; the samples
become the benchmark's rounds). extra_info also carries the device, versions, host syncs (F5)
and kernel launches (F10). Timings are never assertions.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from gpu_timing import (BITS5, DEV, count_host_syncs, count_launches, fwd_bwd, lsq_inputs,
                        record_samples, samples_ms, versions)
from rfq import ops
from rfq import reference as ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA is not available (GPU benchmarks)")

SMOKE = bool(os.environ.get("RFQ_BENCH_SMOKE"))
QN4, QP4 = ref.qrange(4, True)


def run(benchmark, fn, *, group, role, target, floor, min_bytes=0, **extra):
    """Times fn on the GPU and records the samples as this benchmark's rounds."""
    benchmark.group = group
    benchmark.extra_info.update(role=role, target=target, floor=floor, min_bytes=min_bytes,
                                **versions(), **extra)
    fn()  # first call: compiles baselines, fills caches
    torch.cuda.synchronize()
    if benchmark.disabled:  # CI smoke pass: one call is enough
        return
    record_samples(benchmark, fn, samples_ms(fn))


@pytest.fixture(autouse=True)
def _cuda_backend():
    """These files measure the C++/CUDA kernels, whatever RFQ_GPU_BACKEND routes wrappers to."""
    choose = getattr(ops, "gpu_backend", None)  # rfq.ops' cuda/triton switch, where present
    if choose is None:
        yield
    else:
        with choose("cuda"):
            yield


# ---- fused LSQ (F1, F3, F5, F8, F10) -----------------------------------------------------------
SEL = None
ZERO_POINT = None


def rfq_one_bit(x, steps):
    return ops.coupled_quant(x, steps, [4], SEL, True)


def rfq_multi(x, steps):
    return ops.coupled_quant_multi(x, steps, BITS5, True)


def learnable(x, step, qn=QN4, qp=QP4):
    return torch._fake_quantize_learnable_per_tensor_affine(x, step, ZERO_POINT, qn, qp, 1.0)


torch._dynamo.config.recompile_limit = 64
compiled_lsq = torch.compile(ref.composed_lsq, fullgraph=True, dynamic=False)


def five_learnable(x, steps):
    return [learnable(x, steps[j:j + 1], *ref.qrange(b, True)) for j, b in enumerate(BITS5)]


ONE_BIT = {"rfq": rfq_one_bit, "learnable op": lambda x, s: learnable(x, s),
           "compiled LSQ": lambda x, s: compiled_lsq(x, s[0], QN4, QP4)}


@pytest.fixture(autouse=True, scope="module")
def _device_state():
    global SEL, ZERO_POINT
    SEL = torch.zeros((), dtype=torch.long, device=DEV)
    ZERO_POINT = torch.zeros(1, device=DEV, requires_grad=True)
    yield


LARGE = 4_194_304 if SMOKE else 16_777_216
SMALL = [4096, 589_824]  # 64x64 and a ResNet-18 3x3 512->512 weight


# F1 (>= 16M) and F3 (<= 1M): 1-bit fwd+bwd fp32 vs the learnable op (+ F4: compiled LSQ)
@pytest.mark.parametrize("n", [LARGE] + SMALL)
@pytest.mark.parametrize("impl", ["rfq", "learnable op", "compiled LSQ"])
def bench_one_bit_fwd_bwd(benchmark, n, impl):
    x, steps, grad = lsq_inputs(n)
    fn = ONE_BIT[impl]
    target = "F1 / F4" if n >= 16_000_000 else "F3 / F4"
    run(benchmark, lambda: fwd_bwd(fn, x, steps, grad), group=f"GPU 1-bit fwd+bwd n={n}",
        role=impl, target=target, floor=">=2.0x / >=1.0x" if n >= 16_000_000 else ">=3x",
        min_bytes=20 * n)


# F5: host syncs per training step (sel.fill_ + fwd + bwd); time as well
@pytest.mark.parametrize("impl", ["rfq", "learnable op"])
def bench_training_step_syncs(benchmark, impl):
    n = 589_824
    x, steps, grad = lsq_inputs(n)
    fn = ONE_BIT[impl]

    def step():
        SEL.fill_(0)
        return fwd_bwd(fn, x, steps, grad)

    run(benchmark, step, group=f"GPU training step syncs n={n}", role=impl, target="F5",
        floor="0 host syncs", min_bytes=20 * n, host_syncs=count_host_syncs(step))


# F8 (K=5 fwd+bwd, grads summed) and F10 (ResNet-18 weight: launches, <= 30 us)
@pytest.mark.parametrize("n", [589_824, 6_422_528] if SMOKE else [589_824, 6_422_528, LARGE])
@pytest.mark.parametrize("impl", ["rfq", "5x learnable op"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def bench_k5_fwd_bwd(benchmark, n, impl, dtype):
    if dtype != torch.float32 and impl != "rfq":
        pytest.skip("the learnable op's backward is fp32 only")
    x, steps, grad = lsq_inputs(n, k=5, dtype=dtype)
    fn = rfq_multi if impl == "rfq" else five_learnable
    extra = {}
    if impl == "rfq":
        extra["launches"] = count_launches(lambda: fwd_bwd(fn, x, steps, grad))
    suffix = "" if dtype == torch.float32 else " bf16"
    run(benchmark, lambda: fwd_bwd(fn, x, steps, grad), group=f"GPU K=5 fwd+bwd n={n}{suffix}",
        role=impl, target="F10" if n == 589_824 else "F8",
        floor="<=4 launches, <=30 us" if n == 589_824 else ">=3x",
        min_bytes=52 * n * x.element_size() // 4, **extra)


# ---- packed matmul (G1, G3, G4, G6/G7, G8) ------------------------------------------------------
LLM = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # (N, K) of K -> N
GROUP = 128


def packed_weight(n, k, bits, dtype=torch.float16, with_zeros=True):
    g = torch.Generator().manual_seed(bits)
    lo, hi = (-2, 1) if bits == 2 else (-8, 7)
    codes = torch.randint(lo, hi + 1, (n, k), generator=g, dtype=torch.int8)
    packed = ops.pack_weight(codes.to(DEV), bits)
    scales = (torch.rand(n, k // GROUP, generator=g) * 0.01 + 1e-3).to(dtype).to(DEV)
    zeros = None
    if with_zeros:
        zeros = (torch.rand(n, k // GROUP, generator=g) * (2 ** ref.container_bits(bits) - 1))
        zeros = zeros.to(dtype).to(DEV)
    return packed, scales, zeros


def packed_bytes(packed, scales, zeros, m, k, n, x_bytes=2):
    extra = scales.numel() * scales.element_size() + (
        zeros.numel() * zeros.element_size() if zeros is not None else 0)
    return packed.numel() + extra + m * k * x_bytes + m * n * x_bytes


def linear_case(n, k, m, bits, impl, dtype=torch.float16):
    x = torch.randn(m, k, device=DEV, dtype=dtype)
    packed, scales, zeros = packed_weight(n, k, bits, dtype)
    if impl == "rfq":
        return (lambda: ops.packed_linear(x, packed, scales, bits, GROUP, zeros),
                packed_bytes(packed, scales, zeros, m, k, n))
    w = ops.dequantize_weight(packed, scales, bits, (n, k), GROUP, zeros).to(dtype)
    if impl.startswith("dequantize"):  # rfq.ops' composed dequantize, then cuBLAS
        return (lambda: F.linear(x, ops.dequantize_weight(packed, scales, bits, (n, k), GROUP,
                                                          zeros).to(dtype)), 0)
    return (lambda: F.linear(x, w)), 0


# G1 (int4 M=1, LLM suite) and G4 (int4 M=16) vs fp16 F.linear
@pytest.mark.parametrize("n, k", LLM[:2] if SMOKE else LLM, ids=str)
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("impl", ["rfq", "fp16 F.linear"])
def bench_int4_small_m(benchmark, n, k, m, impl):
    fn, nbytes = linear_case(n, k, m, 4, impl)
    run(benchmark, fn, group=f"GPU int4 g128 M={m} {k}->{n}", role=impl,
        target="G1" if m == 1 else "G4", floor=">=2.5x" if m == 1 else ">=2.0x",
        min_bytes=nbytes)


# G8: int2 M=1 vs fp16
@pytest.mark.parametrize("n, k", LLM[:2], ids=str)
@pytest.mark.parametrize("impl", ["rfq", "fp16 F.linear"])
def bench_int2_m1(benchmark, n, k, impl):
    fn, nbytes = linear_case(n, k, 1, 2, impl)
    run(benchmark, fn, group=f"GPU int2 g128 M=1 {k}->{n}", role=impl, target="G8",
        floor=">=4.5x", min_bytes=nbytes)


# G6 (fallback at large M vs fp16) and G7 (vs dequantize + fp16 F.linear)
@pytest.mark.parametrize("m", [1024] if SMOKE else [1024, 4096])
@pytest.mark.parametrize("impl", ["rfq", "fp16 F.linear", "dequantize + fp16 F.linear"])
def bench_int4_large_m(benchmark, m, impl):
    n, k = 4096, 4096
    fn, nbytes = linear_case(n, k, m, 4, impl)
    run(benchmark, fn, group=f"GPU int4 g128 M={m} {k}->{n}", role=impl, target="G6 / G7",
        floor=">=0.75x (1024), >=0.9x (4096) / <=5% slower", min_bytes=nbytes)


# G3: int4 M=1 vs aten._weight_int4pack_mm (tinygemm, its own packing; bf16, scale + zero)
@pytest.mark.parametrize("n, k", LLM[:2], ids=str)
@pytest.mark.parametrize("impl", ["rfq", "aten._weight_int4pack_mm"])
def bench_int4_vs_tinygemm(benchmark, n, k, impl):
    x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
    if impl == "rfq":
        packed, scales, zeros = packed_weight(n, k, 4, torch.bfloat16)
        fn = lambda: ops.packed_linear(x, packed, scales, 4, GROUP, zeros)  # noqa: E731
        nbytes = packed_bytes(packed, scales, zeros, 1, k, n)
    else:
        g = torch.Generator().manual_seed(4)
        u = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32).to(DEV)
        try:
            w_uint8 = (u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8)
            w_int4 = torch.ops.aten._convert_weight_to_int4pack(w_uint8, 8)
            sz = torch.rand(k // GROUP, n, 2, generator=g).to(torch.bfloat16).to(DEV)
            fn = lambda: torch.ops.aten._weight_int4pack_mm(x, w_int4, GROUP, sz)  # noqa: E731
            fn()
        except (RuntimeError, NotImplementedError) as err:
            pytest.skip(f"aten._weight_int4pack_mm unavailable here: {err}")
        nbytes = 0
    run(benchmark, fn, group=f"GPU int4 g128 bf16 M=1 {k}->{n} vs tinygemm", role=impl,
        target="G3", floor=">=1.0x", min_bytes=nbytes)
