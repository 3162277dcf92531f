#!/usr/bin/env bash
# The README's "searched vs uniform" table, end to end and resumable: two coupled runs (seeds 0
# and 1, the demo recipe, 1,000 steps each), then per run `rfq study`: uniform levels, the
# frontier search at levels 2.25-3 with 3 search seeds (BitOps and size budgets), 10 random
# configs per budget, RFQ's greedy search where time allows (GREEDY_LEVELS, GREEDY_SEEDS), and
# seed 0's frontier configs trained alone with LSQ (same recipe and steps); then
# scripts/search_analysis.py on run 0. Every piece is a file; rerunning skips finished ones.
# Measured: about 7.5 hours at 1 thread on the shared machine, 4.3 of them the three greedy
# searches to level 2.5 (80-90 min each); each further GREEDY_LEVELS entry adds about as much.
# Usage: bash scripts/results_search.sh [out_dir] [threads]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/results-search}
THREADS=${2:-1}
FLOAT=rfq/assets/resnet20-fmnist-float.pt
LEVELS=2.25,2.5,2.75,3
for seed in ${TRAIN_SEEDS:-0 1}; do
  run="$OUT/coupled-s$seed"
  if [ ! -f "$run/done" ]; then
    python -m rfq train --profile demo --model resnet20 --init-from "$FLOAT" --epochs 10 \
      --seed "$seed" --out "$run" --threads "$THREADS" --no-progress \
      $( [ -f "$run/checkpoint.pt" ] && echo --resume )
    touch "$run/done"
  fi
  study="$OUT/study-s$seed"
  python -m rfq study --checkpoint "$run" --out "$study" --levels "$LEVELS" \
    --strategies frontier --threads "$THREADS"
done
study="$OUT/study-s0"
for lv in ${GREEDY_LEVELS:-2.5}; do
  python -m rfq study --checkpoint "$OUT/coupled-s0" --out "$study" --levels "$lv" \
    --strategies greedy --metrics bitops --seeds "${GREEDY_SEEDS:-0,1,2}" --random 0 \
    --threads "$THREADS"
done
lsq=()
for lv in 2.25 2.5 2.75 3; do
  dir="$OUT/lsq-frontier-L$lv"
  if [ ! -f "$dir/done" ]; then
    python -m rfq train --profile lsq --lsq-config "$study/bitops-frontier-L$lv-s0.json" \
      --model resnet20 --init-from "$FLOAT" --epochs 10 --out "$dir" --threads "$THREADS" \
      --no-progress $( [ -f "$dir/checkpoint.pt" ] && echo --resume )
    touch "$dir/done"
  fi
  lsq+=("$dir")
done
python -m rfq study --checkpoint "$OUT/coupled-s0" --out "$study" --levels "$LEVELS" \
  --strategies frontier --lsq-alone "${lsq[@]}" --threads "$THREADS"
python scripts/search_analysis.py "$OUT/coupled-s0" "$study" "$OUT/analysis.json" \
  --threads "$THREADS"
