"""The one comparison of every method on the same model and data (README "All methods, one
table"): Fashion-MNIST ResNet-20 from the shipped float model, test top-1 against weight size.

Reads what the methods' results scripts wrote: a `rfq study` folder of the main method
(uniform levels at A5 and the frontier search's size budgets; scripts/results_search.sh) and a
folder of `rfq dfmpc` runs (scripts/results_dfmpc.sh), and optionally the folder of
scripts/results_hotswap.sh (its *-eval.json files). Prints the markdown table and writes the
plot. Usage: python scripts/compare_methods.py STUDY_DIR DFMPC_DIR OUT.png [HOTSWAP_DIR [CSQ_DIR]]
(CSQ_DIR: the folder of scripts/results_csq.sh, its csq-t*/report.json files).
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path


def rows_rfq(study: Path) -> list[dict]:
    uniform = json.loads((study / "uniform.json").read_text())
    rows = [{"method": "RFQ, coupled model, uniform", "config": f"W{u['bits']}A5",
             "data": "training set", "size_kib": u["size_mib"] * 1024,
             "top1": 100 * u["accuracy"], "spread": None, "acts": "5 bits"}
            for u in uniform["uniform_a5"]]
    by_level: dict[float, list[dict]] = {}
    for path in study.glob("size-frontier-L*-s*.json"):
        r = json.loads(path.read_text())
        by_level.setdefault(r["level"], []).append(r)
    for level, results in sorted(by_level.items()):
        accs = [100 * r["accuracy"] for r in results]
        rows.append({"method": "RFQ, coupled model, frontier search", "config":
                     f"size level {level:g}", "data": "training set",
                     "size_kib": statistics.fmean(r["size_mib"] * 1024 for r in results),
                     "top1": statistics.fmean(accs),
                     "spread": statistics.stdev(accs) if len(accs) > 1 else None,
                     "acts": "mixed, inputs 5 bits"})
    return rows


def rows_dfmpc(folder: Path) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("*/report.json")):
        r = json.loads(path.read_text())
        if r["model"] != "resnet20":
            continue
        rows.append({"method": "float", "config": "fp32", "data": "training set",
                     "size_kib": r["float_kib"], "top1": 100 * r["fp"], "spread": None,
                     "acts": "fp32"})
        for key, name in (("uncompensated", "DF-MPC's quantizers, uncompensated"),
                          ("dfmpc", "DF-MPC")):
            rows.append({"method": name, "config": r["bits"], "data": "none",
                         "size_kib": r["size_kib"], "top1": 100 * r[key], "spread": None,
                         "acts": "fp32"})
    return rows


HOTSWAP = {"hotswap": "Hot-swap one model (inspired by One Model for All)",
           "hotswap-direct": "Hot-swap one model, wavelet path off"}


def rows_hotswap(folder: Path) -> list[dict]:
    rows = []
    for run, name in HOTSWAP.items():
        path = folder / f"{run}-eval.json"
        if not path.is_file():
            continue
        for r in json.loads(path.read_text())["rows"]:
            rows.append({"method": name, "config": f"W{r['bits']}A{r['bits']}",
                         "data": "training set", "size_kib": r["size_kib"],
                         "top1": 100 * r["accuracy"], "spread": None,
                         "acts": f"{r['bits']} bit{'s' if r['bits'] > 1 else ''}"})
    return rows


CSQ = "CSQ (bit-level continuous sparsification)"


def rows_csq(folder: Path) -> list[dict]:
    """One row per target: weight size as stored (signed digits: up to b + 1 bits for b bits
    on), CSQ's own count (b bits) in the config column."""
    rows = []
    for path in sorted(p for p in folder.glob("csq-t*/report.json")
                       if re.fullmatch(r"csq-t\d+(-l[\d.]+)?", p.parent.name)):
        r = json.loads(path.read_text())
        rows.append({"method": CSQ, "config": f"target {r['target_bits']:g} "
                     f"(λ {r['reg_strength']:g}): "
                     f"{r['average_bits']:.2f} bits counted, {r['storage_average_bits']:.2f} "
                     f"stored", "data": "training set", "size_kib": r["storage_kib"],
                     "top1": 100 * r["top1"], "spread": None,
                     "acts": f"{r['act_bits']} bits (ReLU6, max-scaled)"})
    return rows


def main(study: str, dfmpc: str, out_png: str, hotswap: str | None = None,
         csq: str | None = None) -> int:
    rows = rows_rfq(Path(study)) + rows_dfmpc(Path(dfmpc))
    if hotswap:
        rows += rows_hotswap(Path(hotswap))
    if csq:
        rows += rows_csq(Path(csq))
    floats = [r for r in rows if r["method"] == "float"]
    rows = [r for r in rows if r["method"] != "float"] + floats[:1]
    print("| method | config | data used | weight KiB | activations | test top-1 % |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        spread = f" ± {r['spread']:.2f}" if r["spread"] is not None else ""
        print(f"| {r['method']} | {r['config']} | {r['data']} | {r['size_kib']:.1f} | "
              f"{r['acts']} | {r['top1']:.2f}{spread} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, marker in (("RFQ, coupled model, uniform", "o-"),
                           ("RFQ, coupled model, frontier search", "s"),
                           ("DF-MPC's quantizers, uncompensated", "x--"), ("DF-MPC", "^-"),
                           (HOTSWAP["hotswap"], "D-"), (HOTSWAP["hotswap-direct"], "d:"),
                           (CSQ, "*-")):
        pts = sorted((r["size_kib"], r["top1"]) for r in rows if r["method"] == method)
        if pts:
            ax.plot(*zip(*pts), marker, label=method)
    ax.set_xlabel("weight size (KiB)")
    ax.set_ylabel("Fashion-MNIST test top-1 (%)")
    title = "ResNet-20 from the shipped float model"
    if floats:
        title += f" (float: {floats[0]['top1']:.2f} %, {floats[0]['size_kib']:.0f} KiB)"
    ax.set_title(title, fontsize=10)
    ax.set_ylim(bottom=max(0, min(r["top1"] for r in rows) - 2))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
