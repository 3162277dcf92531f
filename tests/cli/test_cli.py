"""The CLI end to end on digits (train float -> train coupled -> search -> eval -> export),
the exported packed model, and clear errors for bad settings."""

import json

import pytest
import torch

from rfq.cli import main
from rfq.data import load_digits_dataset
from rfq import deploy
from rfq.deploy.export import to_packed
from rfq.nn import current_config, mixed_layers, set_bits
from rfq.cli.pipeline import calibration_batches, evaluate_config, load_run, score_batches

from cli_args import COMMON

def test_train_writes_checkpoint_log_and_config(runs):
    log = (runs / "coupled" / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,epoch,lr,loss_max,loss_random")
    assert int(log[-1].split(",")[0]) == 30
    cfg = json.loads((runs / "coupled" / "config.json").read_text())
    assert cfg["mode"] == "coupled" and cfg["epochs"] == 2


def test_search_eval_export(runs, capsys):
    out = runs / "search.json"
    assert main(["search", "--checkpoint", str(runs / "coupled"), "--budget", "level:3.5",
                 "--budget", "6M", "--batch-size", "128", "--calib-images", "256",
                 "--uniform", "3,4", "--out", str(out), "--plot", str(runs / "p.png")]) == 0
    text = capsys.readouterr().out
    assert "| coupled, greedy <" in text and "| coupled, uniform | 3/3" in text
    data = json.loads(out.read_text())
    assert len(data["searched"]) == 2 and all(s["reached"] for s in data["searched"])
    assert (runs / "p.png").stat().st_size > 1000
    assert main(["eval", "--checkpoint", str(runs / "coupled"), "--result", str(out),
                 "--index", "1", "--calib-images", "256"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert main(["export", "--checkpoint", str(runs / "coupled"), "--result", str(out),
                 "--index", "1", "--out", str(runs / "model.safetensors"),
                 "--calib-images", "256"]) == 0
    assert "fp32 weights are" in capsys.readouterr().out
    loaded = deploy.load(runs / "model.safetensors")
    searched = data["searched"][1]["config"]
    packed = {n: m for n, m in loaded.named_modules() if hasattr(m, "packed")}
    assert {n: [packed[n].w_bit, packed[n].a_bit] for n in searched} == searched


@pytest.mark.parametrize("flags, convs", [([], "integer"), (["--float-convs"], "float")])
def test_search_records_its_conv_arithmetic(runs, capsys, flags, convs):
    from rfq import ops

    if convs == "integer" and not ops.integer_conv_fast("cpu"):
        convs = "float"  # no integer convolution on this CPU: the search says so
    out = runs / f"search-{convs}.json"
    assert main(["search", "--checkpoint", str(runs / "coupled"), "--budget", "level:4.5",
                 "--batch-size", "64", "--calib-images", "64", "--out", str(out), *flags]) == 0
    assert ("float convs" in capsys.readouterr().out) == bool(flags)
    assert [s["convs"] for s in json.loads(out.read_text())["searched"]] == [convs]


def test_deployed_model_scores_what_the_fake_quantized_one_scores(runs, tmp_path):
    """Same config, same BN recalibration: the exported file's test top-1 on digits equals the
    fake-quantized model's to within one image."""
    run = load_run(runs / "coupled", dataset=load_digits_dataset())
    config = {n: (b, 3) for n, b in zip(run.model.rfq_mixed, (2, 5))}
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(json.dumps({n: list(v) for n, v in config.items()}))
    path = tmp_path / "m.safetensors"
    assert main(["export", "--checkpoint", str(runs / "coupled"), "--config", str(cfg_file),
                 "--out", str(path), "--calib-images", "256"]) == 0
    fake = evaluate_config(run, config, calibration_batches(run, 256))
    loaded = deploy.load(path)
    correct = total = 0
    from rfq.cli.pipeline import test_batches
    with torch.no_grad():
        for x, y in test_batches(run):
            correct += int((loaded(x).argmax(1) == y).sum())
            total += len(y)
    assert abs(correct / total - fake) <= 1 / total + 1e-9


def test_deploy_bench_cli_and_uniform_export(runs, tmp_path, capsys):
    path = tmp_path / "w4.safetensors"
    assert main(["export", "--checkpoint", str(runs / "coupled"), "--bits", "4",
                 "--out", str(path), "--calib-images", "0"]) == 0
    assert all(m.w_bit == 4 for n, m in deploy.load(path).named_modules()
               if hasattr(m, "packed") and n in load_run(
                   runs / "coupled", dataset=load_digits_dataset()).model.rfq_mixed)
    capsys.readouterr()
    report = tmp_path / "bench.json"
    assert main(["deploy", "bench", "--model", str(path), "--batch", "1,4", "--rounds", "1",
                 "--reps", "1", "--per-layer", "--json", str(report)]) == 0
    text = capsys.readouterr().out
    assert "| 1 |" in text and "| 4 |" in text and "| body1.0 |" in text
    data = json.loads(report.read_text())
    assert set(data["batches"]) == {"1", "4"} and data["sizes"]["codes"] > 0
    # every quantized input is counted once: fused into a packed call or a separate quantizer
    layers = [m for m in deploy.load(path).modules() if hasattr(m, "packed")]
    for b in ("1", "4"):
        cost = data["batches"][b]["act_quant_cost"]
        assert cost["fused"] + cost["separate"] == sum(m.a_bit is not None for m in layers)
    assert data["batches"]["1"]["act_quant_cost"]["fused"] >= 1  # the FC reads packed codes


def test_export_and_deploy_bad_input(runs, tmp_path):
    args = ["export", "--checkpoint", str(runs / "coupled"), "--out", str(tmp_path / "x")]
    with pytest.raises(SystemExit, match="give one of --bits, --result, --config"):
        main(args + ["--bits", "4", "--config", "c.json"])
    with pytest.raises(SystemExit, match="--config .* does not exist"):
        main(args + ["--config", str(tmp_path / "none.json")])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"body1.0": [9, 4]}))
    with pytest.raises(SystemExit, match="does not fit"):
        main(args + ["--config", str(bad)])
    old = tmp_path / "old.rfq"
    torch.save({"kind": "packed"}, old)
    with pytest.raises(SystemExit, match="pickled torch file"):
        main(["deploy", "bench", "--model", str(old)])
    with pytest.raises(SystemExit):
        main(["deploy", "bench", "--model", str(old), "--batch", "0"])


