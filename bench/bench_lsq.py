"""Fused LSQ kernels vs their named baselines (targets C1-C6 of ../shared/spec/kernels.md §6.1).

fp32, 4-bit signed weights-style quantization, sizes 589,824 (a ResNet-18 3x3 512->512 weight)
and 6,422,528 (a ResNet-18 layer-1 activation at batch 32). fwd+bwd = forward, then the gradients
of x and the step(s) via torch.autograd.grad (no .grad accumulation on either side).
"""

import pytest
import torch

from rfq import ops
from rfq import reference as ref

SIZES = [589_824, 6_422_528]
BITS5 = [6, 5, 4, 3, 2]
QN, QP = ref.qrange(4, True)


def inputs(n, k=1):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, generator=g) * 0.5).requires_grad_()
    steps = torch.tensor([0.5 / 2 ** (b - 2) for b in (BITS5 if k > 1 else [4])],
                         requires_grad=True)
    grad = torch.randn((k, n) if k > 1 else (n,), generator=g)
    return x, steps, grad


def fwd_bwd(fn, x, steps, grad):
    y = fn(x, steps)
    if isinstance(y, list):  # baselines: one output per bit-width, gradients summed by autograd
        return torch.autograd.grad(y, (x, steps), list(grad))
    return torch.autograd.grad(y, (x, steps), grad)


# ---- the candidates ---------------------------------------------------------------------------
SEL = torch.tensor(0)


def rfq_one_bit(x, steps):
    return ops.coupled_quant(x, steps, [4], SEL, True)


def rfq_multi(x, steps):
    return ops.coupled_quant_multi(x, steps, BITS5, True)


# ---- the baselines ----------------------------------------------------------------------------
ZERO_POINT = torch.zeros(1, requires_grad=True)


def learnable(x, step, qn=QN, qp=QP):
    return torch._fake_quantize_learnable_per_tensor_affine(x, step, ZERO_POINT, qn, qp, 1.0)


# One specialization per (size, bit-width): more than dynamo's default recompile limit of 8.
torch._dynamo.config.recompile_limit = 64
compiled_lsq = torch.compile(ref.composed_lsq, fullgraph=True, dynamic=False)


def compiled_one_bit(x, steps):
    return compiled_lsq(x, steps[0], QN, QP)


def five_compiled(x, steps):
    return [compiled_lsq(x, steps[j], *ref.qrange(b, True)) for j, b in enumerate(BITS5)]


def five_learnable(x, steps):
    return [learnable(x, steps[j:j + 1], *ref.qrange(b, True)) for j, b in enumerate(BITS5)]


ONE_BIT = {"rfq": rfq_one_bit, "learnable op": lambda x, s: learnable(x, s),
           "compiled LSQ": compiled_one_bit}


def tag(benchmark, role, target, floor, min_bytes):
    benchmark.extra_info.update(role=role, target=target, floor=floor, min_bytes=min_bytes)


# C1 / C2: one bit-width, forward + backward (spec minimum 8 + 12 = 20 B/element)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("impl", ["rfq", "learnable op", "compiled LSQ"])
def bench_one_bit_fwd_bwd(benchmark, n, impl):
    benchmark.group = f"1-bit fwd+bwd n={n}"
    fn = ONE_BIT[impl]
    tag(benchmark, impl, "C1 (learnable) / C2 (compiled)", ">=10x / >=1.0x", 20 * n)
    x, steps, grad = inputs(n)
    fwd_bwd(fn, x, steps, grad)  # warm-up (compiles the baseline)
    benchmark(fwd_bwd, fn, x, steps, grad)


# C3: forward only (8 B/element)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("impl", ["rfq", "compiled LSQ", "learnable op"])
def bench_one_bit_fwd(benchmark, n, impl):
    benchmark.group = f"1-bit fwd n={n}"
    fn = ONE_BIT[impl]
    tag(benchmark, impl, "C3 (compiled)", ">=1.0x", 8 * n)
    x, steps, _ = inputs(n)
    x, steps = x.detach(), steps.detach()

    def run():
        with torch.no_grad():
            return fn(x, steps)

    run()
    benchmark(run)


# C4 / C5: K=5 {6..2} forward + backward, gradients summed into one dx (52 B/element)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("impl", ["rfq", "5x compiled LSQ", "5x learnable op"])
def bench_k5_fwd_bwd(benchmark, n, impl):
    benchmark.group = f"K=5 fwd+bwd n={n}"
    fn = {"rfq": rfq_multi, "5x compiled LSQ": five_compiled, "5x learnable op": five_learnable}
    tag(benchmark, impl, "C4 (compiled) / C5 (learnable)", ">=2x / >=20x", 52 * n)
    x, steps, grad = inputs(n, k=5)
    fwd_bwd(fn[impl], x, steps, grad)
    benchmark(fwd_bwd, fn[impl], x, steps, grad)


