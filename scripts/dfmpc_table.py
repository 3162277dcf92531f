"""The README's DF-MPC table from the report.json files of `rfq dfmpc` runs under a folder.
Usage: python scripts/dfmpc_table.py OUT_DIR"""

import json
import sys
from pathlib import Path


def main(folder: str) -> int:
    rows = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*/report.json"))]
    print("| model | bits (low/high) | pairs | average weight bits | size KiB (fp32) | float | "
          "uncompensated | DF-MPC | compensation s |")
    print("|---|---|---|---|---|---|---|---|---|")
    order = {"resnet20": 0, "resnet18": 1, "mobilenetv2": 2}
    for r in sorted(rows, key=lambda r: (order.get(r["model"], 9), r["bits"])):
        print(f"| {r['model']} | {r['bits']} | {len(r['pairs'])} | {r['average_bits']:.2f} | "
              f"{r['size_kib']:.1f} ({r['float_kib']:.1f}) | {100 * r['fp']:.2f} | "
              f"{100 * r['uncompensated']:.2f} | {100 * r['dfmpc']:.2f} | {r['seconds']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