def test_packed_model_matches_the_fake_quantized_one(runs):
    run = load_run(runs / "coupled", dataset=load_digits_dataset())
    model = run.model
    set_bits(model, {n: (b, 4) for n, b in zip(model.rfq_mixed, (2, 5))})
    model.eval()
    packed = to_packed(model)
    x, _ = next(score_batches(run, 64))
    with torch.no_grad():
        ref, got = model(x), packed(x)
    # same codes and steps; packed_linear rounds its activations to int16 per block (~2e-5)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())


@pytest.mark.parametrize("argv,message", [
    (["train", "--out", "X", "--set", "epochs=0"], "epochs must be >= 1"),
    (["train", "--out", "X", "--bits", "9,4"], "bits must be non-empty bit-widths in 1..8"),
    (["train", "--out", "X", "--set", "no_such=1"], "unknown training settings"),
    (["train", "--out", "X", "--set", "oops"], "--set expects key=value"),
    (["train", "--out", "X", "--config", "/nonexistent.json"], "does not exist"),
])
def test_bad_train_settings_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert message in str(exc.value) + capsys.readouterr().err


def test_bad_budget_and_checkpoint(runs, tmp_path):
    with pytest.raises(SystemExit, match="budget must be positive"):
        main(["search", "--checkpoint", str(runs / "coupled"), "--budget", "0"])
    with pytest.raises(SystemExit, match="not a number"):
        main(["search", "--checkpoint", str(runs / "coupled"), "--budget", "cheap"])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["search", "--checkpoint", str(tmp_path / "none"), "--budget", "1M"])
    with pytest.raises(SystemExit, match="float model"):
        main(["search", "--checkpoint", str(runs / "float"), "--budget", "1M"])
    with pytest.raises(SystemExit, match="already exists"):
        main(["train", "--out", str(runs / "coupled"), *COMMON])


