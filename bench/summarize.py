"""Combine the ratio rows of several `pytest bench/ --ratio-json F` runs into one markdown table:
the median ratio over the runs and its range. Shared machines drift between runs (spec §6), so a
ratio is reported with its spread, never from a single run.

    for i in 1 2 3; do pytest bench/ -q --ratio-json /tmp/rfq-bench-$i.json; done
    python bench/summarize.py /tmp/rfq-bench-*.json
"""

import json
import statistics
import sys


def summarize(paths):
    runs = [json.load(open(p)) for p in paths]
    keyed = {}
    for run in runs:
        for row in run["rows"]:
            keyed.setdefault((row["target"], row["group"], row["baseline"]), []).append(row)
    lines = [f"Machine: {runs[0]['machine']}; {len(runs)} runs", "",
             "| target | group | baseline | floor | baseline ms | rfq ms | ratio (median) | "
             "range over runs | rfq GB/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (target, group, baseline), rows in keyed.items():
        ratios = [r["ratio"] for r in rows]
        med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
        lines.append(
            f"| {target} | {group} | {baseline} | {rows[0]['floor']} | {med('base_ms'):.3f} | "
            f"{med('rfq_ms'):.3f} | **{statistics.median(ratios):.2f}x** | "
            f"{min(ratios):.2f}-{max(ratios):.2f} | {med('gbps'):.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(summarize(sys.argv[1:]))
