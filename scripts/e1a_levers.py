"""E1a (issue 17): the coupled training step against the float model's, each lever measured
separately, **interleaved** in one process (drift between variants cancels), with the run's
own memory bandwidth next to it.

Variants, one timed step of each per cycle, the order rotating; each timed step follows an
untimed step of the same variant (as in training, where a step follows one of its kind: the
step after a different variant pays for the other's memory pattern; --no-warm times that):
  float      the float ResNet-20's 4 forward+backward passes + one SGD step (E1a's baseline)
  coupled    rfq's coupled step as shipped (BN + input quantizer fused in every ResNet block,
             and each block's last BN + shortcut add)
  unfused    the same step with BN and the input quantizer as two ops, and ATen's BN + add
             for each block's last BN (unfused_input_quant)
  bn2-unfused  the same step with each block's last BN + shortcut add as ATen's BN and an add
             (the other fusions kept): what batch_norm_add gives
  py-grad    the same step with coupled_quant's autograd in Python (a torch.autograd.Function
             around the same two ops: what torch.library.register_autograd did before the C++
             registration in csrc/autograd.cpp)
  idm-unfused  the same step with the BNs that IDM keeps or compares unfused (F.batch_norm,
             the quantizer, FeatureMSE): how IDM ran with hooks, before batch_norm_quant_mse
  identity   the same step with every quantizer replaced by the identity and every ReLU
             explicit, i.e. the float model's ops: what the method's machinery (KD, IDM,
             stacked BN, masked update, EMA, clamps) costs by itself
  no-idm     identity without the IDM feature loss: what is left of that machinery

    python scripts/e1a_levers.py [--rounds 5] [--cycles 6] [--batch 128] [--variants a,b]
                                 [--no-warm]

Prints per round the median step times and the ratios to the float step, then the median and
range over rounds; and each round's fp32 clone (read + write) and sum (read) bandwidth.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
from bench_method import float_four_pass_step, synthetic_dataset  # noqa: E402

from rfq import models  # noqa: E402
from rfq.cli.demo import SHIPPED_FLOAT  # noqa: E402
from rfq.methods.rfq import CoupledTrainer, TrainConfig  # noqa: E402
from rfq.nn import modules  # noqa: E402
from rfq.runtime import flush_denormals  # noqa: E402


@contextlib.contextmanager
def identity_quantizers():
    """Every quantizer the identity, and the blocks' ReLUs all explicit (an unsigned quantizer
    no longer stands in for one), so that the passes run exactly the float model's ops."""
    clamps = models.input_clamps_at_zero
    modules._quantizer[0] = lambda x, *args: x
    models.input_clamps_at_zero = lambda layer: False
    try:
        with modules.unfused_input_quant():
            yield
    finally:
        modules._quantizer[0] = modules.ops.coupled_quant
        models.input_clamps_at_zero = clamps


class PythonAutogradQuant(torch.autograd.Function):
    """coupled_quant with its backward in Python (the same two ops)."""

    @staticmethod
    def forward(ctx, x, steps, bits, sel, signed, grad_scale):
        ctx.save_for_backward(x, steps, sel)
        ctx.bits, ctx.signed, ctx.grad_scale = bits, signed, grad_scale
        return torch.ops.rfq.coupled_quant.default(x, steps, list(bits), sel, signed, grad_scale)

    @staticmethod
    def backward(ctx, grad_y):
        x, steps, sel = ctx.saved_tensors
        grad_x, grad_steps = torch.ops.rfq.coupled_quant_backward.default(
            grad_y, x, steps, list(ctx.bits), sel, ctx.signed, ctx.grad_scale)
        return grad_x, grad_steps, None, None, None, None


@contextlib.contextmanager
def idm_unfused():
    """BNs that IDM keeps or compares do not fuse with the next quantizer (as with hooks)."""
    fusable = modules.QuantLayer._fusable_after

    def unless_matched(self, bn, x):
        return (fusable(self, bn, x) and getattr(bn, "match_teacher", None) is None
                and not getattr(bn, "match_keep", False))
    modules.QuantLayer._fusable_after = unless_matched
    try:
        yield
    finally:
        modules.QuantLayer._fusable_after = fusable


