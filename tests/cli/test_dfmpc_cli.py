"""`rfq dfmpc` end to end on the CLI tests' float SmallCNN (digits), and its bad input."""

import json

import pytest
import torch

from rfq import checkpoint as ckpt
from rfq import deploy, ops
from rfq.cli import main
from rfq.cli import pipeline
from rfq.data import load_digits_dataset
from rfq.training.metrics import evaluate


def test_dfmpc_writes_report_and_an_evaluable_model(runs, capsys):
    out = runs / "dfmpc"
    assert main(["dfmpc", "--checkpoint", str(runs / "float"), "--bits", "3/6",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "DF-MPC 3/6 on smallcnn: 1 pairs" in text and "uncompensated" in text
    report = json.loads((out / "report.json").read_text())
    assert report["pairs"][0]["low"] == "stem.0" and report["pairs"][0]["high"] == "body1.0"
    assert report["layers"]["stem.0"] == {"bits": 3, "kind": "dorefa", "params": 144}
    assert 0 <= report["uncompensated"] <= 1 and 0 <= report["dfmpc"] <= 1
    # model.pt is a float checkpoint of the compensated model: rfq eval gives the same number
    run = pipeline.load_run(out / "model.pt", dataset=load_digits_dataset())
    assert evaluate(run.model, pipeline.test_batches(run)) == report["dfmpc"]
    # every stored code reproduces its layer's weight exactly
    saved = ckpt.load(out / "model.pt", kind="float")
    for name, q in saved["codes"].items():
        w = (ops.dequantize_ternary(q["codes"], q["scale"]) if q["kind"] == "ternary"
             else ops.dequantize_dorefa(q["codes"], q["scale"], q["bits"]))
        if q["channel_scale"] is not None:
            w = w * q["channel_scale"].reshape(-1, *([1] * (w.dim() - 1)))
        assert torch.equal(w, saved["model"][f"{name}.weight"])
    # model.safetensors: the same model from packed codes through the deploy path, same top-1
    deployed = deploy.load(out / "model.safetensors")
    assert evaluate(deployed, pipeline.test_batches(run)) == report["dfmpc"]


def test_explicit_pairs(runs):
    out = runs / "explicit"
    assert main(["dfmpc", "--checkpoint", str(runs / "float"), "--bits", "2/6",
                 "--pairs", "stem.0:body1.0", "--out", str(out), "--no-eval"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert "dfmpc" not in report and report["layers"]["stem.0"]["kind"] == "ternary"


@pytest.mark.parametrize("argv, match", [
    (["--bits", "2-6"], r"--bits takes LOW/HIGH, e.g. 2/6, got '2-6'"),
    (["--bits", "1/6"], r"--bits 1/6: the low bit-width must be in 2..8"),
    (["--bits", "6/9"], r"--bits 6/9: the high bit-width must be in 2..8"),
    (["--bits", "6/4"], r"--bits 6/4: the low bit-width must not exceed the high"),
    (["--pairs", "stem.0"], r"--pairs takes LOW:HIGH"),
    (["--pairs", "body1.0:body2.0,stem.0:body1.0"], r"'body1.0' is in two pairs"),
    (["--pairs", "stem.0:body2.0"], r"\('stem.0', 'body2.0'\) is not a safe pair"),
    (["--lam1", "-1"], r"lam1 must be a finite number >= 0"),
])
def test_bad_input_is_named_and_writes_nothing(runs, argv, match):
    out = runs / "bad"
    with pytest.raises(SystemExit, match=match):
        main(["dfmpc", "--checkpoint", str(runs / "float"), "--out", str(out), *argv])
    assert not out.exists()


def test_a_quantized_checkpoint_is_refused(runs, tmp_path):
    with pytest.raises(SystemExit, match="holds a coupled model; DF-MPC starts from a float"):
        main(["dfmpc", "--checkpoint", str(runs / "coupled"), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(SystemExit, match="rfq dfmpc: checkpoint .*nothing.pt does not exist"):
        main(["dfmpc", "--checkpoint", str(tmp_path / "nothing.pt"), "--out", str(tmp_path)])
