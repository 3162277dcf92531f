#!/usr/bin/env bash
# The README's Results section, end to end: the demo's coupled run (10 pseudo-epochs of 100
# steps), then each bit-width trained alone with LSQ on the same recipe and the same number of
# steps, then one search + table + plot with all of them. Every step resumes where it stopped.
# About an hour on 2 cores. Usage: bash scripts/results.sh [out_dir] [threads]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/results}
THREADS=${2:-2}
if [ ! -f "$OUT/results.json" ]; then
  python -m rfq demo --out "$OUT" --threads "$THREADS" --epochs "${EPOCHS:-10}"
fi
EPOCHS_RUN=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['config']['epochs'])" \
             "$OUT/results.json")
for b in 6 5 4 3 2; do
  if [ ! -f "$OUT/lsq$b/model.done" ]; then
    python -m rfq train --profile lsq --lsq-bits "$b" --epochs "$EPOCHS_RUN" --model resnet20 \
      --init-from rfq/assets/resnet20-fmnist-float.pt --out "$OUT/lsq$b" --threads "$THREADS" \
      $( [ -f "$OUT/lsq$b/checkpoint.pt" ] && echo --resume ) --no-progress
    touch "$OUT/lsq$b/model.done"
  fi
done
python -m rfq search --checkpoint "$OUT/coupled" --budget level:3.5 --budget level:4 \
  --budget level:4.5 --batch-size "${SEARCH_BATCH:-1024}" --calib-images 2048 --threads "$THREADS" \
  --uniform 2,3,4,5,6 --baselines "$OUT"/lsq6 "$OUT"/lsq5 "$OUT"/lsq4 "$OUT"/lsq3 "$OUT"/lsq2 \
  --out "$OUT/search.json" --plot "$OUT/pareto.png"
