"""The average precision of every `rfq csq` run over training (README's CSQ plot): the
size-weighted average bits at the start of each pseudo-epoch, the target as a dashed line,
the ticket round shaded. Usage: python scripts/plot_csq.py RUNS_DIR OUT.png
(reads RUNS_DIR/csq-tB[-lL]/report.json, written by scripts/results_csq.sh)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def main(runs: str, out: str) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = sorted((json.loads(p.read_text()) for p in Path(runs).glob("csq-t*/report.json")
                      if re.fullmatch(r"csq-t\d+(-l[\d.]+)?", p.parent.name)),
                     key=lambda r: (r["target_bits"], r["reg_strength"]))
    if not reports:
        raise SystemExit(f"plot_csq: no csq-t*/report.json under {runs}")
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for r in reports:
        epochs = [h["epoch"] for h in r["history"]]
        line, = ax.plot(epochs, [h["average_bits"] for h in r["history"]], marker=".",
                        label=f"target {r['target_bits']:g} bits, λ {r['reg_strength']:g}: "
                              f"reached "
                              f"{r['average_bits']:.2f}, top-1 {100 * r['top1']:.2f} %")
        ax.axhline(r["target_bits"], color=line.get_color(), linestyle="--", linewidth=0.8)
        ticket = [h["epoch"] for h in r["history"] if h["round"] == r["config"]["rounds"]]
    if ticket:
        ax.axvspan(ticket[0], ticket[-1] + 1, color="0.9", label="ticket round (masks frozen)")
    ax.set_xlabel(f"pseudo-epoch ({reports[0]['config']['steps_per_epoch']} steps of "
                  f"{reports[0]['config']['batch_size']} images)")
    ax.set_ylabel("average bits (size-weighted)")
    ax.set_title("CSQ on Fashion-MNIST ResNet-20: bits pruned and grown to the target")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
