"""The main job (README command 1): ResNet-20 on Fashion-MNIST, candidates {6..2}, trained once
from the shipped float checkpoint; then the one model at every uniform bit-width, the frontier
search at eight BitOps budgets (levels 2.25 to 5, most of them where accuracy moves with bits)
and RFQ's greedy search at level 3.5 beside it, each config BN-recalibrated and tested on the
10k test images. Prints the table, writes results.json and pareto.png, and ends by exporting
the most accurate searched config as a packed safetensors file (its top-1 from the file, its size
and speed next to the fp32 model).

``--quick`` is a one-minute version for CI; ``--from-scratch`` pretrains the float model first
(30 epochs, ~40 min here) instead of using the shipped one.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from rfq.cost import format_bitops

SHIPPED_FLOAT = Path(__file__).parent.parent / "assets" / "resnet20-fmnist-float.pt"
# budgets where this model's accuracy moves with bits (W2A2 ~90 %, W3A3 ~93 %) and beyond
FRONT_LEVELS = [2.25, 2.5, 2.75, 3, 3.5, 4, 4.5, 5]
# RFQ's greedy search beside it at one budget: it walks one move at a time from uniform 5, so
# a steeper budget takes it many more moves
GREEDY_LEVELS = [3.5]
GREEDY_BATCH = 512


def _trainer(cfg, out, resume=True, dataset=None, progress=True):
    from rfq.methods.rfq import CoupledTrainer as Trainer

    return Trainer(cfg, out, resume=resume and (Path(out) / "checkpoint.pt").exists(),
                   dataset=dataset, progress=progress)


def seconds_per_step(cfg, dataset, steps: int = 6) -> float:
    """Time a few coupled steps of this config in a throwaway run (sizes the demo to the
    machine: these shared machines vary up to 4x)."""
    from rfq.methods.rfq import TrainConfig

    probe = TrainConfig(**{**asdict(cfg), "epochs": 1, "steps_per_epoch": steps + 2,
                           "checkpoint_every": 10**9, "log_every": 10**9})
    tmp = tempfile.mkdtemp(prefix="rfq-probe-")
    try:
        tr = _trainer(probe, tmp, resume=False, dataset=dataset, progress=False)
        tr.run(max_steps=2)  # warm-up
        t0 = time.perf_counter()
        tr.run(max_steps=steps)
        tr.close()
        return (time.perf_counter() - t0) / steps
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(args) -> int:
    from rfq import checkpoint as ckpt
    from rfq.cli.main import PROFILES
    from rfq.data import load_dataset
    from rfq.cli.pipeline import (format_table, load_run, pareto_plot, search_budgets,
                              uniform_results, budget_levels, write_json)
    from rfq.methods.rfq import TrainConfig

    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        ds = load_dataset("fashion-mnist", args.data_dir)
    except FileNotFoundError as err:
        raise SystemExit(f"rfq demo: {err}") from None
    quick = args.quick
    print(f"rfq demo{' (quick)' if quick else ''}: ResNet-20 on Fashion-MNIST "
          f"({len(ds.train)} train / {len(ds.holdout)} held out / {len(ds.test)} test), "
          f"candidates W,A in {{6,5,4,3,2}}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    # stage 0: the float model
    if args.from_scratch:
        fcfg = TrainConfig(**{**PROFILES["float"], "model": "resnet20",
                              "data_dir": args.data_dir})
        if quick:
            fcfg = TrainConfig(**{**asdict(fcfg), "epochs": 2, "steps_per_epoch": 30,
                                  "train_limit": 4000})
        print(f"\n[1/5] float pretraining, {fcfg.epochs} epochs")
        tr = _trainer(fcfg, out / "float", dataset=ds)
        tr.run()
        ckpt.save_atomic({"kind": "float", "config": asdict(fcfg),
                          "model": tr.model.state_dict()}, out / "float" / "model.pt")
        tr.close()
        init = out / "float" / "model.pt"
    else:
        init = SHIPPED_FLOAT
        if not init.is_file():
            raise SystemExit(f"rfq demo: the shipped float checkpoint {init} is missing; "
                             f"run with --from-scratch")
        print(f"\n[1/5] float model: {init.name} (shipped; made by `python -m rfq train "
              f"--profile float`)")

    # stage 1: coupled training, sized to the time budget
    base = {**PROFILES["demo"], "model": "resnet20", "data_dir": args.data_dir,
            "init_from": str(init), "log_every": 10}
    if quick:
        base.update(epochs=2, steps_per_epoch=15, train_limit=4000, batch_size=64,
                    freeze_start=0, checkpoint_every=15)
        cfg = TrainConfig(**base)
    else:
        cfg = TrainConfig(**base)
        if args.epochs and not (out / "coupled" / "checkpoint.pt").exists():
            cfg = TrainConfig(**{**base, "epochs": args.epochs})
        elif not (out / "coupled" / "checkpoint.pt").exists():
            per_step = seconds_per_step(cfg, ds)
            steps = int(args.minutes * 60 / per_step)
            epochs = max(3, min(20, steps // cfg.steps_per_epoch))
            print(f"      measured {per_step:.2f} s per coupled step (4 passes of 128): "
                  f"{epochs} pseudo-epochs of {cfg.steps_per_epoch} steps fit "
                  f"{args.minutes:g} min")
            cfg = TrainConfig(**{**base, "epochs": epochs})
        else:
            saved = ckpt.load(out / "coupled" / "checkpoint.pt")
            cfg = TrainConfig(**{**base, "epochs": saved["config"]["epochs"]})
            print("      resuming the coupled run found in", out / "coupled")
    print(f"\n[2/5] one-shot coupled training: {cfg.epochs * cfg.steps_per_epoch} steps, "
          f"1 max + {cfg.n_random} random passes each, scheduler + IDM on")
    tr = _trainer(cfg, out / "coupled", dataset=ds)
    tr.run()
    train_s = tr.wall
    tr.close()

    # stage 2: uniform levels and searched configs of the one model
    run = load_run(out / "coupled", dataset=ds)
    calib = 256 if quick else 2048
    batch = 128 if quick else 1024
    front_levels = [4.6, 4.7, 4.8, 4.9] if quick else FRONT_LEVELS
    greedy_levels = [4.8] if quick else GREEDY_LEVELS
    print(f"\n[3/5] the one model at every uniform bit-width (BN recalibrated on {calib} "
          f"training images)")
    limit = 2000 if quick else None  # test images (quick: the first 2000)
    uniform = uniform_results(run, [2, 3, 4, 5, 6], calib, limit)
    for u in uniform:
        print(f"      W{u['bits']}A{u['bits']}: {u['accuracy'] * 100:.2f} %")
    print(f"\n[4/5] frontier search: {len(front_levels)} BitOps budgets from one measurement; "
          f"greedy search at level {', '.join(f'{lv:g}' for lv in greedy_levels)} beside it "
          f"(held-out scores of {batch} and {128 if quick else GREEDY_BATCH} images)")
    searched = search_budgets(run, budget_levels(run, front_levels), "bitops", batch, calib,
                              eval_limit=limit, strategy="frontier")
    searched += search_budgets(run, budget_levels(run, greedy_levels), "bitops",
                               128 if quick else GREEDY_BATCH, calib, eval_limit=limit,
                               strategy="greedy")
    print("\n" + format_table(uniform, searched))
    write_json(out / "results.json", {"uniform": uniform, "searched": searched,
                                      "train_seconds": train_s, "config": asdict(cfg)})
    plot = pareto_plot(out / "pareto.png", uniform, searched,
                       title="ResNet-20 / Fashion-MNIST: one coupled model, no retraining")
    deploy_report = deploy_best(run, searched, out, calib, limit, quick)
    write_json(out / "results.json", {"uniform": uniform, "searched": searched,
                                      "train_seconds": train_s, "config": asdict(cfg),
                                      "deployed": deploy_report})
    print(f"\nresults: {out / 'results.json'}, plot: {plot}, deployed model: "
          f"{deploy_report['file']}; coupled training {train_s:.0f} s, "
          f"whole demo {time.perf_counter() - t_start:.0f} s")
    return 0


def deploy_best(run, searched: list[dict], out: Path, calib: int, limit, quick: bool) -> dict:
    """Stage 5: the most accurate searched config as a packed safetensors file, its test top-1
    from the file alone, and its size and speed next to the fp32 model's."""
    from rfq.cli.pipeline import deployed_accuracy, export_config
    from rfq.deploy import bench

    best = max(searched, key=lambda s: s["accuracy"])
    label = f"{best['strategy']} at {format_bitops(best['bitops'])} BitOps"
    print(f"\n[5/5] deploy the most accurate searched config ({label}, "
          f"{best['accuracy'] * 100:.2f} %) as one packed safetensors file")
    path = export_config(run, best["config"], out / "resnet20-best.safetensors", calib,
                         f"demo: most accurate searched config ({label})")
    acc = deployed_accuracy(run, path, limit=limit)
    print(f"      top-1 of the model loaded from the file alone: {acc * 100:.2f} % "
          f"(fake-quantized: {best['accuracy'] * 100:.2f} %)")
    report = bench.bench_file(path, (1, 64), rounds=1 if quick else 3, reps=3 if quick else 30)
    print("      " + bench.format_report(report).replace("\n", "\n      "))
    return {"file": str(path), "label": label, "accuracy": acc,
            "fake_quant_accuracy": best["accuracy"], "sizes": report["sizes"],
            "speed": report["batches"]}
