#!/usr/bin/env bash
# The README's DF-MPC table, end to end and resumable: short float runs of ResNet-18 and
# MobileNetV2 (`rfq train --profile float`, EPOCHS epochs each), then `rfq dfmpc` on them and on
# the shipped ResNet-20 at every bit pair of the table, scripts/dfmpc_analysis.py (why it helps or
# hurts), then DF-MPC's repair of the main method's searched and random configs
# (scripts/dfmpc_repair.py on the `rfq study` folders of scripts/results_search.sh, if STUDY
# names its output, e.g. STUDY=runs/r12). Every piece is a file; a rerun skips it.
# Usage: bash scripts/results_dfmpc.sh [out_dir] [threads]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/results-dfmpc}
THREADS=${2:-1}
EPOCHS=${EPOCHS:-5}
for model in resnet18 mobilenetv2; do
  run="$OUT/float-$model"
  if [ ! -f "$run/done" ]; then
    python -m rfq train --profile float --model "$model" --epochs "$EPOCHS" --out "$run" \
      --threads "$THREADS" --no-progress $( [ -f "$run/checkpoint.pt" ] && echo --resume )
    touch "$run/done"
  fi
done
declare -A CHECKPOINT=([resnet20]=rfq/assets/resnet20-fmnist-float.pt
                       [resnet18]="$OUT/float-resnet18" [mobilenetv2]="$OUT/float-mobilenetv2")
declare -A BITS=([resnet20]="2/6 3/6 4/6" [resnet18]="2/6 3/6 4/6" [mobilenetv2]="6/6 4/6 3/6")
for model in resnet20 resnet18 mobilenetv2; do
  for bits in ${BITS[$model]}; do
    dir="$OUT/$model-${bits/\//-}"
    [ -f "$dir/report.json" ] || python -m rfq dfmpc --checkpoint "${CHECKPOINT[$model]}" \
      --bits "$bits" --out "$dir" --threads "$THREADS"
  done
done
python scripts/dfmpc_table.py "$OUT" > "$OUT/table.md"
for case in "resnet20 2/6" "resnet20 3/6" "resnet18 2/6" "resnet18 3/6" "mobilenetv2 3/6"; do
  set -- $case
  json="$OUT/analysis-$1-${2/\//-}.json"
  [ -f "$json" ] || python scripts/dfmpc_analysis.py "${CHECKPOINT[$1]}" "$2" "$json" \
    --threads "$THREADS"
done
if [ -n "${STUDY:-}" ]; then
  python scripts/dfmpc_repair.py "$STUDY/coupled-s0" "$STUDY/study-s0" "$OUT/repair-s0.jsonl" \
    --threads "$THREADS"
  python scripts/compare_methods.py "$STUDY/study-s0" "$OUT" docs/compare_methods.png
fi
cat "$OUT/table.md"
