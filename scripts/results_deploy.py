"""README's deploy tables: the demo's one model exported at uniform W2..W6 and at every config its
search chose, plus a W8A8 export of the shipped float model; for each, the file's bytes against
the fp32 weights and the Fashion-MNIST test top-1 of the model loaded from the file alone next to
the fake-quantized model's (same BN recalibration). Ends with `rfq deploy bench --per-layer` of
the most accurate searched config. Resumable: finished rows are kept in OUT/deploy.json.

    python scripts/results_deploy.py --demo runs/demo --out runs/deploy [--data-dir D]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rfq import deploy
from rfq.cli.demo import SHIPPED_FLOAT
from rfq.cli.pipeline import (calibration_batches, deployed_accuracy, evaluate_config,
                              export_config, load_run, write_json)
from rfq.cost import format_bitops
from rfq.deploy import bench
from rfq.nn import QuantConfig, quantize_
from rfq.runtime import flush_denormals
from rfq.training import evaluate
from rfq.cli.pipeline import test_batches


def w8_from_float(data_dir, path: Path, calib_images: int) -> dict:
    """W8A8 of the shipped float ResNet-20: LSQ's initial steps (weights from their statistics,
    activations from the first calibration batch), no training."""
    run = load_run(SHIPPED_FLOAT, data_dir=data_dir)
    float_acc = evaluate(run.model, test_batches(run))
    model = quantize_(run.model, QuantConfig(bits=(8,), first_bits=8, last_bits=8))
    model.eval()
    with flush_denormals(), torch.no_grad():
        for x, _ in calibration_batches(run, calib_images)[:1]:
            model(x)  # activation steps from this batch
        fake = evaluate(model, test_batches(run))
    arch = {"model": "resnet20", "in_channels": 1, "classes": 10, "input_shape": [1, 28, 28]}
    deploy.export(model, path, arch=arch, extra={"config_from": "W8A8 of the shipped float "
                                                 "model, LSQ initial steps"})
    run.model = model
    return {"fake": fake, "float": float_acc, "deployed": deployed_accuracy(run, path)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", required=True, help="the demo's output folder (coupled/, results.json)")
    p.add_argument("--out", default="runs/deploy")
    p.add_argument("--data-dir")
    p.add_argument("--calib-images", type=int, default=2048, help="as the demo (its accuracies)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "deploy.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"rows": {}}
    run = load_run(Path(args.demo) / "coupled", data_dir=args.data_dir)
    demo = json.loads((Path(args.demo) / "results.json").read_text())
    items = [(f"uniform W{b}A{b}", run.costs.uniform(run.model, b)) for b in (2, 3, 4, 5, 6)]
    for i, s in enumerate(demo["searched"]):
        items.append((f"{s['strategy']} {format_bitops(s['bitops'])} (#{i})",
                      {n: tuple(v) for n, v in s["config"].items()}))
    t0 = time.perf_counter()
    for label, config in items:
        if label in state["rows"]:
            continue
        path = out / (label.split(" (")[0].replace(" ", "-").replace(".", "_") +
                      f"-{len(state['rows'])}.safetensors")
        t = time.perf_counter()
        export_config(run, config, path, args.calib_images, label)
        fake = evaluate_config(run, config, calibration_batches(run, args.calib_images))
        row = {"file": str(path), "fake": fake, "deployed": deployed_accuracy(run, path),
               "sizes": deploy.file_sizes(path), "size_kib_cost_model": run.costs.size_kib(config),
               "seconds": time.perf_counter() - t}
        state["rows"][label] = row
        write_json(state_path, state)
        print(f"{label}: fake-quant {fake * 100:.2f} %, from the file {row['deployed'] * 100:.2f}"
              f" %, {row['sizes']['file'] / 1024:.1f} KiB ({row['seconds']:.0f} s)")
    if "uniform W8A8 (float model, no training)" not in state["rows"]:
        path = out / "uniform-W8A8-float.safetensors"
        acc = w8_from_float(args.data_dir, path, args.calib_images)
        state["rows"]["uniform W8A8 (float model, no training)"] = {
            "file": str(path), "fake": acc["fake"], "deployed": acc["deployed"],
            "float": acc["float"], "sizes": deploy.file_sizes(path)}
        write_json(state_path, state)
    best = max(demo["searched"], key=lambda s: s["accuracy"])
    best_label = next(label for label, _ in items
                      if label.endswith(f"(#{demo['searched'].index(best)})"))
    report = bench.bench_file(state["rows"][best_label]["file"], (1, 64), rounds=5, reps=30,
                              layers=True)
    state["bench"] = {"label": best_label, "report": report}
    state["wall_seconds"] = state.get("wall_seconds", 0) + time.perf_counter() - t0
    write_json(state_path, state)

    lines = ["| config | top-1 fake-quant % | top-1 from the file % | file KiB | codes KiB "
             "| at own bits KiB | fp32 KiB | fp32 / file |", "|---|---|---|---|---|---|---|---|"]
    for label, r in state["rows"].items():
        s = r["sizes"]
        lines.append(f"| {label} | {r['fake'] * 100:.2f} | {r['deployed'] * 100:.2f} | "
                     f"{s['file'] / 1024:.1f} | {s['codes'] / 1024:.1f} | "
                     f"{s['codes_ideal'] / 1024:.1f} | {s['fp32'] / 1024:.1f} | "
                     f"{s['fp32'] / s['file']:.2f}x |")
    print("\n".join(lines))
    print(f"\nper-layer, {best_label}:\n" + bench.format_report(report))
    print(f"\nwall time of this script: {state['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