@contextlib.contextmanager
def shortcut_add_unfused():
    """Each block's last switchable BN as F.batch_norm and a separate add (as before
    batch_norm_add)."""
    fused = modules.SwitchableBatchNorm2d.forward_add
    modules.SwitchableBatchNorm2d.forward_add = lambda bn, x, residual: bn(x) + residual
    try:
        yield
    finally:
        modules.SwitchableBatchNorm2d.forward_add = fused


@contextlib.contextmanager
def python_autograd():
    modules._quantizer[0] = PythonAutogradQuant.apply
    try:
        yield
    finally:
        modules._quantizer[0] = modules.ops.coupled_quant


def bandwidth(mb: int = 256) -> tuple[float, float]:
    """(clone GB/s counting read + write, sum GB/s) over a fresh fp32 buffer, best of 3."""
    x = torch.ones(mb << 18)
    best_c = best_s = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        y = x.clone()
        best_c = min(best_c, time.perf_counter() - t)
        t = time.perf_counter()
        x.sum()
        best_s = min(best_s, time.perf_counter() - t)
        del y
    return 2 * x.nbytes / best_c / 1e9, x.nbytes / best_s / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cycles", type=int, default=6, help="steps of each variant per round")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--variants", default=None,
                    help="comma-separated subset of the variants (float always runs)")
    ap.add_argument("--no-warm", dest="warm", action="store_false",
                    help="time each variant right after the previous variant's step")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="rfq-e1a-")
    cfg = TrainConfig(mode="coupled", model="resnet20", dataset="synthetic", epochs=1,
                      steps_per_epoch=10**6, batch_size=args.batch, checkpoint_every=10**9,
                      init_from=str(SHIPPED_FLOAT))
    trainer = CoupledTrainer(cfg, tmp, dataset=synthetic_dataset(), progress=False)
    x, y = trainer.stream.batch(0, 0)
    float_step = float_four_pass_step(x, y)

    def coupled():
        trainer.train_step(x, y)

    def unfused():
        with modules.unfused_input_quant():
            trainer.train_step(x, y)

    def py_grad():
        with python_autograd():
            trainer.train_step(x, y)

    def bn2_unfused():
        with shortcut_add_unfused():
            trainer.train_step(x, y)

    def idm_unfused_step():
        with idm_unfused():
            trainer.train_step(x, y)

    def identity():
        with identity_quantizers():
            trainer.train_step(x, y)

    def no_idm():
        tap, trainer.tap = trainer.tap, None
        try:
            identity()
        finally:
            trainer.tap = tap

    variants = {"float": float_step, "coupled": coupled, "unfused": unfused,
                "bn2-unfused": bn2_unfused, "py-grad": py_grad,
                "idm-unfused": idm_unfused_step, "identity": identity, "no-idm": no_idm}
    if args.variants:
        keep = {"float", *args.variants.split(",")}
        unknown = keep - set(variants)
        if unknown:
            ap.error(f"--variants: unknown {sorted(unknown)}; known: {sorted(variants)}")
        variants = {n: f for n, f in variants.items() if n in keep}
    names = list(variants)
    ratios = {n: [] for n in names[1:]}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{'each timed step after an untimed one of its kind' if args.warm else 'no warm step'}")
    try:
        with flush_denormals():
            for fn in variants.values():  # warm-up (allocator, activation-step init)
                fn()
                fn()
            for r in range(args.rounds):
                times = {n: [] for n in names}
                for c in range(args.cycles):
                    order = names[c % len(names):] + names[:c % len(names)]
                    for n in order:
                        if args.warm:  # as in training: the timed step follows one of its kind
                            variants[n]()
                        t = time.perf_counter()
                        variants[n]()
                        times[n].append(time.perf_counter() - t)
                med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
                clone_gbs, sum_gbs = bandwidth()
                row = "  ".join(f"{n} {med[n]:.0f} ms" for n in names)
                rel = "  ".join(f"{n} {med[n] / med['float']:.3f}x" for n in names[1:])
                print(f"round {r + 1}: {row} | {rel} | clone {clone_gbs:.1f} GB/s, "
                      f"sum {sum_gbs:.1f} GB/s", flush=True)
                for n in names[1:]:
                    ratios[n].append(med[n] / med["float"])
    finally:
        trainer.close()
        shutil.rmtree(tmp, ignore_errors=True)
    for n in names[1:]:
        v = ratios[n]
        print(f"{n} / float: median {statistics.median(v):.3f}x, range "
              f"{min(v):.3f}-{max(v):.3f}x over {len(v)} rounds")


if __name__ == "__main__":
    main()
