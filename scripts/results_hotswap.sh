#!/usr/bin/env bash
# README's hot-swap table: one hot-swap model (wavelet path on) and its ablation (off) trained
# from the shipped float ResNet-20 with `rfq hotswap train` (1,000 steps each), separately
# trained LSQ at 8, 7 and 1 bits (6..2 come from scripts/results.sh, docs/results-resnet20-fmnist.json),
# then every model's test top-1 at 8..1 bits, with BN as trained and recalibrated.
# Resumable: finished runs are skipped, interrupted ones continue.
#   bash scripts/results_hotswap.sh [OUT=runs] [THREADS=1]
# The two hot-swap runs go in parallel, one thread each (about 18 min on the 2-core machine),
# then the LSQ runs (about 10 min), then the evaluations (about 5 min).
set -euo pipefail
OUT=${1:-runs}
THREADS=${2:-1}
FLOAT=rfq/assets/resnet20-fmnist-float.pt
mkdir -p "$OUT"

train() {  # folder, then extra args; resumes a run that has a checkpoint but is not finished
  local dir=$1; shift
  if [ -f "$dir/done" ]; then return 0; fi
  local resume=()
  if [ -f "$dir/checkpoint.pt" ]; then resume=(--resume); fi
  "$@" --out "$dir" ${resume[@]+"${resume[@]}"} --threads "$THREADS" --no-progress \
    > "$dir.log" 2>&1 && touch "$dir/done"
}

train "$OUT/hotswap" python -m rfq hotswap train --init-from "$FLOAT" &
train "$OUT/hotswap-direct" python -m rfq hotswap train --init-from "$FLOAT" --no-wavelet &
wait
train "$OUT/lsq8" python -m rfq train --profile lsq --lsq-bits 8 --init-from "$FLOAT" &
train "$OUT/lsq1" python -m rfq train --profile lsq --lsq-bits 1 --init-from "$FLOAT" &
wait
train "$OUT/lsq7" python -m rfq train --profile lsq --lsq-bits 7 --init-from "$FLOAT"
wait
for run in hotswap hotswap-direct; do
  python -m rfq hotswap eval --checkpoint "$OUT/$run" --bits 8,7,6,5,4,3,2,1 \
    --threads 2 --json "$OUT/$run-eval.json"
  python -m rfq hotswap eval --checkpoint "$OUT/$run" --bits 8,7,6,5,4,3,2,1 \
    --calib-images 2048 --threads 2 --json "$OUT/$run-eval-calib.json"
done
for b in 8 7 1; do
  python -m rfq eval --checkpoint "$OUT/lsq$b" --bits "$b" --calib-images 2048 --threads 2 \
    | tee "$OUT/lsq$b-eval.txt"
done
