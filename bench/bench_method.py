"""The method's own speed (issue 6 targets E1a, E1b, E2): ResNet-20 at 28x28, batch 128,
channels_last, fp32, denormals flushed, on both sides of every ratio.

- E1a: one coupled training step (1 max + 3 random passes, KD, IDM, masked update, EMA) vs the
  same 4 forward+backward passes of the float model plus one SGD step. Overhead = the inverse
  ratio; floor <= 1.10x, stretch <= 1.03x.
- E1b: the same coupled step vs the identical step whose quantizers are rfq.reference's plain
  PyTorch expressions instead of the fused ops (floor 1.3x).
- E2: a whole greedy search to a fixed BitOps budget, cached evaluation (shared prefix stages,
  quantized weights made once per (layer, bit)) vs the straightforward one (a full forward per
  candidate, weights re-quantized each time); the bench checks that both choose the identical
  config (floor 2x, stretch 4x).
The model starts from the shipped float ResNet-20 (so the search's errors mean something);
E1 trains on synthetic tensors of the Fashion-MNIST shapes (the timing does not depend on the
pixels); E2 scores on Fashion-MNIST's held-out images when the dataset is installed, else on
synthetic ones.
"""

import os
import shutil
import tempfile

import pytest
import torch
import torch.nn.functional as F

from rfq.data import Dataset, Split
from rfq.models import build_model
from rfq.nn.modules import use_reference_quantizer
from rfq.methods.rfq import TrainConfig, CoupledTrainer as Trainer
from rfq.runtime import flush_denormals

SMOKE = bool(os.environ.get("RFQ_BENCH_SMOKE"))
BATCH = 16 if SMOKE else 128


def synthetic_dataset(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g)
    split = Split(images, labels)
    return Dataset("synthetic", split, split, split, 0.286, 0.353)


@pytest.fixture(scope="module")
def trainer():
    tmp = tempfile.mkdtemp(prefix="rfq-bench-")
    from rfq.cli.demo import SHIPPED_FLOAT

    cfg = TrainConfig(mode="coupled", model="resnet20", dataset="synthetic", epochs=1,
                      steps_per_epoch=10**6, batch_size=BATCH, checkpoint_every=10**9,
                      init_from=str(SHIPPED_FLOAT))
    tr = Trainer(cfg, tmp, dataset=synthetic_dataset(), progress=False)
    yield tr
    tr.close()
    shutil.rmtree(tmp, ignore_errors=True)


def tag(benchmark, role, target, floor, group):
    benchmark.group = group
    benchmark.extra_info.update(role=role, target=target, floor=floor)


GROUP_STEP = f"ResNet-20 training step, batch {BATCH} (4 passes)"


def time_step(benchmark, step) -> None:
    """A whole training step, timed with denormals flushed (as the trainers run)."""
    from rfq.runtime import flush_denormals

    with flush_denormals():
        step()
        benchmark.pedantic(step, rounds=3 if SMOKE else 10, warmup_rounds=1 if SMOKE else 2)


def float_four_pass_step(x, y, passes=4, channels_last=True):
    """The float ResNet-20's 4 forward+backward passes on (x, y) plus one SGD step: E1a's
    baseline (and the hot-swap step's; one NCHW pass: the CSQ step's)."""
    torch.manual_seed(0)
    model = build_model("resnet20")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)

    def step():
        opt.zero_grad(set_to_none=True)
        for _ in range(passes):
            F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


@pytest.mark.parametrize("impl", ["rfq", "float model, 4 passes", "plain PyTorch quantizers"])
def bench_training_step(benchmark, trainer, impl):
    x, y = trainer.stream.batch(0, 0)
    tag(benchmark, impl, "E1a (float) / E1b (plain quantizers)", "<=1.10x overhead / >=1.3x",
        GROUP_STEP)
    if impl == "float model, 4 passes":
        step = float_four_pass_step(x, y)
    elif impl == "rfq":
        def step():
            trainer.train_step(x, y)
    else:
        def step():
            with use_reference_quantizer():
                trainer.train_step(x, y)
    with flush_denormals():
        step()
        benchmark.pedantic(step, rounds=3 if SMOKE else 12, warmup_rounds=1 if SMOKE else 3)


@pytest.fixture(scope="module")
def search_setup(trainer):
    from rfq.cost import CostModel

    model = trainer.ema.model
    costs = CostModel(model, (1, 28, 28))
    level = 4.9 if SMOKE else 4.75
    return model, costs, level_costs(model, costs, [level])[0]


def level_costs(model, costs, levels):
    """BitOps of uniform levels (budget_levels needs only a run's model and costs)."""
    from types import SimpleNamespace

    from rfq.cli.pipeline import budget_levels

    return budget_levels(SimpleNamespace(model=model, costs=costs), levels)


def score_images():
    """Held-out Fashion-MNIST images (normalized, channels_last) or synthetic stand-ins."""
    from rfq.data import load_fashion_mnist, normalize

    try:
        ds = load_fashion_mnist()
        images = normalize(ds.holdout.images, ds.mean, ds.std)
        labels = ds.holdout.labels
    except FileNotFoundError:
        g = torch.Generator().manual_seed(1)
        images = torch.randn(1024, 1, 28, 28, generator=g)
        labels = torch.randint(0, 10, (1024,), generator=g)
    return images.contiguous(memory_format=torch.channels_last), labels


CHOSEN = {}


GREEDY_IMPLS = {  # impl: (cached, integer convs)
    "rfq": (True, True),
    "straightforward search": (False, True),
    "rfq, float convs": (True, False),
    "straightforward search, float convs": (False, False),
}