def test_train_tensorboard_logs_the_csv_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    assert main(["train", "--out", str(out), "--mode", "float", "--epochs", "1",
                 "--steps-per-epoch", "6", "--set", "log_every=3", "--tensorboard",
                 *COMMON]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    rows = [r.split(",") for r in (out / "log.csv").read_text().splitlines()[1:]]
    logged = events.Scalars("train/loss")
    assert [e.step for e in logged] == [int(r[0]) for r in rows] == [3, 6]
    for e, r in zip(logged, rows):  # the same interval means as the CSV's loss column
        assert abs(e.value - float(r[3])) < 1e-4
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx(
        [float(r[2]) for r in rows], rel=1e-4)


def test_train_tensorboard_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(SystemExit, match="pip install tensorboard"):
        main(["train", "--out", str(tmp_path / "tb"), "--mode", "float", "--epochs", "1",
              "--tensorboard", *COMMON])
    assert not (tmp_path / "tb" / "checkpoint.pt").exists()


def _search_json(runs) -> str:
    out = runs / "bad-input-search.json"
    if not out.exists():
        assert main(["search", "--checkpoint", str(runs / "coupled"), "--budget", "level:4",
                     "--batch-size", "64", "--calib-images", "0", "--out", str(out)]) == 0
    return str(out)


@pytest.mark.parametrize("command", ["eval", "export"])
def test_bad_result_bits_and_index_are_clear_errors(runs, tmp_path, command):
    """eval/export: a missing or malformed --result, an out-of-range --index, a --bits that is
    not a candidate, a config of another model: a message naming the argument, nothing written."""
    result = _search_json(runs)
    out = tmp_path / "never.rfq"
    extra = ["--out", str(out)] if command == "export" else []
    base = [command, "--checkpoint", str(runs / "coupled"), "--calib-images", "0", *extra]
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"searched": []}))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"searched": [{"config": {"blocks.9.conv": [4, 4]}}]}))
    bad_bits = tmp_path / "badbits.json"
    data = json.loads(open(result).read())
    data["searched"][0]["config"] = {n: [7, 4] for n in data["searched"][0]["config"]}
    bad_bits.write_text(json.dumps(data))
    cases = [
        (["--result", str(tmp_path / "missing.json")], "--result .* does not exist"),
        (["--result", str(garbage)], "--result .* is not JSON"),
        (["--result", str(empty)], "holds no searched configs"),
        (["--result", result, "--index", "5"], r"--index 5 outside 0\.\.0"),
        (["--result", str(other)], "unknown layer blocks.9.conv"),
        (["--result", str(bad_bits)], r"\(7, 4\) is not a candidate pair"),
        (["--bits", "8"], r"--bits 8 is not a candidate bit-width of this model \(candidates: "
                          r"2, 3, 4, 5, 6\)"),
        (["--bits", "4", "--result", result],
         "give --bits or --result, not both" if command == "eval" else
         "give one of --bits, --result, --config"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit, match=message):
            main(base + args)
    assert not out.exists()


def test_bad_checkpoints_are_clear_errors(runs, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="corrupt or not an rfq checkpoint"):
        main(["export", "--checkpoint", str(junk), "--out", str(tmp_path / "x.rfq")])
    with pytest.raises(SystemExit, match="float model: nothing to pack"):
        main(["export", "--checkpoint", str(runs / "float"), "--out", str(tmp_path / "x.rfq")])
    with pytest.raises(SystemExit, match="float model: it has no bit-widths"):
        main(["eval", "--checkpoint", str(runs / "float"), "--bits", "4"])
    assert not (tmp_path / "x.rfq").exists()


@pytest.mark.parametrize("value", ["1", "9"])
def test_search_min_bits_out_of_range(runs, value):
    with pytest.raises(SystemExit, match=f"--min-bits must be between the smallest candidate "
                                         f"\\(2\\) and 8, got {value}"):
        main(["search", "--checkpoint", str(runs / "coupled"), "--budget", "level:4",
              "--min-bits", value])


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="resume: .*checkpoint.pt does not exist"):
        main(["train", "--out", str(tmp_path / "fresh"), "--resume", "--mode", "float",
              "--epochs", "1", *COMMON])
    assert not (tmp_path / "fresh" / "checkpoint.pt").exists()


