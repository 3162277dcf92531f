#!/usr/bin/env bash
# README's CSQ table: Fashion-MNIST ResNet-20 from the shipped float model, `rfq csq` at target
# 2, 3 and 4 average bits (size mode, N = 6 planes, 5-bit inputs like the main method's rows in
# the comparison table), then the plot of the average precision over training. Target 2 also
# with lambda = 0.5; target 3 also in layer mode, with twice the steps and with learned LSQ
# input steps (ablations).
# Resumable: finished runs are skipped, interrupted ones continue.
#   bash scripts/results_csq.sh [OUT=runs] [THREADS=1]
# Two runs at a time, one thread each: about 6 min per pair on the 2-core machine (12 min),
# then the target-3 ablations (18 min).
set -euo pipefail
OUT=${1:-runs}
THREADS=${2:-1}
FLOAT=rfq/assets/resnet20-fmnist-float.pt
mkdir -p "$OUT"

csq() {  # folder name, target bits, extra flags; resumes an interrupted run, skips a finished one
  local dir=$OUT/$1 target=$2
  shift 2
  if [ -f "$dir/report.json" ]; then return 0; fi
  local resume=()
  if [ -f "$dir/checkpoint.pt" ]; then resume=(--resume); fi
  python -m rfq csq --init-from "$FLOAT" --target-bits "$target" --act-bits 5 --planes 6 \
    --out "$dir" "$@" ${resume[@]+"${resume[@]}"} --threads "$THREADS" --no-progress \
    > "$dir.log" 2>&1
}

csq csq-t2 2 &
csq csq-t4 4 &
wait
csq csq-t3 3 &
csq csq-t2-l0.5 2 --reg-strength 0.5 &  # the default lambda = 0.1 stops at 2.22 bits (README)
wait
python scripts/plot_csq.py "$OUT" "$OUT/csq-precision.png"
# ablations at target 3 (README): the unweighted budget, and twice the steps
csq csq-t3-layer 3 --budget-mode layer &
csq csq-t3-long 3 --round-epochs 40 --ticket-epochs 12 &
wait
csq csq-t3-lsqact 3 --act-quant lsq  # the main method's learned input steps
