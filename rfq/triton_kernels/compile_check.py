"""Compiles every Triton kernel of rfq for an NVIDIA GPU target without a GPU, and checks the PTX.

    python -m rfq.triton_kernels.compile_check [--arch 90] [--verbose]

The launchers run on small CPU tensors with each kernel's launch intercepted: the JIT's own
binder turns the arguments into the specialization (dtypes, ints equal to 1 as constexpr,
16-byte alignment) a GPU run would compile, and triton.compile builds it for the target down to
a cubin (ptxas ships with Triton). This catches type and lowering errors the interpreter
(TRITON_INTERPRET=1) cannot, and lets the PTX be checked for what the numerics rely on:
    - no approximate division (div.full / div.approx): every fp32 division is div.rn
    - the LSQ kernels contain no fused multiply-add (enable_fp_fusion=False keeps k*s rounded)
    - the half-to-even rounding constant 1.5 * 2^23 (0f4B400000) survives, so (c + M) - M was
      not folded away
A control kernel with Triton's plain `/` is compiled first and must be flagged, so the check
cannot pass blind. Must run without TRITON_INTERPRET (the interpreter replaces the JIT). Exit
status 1 on failure.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from contextlib import contextmanager

import torch

from rfq.ops.layout import packed_row_bytes


def _require_compiler_mode():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("compile_check: unset TRITON_INTERPRET (the interpreter replaces the JIT)")


@contextmanager
def recorded_launches():
    """Intercepts JITFunction.run: launches are recorded as (kernel, args, kwargs), not run."""
    from triton.runtime.jit import JITFunction

    calls = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        calls.append((self, args, dict(kwargs)))
        return None

    JITFunction.run = record
    try:
        yield calls
    finally:
        JITFunction.run = original


def compile_launch(kernel, args, kwargs, target):
    """What kernel[grid](*args, **kwargs) would compile on `target`, via the JIT's own binder."""
    import triton
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args,
                                                              specialization, options)
    source = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=target, options=options.__dict__)


def _lsq_launches(quick=False):
    """Launch every LSQ launcher over the specializations that matter: dtypes, n = 1 (a
    constexpr), n % 16 == 0 and odd n, strided steps, binary candidates, K = 1 and 8. quick:
    two of them (bf16 n = 1 with a binary candidate; fp32 odd n, strided steps, K = 5)."""
    from rfq.triton_kernels import lsq

    cases = [([4], True), ([6, 5, 4, 3, 2], True), ([1, 2, 8], True), ([8, 7, 6, 5, 4, 3, 2, 1],
             False), ([1], True)]
    plan = [(dtype, n, cases) for dtype in (torch.float32, torch.bfloat16, torch.float16)
            for n in (1, 4096, 4133)]
    if quick:
        plan = [(torch.bfloat16, 1, [([1, 4, 8], True)]),
                (torch.float32, 4133, [([6, 5, 4, 3, 2], False)])]
    for dtype, n, n_cases in plan:
        x = torch.randn(n).to(dtype)
        for bits, signed in n_cases:
            k = len(bits)
            steps = torch.full((2 * k,), 0.1)[::2] if n == 4133 else torch.full((k,), 0.1)
            sel = torch.tensor(k - 1)
            lsq.coupled_quant(x, steps, bits, sel, signed)
            lsq.coupled_quant_backward(x, x, steps, bits, sel, signed, 1.0)
            lsq.coupled_quant_multi(x, steps, bits, signed)
            lsq.coupled_quant_multi_backward(torch.stack([x] * k), x, steps, bits, signed, 1.0)
            lsq.quant_stats(x, steps, bits, signed)
        for b in (1, 8) if quick else (1, 4, 8):
            lsq.quantize_codes(x, torch.tensor([0.1]), b, True)
            lsq.quantize_codes(x, torch.tensor([0.1]), b, False)


