"""`rfq study`: the searched-vs-uniform comparison with error bars (README "Results").

For one coupled run: the uniform levels, then per budget metric and budget level the frontier
and greedy searches over several search seeds (each seed scores on other held-out batches),
random configs at the same budget, and optionally LSQ-alone runs of searched configs; every
config BN-recalibrated and tested on the test set. Each finished piece is one JSON file in
``--out``, so an interrupted study continues where it stopped; the table is rebuilt from all
files of the folder every time (``--strategies`` says what to run, the table shows all).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from rfq.cli.pipeline import budget_levels
from rfq.cost import format_bitops


def _done(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def interpolate(points: list[tuple[float, float]], x: float) -> float:
    """Piecewise-linear value of sorted (x, y) points at x (clamped at the ends)."""
    pts = sorted(points)
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1]


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_study(args) -> int:
    import torch

    from rfq.cli.pipeline import (calibration_batches, evaluate_config, load_run, score_batches,
                                  uniform_results, write_json)
    from rfq.methods.rfq.frontier import FrontierSearch
    from rfq.methods.rfq.search import GreedySearch, random_config
    from rfq.nn import mixed_layers
    from rfq.runtime import flush_denormals

    for name, values, allowed in (("--strategies", args.strategies, ("frontier", "greedy")),
                                  ("--metrics", args.metrics, ("bitops", "size"))):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise SystemExit(f"rfq study: {name} takes {', '.join(allowed)}; got {values}")
    for name, value in (("--random", args.random), ("--refine-rounds", args.refine_rounds)):
        if value < 0:
            raise SystemExit(f"rfq study: {name} must be >= 0, got {value}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = load_run(args.checkpoint, data_dir=args.data_dir)
    if run.costs is None:
        raise SystemExit("rfq study: the checkpoint holds a float model: nothing to search")
    candidates = sorted({b for _, m in mixed_layers(run.model) for b in m.w_bits})
    bad = [lv for lv in args.levels if not candidates[0] <= lv <= candidates[-1]]
    if bad:
        raise SystemExit(f"rfq study: --levels {bad} outside the candidate range "
                         f"{candidates[0]}..{candidates[-1]}")
    calib = calibration_batches(run, args.calib_images)

    def accuracy(config) -> float:
        return evaluate_config(run, {n: tuple(v) for n, v in config.items()}, calib)

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    path = out / "uniform.json"
    if not path.is_file():
        t0 = time.perf_counter()
        uniform = uniform_results(run, args.uniform, args.calib_images)
        held = []  # W=b with inputs at 5: the uniform line of a size budget's configs
        for b in args.uniform:
            cfg = {n: (w, run.costs.uniform(run.model, 5)[n][1])
                   for n, (w, _) in run.costs.uniform(run.model, b).items()}
            held.append({"bits": b, "bitops": run.costs.bitops(cfg),
                         "size_mib": run.costs.size_mib(cfg), "accuracy": accuracy(cfg)})
        write_json(path, {"uniform": uniform, "uniform_a5": held,
                          "seconds": time.perf_counter() - t0})
        log("uniform: " + ", ".join(f"W{u['bits']}A{u['bits']} {u['accuracy'] * 100:.2f}"
                                    for u in uniform))

    for metric in args.metrics:
        targets = budget_levels(run, args.levels, metric)
        for strategy in args.strategies:
            for seed in args.seeds:
                files = [out / f"{metric}-{strategy}-L{lv:g}-s{seed}.json" for lv in args.levels]
                todo = [(lv, t, f) for lv, t, f in zip(args.levels, targets, files)
                        if not f.is_file()]
                if not todo:
                    continue
                with flush_denormals():
                    if strategy == "frontier":
                        search = FrontierSearch(run.model, run.costs,
                                                score_batches(run, args.batch_size, seed), metric,
                                                refine_rounds=args.refine_rounds)
                        t0 = time.perf_counter()
                        results = search.run_all([t for _, t, _ in todo])
                        front_seconds = time.perf_counter() - t0
                    else:
                        results = []
                        for _, t, _ in todo:
                            search = GreedySearch(run.model, run.costs,
                                                  score_batches(run, args.batch_size, seed),
                                                  metric)
                            results.append(search.run(t))
                        front_seconds = None
                for (lv, _, f), r in zip(todo, results):
                    r.seed = seed
                    r.accuracy = accuracy(r.config)
                    write_json(f, {**r.to_dict(), "level": lv, "front_seconds": front_seconds,
                                   "front_levels": len(todo)})
                    log(f"{metric} {strategy} level {lv:g} seed {seed}: "
                        f"{r.accuracy * 100:.2f} % at {_cost_text(run, r.config, metric)}, "
                        f"{r.seconds:.0f} s search")
        for lv, t in zip(args.levels, targets):
            f = out / f"{metric}-random-L{lv:g}.json"
            if args.random and not f.is_file():
                configs = [random_config(run.model, run.costs, t, metric, seed=k)
                           for k in range(args.random)]
                rows = [{"config": {n: list(v) for n, v in c.items()},
                         "bitops": run.costs.bitops(c), "size_mib": run.costs.size_mib(c),
                         "accuracy": accuracy(c)} for c in configs]
                write_json(f, {"level": lv, "target": t, "metric": metric, "random": rows})
                accs = [r["accuracy"] * 100 for r in rows]
                log(f"{metric} random level {lv:g}: mean {statistics.fmean(accs):.2f}, "
                    f"best {max(accs):.2f} ({len(rows)} configs)")

    for lsq_dir in args.lsq_alone or ():
        f = out / f"lsq-{Path(lsq_dir).name}.json"
        if f.is_file():
            continue
        lrun = load_run(lsq_dir, dataset=run.dataset, data_dir=args.data_dir)
        if lrun.cfg.mode != "lsq" or lrun.cfg.lsq_config is None:
            raise SystemExit(f"rfq study: --lsq-alone {lsq_dir} is not an LSQ run of a mixed "
                             f"config (rfq train --lsq-config)")
        config = {n: tuple(v) for n, v in lrun.cfg.lsq_config.items()}
        lcalib = calibration_batches(lrun, args.calib_images)
        write_json(f, {"run": str(lsq_dir), "config": lrun.cfg.lsq_config,
                       "bitops": lrun.costs.bitops(config),
                       "size_mib": lrun.costs.size_mib(config),
                       "accuracy": evaluate_config(lrun, config, lcalib),
                       "coupled_accuracy": accuracy(config), "train_seconds": lrun.wall})
        log(f"LSQ alone {lsq_dir}: {_done(f)['accuracy'] * 100:.2f} %")

    found = [s for s in ("frontier", "greedy") if any(out.glob(f"*-{s}-L*.json"))]
    table = study_table(out, run, args.metrics, args.levels, found or args.strategies)
    (out / "table.md").write_text(table + "\n")
    print(table)
    return 0


def _cost_text(run, config, metric: str) -> str:
    cfg = {n: tuple(v) for n, v in config.items()}
    return (f"{format_bitops(run.costs.bitops(cfg))} BitOps" if metric == "bitops"
            else f"{run.costs.size_kib(cfg):.1f} KiB")


def _nearest_level_above(cost: float, level_targets: dict) -> float | None:
    above = [(t - cost, lv) for lv, t in level_targets.items() if t > cost]
    return min(above)[1] if above else None


def study_table(out: Path, run, metrics, levels, strategies) -> str:
    """The markdown table of a study folder: per metric and level, uniform (interpolated at the
    budget), each strategy's mean ± std over search seeds, random configs, LSQ alone."""
    uni = _done(out / "uniform.json")
    if uni is None:
        return "(no results yet)"
    lsq = [json.loads(p.read_text()) for p in sorted(out.glob("lsq-*.json"))]
    lines = []
    for metric in metrics:
        key = "bitops" if metric == "bitops" else "size_mib"
        line = uni["uniform"] if metric == "bitops" else uni["uniform_a5"]
        points = [(u[key], u["accuracy"] * 100) for u in line]
        head = ["budget", f"uniform{'' if metric == 'bitops' else ' W=b A5'} (interp.)"]
        head += [f"{s} (mean ± std, n)" for s in strategies]
        head += ["random: mean / best (n)", "LSQ alone (coupled)", "search s (frontier: all "
                 "levels)"]
        level_targets = {lv: t for lv, t in zip(levels, budget_levels(run, levels, metric))}
        lines += [f"**{metric} budgets**", "", "| " + " | ".join(head) + " |",
                  "|" + "---|" * len(head)]
        for lv in levels:
            cells, target = [], None
            runs = {s: [r for r in (_done(p) for p in sorted(
                out.glob(f"{metric}-{s}-L{lv:g}-s*.json"))) if r] for s in strategies}
            any_run = next((r for rs in runs.values() for r in rs), None)
            if any_run:
                target = any_run["target"]
            rnd = _done(out / f"{metric}-random-L{lv:g}.json")
            if target is None and rnd:
                target = rnd["target"]
            if target is None:
                continue
            x = target if metric == "bitops" else target / (8 * 2**20)
            budget = (format_bitops(target) if metric == "bitops"
                      else f"{target / 8192:.1f} KiB")
            cells.append(f"level {lv:g} (< {budget})")
            cells.append(f"{interpolate(points, x):.2f}")
            times = []
            for s in strategies:
                accs = [r["accuracy"] * 100 for r in runs[s]]
                m, sd = mean_std(accs)
                cells.append(f"{m:.2f} ± {sd:.2f} ({len(accs)})" if accs else "–")
                secs = [r["front_seconds"] if r.get("front_seconds") else r["seconds"]
                        for r in runs[s]]
                if secs:
                    times.append(f"{s[0]} {statistics.fmean(secs):.0f}")
            if rnd:
                accs = [r["accuracy"] * 100 for r in rnd["random"]]
                cells.append(f"{statistics.fmean(accs):.2f} / {max(accs):.2f} ({len(accs)})")
            else:
                cells.append("–")
            match = [r for r in lsq if metric == "bitops" and
                     _nearest_level_above(r["bitops"], level_targets) == lv]
            cells.append(", ".join(f"{r['accuracy'] * 100:.2f} ({r['coupled_accuracy'] * 100:.2f})"
                                   for r in match) or "–")
            cells.append(", ".join(times) or "–")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def add_parser(sub) -> None:
    def floats(v):
        return [float(x) for x in v.split(",")]

    def ints(v):
        return [int(x) for x in v.split(",")]

    p = sub.add_parser("study", help="searched vs uniform vs random (vs LSQ alone), "
                                     "with error bars over search seeds; resumable")
    p.add_argument("--checkpoint", required=True, help="a coupled run folder")
    p.add_argument("--out", required=True, help="study folder (one JSON per finished piece)")
    p.add_argument("--levels", type=floats, default=[2.25, 2.5, 2.75, 3.0])
    p.add_argument("--seeds", type=ints, default=[0, 1, 2], help="search seeds")
    p.add_argument("--strategies", type=lambda v: v.split(","), default=["frontier", "greedy"])
    p.add_argument("--metrics", type=lambda v: v.split(","), default=["bitops", "size"])
    p.add_argument("--random", type=int, default=10, help="random configs per budget")
    p.add_argument("--uniform", type=ints, default=[2, 3, 4, 5, 6])
    p.add_argument("--batch-size", type=int, default=1024, help="held-out images per score")
    p.add_argument("--refine-rounds", type=int, default=1)
    p.add_argument("--calib-images", type=int, default=2048)
    p.add_argument("--lsq-alone", nargs="*", help="LSQ runs of searched configs to add")
    p.add_argument("--data-dir")
    p.add_argument("--threads", type=int)
    p.set_defaults(func=run_study)
