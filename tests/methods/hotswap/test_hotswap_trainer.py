"""Hot-swap training on digits (SmallCNN): the sandwich rule's passes, bits outside a step left
untouched in their BN copies and band steps, bit-identical resume, and the CLI."""

import pytest
import torch

from rfq.cli import main
from rfq.data import load_digits_dataset
from rfq.methods.hotswap.trainer import HotSwapTrainer
from rfq.methods.rfq import TrainConfig
from rfq.nn import SwitchableBatchNorm2d

from method_utils import DIGITS

BITS = [8, 7, 6, 5, 4, 3, 2, 1]


def hotswap_config(init_from, **kw) -> TrainConfig:
    return TrainConfig(**{**DIGITS, "mode": "hotswap", "bits": BITS, "depthwise_bits": BITS,
                          "epochs": 2, "steps_per_epoch": 3, "lr": 0.01, "warmup_epochs": 0.0,
                          "ema_decay": 0.99, "idm": False, "scheduler": False,
                          "init_from": str(init_from), **kw})


def test_sandwich_configs_are_uniform_with_the_lowest_bit_first(tmp_path, digits, float_ckpt):
    tr = HotSwapTrainer(hotswap_config(float_ckpt), tmp_path / "r", dataset=digits,
                        progress=False)
    seen = set()
    for _ in range(20):
        configs = tr.step_configs()
        assert len(configs) == 3
        bits = [set(c.values()) for c in configs]
        assert all(len(b) == 1 for b in bits)  # the whole model at one bit-width per pass
        assert bits[0] == {(1, 1)}
        seen |= {next(iter(b))[0] for b in bits[1:]}
    assert seen <= set(range(2, 8)) and len(seen) >= 4
    tr.close()


def test_a_step_leaves_unused_bits_untouched(tmp_path, digits, float_ckpt):
    tr = HotSwapTrainer(hotswap_config(float_ckpt, epochs=1, steps_per_epoch=1), tmp_path / "r",
                        dataset=digits, progress=False)
    used = [8, 1, 5, 3]  # the max pass, then these three
    tr.step_configs = lambda: [tr.uniform(b) for b in used[1:]]
    sbn = [m for m in tr.model.modules() if isinstance(m, SwitchableBatchNorm2d)]
    layers = [m for m in tr.model.modules() if hasattr(m, "band_steps")]
    before = [{k: v.clone() for k, v in m.state_dict().items() if torch.is_tensor(v)}
              for m in sbn]
    band_before = [m.band_steps.detach().clone() for m in layers]
    tr.run()
    for m, old in zip(sbn, before):
        for b in BITS:
            i = BITS.index(b)
            for key in ("weight", "bias", "running_mean", "running_var"):
                same = torch.equal(getattr(m, key)[i, i], old[key][i, i])
                assert same == (b not in used), (key, b)
    for m, old in zip(layers, band_before):
        for b in (3, 2, 1):
            r = m.wavelet_bits.index(b)
            assert torch.equal(m.band_steps[r], old[r]) == (b not in used), b
    tr.close()


def test_resume_is_bit_identical(tmp_path, digits, float_ckpt):
    cfg = hotswap_config(float_ckpt, epochs=2, steps_per_epoch=3, checkpoint_every=100)
    full = HotSwapTrainer(cfg, tmp_path / "full", dataset=digits, progress=False)
    full.run()
    part = HotSwapTrainer(cfg, tmp_path / "part", dataset=digits, progress=False)
    part.run(max_steps=4)
    part.close()
    resumed = HotSwapTrainer(cfg, tmp_path / "part", resume=True, dataset=digits,
                             progress=False)
    assert resumed.step == 4
    resumed.run()
    for model_a, model_b in ((full.model, resumed.model), (full.ema.model, resumed.ema.model)):
        for (n, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
            if torch.is_tensor(a):
                assert torch.equal(a, b), n


def test_cli_train_and_eval(tmp_path, float_ckpt, capsys):
    out = tmp_path / "hs"
    common = ["--model", "smallcnn", "--set", "dataset='digits'", "--set", "channels_last=False",
              "--batch-size", "64"]
    assert main(["hotswap", "train", "--init-from", str(float_ckpt), "--out", str(out),
                 "--epochs", "1", "--steps-per-epoch", "3", "--no-progress", *common]) == 0
    capsys.readouterr()
    from rfq.cli import pipeline
    orig = pipeline.load_run
    pipeline.load_run = lambda path, data_dir=None: orig(path, dataset=load_digits_dataset())
    try:
        assert main(["hotswap", "eval", "--checkpoint", str(out), "--bits", "8,3,1",
                     "--json", str(tmp_path / "e.json")]) == 0
        text = capsys.readouterr().out
        assert "W8A8:" in text and "W3A3:" in text and "W1A1:" in text
        import json
        rows = json.loads((tmp_path / "e.json").read_text())["rows"]
        assert [r["bits"] for r in rows] == [8, 3, 1]
        assert rows[0]["size_kib"] > rows[1]["size_kib"] > rows[2]["size_kib"]
        assert main(["hotswap", "export", "--checkpoint", str(out), "--bits", "2",
                     "--out", str(tmp_path / "w2.safetensors")]) == 0
        from rfq import deploy
        loaded = deploy.load(tmp_path / "w2.safetensors")
        assert any(getattr(m, "code", None) == "haar" for m in loaded.modules())
        # the generic `rfq export` (which also recalibrates BN) writes a hot-swap model's
        # wavelet layers as the same band codes
        assert main(["export", "--checkpoint", str(out), "--bits", "2", "--calib-images", "0",
                     "--out", str(tmp_path / "g2.safetensors")]) == 0
        generic = deploy.load(tmp_path / "g2.safetensors")
        for (n, a), (_, b) in zip(loaded.named_modules(), generic.named_modules()):
            if hasattr(a, "packed"):
                assert a.code == b.code and torch.equal(a.codes(), b.codes()), n
        with pytest.raises(SystemExit, match=r"--bits \[9\] are not bit-widths"):
            main(["hotswap", "eval", "--checkpoint", str(out), "--bits", "9"])
        with pytest.raises(SystemExit, match="not a hot-swap one"):
            main(["hotswap", "eval", "--checkpoint", str(float_ckpt)])
    finally:
        pipeline.load_run = orig
