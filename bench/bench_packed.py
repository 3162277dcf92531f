"""Packed-weight matmul vs its baselines (targets C7-C12 of ../shared/spec/kernels.md §6.1).

Weights are cold: every call uses the next of several copies, together larger than the L3
cache, as a real model streams its layers (activations stay hot). Groups of 128 with bf16 scales;
rfq runs with fp32 activations unless the group says bf16.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from rfq import ops

# per implementation: well past this machine's 32 MB L3 (CI's timing-free smoke pass: 2 copies)
COLD_BYTES = 0 if os.environ.get("RFQ_BENCH_SMOKE") else 256 << 20
LLM = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N, K) of the CPU LLM suite
RFQ_SUITE = {  # (N, K): convs as GEMM (K = C_in * kh * kw)
    "ResNet-18 layer4 3x3 512->512": (512, 4608),
    "ResNet-18 FC 512->1000": (1000, 512),
    "MobileNetV2 1x1 320->1280": (1280, 320),
    "MobileNetV2 FC 1280->1000": (1000, 1280),
}
M_VALUES = [1, 16, 64]
GROUP = 128


def copies_for(nbytes):
    return max(2, -(-COLD_BYTES // max(nbytes, 1)))


class Rotating:
    """Calls fn(x, *weights[i]) with i cycling over cold copies."""

    def __init__(self, fn, weights, x):
        self.fn, self.weights, self.x, self.i = fn, weights, x, 0

    def __call__(self):
        w = self.weights[self.i]
        self.i = (self.i + 1) % len(self.weights)
        return self.fn(self.x, *w)


def fp32_weights(n, k):
    return [(torch.randn(n, k) * 0.02,) for _ in range(copies_for(n * k * 4))]


def rfq_weights(n, k, bits):
    g = torch.Generator().manual_seed(bits)
    lo, hi = (-2, 1) if bits == 2 else (-8, 7)
    out = []
    one = None
    for _ in range(copies_for(ops.packed_row_bytes(k, bits) * n)):
        codes = torch.randint(lo, hi + 1, (n, k), generator=g, dtype=torch.int8)
        scales = (torch.rand(n, -(-k // GROUP), generator=g) * 0.01).to(torch.bfloat16)
        one = (ops.pack_weight(codes, bits), scales)
        out.append(one)
    return out


def aten_int4_weights(n, k):
    out = []
    for _ in range(copies_for(n * k // 2)):
        u = torch.randint(0, 16, (n, k), dtype=torch.int32)
        s = torch.rand(n, k // GROUP) * 0.01
        sz = torch.stack([s.t(), torch.zeros_like(s.t())], dim=-1).to(torch.bfloat16)
        out.append((torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1), sz))
    return out


def run_rfq(bits):
    return lambda x, packed, scales: ops.packed_linear(x, packed, scales, bits, GROUP)


def run_aten_int4(x, packed, sz):
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, sz)


def tag(benchmark, role, target, floor, nbytes):
    benchmark.extra_info.update(role=role, target=target, floor=floor, min_bytes=nbytes)


def io_bytes(m, n, k, act_bytes=4):
    return m * k * act_bytes + m * n * act_bytes


# C7 / C8 / C10 / C11: int4 g128 vs fp32 F.linear and aten's int4 CPU op, LLM suite
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("shape", LLM, ids=lambda s: f"{s[1]}->{s[0]}")
@pytest.mark.parametrize("impl", ["rfq", "fp32 F.linear", "aten int4pack (bf16 x)"])
def bench_int4_llm(benchmark, impl, shape, m):
    n, k = shape
    benchmark.group = f"int4 g128 {k}->{n} M={m}"
    target = {1: "C7 (fp32) / C8 (aten int4)", 16: "C10", 64: "C11"}[m]
    floor = {1: ">=5x / >=1.25x", 16: ">=2x", 64: ">=0.9x"}[m]
    x = torch.randn(m, k)
    if impl == "rfq":
        fn, weights = run_rfq(4), rfq_weights(n, k, 4)
        nbytes = ops.packed_row_bytes(k, 4) * n + n * (k // GROUP) * 2 + io_bytes(m, n, k)
    elif impl == "fp32 F.linear":
        fn, weights, nbytes = F.linear, fp32_weights(n, k), n * k * 4
    else:
        fn, weights, nbytes = run_aten_int4, aten_int4_weights(n, k), n * k // 2
        x = x.to(torch.bfloat16)
    tag(benchmark, impl, target, floor, nbytes)
    call = Rotating(fn, weights, x)
    call()
    benchmark(call)


# C9: int2 g128 vs fp32 at M=1
@pytest.mark.parametrize("shape", LLM, ids=lambda s: f"{s[1]}->{s[0]}")
@pytest.mark.parametrize("impl", ["rfq", "fp32 F.linear"])
def bench_int2_llm(benchmark, impl, shape):
    n, k = shape
    benchmark.group = f"int2 g128 {k}->{n} M=1"
    x = torch.randn(1, k)
    if impl == "rfq":
        fn, weights = run_rfq(2), rfq_weights(n, k, 2)
        nbytes = ops.packed_row_bytes(k, 2) * n + n * (k // GROUP) * 2 + io_bytes(1, n, k)
    else:
        fn, weights, nbytes = F.linear, fp32_weights(n, k), n * k * 4
    tag(benchmark, impl, "C9", ">=8x", nbytes)
    call = Rotating(fn, weights, x)
    call()
    benchmark(call)


# C12: bf16 activations no slower than fp32 activations (rfq int4, M=1)
@pytest.mark.parametrize("shape", LLM[:1], ids=lambda s: f"{s[1]}->{s[0]}")
@pytest.mark.parametrize("act", [torch.bfloat16, torch.float32], ids=str)
def bench_int4_activation_dtype(benchmark, act, shape):
    n, k = shape
    benchmark.group = f"rfq int4 bf16 vs fp32 activations {k}->{n} M=1"
    role = "rfq" if act == torch.bfloat16 else "rfq with fp32 x"
    nbytes = ops.packed_row_bytes(k, 4) * n + n * (k // GROUP) * 2
    tag(benchmark, role, "C12", ">=1.0x (bf16 no slower)", nbytes)
    call = Rotating(run_rfq(4), rfq_weights(n, k, 4), torch.randn(1, k).to(act))
    call()
    benchmark(call)


# rfq suite: tiny weights, never slower than fp32
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("name", list(RFQ_SUITE))
@pytest.mark.parametrize("impl", ["rfq", "fp32 F.linear"])
def bench_int4_rfq_suite(benchmark, impl, name, m):
    n, k = RFQ_SUITE[name]
    benchmark.group = f"int4 g128 {name} M={m}"
    x = torch.randn(m, k)
    if impl == "rfq":
        fn, weights = run_rfq(4), rfq_weights(n, k, 4)
        nbytes = ops.packed_row_bytes(k, 4) * n + io_bytes(m, n, k)
    else:
        fn, weights, nbytes = F.linear, fp32_weights(n, k), n * k * 4
    tag(benchmark, impl, "rfq suite", ">=1.0x", nbytes)
    call = Rotating(fn, weights, x)
    call()
    benchmark(call)


# Deployed 1x1 convs at batch 1 (issue 17, C8's "rfq-suite conv shapes through the packed conv
# path"): MobileNetV2's small weights at 4x4, 2x2 and 1x1 pixels (M = positions). Warm weights,
# as in a deployed model's forward (they fit in L2); the per-call fixed cost decides here.
DEPLOY_1X1 = {"MobileNetV2 1x1 32->192": (192, 32), "MobileNetV2 1x1 192->64": (64, 192),
              "MobileNetV2 1x1 64->384": (384, 64), "MobileNetV2 1x1 576->160": (160, 576)}


@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("name", list(DEPLOY_1X1))
@pytest.mark.parametrize("impl", ["rfq", "fp32 F.linear"])
def bench_int4_deploy_1x1(benchmark, impl, name, m):
    n, k = DEPLOY_1X1[name]
    benchmark.group = f"int4 g128 warm {name} M={m}"
    g = torch.Generator().manual_seed(0)
    x, bias = torch.randn(m, k, generator=g), torch.randn(n, generator=g)
    if impl == "rfq":
        codes = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
        packed = ops.pack_weight(codes, 4)
        scales = torch.rand(n, -(-k // GROUP), generator=g) + 0.5

        def call():
            return ops.packed_linear(x, packed, scales, 4, GROUP, None, bias)
        nbytes = ops.packed_row_bytes(k, 4) * n + io_bytes(m, n, k)
    else:
        w = torch.randn(n, k, generator=g) * 0.02

        def call():
            return F.linear(x, w, bias)
        nbytes = n * k * 4
    tag(benchmark, impl, "deploy 1x1 (warm)", "(reported)", nbytes)
    with torch.inference_mode():
        call()
        benchmark(call)


# Reference for the GB/s columns: this machine's memory bandwidth, measured in the same run
# (256 MB, far past L3). Its row's "rfq GB/s" is the copy's (bytes read + written); the ratio
# column means nothing here.
@pytest.mark.parametrize("impl", ["copy", "sum"])
def bench_memory_bandwidth(benchmark, impl):
    n = (0 if COLD_BYTES == 0 else 64 << 20) or (1 << 20)  # fp32 elements (smoke: 4 MB)
    src = torch.ones(n)
    benchmark.group = "machine bandwidth: 256 MB fp32 copy_ (read + write) vs sum (read)"
    if impl == "copy":
        dst = torch.empty_like(src)
        tag(benchmark, "rfq", "bandwidth reference", "-", 2 * 4 * n)
        benchmark(lambda: dst.copy_(src))
    else:
        tag(benchmark, "sum (read only)", "bandwidth reference", "-", 4 * n)
        benchmark(src.sum)


# C8's thread check (issue 17): does one core stream the read roof, or do both cores need to?
# The M=1 int4 GEMV on the largest LLM shape and the read-only `sum`, each at 1 and 2 threads;
# the ratio column is 2-thread time over 1-thread time per role group (the GB/s column: rates).
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("impl", ["int4 M=1 11008->4096", "sum (read only)"])
def bench_thread_bandwidth(benchmark, impl, threads):
    before = torch.get_num_threads()
    benchmark.group = f"C8 thread check: {impl}, 1 vs 2 threads"
    role = "rfq" if threads == 2 else "1 thread"
    try:
        torch.set_num_threads(threads)
        if impl == "sum (read only)":
            n = (0 if COLD_BYTES == 0 else 64 << 20) or (1 << 20)
            src = torch.ones(n)
            tag(benchmark, role, "C8 thread check", "-", 4 * n)
            benchmark(src.sum)
        else:
            n, k = 4096, 11008
            nbytes = ops.packed_row_bytes(k, 4) * n + n * (k // GROUP) * 2 + io_bytes(1, n, k)
            tag(benchmark, role, "C8 thread check", "-", nbytes)
            call = Rotating(run_rfq(4), rfq_weights(n, k, 4), torch.randn(1, k))
            call()
            benchmark(call)
    finally:
        torch.set_num_threads(before)