def _packed_launches(quick=False):
    """Every container, scale mode, dtype and path (GEMV direct, GEMV split-K, GEMM). quick:
    4-bit g128 with zeros in fp16 on every path, and 8-bit per-tensor fp32 on the GEMM."""
    from rfq.triton_kernels import packed

    n, k = 40, 300
    plan = [(bits, g, (torch.float32, torch.bfloat16, torch.float16), (1, 3, 40))
            for bits in (1, 2, 4, 5, 8)
            for g in ((0, False), (32, False), (64, True), (128, True), (32, True))]
    if quick:
        plan = [(4, (128, True), (torch.float16,), (1, 3, 40)),
                (8, (0, False), (torch.float32,), (40,))]
    for bits, (group_size, with_zeros), dtypes, ms in plan:
        w = torch.zeros(n, packed_row_bytes(k, bits), dtype=torch.uint8)
        groups = -(-k // group_size) if group_size else 1
        scales = (torch.ones(n, groups, dtype=torch.bfloat16) if group_size
                  else torch.tensor([0.1]))
        zeros = torch.ones(n, groups, dtype=torch.float16) if with_zeros else None
        for dtype in dtypes:
            for m in ms:  # GEMV direct / GEMV split-K / GEMM
                x = torch.randn(m, k).to(dtype)
                packed.packed_linear(x, w, scales, zeros, bits, group_size, torch.ones(n))
                packed.packed_linear(x, w, scales, zeros, bits, group_size, None, splits=1)
                # the fused input quantizer: codes in the GEMV's registers (binary and not)
                for x_bits, x_signed in ((1, True), (4, False)):
                    packed.packed_linear(x, w, scales, zeros, bits, group_size, torch.ones(n),
                                         torch.tensor([0.5]), x_bits, x_signed)
        packed.dequantize_weight(w, scales, zeros, bits, group_size, k)
        packed.unpack_weight(w, bits, (n, k))


# kernels that quantize (divide, clip, round) and the reduction finishers of the LSQ family
QUANTIZERS = {"_forward_kernel", "_backward_kernel", "_multi_forward_kernel",
              "_multi_backward_kernel", "_stats_kernel", "_codes_kernel"}
LSQ_FINISHERS = {"_selected_step_grad_kernel", "_step_grads_kernel", "_stats_finish_kernel"}


def check_ptx(name: str, ptx: str, constexprs: dict) -> list[str]:
    problems = []
    if re.search(r"\bdiv\.(full|approx)(\.ftz)?\.f32", ptx):
        problems.append("approximate fp32 division (div.full/div.approx) in the PTX")
    if name in QUANTIZERS | LSQ_FINISHERS and re.search(r"\bfma\.rn(\.ftz)?\.f32", ptx):
        problems.append("fused multiply-add in an LSQ kernel (enable_fp_fusion must be off)")
    if name in QUANTIZERS:
        if not re.search(r"\bdiv\.rn\.f32", ptx):
            problems.append("no div.rn.f32: the quantizer's division is missing")
        binary = constexprs.get("BIN", (constexprs.get("BINARY", False),))
        if not all(binary) and not ("0f4B400000" in ptx and "0fCB400000" in ptx):
            problems.append("rounding constant +-1.5*2^23 missing: (c + M) - M was folded")
    return problems


def _control_kernel():
    """A kernel with Triton's plain fp32 `/`: check_ptx must flag it, or the check is blind."""
    import triton
    import triton.language as tl

    @triton.jit
    def plain_division(x_ptr, y_ptr, s, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) / s, mask=offs < n)

    return plain_division


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    parser.add_argument("--only", choices=["lsq", "packed"], default=None)
    parser.add_argument("--quick", action="store_true",
                        help="a few risky specializations of every kernel (the test suite's)")
    parser.add_argument("--verbose", action="store_true")
    opts = parser.parse_args(argv)
    _require_compiler_mode()
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", opts.arch, 32)
    control = _control_kernel()
    with recorded_launches() as calls:
        x = torch.empty(64)
        control[(1,)](x, x, 0.1, 64, BLOCK=64)
    kernel, args, kwargs = calls[0]
    if not check_ptx("_codes_kernel", compile_launch(kernel, args, kwargs, target).asm["ptx"],
                     {"BINARY": False}):
        print("compile_check: the PTX check does not flag plain fp32 division (div.full.f32) "
              "on this Triton: it cannot vouch for the kernels")
        return 1
    with recorded_launches() as calls:
        if opts.only in (None, "lsq"):
            _lsq_launches(opts.quick)
        if opts.only in (None, "packed"):
            _packed_launches(opts.quick)
    seen, failures = {}, 0
    for kernel, args, kwargs in calls:
        compiled = compile_launch(kernel, args, kwargs, target)
        key = compiled.hash
        if key in seen:
            continue
        name = kernel.fn.__name__
        seen[key] = name
        problems = check_ptx(name, compiled.asm["ptx"], kwargs)
        failures += bool(problems)
        if problems or opts.verbose:
            print(f"{name} [{compiled.metadata.num_warps} warps, "
                  f"{compiled.metadata.shared} B smem]: {'; '.join(problems) or 'ok'}")
    counts = {}
    for name in seen.values():
        counts[name] = counts.get(name, 0) + 1
    summary = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
    print(f"compiled {len(seen)} specializations for sm_{opts.arch} ({summary}); "
          f"{failures} with problems")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