def test_init_from_another_architecture_is_an_error(runs, tmp_path):
    # a smallcnn float checkpoint for a resnet20 run
    with pytest.raises(SystemExit, match="holds a smallcnn, this run trains a resnet20"):
        main(["train", "--out", str(tmp_path / "a"), "--mode", "coupled", "--model", "resnet20",
              "--dataset", "digits", "--epochs", "1", "--no-progress",
              "--init-from", str(runs / "float" / "model.pt")])
    assert not (tmp_path / "a" / "checkpoint.pt").exists()


def test_lsq_alone_baselines_in_the_search_table(runs, capsys):
    """--profile lsq trains one bit-width alone (a model with that one candidate); --baselines
    evaluates it at that bit-width and puts it in the table and the JSON."""
    lsq = runs / "lsq3"
    assert main(["train", "--out", str(lsq), "--profile", "lsq", "--lsq-bits", "3",
                 "--epochs", "1", "--steps-per-epoch", "10", "--init-from",
                 str(runs / "float" / "model.pt"), *COMMON]) == 0
    run = load_run(lsq, dataset=load_digits_dataset())
    assert run.cfg.mode == "lsq" and run.cfg.lsq_bits == 3
    assert all(list(m.w_bits) == list(m.a_bits) == [3] for _, m in mixed_layers(run.model))
    out = runs / "with-baseline.json"
    capsys.readouterr()
    assert main(["search", "--checkpoint", str(runs / "coupled"), "--budget", "level:3.5",
                 "--batch-size", "128", "--calib-images", "256", "--baselines", str(lsq),
                 "--out", str(out)]) == 0
    assert "| LSQ trained alone | 3/3 |" in capsys.readouterr().out
    (base,) = json.loads(out.read_text())["baselines"]
    want = evaluate_config(run, run.costs.uniform(run.model, 3),
                           calibration_batches(run, 256))
    assert base["bits"] == 3 and base["accuracy"] == want
    with pytest.raises(SystemExit, match="not an LSQ run"):
        main(["search", "--checkpoint", str(runs / "coupled"), "--budget", "level:3.5",
              "--batch-size", "128", "--calib-images", "0", "--baselines",
              str(runs / "coupled"), "--out", str(runs / "x.json")])


def test_lsq_alone_of_a_searched_mixed_config(runs, capsys):
    """--lsq-config trains a searched config alone: the model (and its EMA) run exactly that
    config from the first step to the checkpoint; bad configs are named errors."""
    result = runs / "frontier.json"
    assert main(["search", "--checkpoint", str(runs / "coupled"), "--budget", "level:3",
                 "--strategy", "frontier", "--batch-size", "128", "--calib-images", "256",
                 "--out", str(result)]) == 0
    config = json.loads(result.read_text())["searched"][0]["config"]
    assert json.loads(result.read_text())["searched"][0]["strategy"] == "frontier"
    out = runs / "lsq-mixed"
    assert main(["train", "--out", str(out), "--profile", "lsq", "--lsq-config", str(result),
                 "--epochs", "1", "--steps-per-epoch", "6", "--init-from",
                 str(runs / "float" / "model.pt"), *COMMON]) == 0
    run = load_run(out, dataset=load_digits_dataset())
    assert run.cfg.lsq_config == config
    assert current_config(run.model) == {n: tuple(v) for n, v in config.items()}
    capsys.readouterr()
    assert main(["search", "--checkpoint", str(runs / "coupled"), "--budget", "level:3.5",
                 "--batch-size", "128", "--calib-images", "256", "--baselines", str(out),
                 "--out", str(runs / "mixed-baseline.json")]) == 0
    assert "| LSQ trained alone | mixed |" in capsys.readouterr().out
    bad = runs / "bad-config.json"
    bad.write_text(json.dumps({"searched": [{"config": {"no.such.layer": [2, 2]}}]}))
    with pytest.raises(SystemExit, match="lsq_config does not fit"):
        main(["train", "--out", str(runs / "lsq-bad"), "--profile", "lsq", "--lsq-config",
              str(bad), "--epochs", "1", *COMMON])
    name = next(iter(config))
    bad.write_text(json.dumps({"searched": [{"config": {**config, name: [7, 2]}}]}))
    with pytest.raises(SystemExit, match="lsq_config: layer"):
        main(["train", "--out", str(runs / "lsq-bad"), "--profile", "lsq", "--lsq-config",
              str(bad), "--epochs", "1", *COMMON])
    assert not (runs / "lsq-bad" / "checkpoint.pt").exists()


