"""`python -m rfq showcase`: a few-second tour of the fused ops.

Trains one small MLP on scikit-learn's digits with weights shared across bit-widths: every step
re-selects the bit-width of every quantizer (``sel.fill_``, no recompile, no host sync) and the
forward/backward runs through ``torch.ops.rfq.coupled_quant``. Then it evaluates the one model at
each uniform bit-width, prints the per-layer turbulence from ``quant_stats``, and times a
quantizer forward+backward against the plain-PyTorch reference.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from rfq import ops
from rfq import reference as ref

CANDIDATES = [6, 5, 4, 3, 2]


class CoupledQuantLinear(torch.nn.Module):
    """Linear layer with one float weight and per-candidate LSQ steps for weight and input."""

    def __init__(self, fan_in: int, fan_out: int, bits=CANDIDATES):
        super().__init__()
        self.bits = list(bits)
        self.linear = torch.nn.Linear(fan_in, fan_out)
        w = self.linear.weight.detach()
        # LSQ init per candidate: 2 mean|w| / sqrt(Q_P)
        self.w_steps = torch.nn.Parameter(torch.tensor(
            [2 * w.abs().mean().item() / math.sqrt(2 ** (b - 1) - 1 or 1) for b in self.bits]))
        self.a_steps = torch.nn.Parameter(torch.tensor(
            [4.0 / (2**b - 1) for b in self.bits]))
        self.register_buffer("sel", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        q = len(self.bits)
        xq = ops.coupled_quant(x.relu(), self.a_steps, self.bits, self.sel, False,
                               1.0 / math.sqrt(x[0].numel() * q))
        wq = ops.coupled_quant(self.linear.weight, self.w_steps, self.bits, self.sel, True,
                               1.0 / math.sqrt(self.linear.weight.numel() * q))
        return F.linear(xq, wq, self.linear.bias)


def load_digits_tensors():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 4.0  # 0..16 -> 0..4
    y = torch.tensor(data.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def main(steps: int = 400, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    (xt, yt), (xv, yv) = load_digits_tensors()
    layers = [CoupledQuantLinear(64, 128), CoupledQuantLinear(128, 10)]
    model = torch.nn.Sequential(layers[0], layers[1])
    step_params = [p for n, p in model.named_parameters() if n.endswith("_steps")]
    other_params = [p for n, p in model.named_parameters() if not n.endswith("_steps")]
    # step sizes are ~1e-2: Adam's per-step move must be far smaller than that
    opt = torch.optim.Adam([{"params": other_params, "lr": 3e-3},
                            {"params": step_params, "lr": 2e-4}])
    rng = torch.Generator().manual_seed(seed)
    print(f"rfq showcase: 64-128-10 MLP on digits, candidates {CANDIDATES}, CPU kernels "
          f"{ops.cpu_capability()}")
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(yt), (64,), generator=rng)
        for layer in layers:  # a random bit-width per layer, every step
            layer.sel.fill_(int(torch.randint(0, len(CANDIDATES), (), generator=rng)))
        loss = F.cross_entropy(model(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():  # step sizes must stay positive (the kernels reject s <= 0)
            for layer in layers:
                layer.w_steps.clamp_(min=1e-5)
                layer.a_steps.clamp_(min=1e-5)
    print(f"trained {steps} steps with random per-layer bit-widths in "
          f"{time.perf_counter() - t0:.1f} s")

    results = {}
    with torch.no_grad():
        for j, b in enumerate(CANDIDATES):
            for layer in layers:
                layer.sel.fill_(j)
            acc = (model(xv).argmax(1) == yv).float().mean().item()
            results[b] = acc
    print("\nthe one model at each uniform bit-width (no retraining):")
    print("  bits | val accuracy")
    for b, acc in results.items():
        print(f"  {b:4d} | {acc * 100:6.2f} %")

    print("\nturbulence per layer (quant_stats, delta=0.125): mean_b share_b / b")
    for i, layer in enumerate(layers):
        mse, share = ops.quant_stats(layer.linear.weight.detach(), layer.w_steps.detach(),
                                     CANDIDATES, True)
        turb = (share / torch.tensor(CANDIDATES, dtype=torch.float32)).mean().item()
        print(f"  layer {i}: turbulence {turb:.4f}, weight MSE per bit "
              + ", ".join(f"{b}b {m:.2e}" for b, m in zip(CANDIDATES, mse.tolist())))

    x = torch.randn(1_000_000, requires_grad=True)
    s = torch.tensor([0.05], requires_grad=True)
    sel = torch.zeros((), dtype=torch.long)
    g = torch.randn(1_000_000)

    def timed(fn, reps=20):
        fn()
        t = time.perf_counter()
        for _ in range(reps):
            torch.autograd.grad(fn(), (x, s), g)
        return (time.perf_counter() - t) / reps * 1e3

    fused = timed(lambda: ops.coupled_quant(x, s, [4], sel))
    plain = timed(lambda: ref.coupled_quant(x, s, [4], sel))
    print(f"\n1M-element 4-bit quantizer fwd+bwd: rfq {fused:.2f} ms, plain PyTorch "
          f"{plain:.2f} ms ({plain / fused:.1f}x)")
    return results