# C6: thread scaling of our own kernels (>= 1M elements)
def stats_k5(x, steps, grad):
    return ops.quant_stats(x, steps, BITS5)


@pytest.mark.parametrize("n", [1_048_576, 6_422_528])
@pytest.mark.parametrize("kernel", ["1-bit fwd+bwd", "quant_stats K=5"])
@pytest.mark.parametrize("threads", [2, 1])
def bench_thread_scaling(benchmark, n, kernel, threads):
    benchmark.group = f"rfq {kernel}, 2 vs 1 threads n={n}"
    one_bit = kernel == "1-bit fwd+bwd"
    tag(benchmark, "rfq" if threads == 2 else "rfq on 1 thread", "C6", ">=1.7x",
        20 * n if one_bit else 4 * n)
    x, steps, grad = inputs(n, k=1 if one_bit else 5)
    fn = (lambda: fwd_bwd(rfq_one_bit, x, steps, grad)) if one_bit else (
        lambda: stats_k5(x.detach(), steps.detach(), grad))

    def run():
        torch.set_num_threads(threads)
        return fn()

    run()
    benchmark(run)


# E1a's IDM lever: BN + the next conv's quantizer + IDM's feature MSE to a teacher, fwd+bwd, at
# ResNet-20's batch-128 activation shapes (channels_last fp32), against the same three steps
# unfused (what IDM ran before batch_norm_quant_mse). Minimum bytes: x, teacher in and y out
# forward; dy, x, teacher in and dx out backward (28 B/element).
BN_SHAPES = [(128, 16, 28, 28), (128, 32, 14, 14), (128, 64, 7, 7)]


def bn_mse_inputs(shape):
    g = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(memory_format=cl).requires_grad_()
    w = (torch.rand(shape[1], generator=g) + 0.5).requires_grad_()
    b = (torch.randn(shape[1], generator=g) * 0.3).requires_grad_()
    steps = torch.tensor([0.3, 0.1, 0.05], requires_grad=True)
    teacher = torch.randn(shape, generator=g).to(memory_format=cl)
    grad = torch.randn(shape, generator=g).to(memory_format=cl)
    return x, w, b, steps, teacher, grad


def bn_mse_fused(x, w, b, steps, teacher):
    y, _, _, mse = ops.batch_norm_quant_mse(x, w, b, 1e-5, steps, [2, 4, 6], SEL, teacher)
    return y, mse


def bn_mse_unfused(x, w, b, steps, teacher):
    from rfq.nn.modules import FeatureMSE

    z = torch.nn.functional.batch_norm(x, None, None, w, b, True, 0.0, 1e-5)
    return ops.coupled_quant(z, steps, [2, 4, 6], SEL, False), FeatureMSE.apply(z, teacher)


@pytest.mark.parametrize("shape", BN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["rfq", "unfused BN + quantizer + FeatureMSE"])
def bench_bn_quant_mse_fwd_bwd(benchmark, shape, impl):
    benchmark.group = f"BN + quantizer + feature MSE fwd+bwd {shape}"
    tag(benchmark, impl, "E1a lever (IDM)", "-", 28 * torch.Size(shape).numel())
    x, w, b, steps, teacher, grad = bn_mse_inputs(shape)
    fn = bn_mse_fused if impl == "rfq" else bn_mse_unfused

    def run():
        y, mse = fn(x, w, b, steps, teacher)
        return torch.autograd.grad((y, mse), (x, w, b, steps), (grad, torch.tensor(0.01)))

    run()
    benchmark(run)


# E1a's bn2 lever: a residual block's last BN and its shortcut add, fwd+bwd, against ATen's
# F.batch_norm + add (what the blocks ran before batch_norm_add). Minimum bytes: x, residual in
# and y out forward; dy, x in and dx out backward (24 B/element).
def bn_add_unfused(x, w, b, residual):
    return torch.nn.functional.batch_norm(x, None, None, w, b, True, 0.0, 1e-5) + residual


@pytest.mark.parametrize("shape", BN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["rfq", "ATen BN + add"])
def bench_bn_add_fwd_bwd(benchmark, shape, impl):
    benchmark.group = f"BN + shortcut add fwd+bwd {shape}"
    tag(benchmark, impl, "E1a lever (bn2)", "-", 24 * torch.Size(shape).numel())
    x, w, b, _, residual, grad = bn_mse_inputs(shape)
    residual.requires_grad_()

    def fused(x, w, b, residual):
        return ops.batch_norm_add(x, w, b, 1e-5, residual)[0]
    fn = fused if impl == "rfq" else bn_add_unfused

    def run():
        y = fn(x, w, b, residual)
        return torch.autograd.grad(y, (x, w, b, residual), grad)

    run()
    benchmark(run)