@pytest.mark.parametrize("impl", list(GREEDY_IMPLS))
def bench_greedy_search(benchmark, search_setup, impl):
    """E2: rfq's search vs the straightforward one, both with the convs after a ReLU on integer
    codes (the same arithmetic: the identical config is asserted); the float-conv pair shows
    what the integer convs add, and the float straightforward search is the earlier baseline
    (its config can differ: fp32 rounding is amplified by the quantizers, see bench/README)."""
    from rfq.methods.rfq.search import GreedySearch, ScoreBatches

    model, costs, target = search_setup
    batch = 32 if SMOKE else 256
    tag(benchmark, impl, "E2", ">=3x (identical config)",
        f"greedy search ResNet-20 to {target / 1e6:.0f}M BitOps, {batch}-image scores")
    images, labels = score_images()
    cached, integer = GREEDY_IMPLS[impl]

    def search():
        scores = ScoreBatches(images, labels, batch, seed=0)
        searcher = GreedySearch(model, costs, scores, fast=cached)
        searcher.integer_convs = integer
        with flush_denormals():
            return searcher.run(target)

    result = benchmark.pedantic(search, rounds=1 if SMOKE else 2, warmup_rounds=0)
    CHOSEN[impl] = result.config
    benchmark.extra_info["moves"] = result.iterations
    benchmark.extra_info["evaluations"] = result.evaluations
    for a, b in (("rfq", "straightforward search"),
                 ("rfq, float convs", "straightforward search, float convs")):
        if a in CHOSEN and b in CHOSEN:
            assert CHOSEN[a] == CHOSEN[b], f"{a} and {b} chose different configs"
    if impl != "rfq" and "rfq" in CHOSEN:
        benchmark.extra_info["same config as rfq"] = CHOSEN["rfq"] == result.config


# the smoke run (CI) keeps every budget near the greedy search's start (uniform 5): few moves
FRONT_LEVELS = ([4.3, 4.4, 4.5, 4.6, 4.7, 4.8, 4.9, 4.95] if SMOKE
                else [2.25, 2.5, 2.75, 3, 3.5, 4, 4.5, 5])
# the greedy side searches to the demo's greedy budget; lower budgets only take it longer
GREEDY_LEVEL = 4.9 if SMOKE else 3.5


@pytest.mark.parametrize("impl", ["rfq", "greedy search, one budget"])
def bench_frontier_search(benchmark, search_setup, impl):
    """E2f: the frontier search's whole front (8 budgets, measured, solved and refined each)
    vs one greedy search to one of its budgets (level 3.5), the same held-out scores."""
    from rfq.methods.rfq.frontier import FrontierSearch
    from rfq.methods.rfq.search import GreedySearch, ScoreBatches

    model, costs, _ = search_setup
    targets = level_costs(model, costs, FRONT_LEVELS)
    batch = 32 if SMOKE else 256
    tag(benchmark, impl, "E2f", "front of >=8 budgets faster than 1 greedy budget",
        f"ResNet-20: frontier search, {len(targets)} budgets vs greedy search to level "
        f"{GREEDY_LEVEL:g}, {batch}-image scores")
    images, labels = score_images()

    def search():
        scores = ScoreBatches(images, labels, batch, seed=0)
        with flush_denormals():
            if impl == "rfq":
                return FrontierSearch(model, costs, scores).run_all(targets)
            greedy_target = targets[FRONT_LEVELS.index(GREEDY_LEVEL)]
            return [GreedySearch(model, costs, scores).run(greedy_target)]

    results = benchmark.pedantic(search, rounds=1, warmup_rounds=0)
    benchmark.extra_info["evaluations"] = sum(r.evaluations for r in results)
    assert all(r.reached for r in results)


SEARCH_CONVS = [(16, 28), (32, 14), (64, 7)]  # ResNet-20's 3x3 convs at 28x28 input


@pytest.mark.parametrize("channels, size", SEARCH_CONVS)
@pytest.mark.parametrize("impl", ["rfq", "fp32 conv of the fake-quantized tensors"])
def bench_integer_conv(benchmark, impl, channels, size):
    """The search's convs: integer_conv2d on 5-bit codes vs the fp32 conv of the same
    fake-quantized tensors (what the float path runs), batch 256, channels_last."""
    from rfq import ops

    if not ops.integer_conv_fast("cpu"):
        pytest.skip("no integer convolution on this CPU (x86 oneDNN with VNNI)")
    batch = 16 if SMOKE else 256
    tag(benchmark, impl, "E2 (conv)", "faster than fp32",
        f"3x3 conv {channels}->{channels} at {size}x{size}, batch {batch}, 5-bit codes")
    g = torch.Generator().manual_seed(channels)
    cl = torch.channels_last
    x_codes = torch.randint(0, 32, (batch, channels, size, size), generator=g,
                            dtype=torch.uint8).contiguous(memory_format=cl)
    w_codes = torch.randint(-16, 16, (channels, channels, 3, 3), generator=g, dtype=torch.int8)
    xs, ws = 0.05, 0.01
    if impl == "rfq":
        packed = ops.pack_conv_codes(w_codes, ws, 1, 1)

        def conv():
            return ops.integer_conv2d(x_codes, xs, packed)
    else:
        xq = (x_codes.float() * xs).contiguous(memory_format=cl)
        wq = (w_codes.float() * ws).contiguous(memory_format=cl)

        def conv():
            return F.conv2d(xq, wq, None, 1, 1)
    benchmark(conv)
