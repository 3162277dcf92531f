"""CSQ (issue 15): the fused bit-level weight op against the official code's eager composition
and torch.compile of that composition, forward + backward, on a ResNet-20-sized layer
(64x64x3x3) and a ResNet-18-sized one (512x512x3x3), N = 8 planes, fp32; and the whole CSQ
training step (ResNet-20 at 28x28, batch 128, NCHW, 4-bit inputs) built with each weight path,
against the float model's step.

Floors (issue 15): the fused op 3x the eager composition and 1.3x the compiled one on both
layers. The roofline: one forward + backward must read p and q twice and grad_w once, and
write w, dp and dq: (6N + 2) x 4 bytes per weight. The ``copy`` role clones a tensor of half
that many bytes (it reads and writes each once): the memory bound this machine reaches.
"""

import os
import shutil
import tempfile

import pytest
import torch

from rfq import ops
from rfq import reference as ref
from rfq.methods.csq import CsqConfig, CsqTrainer
from rfq.methods.csq.modules import use_composed_weight
from rfq.runtime import retain_freed_memory

from bench_method import float_four_pass_step, synthetic_dataset, time_step

SMOKE = bool(os.environ.get("RFQ_BENCH_SMOKE"))
PLANES = 8
LAYERS = {"ResNet-20 layer 64x64x3x3": (64, 64, 3, 3),
          "ResNet-18 layer 512x512x3x3": (128, 128, 3, 3) if SMOKE else (512, 512, 3, 3)}
IMPLS = ["rfq", "eager composition", "torch.compile of the composition", "copy (memory bound)"]

_compiled = torch.compile(ref.csq_weight_composed, dynamic=False)


def make_layer(shape):
    g = torch.Generator().manual_seed(0)
    p, q = (torch.randn((PLANES, *shape), generator=g).requires_grad_(True) for _ in range(2))
    m = torch.randn(PLANES, generator=g).requires_grad_(True)
    scale = torch.tensor(0.3, requires_grad=True)
    return p, q, m, scale, torch.tensor(5.0), torch.randn(shape, generator=g)


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("impl", IMPLS)
def bench_csq_weight(benchmark, layer, impl):
    retain_freed_memory()
    p, q, m, scale, beta, grad_w = make_layer(LAYERS[layer])
    leaves = (p, q, m, scale)
    benchmark.group = f"csq_weight forward + backward, {layer}, N = {PLANES}"
    benchmark.extra_info.update(role=impl, target="csq_weight", floor="3x eager, 1.3x compiled",
                                min_bytes=(6 * PLANES + 2) * 4 * grad_w.numel())
    if impl == "copy (memory bound)":
        big = torch.ones((6 * PLANES + 2) * grad_w.numel() // 2)

        def step():
            big.clone()
    else:
        fn = {"rfq": ops.csq_weight, "eager composition": ref.csq_weight_composed,
              "torch.compile of the composition": _compiled}[impl]

        def step():
            for t in leaves:
                t.grad = None
            fn(p, q, m, scale, beta).backward(grad_w)
    step()
    benchmark.pedantic(step, rounds=3 if SMOKE else 15, warmup_rounds=1 if SMOKE else 3)


BATCH = 16 if SMOKE else 128
GROUP_STEP = f"ResNet-20 CSQ training step, batch {BATCH}, N = {PLANES}"


@pytest.fixture(scope="module")
def csq_trainer():
    from rfq.cli.demo import SHIPPED_FLOAT

    tmp = tempfile.mkdtemp(prefix="rfq-bench-csq-")
    cfg = CsqConfig(model="resnet20", dataset="synthetic", batch_size=BATCH, planes=PLANES,
                    steps_per_epoch=10**6,
                    round_epochs=1, ticket_epochs=0, checkpoint_every=10**9, channels_last=False,
                    ema_decay=0.0, init_from=str(SHIPPED_FLOAT))
    tr = CsqTrainer(cfg, tmp, dataset=synthetic_dataset(), progress=False)
    yield tr
    tr.close()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("impl", ["rfq", "eager composition", "float model"])
def bench_csq_step(benchmark, csq_trainer, impl):
    tr = csq_trainer
    x, y = tr.stream.batch(0, 0)
    benchmark.group = GROUP_STEP
    benchmark.extra_info.update(role=impl, target="CSQ step", floor="(reported)")
    if impl == "float model":
        step = float_four_pass_step(x, y, passes=1, channels_last=False)
    elif impl == "eager composition":
        def step():
            with use_composed_weight():
                tr.train_step(x, y)
    else:
        def step():
            tr.train_step(x, y)
    time_step(benchmark, step)