def test_frontier_and_greedy_from_the_cli_and_legacy_floor_rule(runs, capsys):
    out = runs / "front.json"
    assert main(["search", "--checkpoint", str(runs / "coupled"), "--strategy", "frontier",
                 "--budget", "level:2.5", "--budget", "level:3", "--budget", "level:4",
                 "--batch-size", "128", "--calib-images", "256", "--out", str(out)]) == 0
    searched = json.loads(out.read_text())["searched"]
    assert [s["reached"] for s in searched] == [True] * 3
    assert searched[0]["bitops"] <= searched[1]["bitops"] <= searched[2]["bitops"]
    with pytest.raises(SystemExit, match="legacy-floor"):
        main(["search", "--checkpoint", str(runs / "coupled"), "--strategy", "frontier",
              "--legacy-floor", "--budget", "level:3", "--out", str(runs / "y.json")])


def test_study_is_resumable_and_tabulates_every_piece(runs, capsys):
    out = runs / "study"
    argv = ["study", "--checkpoint", str(runs / "coupled"), "--out", str(out),
            "--levels", "2.5,3.5", "--seeds", "0,1", "--random", "2", "--batch-size", "128",
            "--calib-images", "256", "--metrics", "bitops,size"]
    assert main(argv) == 0
    files = sorted(p.name for p in out.glob("*.json"))
    assert "uniform.json" in files and "bitops-random-L2.5.json" in files
    for metric in ("bitops", "size"):
        for strategy in ("frontier", "greedy"):
            for lv in ("2.5", "3.5"):
                for seed in (0, 1):
                    r = json.loads((out / f"{metric}-{strategy}-L{lv}-s{seed}.json").read_text())
                    assert r["seed"] == seed and r["strategy"] == strategy and r["reached"]
                    assert 0 <= r["accuracy"] <= 1
    table = (out / "table.md").read_text()
    assert "level 2.5" in table and "± " in table and "(2)" in table
    stamp = {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")}
    capsys.readouterr()
    assert main(argv) == 0  # everything done: nothing is searched again
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")} == stamp
    with pytest.raises(SystemExit, match="--levels"):
        main([*argv[:-2], "--metrics", "bitops", "--levels", "1.5"])
    with pytest.raises(SystemExit, match="--strategies"):
        main([*argv, "--strategies", "annealing"])


def test_bad_lsq_config_index_and_study_counts_are_named(runs):
    result = runs / "one-config.json"
    result.write_text(json.dumps({"searched": [{"config": {"a": [2, 2]}}]}))
    with pytest.raises(SystemExit, match="--lsq-index 3 outside 0..0"):
        main(["train", "--out", str(runs / "lsq-idx"), "--profile", "lsq", "--lsq-config",
              str(result), "--lsq-index", "3", *COMMON])
    with pytest.raises(SystemExit, match="--lsq-config .* does not exist"):
        main(["train", "--out", str(runs / "lsq-idx"), "--lsq-config", str(runs / "none.json"),
              *COMMON])
    for flag in ("--random", "--refine-rounds"):
        with pytest.raises(SystemExit, match=f"{flag} must be >= 0"):
            main(["study", "--checkpoint", str(runs / "coupled"), "--out",
                  str(runs / "study-bad"), flag, "-1"])
    assert not (runs / "lsq-idx").exists() and not (runs / "study-bad").exists()
