"""Hot-swap training step (issue 14: the wavelet path must not make a step slow): ResNet-20 at
28x28, batch 128, channels_last, fp32, denormals flushed; one sandwich step = the 8-bit pass and
three passes at fixed bits 1, 2 and 5 (two on the wavelet path, one direct), KD, masked update,
EMA, against
- the same 4 forward+backward passes of the float model plus one SGD step (like E1a),
- the identical step with plain-PyTorch quantizers (rfq.reference's twin of coupled_quant, the
  Haar transform being plain PyTorch in both),
- the identical step with the wavelet path off (direct LSQ at 1 and 2 bits too): the ratio is
  what the band path costs (a fused Haar-band op is due if that exceeds 10 % of the step),
- the main method's coupled step (candidates {6..2}, 1 max + 3 random passes, IDM, scheduler).
"""

import os
import shutil
import tempfile

import pytest

from rfq.nn.modules import use_reference_quantizer
from rfq.methods.hotswap.trainer import HotSwapTrainer
from rfq.methods.rfq import TrainConfig

from bench_method import float_four_pass_step, synthetic_dataset, time_step, trainer  # noqa: F401

SMOKE = bool(os.environ.get("RFQ_BENCH_SMOKE"))
BATCH = 16 if SMOKE else 128
BITS = [8, 7, 6, 5, 4, 3, 2, 1]
GROUP = f"ResNet-20 hot-swap training step, batch {BATCH} (4 passes: 8, 1, 2, 5 bits)"


def make_trainer(wavelet: bool):
    from rfq.cli.demo import SHIPPED_FLOAT

    tmp = tempfile.mkdtemp(prefix="rfq-bench-hs-")
    cfg = TrainConfig(mode="hotswap", bits=BITS, depthwise_bits=BITS, wavelet=wavelet,
                      model="resnet20", dataset="synthetic", epochs=1, steps_per_epoch=10**6,
                      batch_size=BATCH, checkpoint_every=10**9, idm=False, scheduler=False,
                      init_from=str(SHIPPED_FLOAT))
    tr = HotSwapTrainer(cfg, tmp, dataset=synthetic_dataset(), progress=False)
    tr.step_configs = lambda: [tr.uniform(b) for b in (1, 2, 5)]
    return tr, tmp


@pytest.fixture(scope="module")
def trainers():
    made = {w: make_trainer(w) for w in (True, False)}
    yield {w: tr for w, (tr, _) in made.items()}
    for tr, tmp in made.values():
        tr.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("impl", ["rfq", "float model, 4 passes", "plain PyTorch quantizers",
                                  "wavelet path off", "main method's coupled step"])
def bench_hotswap_step(benchmark, trainers, trainer, impl):  # noqa: F811 (fixture)
    # trainer: bench_method's coupled-step fixture (the main method's step)
    tr = trainer if impl == "main method's coupled step" else trainers[impl != "wavelet path off"]
    x, y = tr.stream.batch(0, 0)
    benchmark.group = GROUP
    benchmark.extra_info.update(role=impl, target="hot-swap step", floor="(reported)")
    if impl == "float model, 4 passes":
        step = float_four_pass_step(x, y)
    elif impl == "plain PyTorch quantizers":
        def step():
            with use_reference_quantizer():
                tr.train_step(x, y)
    else:
        def step():
            tr.train_step(x, y)
    time_step(benchmark, step)


GROUP_BANDS = "ResNet-20 weight quantizers of one pass, fwd+bwd (18 mixed layers)"


@pytest.mark.parametrize("impl", ["rfq", "direct path at 4 bits"])
def bench_band_path(benchmark, trainers, impl):
    """The band path alone: every mixed layer's quantized weight at 2 bits (Haar, 4 band
    quantizers, inverse; forward and backward) against the direct path at 4 bits. Twice the
    difference (two wavelet passes per step) over the step's time is the band path's share."""
    from rfq.nn import mixed_layers

    model = trainers[True].model
    layers = [m for _, m in mixed_layers(model)]
    bits = 2 if impl == "rfq" else 4
    benchmark.group = GROUP_BANDS
    benchmark.extra_info.update(role=impl, target="hot-swap band path", floor="(reported)")

    def run():
        for m in layers:
            m.set_bits(bits, bits)
        total = sum(m.quantized_weight().sum() for m in layers)
        total.backward()
    try:
        benchmark.pedantic(run, rounds=5 if SMOKE else 30, warmup_rounds=2)
    finally:
        model.set_bits(8)
        model.zero_grad(set_to_none=True)
