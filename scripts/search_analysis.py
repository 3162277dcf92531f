"""Why a search does or does not beat uniform: measurements behind the README's verdict.

1. score noise per move: every one-step move from uniform W3A3 scored on 5 disjoint held-out
   batches; the spread of one move's error over batches against the spread between moves;
2. BN recalibration size: one searched config's test accuracy after recalibrating on 512, 2048
   and 7000 training images (3 draws each);
3. does the frontier's refinement pay: the solved configs with and without one refinement round,
   same seeds.
Usage: python scripts/search_analysis.py RUN_DIR STUDY_DIR OUT.json [--threads N]
(STUDY_DIR: an `rfq study` folder of the same run, for the configs of parts 2 and 3).
Each part is saved in OUT.json when it finishes; a rerun skips finished parts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("study")
    p.add_argument("out")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1024)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from rfq.cli.pipeline import (budget_levels, calibration_batches, evaluate_config, load_run,
                                  score_batches, write_json)
    from rfq.methods.rfq.frontier import FrontierSearch
    from rfq.methods.rfq.search import GreedySearch
    from rfq.runtime import flush_denormals

    out = Path(args.out)
    done = json.loads(out.read_text()) if out.is_file() else {}
    run = load_run(args.run)

    if "noise" not in done:
        t0 = time.perf_counter()
        search = GreedySearch(run.model, run.costs, score_batches(run, args.batch_size, 0))
        config = run.costs.uniform(run.model, 3)
        moves = search.moves(config, "w", 2) + search.moves(config, "a", 2)
        per_batch = []
        with flush_denormals(), search._scoring():
            for _ in range(5):  # 5 x 1024 of the 5,000 held-out images: disjoint batches
                x, y = next(search.batches)
                per_batch.append(search._errors(config, moves, x, y))
        per_move = list(zip(*per_batch))
        within = statistics.fmean(statistics.stdev(m) for m in per_move)
        means = [statistics.fmean(m) for m in per_move]
        best = min(range(len(moves)), key=lambda i: means[i])
        # how often one batch's argmin error is the 5-batch argmin
        agree = sum(min(range(len(moves)), key=lambda i: b[i]) == best for b in per_batch)
        done["noise"] = {
            "moves": len(moves), "batch": args.batch_size,
            "std_of_a_moves_error_over_batches_pts": within * 100,
            "std_between_moves_mean_error_pts": statistics.stdev(means) * 100,
            "best_vs_median_move_pts": (statistics.median(means) - means[best]) * 100,
            "single_batch_argmin_agrees_with_5_batch_argmin": f"{agree}/5",
            "seconds": time.perf_counter() - t0}
        write_json(out, done)
        print("noise:", done["noise"], flush=True)

    study = Path(args.study)
    if "bn_recalibration" not in done:
        r = json.loads((study / "bitops-frontier-L2.5-s0.json").read_text())
        config = {n: tuple(v) for n, v in r["config"].items()}
        rows = {}
        for images in (512, 2048, 7000):
            accs = []
            for seed in (1, 2, 3):
                calib = calibration_batches(run, images, seed=seed)
                accs.append(evaluate_config(run, config, calib) * 100)
            rows[images] = {"mean": statistics.fmean(accs), "std": statistics.stdev(accs),
                            "runs": accs}
        done["bn_recalibration"] = {"config": "bitops frontier level 2.5 seed 0", **rows}
        write_json(out, done)
        print("bn:", done["bn_recalibration"], flush=True)

    if "refinement" not in done:
        levels = [2.25, 2.5, 2.75, 3.0]
        targets = budget_levels(run, levels)
        calib = calibration_batches(run, 2048)
        rows = []
        for seed in (0, 1, 2):
            with flush_denormals():
                solved = FrontierSearch(run.model, run.costs,
                                        score_batches(run, args.batch_size, seed),
                                        refine_rounds=0).run_all(targets)
            for lv, r in zip(levels, solved):
                refined = json.loads((study / f"bitops-frontier-L{lv:g}-s{seed}.json")
                                     .read_text())
                rows.append({"level": lv, "seed": seed,
                             "solved": evaluate_config(
                                 run, {n: tuple(v) for n, v in r.config.items()}, calib) * 100,
                             "refined": refined["accuracy"] * 100,
                             "refinement_accepted": any(h.get("accepted")
                                                        for h in refined["history"])})
            done["refinement"] = rows
            write_json(out, done)
        print("refinement:", rows, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
