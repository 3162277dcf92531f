#!/usr/bin/env bash
# CUDA compile check without a GPU (spec §7): builds rfq._C with its CUDA kernels against the CUDA 13
# build of torch (2.14.1) in a cached venv, out of tree, then loads that build and checks that every
# op declared in csrc/registration.cpp has a CUDA kernel. The in-place rfq/_C*.so that the CPU torch
# uses is never touched: the build runs on a copy of the sources in a temporary folder.
#
# Environment: RFQ_CUDA_VENV (default ~/.cache/rfq/cu13-venv), RFQ_CUDA_HOME (default
# /usr/local/cuda-13.0), MAX_JOBS (default 2), PYTHON (the interpreter that creates the venv),
# RFQ_CUDA_CHECK_LOG (where the full build log is kept; default /tmp/rfq-cuda-check-build.log).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${RFQ_CUDA_VENV:-$HOME/.cache/rfq/cu13-venv}
CUDA_ROOT=${RFQ_CUDA_HOME:-/usr/local/cuda-13.0}
TORCH_SPEC="torch==2.14.1"
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-2}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
START=$SECONDS

fail() {
  echo "check_cuda_build: FAIL: $*" >&2
  exit 1
}
say() { echo "[cuda-check $((SECONDS - START))s] $*"; }

[ -x "$CUDA_ROOT/bin/nvcc" ] || fail "no nvcc at $CUDA_ROOT/bin/nvcc (set RFQ_CUDA_HOME to a CUDA 13 toolkit)"

# 1. The venv with the CUDA 13 torch (large; pip takes it from local disk). Reused when it is intact.
venv_ok() {
  "$VENV/bin/python" - <<'PYEOF' 2>/dev/null
import sys, setuptools, torch
sys.exit(0 if torch.__version__.startswith("2.14.1") and torch.version.cuda else 1)
PYEOF
}
if ! venv_ok; then
  say "creating $VENV with $TORCH_SPEC (CUDA 13 build)"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV" || fail "could not create the venv $VENV"
  PIP_LOG=$(mktemp "${TMPDIR:-/tmp}/rfq-cuda-venv-pip.XXXXXX")
  if ! "$VENV/bin/python" -m pip install -q "$TORCH_SPEC" numpy "setuptools>=64" wheel \
    >"$PIP_LOG" 2>&1; then
    grep -v "WARNING: Location" "$PIP_LOG" | tail -20 >&2
    fail "pip could not install $TORCH_SPEC into $VENV"
  fi
  rm -f "$PIP_LOG"
  venv_ok || fail "$VENV has no CUDA build of torch 2.14.1 after installing it"
fi
VPY="$VENV/bin/python"
SITE=$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
CU13_INCLUDE="$SITE/nvidia/cu13/include"
[ -d "$CU13_INCLUDE" ] || fail "the torch wheel's CUDA headers are missing: $CU13_INCLUDE"
say "venv ready: $("$VPY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)')"

# 2. Build out of tree, from a copy of the sources.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/rfq-cuda-check.XXXXXX") || fail "mktemp failed"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/src"
# the Python package too (find_packages needs it; compiled files are left behind)
cp -r setup.py pyproject.toml README.md csrc rfq "$WORK/src/" || fail "copying sources"
find "$WORK/src/rfq" \( -name "*.so" -o -name __pycache__ \) -prune -exec rm -rf {} +
say "building rfq._C with RFQ_CUDA=1 (MAX_JOBS=$MAX_JOBS, arch ${TORCH_CUDA_ARCH_LIST:-setup.py default})"
(
  cd "$WORK/src" &&
    RFQ_CUDA=1 CUDA_HOME="$CUDA_ROOT" RFQ_CUDA_INCLUDE="$CU13_INCLUDE" PATH="$CUDA_ROOT/bin:$PATH" \
      "$VPY" setup.py -q build_ext --build-lib "$WORK/lib" --build-temp "$WORK/tmp"
) >"$WORK/build.log" 2>&1
rc=$?
cp "$WORK/build.log" "${RFQ_CUDA_CHECK_LOG:-${TMPDIR:-/tmp}/rfq-cuda-check-build.log}" 2>/dev/null
if [ "$rc" -ne 0 ]; then
  grep -E -B1 -A3 "(error|Error)[: ]" "$WORK/build.log" | grep -v "warning" | head -60 >&2
  fail "the CUDA build did not compile (exit $rc); the errors are above"
fi
SO=$(ls "$WORK"/lib/rfq/_C*.so 2>/dev/null | head -1)
[ -n "$SO" ] || fail "the build produced no rfq/_C*.so"
say "built $(basename "$SO") ($(du -h "$SO" | cut -f1))"

# 3. Load it (no GPU needed) and check a CUDA kernel per declared op.
"$VPY" - "$SO" "$ROOT/csrc/registration.cpp" <<'PYEOF' || fail "dispatcher check failed (see above)"
import re, sys
import torch

so, registration = sys.argv[1], sys.argv[2]
ops = re.findall(r'm\.def\(\s*"(\w+)\(', open(registration).read())
if not ops:
    sys.exit("no m.def(...) found in " + registration)
torch.ops.load_library(so)
missing = []
for name in ops:
    dump = torch._C._dispatch_dump(f"rfq::{name}")
    keys = {line.split(":", 1)[0] for line in dump.splitlines() if ": registered at" in line}
    if "CUDA" not in keys or "CPU" not in keys:
        missing.append(f"{name} (kernels for: {', '.join(sorted(keys)) or 'none'})")
if missing:
    print("ops without a CUDA (or CPU) kernel:\n  " + "\n  ".join(missing), file=sys.stderr)
    sys.exit(1)
print(f"[cuda-check] all {len(ops)} ops have CPU and CUDA kernels: {', '.join(ops)}")
PYEOF
say "OK"
