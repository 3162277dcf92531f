"""C8 (issue 17): the packed int4 M=1 GEMV's read rate as a fraction of this machine's streaming
read rate, both measured in **interleaved pairs** in one process, so that drift between them
cancels (the block-wise pytest-benchmark runs saw the `sum` roof itself move 43-84 GB/s within
one session).

Each step times one cold `packed_linear` call (int4 g128, M=1, rotating weight copies far past
L3), one cold `torch.sum` over the same number of bytes (rotating slices of a 256 MB buffer)
and aten's int4 CPU op on the same shape (bf16 x, its own packed copies); a round's fraction is
the median over its steps of rfq's rate over `sum`'s, and its aten ratio the median of aten's
time over rfq's.

    python scripts/c8_fraction.py [--rounds 5] [--pairs 200] [--threads 2] [--per-tensor]

Each pair also repeats the rfq call on the weights it just read: that call reads them from L3
(when they fit), so its rate is the kernel's own ceiling on these cores, without the memory; a
cold / warm ratio near 1 means the cold call is bound by the kernel, not by the memory.

--per-tensor runs rfq on the same codes with one scale (group_size 0): no scale stream, the
upper bound of putting the scales inline (the byte count still includes the g128 scales).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rfq import ops
from rfq.runtime import retain_freed_memory

SHAPES = [(4096, 11008), (11008, 4096), (4096, 4096)]  # (N, K) of the LLM suite
GROUP = 128
COLD_BYTES = 256 << 20


def packed_copies(n: int, k: int):
    g = torch.Generator().manual_seed(4)
    row = ops.packed_row_bytes(k, 4)
    copies = max(2, -(-COLD_BYTES // (row * n)))
    out = []
    for _ in range(copies):
        codes = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
        scales = (torch.rand(n, k // GROUP, generator=g) * 0.01).to(torch.bfloat16)
        out.append((ops.pack_weight(codes, 4), scales))
    return out, row * n + n * (k // GROUP) * 2 + 4 * (n + k)


def aten_copies(n: int, k: int):
    copies = max(2, -(-COLD_BYTES // (n * k // 2)))
    out = []
    for _ in range(copies):
        u = torch.randint(0, 16, (n, k), dtype=torch.int32)
        s = torch.rand(n, k // GROUP) * 0.01
        sz = torch.stack([s.t(), torch.zeros_like(s.t())], dim=-1).to(torch.bfloat16)
        out.append((torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1), sz))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--pairs", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--per-tensor", action="store_true",
                   help="rfq with one scale: no scale stream (the inline-scale upper bound)")
    args = p.parse_args()
    retain_freed_memory()
    torch.set_num_threads(args.threads)
    roof_buffer = torch.ones(COLD_BYTES // 4)
    one = torch.tensor([0.01])

    def rfq(x, packed, scales):
        if args.per_tensor:
            return ops.packed_linear(x, packed, one, 4, 0)
        return ops.packed_linear(x, packed, scales, 4, GROUP)

    print(f"torch {torch.__version__}, {args.threads} threads, CPU kernels "
          f"{ops.cpu_capability()}; {args.rounds} rounds of {args.pairs} interleaved pairs")
    print("| shape (K→N) | rfq GB/s | `sum` GB/s | fraction of `sum`, median of rounds | range "
          "| vs aten int4 (bf16 x) | range | rfq warm GB/s | cold / warm |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, k in SHAPES:
        weights, nbytes = packed_copies(n, k)
        aten = aten_copies(n, k)
        x = torch.randn(1, k)
        xb = x.to(torch.bfloat16)
        elems = nbytes // 4
        slices = [roof_buffer[i * elems:(i + 1) * elems] for i in range(len(roof_buffer) // elems)]
        for i in range(10):  # warm: threads up, pages touched
            rfq(x, *weights[i % len(weights)])
            slices[i % len(slices)].sum()
            torch.ops.aten._weight_int4pack_mm_for_cpu(xb, *aten[i % len(aten)][:1], GROUP,
                                                       aten[i % len(aten)][1])
        fractions, rates, roofs, vs_aten, warm_rates = [], [], [], [], []
        for _ in range(args.rounds):
            ratios, aten_ratios = [], []
            for j in range(args.pairs):
                w = weights[j % len(weights)]
                sl = slices[(j * 7) % len(slices)]
                t0 = time.perf_counter()
                rfq(x, *w)
                cold = time.perf_counter() - t0
                t0 = time.perf_counter()
                rfq(x, *w)  # again, from cache: the kernel's own rate, without the memory
                warm = time.perf_counter() - t0
                t0 = time.perf_counter()
                sl.sum()
                roof = time.perf_counter() - t0
                wa, sz = aten[j % len(aten)]
                t0 = time.perf_counter()
                torch.ops.aten._weight_int4pack_mm_for_cpu(xb, wa, GROUP, sz)
                aten_ratios.append((time.perf_counter() - t0) / cold)
                rates.append(nbytes / cold / 1e9)
                warm_rates.append(nbytes / warm / 1e9)
                roofs.append(elems * 4 / roof / 1e9)
                ratios.append(roof / cold * nbytes / (elems * 4))
            fractions.append(statistics.median(ratios))
            vs_aten.append(statistics.median(aten_ratios))
        print(f"| {k}→{n} | {statistics.median(rates):.1f} | {statistics.median(roofs):.1f} | "
              f"{100 * statistics.median(fractions):.0f} % | {100 * min(fractions):.0f}–"
              f"{100 * max(fractions):.0f} % | {statistics.median(vs_aten):.2f}x | "
              f"{min(vs_aten):.2f}–{max(vs_aten):.2f}x | {statistics.median(warm_rates):.1f} | "
              f"{statistics.median(rates) / statistics.median(warm_rates):.2f} |", flush=True)


if __name__ == "__main__":
    main()
