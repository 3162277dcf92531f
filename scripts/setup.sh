#!/usr/bin/env bash
# Sets up rfq in the current Python: torch (CPU wheel 2.13.0 unless a torch >= 2.11 is already
# installed), the test and demo dependencies, then builds the C++ extension in place.
# Idempotent: a second run only re-checks and rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-2}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

torch_ok() {
  "$PY" - <<'PYEOF' 2>/dev/null
import sys, torch
major, minor = (int(p) for p in torch.__version__.split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 11) else 1)
PYEOF
}

if ! torch_ok; then
  echo "[setup] installing torch==2.13.0 (CPU build)"
  "$PY" -m pip install -q torch==2.13.0
fi
echo "[setup] installing test and demo dependencies"
"$PY" -m pip install -q numpy pytest hypothesis pytest-benchmark expecttest scikit-learn "triton>=3.6"
"$PY" -m pip install -q tqdm matplotlib tensorboard  # the CLI: progress bars, Pareto plot, --tensorboard
# The demo's data: Fashion-MNIST from Debian's package (never downloaded at run time).
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ] && [ -z "${RFQ_DATA_DIR:-}" ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" -eq 0 ]; then
    echo "[setup] installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; } >/dev/null \
      || echo "[setup] WARNING: could not install dataset-fashion-mnist; the demo needs it" >&2
  else
    echo "[setup] NOTE: the demo needs Fashion-MNIST: sudo apt-get install dataset-fashion-mnist" >&2
  fi
fi
echo "[setup] building rfq._C (MAX_JOBS=$MAX_JOBS)"
"$PY" -m pip install -q -e . --no-build-isolation
"$PY" -c "import rfq, torch; print('[setup] rfq ready: torch', torch.__version__, '| CPU kernels', rfq.ops.cpu_capability())"
