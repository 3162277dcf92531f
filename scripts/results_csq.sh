#!/usr/bin/env bash
# README's CSQ table: Fashion-MNIST ResNet-20 from the shipped float model, `rfq csq` at target
# 2, 3 and 4 average bits (size mode, N = 6 planes, 5-bit inputs like the main method's rows in
# the comparison table), then the plot of the average precision over training. Target 2 also
# with lambda = 0.5.
# Resumable: finished runs are skipped, interrupted ones continue.
#   bash scripts/results_csq.sh [OUT=runs] [THREADS=1]
# Two runs at a time, one thread each: about 6 min per pair on the 2-core machine (12 min).
set -euo pipefail
OUT=${1:-runs}
THREADS=${2:-1}
FLOAT=rfq/assets/resnet20-fmnist-float.pt
mkdir -p "$OUT"

csq() {  # target bits [lambda]; resumes an interrupted run, skips a finished one
  local dir=$OUT/csq-t$1 extra=()
  if [ $# -gt 1 ]; then dir=$dir-l$2; extra=(--reg-strength "$2"); fi
  if [ -f "$dir/report.json" ]; then return 0; fi
  local resume=()
  if [ -f "$dir/checkpoint.pt" ]; then resume=(--resume); fi
  python -m rfq csq --init-from "$FLOAT" --target-bits "$1" --act-bits 5 --planes 6 \
    --budget-mode size --out "$dir" ${extra[@]+"${extra[@]}"} ${resume[@]+"${resume[@]}"} \
    --threads "$THREADS" --no-progress > "$dir.log" 2>&1
}

csq 2 &
csq 4 &
wait
csq 3 &
csq 2 0.5 &  # the default lambda = 0.1 stops at 2.22 bits for target 2 (README)
wait
python scripts/plot_csq.py "$OUT" "$OUT/csq-precision.png"
