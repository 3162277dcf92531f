"""DF-MPC as a zero-data repair of the main method's mixed configs (README, DF-MPC section).

For every config of an `rfq study` folder (the frontier's, the greedy search's and the random
ones, BitOps budgets): the coupled model at the config, BN recalibrated as the study does
(2,048 training images), test top-1 without and with ``rfq.methods.dfmpc.repair_config``
(which itself reads no data). Configs without a low->high pair are left out; "without" is the
study's own number (the same recalibration), recomputed for the first config as a check. One
JSON line per config in OUT.jsonl: a rerun skips the done ones.
Usage: python scripts/dfmpc_repair.py RUN_DIR STUDY_DIR OUT.jsonl [--threads N] [--calib-images N]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch


def study_configs(study: Path):
    """(key, config, study's accuracy) of every BitOps config in the folder, in a fixed order."""
    for path in sorted(study.glob("bitops-*.json")):
        data = json.loads(path.read_text())
        if "random" in data:
            for i, r in enumerate(data["random"]):
                yield f"{path.stem}#{i}", r["config"], r["accuracy"]
        elif "config" in data:
            yield path.stem, data["config"], data["accuracy"]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("study")
    p.add_argument("out")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calib-images", type=int, default=2048)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from rfq.cli.pipeline import calibration_batches, load_run, test_batches
    from rfq.methods.dfmpc.repair import repair_config
    from rfq.methods.rfq.search import recalibrate_bn
    from rfq.nn import set_bits
    from rfq.runtime import flush_denormals
    from rfq.training.metrics import evaluate

    out = Path(args.out)
    done = {}
    if out.is_file():
        for line in out.read_text().splitlines():
            row = json.loads(line)
            done[row["key"]] = row
    run = load_run(args.run)
    calib = calibration_batches(run, args.calib_images)
    checked = bool(done)
    for key, config, base in study_configs(Path(args.study)):
        if key in done:
            continue
        model = copy.deepcopy(run.model)
        set_bits(model, {n: tuple(v) for n, v in config.items()})
        with flush_denormals():
            recalibrate_bn(model, calib)
            repaired, report = repair_config(model)
            if report and not checked:
                recomputed = evaluate(model, test_batches(run))
                if recomputed != base:
                    raise SystemExit(f"{key}: the study's {base} is not reproduced "
                                     f"({recomputed}): other calibration settings?")
                checked = True
            fixed = evaluate(repaired, test_batches(run)) if report else base
        row = {"key": key, "pairs": len(report), "base": base, "repaired": fixed}
        done[key] = row
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{key}: {len(report)} low->high pairs, {base * 100:.2f} -> {fixed * 100:.2f} %",
              flush=True)
    rows = [r for r in done.values() if r["pairs"]]
    if len(rows) > 1:
        deltas = [100 * (r["repaired"] - r["base"]) for r in rows]
        mean, std = statistics.fmean(deltas), statistics.stdev(deltas)
        print(f"{len(rows)} of {len(done)} configs have a low->high pair; repair changes top-1 "
              f"by {mean:+.2f} +- {std:.2f} points (mean +- std; standard error "
              f"{std / len(rows) ** 0.5:.2f}); better in {sum(d > 0 for d in deltas)}, worse "
              f"in {sum(d < 0 for d in deltas)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
