"""The CPU kernels are compiled for several ISA levels and picked at run time (ATen's rule, so
ATEN_CPU_CAPABILITY lowers it). Every level this CPU can run must give the reference's results."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

LEVELS = ["default", "avx2", "avx512"]

CHECK = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, TESTS_DIR)
    from packed_cases import assert_linear_close
    import torch, rfq
    from rfq import ops, reference as ref
    print(ops.cpu_capability())
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for bits, signed in ((1, True), (4, True), (8, False), (3, False)):
            x = (torch.randn(9_001, generator=g) * 3).to(dtype)
            steps = torch.tensor([0.37, 0.05, 0.125])
            cands, sel = [bits, 2, 6], torch.tensor(0)
            assert torch.equal(ops.coupled_quant(x, steps, cands, sel, signed),
                               ref.coupled_quant(x, steps, cands, sel, signed))
            gy = torch.randn(x.shape, generator=g).to(dtype)
            gx, gs = torch.ops.rfq.coupled_quant_backward(gy, x, steps, cands, sel, signed, 1.0)
            rgx, rgs = ref.coupled_quant_backward(gy, x, steps, cands, sel, signed, 1.0)
            assert torch.equal(gx, rgx)
            torch.testing.assert_close(gs, rgs, rtol=1e-5, atol=1e-3)
            assert torch.equal(ops.coupled_quant_multi(x, steps, cands, signed),
                               ref.coupled_quant_multi(x, steps, cands, signed))
            gys = torch.randn((3, *x.shape), generator=g).to(dtype)
            mx = torch.ops.rfq.coupled_quant_multi_backward(gys, x, steps, cands, signed, 1.0)
            rmx = ref.coupled_quant_multi_backward(gys, x, steps, cands, signed, 1.0)
            assert torch.equal(mx[0], rmx[0])
            mse, share = ops.quant_stats(x, steps, cands, signed)
            rmse, rshare = ref.quant_stats(x, steps, cands, signed)
            assert torch.equal(share, rshare)
            torch.testing.assert_close(mse, rmse, rtol=1e-5, atol=0)
            assert torch.equal(ops.quantize_codes(x, steps[:1], bits, signed),
                               ref.quantize_codes(x, steps[:1], bits, signed))
    for bits in (1, 2, 4, 8):  # packed matmul: small-M kernel and the dequantize + MKL path
        lo, hi = (-1, 1) if bits == 1 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        codes = torch.randint(lo, hi + 1, (37, 300), generator=g, dtype=torch.int8)
        codes = torch.where(codes == 0, 1, codes).to(torch.int8) if bits == 1 else codes
        packed = ops.pack_weight(codes, bits)
        scales = torch.rand(37, 5, generator=g) + 0.5
        zeros = torch.rand(37, 5, generator=g) * 3
        for m in (1, 5, 40):
            x = torch.randn(m, 300, generator=g)
            y = ops.packed_linear(x, packed, scales, bits, 64, zeros)
            want = ref.packed_linear(x, packed, scales, zeros, bits, 64)
            w = ref.dequantize_weight(packed, scales, bits, (37, 300), 64, zeros)
            assert_linear_close(y, want, x, w)
            # fused input quantizer: power-of-two steps keep every product and sum exact
            xs, s1 = torch.tensor([0.25]), torch.tensor([2.0 ** -5])
            y = ops.packed_linear(x * 4, packed, s1, bits, x_step=xs, x_bits=5, x_signed=True)
            k = ref.codes_float(x * 16, 5, True).double()
            assert torch.equal(y, ((k @ codes.double().t()) * 2.0 ** -7).float())
    for dtype in (torch.float32, torch.float64):  # CSQ: the vector sigmoid of every level
        p, q = (torch.randn(6, 4_099, generator=g).to(dtype) for _ in range(2))
        m, s, b = torch.randn(6).to(dtype), torch.tensor(0.4, dtype=dtype), torch.tensor(7.0, dtype=dtype)
        tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else {}
        torch.testing.assert_close(ops.csq_weight(p, q, m, s, b), ref.csq_weight(p, q, m, s, b), **tol)
        gw = torch.randn(4_099, generator=g).to(dtype)
        dp, dq, dm, ds = torch.ops.rfq.csq_weight_backward(gw, p, q, m, s, b)
        leaves = [t.clone().requires_grad_(True) for t in (p, q, m, s)]
        ref.csq_weight(*leaves, b).backward(gw)
        for got, leaf in zip((dp, dq), leaves):
            torch.testing.assert_close(got, leaf.grad, rtol=1e-5, atol=1e-6)
        for got, leaf in zip((dm, ds), leaves[2:]):  # sums of 24K terms: fp32 orders differ
            torch.testing.assert_close(got, leaf.grad, rtol=1e-4, atol=1e-5)
    for shape, cl in (((16, 24, 9, 9), True), ((5, 17, 13, 3), False), ((40, 19), False)):
        x = torch.randn(shape, generator=g) * 2 + 1  # batch_norm_quant: vector and tail lanes
        x = x.to(memory_format=torch.channels_last) if cl else x
        w, b, s = torch.rand(shape[1], generator=g) + 0.5, torch.randn(shape[1], generator=g), torch.tensor([0.2, 0.05])
        for sel, signed in ((0, False), (1, True)):
            sel = torch.tensor(sel)
            y, mean, var = ops.batch_norm_quant(x, w, b, 1e-5, s, [3, 5], sel, signed)
            assert torch.equal(y, ref.batch_norm_quant_from_stats(x, w, b, mean, var, 1e-5, s, [3, 5], sel, signed))
            gy = torch.randn(shape, generator=g)
            got = torch.ops.rfq.batch_norm_quant_backward(gy, x, w, b, mean, var, 1e-5, s, [3, 5], sel, signed, 1.0)
            leaves = [t.clone().requires_grad_(True) for t in (x, w, b, s)]
            ref.batch_norm_quant(*leaves[:3], 1e-5, leaves[3], [3, 5], sel, signed, stats=(mean, var))[0].backward(gy)
            for a, leaf in zip(got, leaves):
                torch.testing.assert_close(a, leaf.grad, rtol=1e-4, atol=1e-3)
            t = torch.randn(shape, generator=g)  # batch_norm_quant_mse: its teacher term
            y2, _, _, mse = ops.batch_norm_quant_mse(x, w, b, 1e-5, s, [3, 5], sel, t, signed)
            assert torch.equal(y2, y)
            leaves = [v.clone().requires_grad_(True) for v in (x, w, b, s)]
            yr, _, _, mr = ref.batch_norm_quant_mse(*leaves[:3], 1e-5, leaves[3], [3, 5], sel, t, signed, stats=(mean, var))
            torch.testing.assert_close(mse, mr, rtol=2e-6, atol=0)
            ((yr * gy).sum() + 5.0 * mr).backward()
            got = torch.ops.rfq.batch_norm_quant_mse_backward(gy, torch.tensor(5.0), x, w, b, mean, var, 1e-5, s, [3, 5], sel, t, signed, 1.0)
            for a, leaf in zip(got, leaves):
                torch.testing.assert_close(a, leaf.grad, rtol=1e-4, atol=1e-3)
        r = torch.randn(shape, generator=g)  # batch_norm_add: its residual
        y3, m3, v3 = ops.batch_norm_add(x, w, b, 1e-5, r)
        assert torch.equal(m3, mean) and torch.equal(v3, var)
        leaves = [v.clone().requires_grad_(True) for v in (x, w, b, r)]
        yr, _, _ = ref.batch_norm_add(*leaves[:3], 1e-5, leaves[3], stats=(mean, var))
        assert torch.equal(y3, yr)
        yr.backward(gy)
        got = torch.ops.rfq.batch_norm_add_backward(gy, x, w, mean, var, 1e-5)
        for a, leaf in zip(got, leaves):
            torch.testing.assert_close(a, leaf.grad, rtol=1e-4, atol=1e-3)
    print("ok")
    """
)


def supported_levels():
    best = torch.backends.cpu.get_cpu_capability().lower()
    if best not in LEVELS:
        return ["default"]
    return LEVELS[: LEVELS.index(best) + 1]


@pytest.mark.parametrize("level", LEVELS)
def test_every_isa_level_matches_reference(level):
    if level not in supported_levels():
        pytest.skip(f"this CPU cannot run {level} kernels")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=level)
    script = CHECK.replace("TESTS_DIR", repr(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    capability, status = out.stdout.split()
    assert capability.lower() == level and status == "ok"
