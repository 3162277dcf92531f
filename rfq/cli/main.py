"""``python -m rfq train | search | eval | export | deploy | demo | study | dfmpc | hotswap |
csq | showcase`` (also the
``rfq`` script).

Settings come from a profile (``--profile``), then a config file (``--config``, JSON or TOML,
keys of rfq.methods.rfq.TrainConfig), then ``--set key=value`` and the named flags, later ones winning.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

PROFILES = {
    # stage 0, float pretraining (spec method_rfq.md §9): SGD Nesterov 0.9, lr 0.1 cosine,
    # weight decay 5e-4, batch 128, 30 epochs
    "float": dict(mode="float", epochs=30, lr=0.1, weight_decay=5e-4, warmup_epochs=0.0,
                  min_lr=0.0, checkpoint_every=500),
    # the scaled Fashion-MNIST recipe, full profile
    "full": dict(mode="coupled", epochs=40, lr=0.01, warmup_epochs=2.0, weight_decay=2.5e-5,
                 step_lr=1e-4, ema_decay=0.998, qe=True, qe_start=10, freeze_start=2,
                 p_early=2, p_late=4, checkpoint_every=500),
    # quick profile (spec §9): 20k-image subset, pseudo-epochs of 100 steps
    "quick": dict(mode="coupled", epochs=5, steps_per_epoch=100, train_limit=20000, lr=0.01,
                  warmup_epochs=0.5, ema_decay=0.99, freeze_start=1, p_early=2, p_late=1),
    # the demo: the quick recipe on all 55k training images (its epochs are sized to the
    # machine by `python -m rfq demo`)
    "demo": dict(mode="coupled", epochs=10, steps_per_epoch=100, lr=0.01, warmup_epochs=0.5,
                 ema_decay=0.99, freeze_start=1, p_early=2, p_late=1),
    # one bit-width trained alone with LSQ, the demo's recipe otherwise (the retraining the
    # method avoids): set --lsq-bits and the demo run's --epochs
    "lsq": dict(mode="lsq", epochs=10, steps_per_epoch=100, lr=0.01, warmup_epochs=0.5,
                ema_decay=0.99),
    # hot-swap 8..1 (spec methods_seeds.md §B.2): the demo's length and schedule, SGD lr 0.01
    # cosine from the float weights, weight decay 5e-5, sandwich rule (8, 1, two of 2..7)
    "hotswap": dict(mode="hotswap", bits=[8, 7, 6, 5, 4, 3, 2, 1],
                    depthwise_bits=[8, 7, 6, 5, 4, 3, 2, 1], epochs=10, steps_per_epoch=100,
                    lr=0.01, warmup_epochs=0.5, weight_decay=5e-5, ema_decay=0.99, n_random=3,
                    idm=False, scheduler=False, checkpoint_every=100),
}

FLAG_KEYS = ("mode", "model", "dataset", "data_dir", "epochs", "batch_size", "lr", "seed",
             "lsq_bits", "init_from", "device", "steps_per_epoch", "train_limit", "n_random",
             "tensorboard")


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def load_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"rfq: config file {path} does not exist")
    text = p.read_text()
    if p.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            raise SystemExit("rfq: TOML configs need Python >= 3.11; use a JSON config") from None
        data = tomllib.loads(text)
        data = data.get("train", data)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise SystemExit(f"rfq: config file {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"rfq: config file {path} must hold a table of settings")
    return data


def merge_settings(values: dict, args, prog: str) -> dict:
    """``values`` updated with --config's file, then --set's key=value pairs."""
    if args.config:
        values.update(load_config_file(args.config))
    for item in args.set or ():
        if "=" not in item:
            raise SystemExit(f"{prog}: --set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        values[key.strip()] = _parse_value(text.strip())
    return values


def build_train_config(args):
    from rfq.methods.rfq import TrainConfig

    values = dict(PROFILES[args.profile]) if args.profile else {}
    merge_settings(values, args, "rfq")
    for key in FLAG_KEYS:
        v = getattr(args, key, None)
        if v is not None:
            values[key] = v
    if args.bits:
        values["bits"] = [int(b) for b in args.bits.split(",")]
    if getattr(args, "lsq_config", None):
        config = _result_config(args.lsq_config, args.lsq_index, "rfq train", "--lsq-config",
                                "--lsq-index")
        values["lsq_config"] = {n: list(v) for n, v in config.items()}
        values["mode"] = "lsq"
    try:
        return TrainConfig.from_dict(values)
    except (ValueError, TypeError) as err:
        raise SystemExit(f"rfq: bad training settings: {err}") from None


def cmd_train(args) -> int:
    import torch

    from rfq import checkpoint as ckpt
    from rfq.training import evaluate
    from rfq.data import eval_batches

    cfg = build_train_config(args)
    if cfg.mode == "hotswap":
        from rfq.methods.hotswap.trainer import HotSwapTrainer as Trainer
    else:
        from rfq.methods.rfq import CoupledTrainer as Trainer
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        trainer = Trainer(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    except (ckpt.CheckpointError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"rfq train: {err}") from None
    t0 = time.perf_counter()
    logs = trainer.run()
    model = trainer.eval_model
    if trainer.dist.main:
        if cfg.mode == "float":
            ckpt.save_atomic({"kind": "float", "config": asdict(cfg),
                              "model": {k: v.half() if v.is_floating_point() else v
                                        for k, v in trainer.model.state_dict().items()}},
                             Path(args.out) / "model.pt")
        batches = eval_batches(trainer.ds.test, trainer.ds, 256, trainer.device,
                               cfg.channels_last)
        acc = evaluate(model, batches)
        print(f"trained {trainer.step} steps ({cfg.mode}) in {time.perf_counter() - t0:.0f} s "
              f"this session, {trainer.wall:.0f} s in all; test accuracy at the max bits "
              f"(BN as trained): {acc * 100:.2f} %; last losses "
              + ", ".join(f"{k} {v:.3f}" for k, v in logs.items()))
    trainer.close()
    return 0


def _parse_budgets(run, texts, metric):
    from rfq.cost import parse_budget
    from rfq.cli.pipeline import budget_levels

    out = []
    for t in texts:
        if t.lower().startswith("level:"):
            try:
                level = float(t.split(":", 1)[1])
            except ValueError:
                raise SystemExit(f"rfq: --budget {t!r}: level must be a number") from None
            if metric != "bitops":
                raise SystemExit("rfq: level: budgets are BitOps budgets")
            out.extend(budget_levels(run, [level]))
        else:
            try:
                out.append(parse_budget(t, metric))
            except ValueError as err:
                raise SystemExit(f"rfq: --budget: {err}") from None
    return out


def load_run_arg(args):
    """The run of --checkpoint (threads set first); a bad checkpoint exits with its message."""
    import torch

    from rfq import checkpoint as ckpt
    from rfq.cli.pipeline import load_run

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return load_run(args.checkpoint, data_dir=args.data_dir)
    except (ckpt.CheckpointError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"rfq {args.command}: {err}") from None


def cmd_search(args) -> int:
    from rfq.cli.pipeline import format_table, pareto_plot, search_budgets, uniform_results, write_json

    run = load_run_arg(args)
    if run.costs is None:
        raise SystemExit("rfq search: the checkpoint holds a float model: nothing to search")
    budgets = _parse_budgets(run, args.budget, args.metric)
    if args.legacy_floor and args.strategy != "greedy":
        raise SystemExit("rfq search: --legacy-floor is a rule of the greedy search; the "
                         "frontier search takes --min-bits")
    if args.min_bits is not None:
        from rfq.nn import mixed_layers

        smallest = min(min(m.w_bits) for _, m in mixed_layers(run.model))
        if not smallest <= args.min_bits <= 8:
            raise SystemExit(f"rfq search: --min-bits must be between the smallest candidate "
                             f"({smallest}) and 8, got {args.min_bits}")
    print(f"searching {len(budgets)} budget(s) on {run.path} ({args.strategy}, {args.metric}, "
          f"search batch "
          f"{args.batch_size}, {'straightforward' if args.naive else 'cached'} evaluation"
          f"{', float convs' if args.float_convs else ''})")
    searched = search_budgets(run, budgets, args.metric, args.batch_size, args.calib_images,
                              fast=not args.naive, min_bits=args.min_bits,
                              legacy_floor=args.legacy_floor, strategy=args.strategy,
                              integer_convs=not args.float_convs)
    uniform = uniform_results(run, args.uniform, args.calib_images) if args.uniform else []
    baselines = [b for path in args.baselines or () for b in _baseline(path, args)]
    print(format_table(uniform, searched, baselines))
    out = Path(args.out or Path(run.path).parent / "search.json")
    write_json(out, {"checkpoint": str(run.path), "metric": args.metric, "uniform": uniform,
                     "searched": searched, "baselines": baselines})
    print(f"results: {out}")
    if args.plot:
        print(f"plot: {pareto_plot(args.plot, uniform, searched, baselines)}")
    return 0


def _baseline(path, args):
    from rfq.cli.pipeline import calibration_batches, evaluate_config, load_run

    run = load_run(path, data_dir=args.data_dir)
    if run.cfg.mode != "lsq":
        raise SystemExit(f"rfq: --baselines {path} is not an LSQ run (mode {run.cfg.mode})")
    if run.cfg.lsq_config is not None:  # one mixed config trained alone
        cfg, bits = {n: tuple(v) for n, v in run.cfg.lsq_config.items()}, "mixed"
    else:
        cfg, bits = run.costs.uniform(run.model, run.cfg.lsq_bits), run.cfg.lsq_bits
    calib = calibration_batches(run, args.calib_images)
    return [{"bits": bits, "bitops": run.costs.bitops(cfg),
             "size_mib": run.costs.size_mib(cfg), "accuracy": evaluate_config(run, cfg, calib),
             "train_seconds": run.wall, "checkpoint": str(run.path)}]


def _config_arg(run, args):
    """The bit config that --bits / --result (+ --index) name, checked against the model:
    None for a float model; the highest candidates when neither is given."""
    from rfq.nn import mixed_layers, resolve_config

    cmd = f"rfq {args.command}"
    hand = getattr(args, "config", None)
    given = [f for f, v in (("--bits", args.bits), ("--result", args.result), ("--config", hand))
             if v is not None]
    if len(given) > 1:
        if not hasattr(args, "config"):
            raise SystemExit(f"{cmd}: give --bits or --result, not both")
        raise SystemExit(f"{cmd}: give one of --bits, --result, --config (got {', '.join(given)})")
    if run.costs is None:
        if given:
            raise SystemExit(f"{cmd}: {run.path} holds a float model: it has no bit-widths")
        return None
    if args.result or hand:
        flag = "--result" if args.result else "--config"
        config = _result_config(args.result, args.index, cmd) if args.result else \
            _config_file(hand, cmd)
        layers = dict(mixed_layers(run.model))
        problems = [f"missing layer {n}" for n in layers if n not in config]
        problems += [f"unknown layer {n}" for n in config if n not in layers]
        for n, (w, a) in config.items():
            if n in layers and (w not in layers[n].w_bits or
                                (layers[n].a_bits and a not in layers[n].a_bits)):
                problems.append(f"{n}: ({w}, {a}) is not a candidate pair")
        if problems:
            raise SystemExit(f"{cmd}: {flag} {args.result or hand} does not fit {run.path}: "
                             + "; ".join(problems[:5])
                             + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""))
        return resolve_config(run.model, config)
    candidates = sorted({b for _, m in mixed_layers(run.model) for b in m.w_bits})
    if args.bits is None:
        return run.costs.uniform(run.model, candidates[-1])
    if args.bits not in candidates:
        raise SystemExit(f"{cmd}: --bits {args.bits} is not a candidate bit-width of this model "
                         f"(candidates: {', '.join(map(str, candidates))})")
    return run.costs.uniform(run.model, args.bits)


def _read_json(path: str, cmd: str, flag: str):
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"{cmd}: {flag} {path} does not exist")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SystemExit(f"{cmd}: {flag} {path} is not JSON: {err}") from None


def _config_file(path: str, cmd: str) -> dict:
    """A hand-written config: JSON {layer: [w_bits, a_bits]} (a_bits null where the layer's
    input is not quantized)."""
    config = _read_json(path, cmd, "--config")
    if not isinstance(config, dict) or not all(
            isinstance(v, (list, tuple)) and len(v) == 2 for v in config.values()):
        raise SystemExit(f"{cmd}: --config {path} must be a JSON object {{layer: [w, a]}}")
    return {n: tuple(v) for n, v in config.items()}


def _result_config(path: str, index: int, cmd: str, flag: str = "--result",
                   index_flag: str = "--index") -> dict:
    """Config ``index`` of a search.json (or of a single search result)."""
    data = _read_json(path, cmd, flag)
    searched = data.get("searched", [data]) if isinstance(data, dict) else None
    if not isinstance(searched, list) or not searched:
        raise SystemExit(f"{cmd}: {flag} {path} holds no searched configs "
                         f"(expected rfq search's JSON)")
    if not 0 <= index < len(searched):
        raise SystemExit(f"{cmd}: {index_flag} {index} outside 0..{len(searched) - 1} "
                         f"({len(searched)} searched configs in {path})")
    entry = searched[index]
    config = entry.get("config") if isinstance(entry, dict) else None
    if not isinstance(config, dict) or not all(
            isinstance(v, (list, tuple)) and len(v) == 2 for v in config.values()):
        raise SystemExit(f"{cmd}: {flag} {path} entry {index} has no config of "
                         f"{{layer: [w, a]}} pairs")
    return {n: tuple(v) for n, v in config.items()}


def cmd_eval(args) -> int:
    from rfq.cost import format_bitops
    from rfq.cli.pipeline import calibration_batches, evaluate_config

    run = load_run_arg(args)
    config = _config_arg(run, args)
    calib = calibration_batches(run, args.calib_images) if config is not None and \
        args.calib_images else []
    acc = evaluate_config(run, config, calib, args.split)
    cost = ""
    if config is not None:
        cost = f", {format_bitops(run.costs.bitops(config))} BitOps, " \
               f"{run.costs.size_kib(config):.1f} KiB"
    print(f"{args.split} accuracy {acc * 100:.2f} %{cost}")
    return 0


def cmd_export(args) -> int:
    from rfq import deploy
    from rfq.cli.pipeline import export_config

    run = load_run_arg(args)
    if run.costs is None:
        raise SystemExit(f"rfq export: {run.path} holds a float model: nothing to pack")
    config = _config_arg(run, args)
    if args.result:
        source = f"{args.result} #{args.index}"
    elif args.config:
        source = args.config
    else:
        source = f"uniform {next(iter(config.values()))[0]} bits"
    path = export_config(run, config, args.out, args.calib_images, source)
    sizes = deploy.file_sizes(path)
    print(f"exported {path}: {sizes['file'] / 1024:.1f} KiB (packed codes "
          f"{sizes['codes'] / 1024:.1f} KiB; {run.costs.size_kib(config):.1f} KiB at each "
          f"layer's own bits by the cost model); the fp32 weights are "
          f"{sizes['fp32'] / 1024:.1f} KiB, {sizes['fp32'] / sizes['file']:.2f}x the file")
    return 0


def cmd_deploy(args) -> int:
    import torch

    from rfq.cli.pipeline import write_json
    from rfq.deploy import DeployFormatError, bench

    if args.deploy_command != "bench":  # argparse enforces the choice; kept for clarity
        raise SystemExit("rfq deploy: choose a subcommand: bench")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        report = bench.bench_file(args.model, args.batch, args.rounds, args.reps, args.dense,
                                  layers=args.per_layer)
    except (DeployFormatError, ValueError) as err:
        raise SystemExit(f"rfq deploy bench: {err}") from None
    print(bench.format_report(report))
    if args.json:
        write_json(args.json, report)
    return 0


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def cmd_demo(args) -> int:
    from rfq.cli import demo

    return demo.main(args)


def cmd_showcase(args) -> int:
    from rfq.cli import showcase

    showcase.main(steps=args.steps, seed=args.seed)
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rfq", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a run (coupled, float or single-bit LSQ)")
    t.add_argument("--out", required=True, help="run folder (checkpoint.pt, log.csv)")
    t.add_argument("--profile", choices=sorted(PROFILES))
    t.add_argument("--config", help="JSON or TOML file of TrainConfig settings")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="any TrainConfig field")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--mode", choices=["coupled", "float", "lsq", "hotswap"])
    t.add_argument("--model")
    t.add_argument("--dataset")
    t.add_argument("--data-dir")
    t.add_argument("--epochs", type=int)
    t.add_argument("--steps-per-epoch", type=int)
    t.add_argument("--train-limit", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--bits", help="candidate bits, e.g. 6,5,4,3,2")
    t.add_argument("--lsq-bits", type=int)
    t.add_argument("--lsq-config", metavar="RESULT",
                   help="train one searched mixed config alone with LSQ (a search JSON)")
    t.add_argument("--lsq-index", type=int, default=0, help="which config of --lsq-config")
    t.add_argument("--n-random", type=int)
    t.add_argument("--init-from", help="float checkpoint (model.pt of a float run)")
    t.add_argument("--seed", type=int)
    t.add_argument("--device")
    t.add_argument("--threads", type=int)
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--tensorboard", action="store_true", default=None,
                   help="also log to <out>/tensorboard (needs the tensorboard package)")
    t.set_defaults(func=cmd_train)

    def add_run_args(p):
        p.add_argument("--checkpoint", required=True, help="run folder or checkpoint file")
        p.add_argument("--data-dir")
        p.add_argument("--calib-images", type=int, default=7000,
                       help="training images for BN recalibration (0: none)")
        p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")

    s = sub.add_parser("search", help="greedy bit-width search under budgets")
    add_run_args(s)
    s.add_argument("--budget", action="append", required=True,
                   help="e.g. 498.6M (BitOps), level:3.5, 120KiB (size); repeatable")
    s.add_argument("--metric", choices=["bitops", "size"], default="bitops")
    s.add_argument("--strategy", choices=["greedy", "frontier"], default="greedy",
                   help="greedy: RFQ's search per budget; frontier: measure once, solve all")
    s.add_argument("--batch-size", type=int, default=1024, help="held-out images per score")
    s.add_argument("--min-bits", type=int)
    s.add_argument("--legacy-floor", action="store_true", help="RFQuant's floor of 3 bits")
    s.add_argument("--naive", action="store_true",
                   help="straightforward evaluation (full forward per move; for comparison)")
    s.add_argument("--float-convs", action="store_true",
                   help="score with float convolutions, as searches did before 2026-12-06 "
                        "(default: integer ones where fast; the results JSON records which)")
    s.add_argument("--uniform", type=lambda v: [int(b) for b in v.split(",")],
                   help="also report these uniform bit-widths, e.g. 2,3,4,5,6")
    s.add_argument("--baselines", nargs="*", help="LSQ run folders to add to table and plot")
    s.add_argument("--out", help="results JSON (default: search.json next to the checkpoint)")
    s.add_argument("--plot", help="write the Pareto plot PNG here")
    s.set_defaults(func=cmd_search)

    e = sub.add_parser("eval", help="accuracy at a uniform bit-width or a searched config")
    add_run_args(e)
    e.add_argument("--bits", type=int)
    e.add_argument("--result", help="search.json to take a config from")
    e.add_argument("--index", type=int, default=0, help="which searched config of --result")
    e.add_argument("--split", choices=["test", "holdout"], default="test")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="one searched (or uniform, or hand-written) config as "
                       "a packed safetensors model")
    add_run_args(x)
    x.add_argument("--bits", type=int, help="uniform bit-width")
    x.add_argument("--result", help="search.json to take a config from")
    x.add_argument("--index", type=int, default=0, help="which searched config of --result")
    x.add_argument("--config", help="JSON file {layer: [w_bits, a_bits]} (a hand-written config)")
    x.add_argument("--out", required=True, help="the .safetensors file to write")
    x.set_defaults(func=cmd_export)

    dp = sub.add_parser("deploy", help="deployed models: bench")
    dsub = dp.add_subparsers(dest="deploy_command", required=True)
    db = dsub.add_parser("bench", help="size and speed of a deploy file against its fp32 model")
    db.add_argument("--model", required=True, help="a file written by rfq export")
    db.add_argument("--batch", type=_int_list, default=[1, 64], help="batch sizes, e.g. 1,64")
    db.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median, range)")
    db.add_argument("--reps", type=int, default=30, help="timed calls per round (batch < 16)")
    db.add_argument("--dense", choices=["auto", "all", "none"], default="auto",
                    help="which convs keep a dequantized weight copy (rfq.deploy.load)")
    db.add_argument("--per-layer", action="store_true", help="per-layer times (first batch)")
    db.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    db.add_argument("--json", help="also write the report here")
    db.set_defaults(func=cmd_deploy)

    d = sub.add_parser("demo", help="the main job: train once, search three budgets, report")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--quick", action="store_true", help="a one-minute version (CI)")
    d.add_argument("--from-scratch", action="store_true",
                   help="pretrain the float model too instead of the shipped checkpoint")
    d.add_argument("--minutes", type=float, default=9.0,
                   help="coupled-training time to size the run for (default 9)")
    d.add_argument("--epochs", type=int,
                   help="pseudo-epochs of 100 coupled steps (default: sized to --minutes)")
    d.add_argument("--data-dir")
    d.add_argument("--threads", type=int)
    d.set_defaults(func=cmd_demo)

    from rfq.cli import csq, dfmpc, hotswap, study

    study.add_parser(sub)
    dfmpc.add_parser(sub)
    hotswap.add_parser(sub)
    csq.add_parser(sub)

    w = sub.add_parser("showcase", help="a few-second tour of the fused ops on digits")
    w.add_argument("--steps", type=int, default=400)
    w.add_argument("--seed", type=int, default=0)
    w.set_defaults(func=cmd_showcase)
    return parser


def main(argv=None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if getattr(args, "command", None) == "showcase" and args.steps < 1:
        parser.error("--steps must be at least 1")
    for name in ("epochs", "batch_size", "steps_per_epoch", "train_limit", "calib_images",
                 "minutes"):
        v = getattr(args, name, None)
        if v is not None and v < (0 if name == "calib_images" else 1e-9):
            parser.error(f"--{name.replace('_', '-')} must be positive, got {v}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
