#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (python3.12, torch >= 2.11 CUDA build, triton,
# no network): build rfq._C in place with its CUDA kernels, run the whole test suite on cpu and
# cuda, run the GPU benchmarks, and leave every log and the ratio JSON under $OUT.
#
#   OUT=/some/dir bash scripts/gpu_check.sh      # exit status: 0 only if build and tests passed
#
# The whole run fits RFQ_GPU_BUDGET seconds (default 540: a device command may run 600). Each phase
# also has its own cap (RFQ_GPU_BUILD_TIMEOUT, RFQ_GPU_TEST_TIMEOUT, RFQ_GPU_BENCH_TIMEOUT) and gets
# at most what is left, so a hang in one still leaves the others' results. RFQ_GPU_TESTS picks the
# test paths (default: the whole suite); RFQ_GPU_PHASES (default "build,tests,bench") skips phases.
# Phases after a failed build are skipped. TORCH_CUDA_ARCH_LIST defaults to this GPU's own
# architecture (one arch: the build is the slowest phase).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/rfq-gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-}
if [ -z "$PY" ]; then  # the first interpreter that can import torch (python3.12 on the GPU machines)
  for c in python3.12 python3 python; do
    if "$c" -c "import torch" >/dev/null 2>&1; then PY=$c; break; fi
  done
fi
[ -n "$PY" ] || { echo "gpu_check: no python with torch found" >&2; exit 1; }
export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1 PIP_ROOT_USER_ACTION=ignore
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
START=$SECONDS
BUDGET=${RFQ_GPU_BUDGET:-540}
PHASES=${RFQ_GPU_PHASES:-build,tests,bench}
# Seconds for the next phase: its cap, or what is left of the budget minus a reserve for the rest.
limit() {
  local cap=$1 reserve=$2
  local left=$((BUDGET - (SECONDS - START) - reserve))
  [ "$left" -lt 10 ] && left=10
  [ "$cap" -lt "$left" ] && echo "$cap" || echo "$left"
}
wants() { case ",$PHASES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
note() { echo "[gpu-check $((SECONDS - START))s] $*" | tee -a "$SUMMARY"; }

# ---- environment -------------------------------------------------------------------------------
{
  date -u
  uname -a
  nvidia-smi 2>&1 || echo "nvidia-smi unavailable"
  "$PY" - <<'PYEOF' 2>&1
import importlib, sys
print("python", sys.version.split()[0])
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
for name in ("triton", "setuptools", "numpy", "pytest", "hypothesis", "pytest_benchmark",
             "expecttest", "sklearn"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "?"))
    except Exception as err:  # noqa: BLE001
        print(name, "MISSING", type(err).__name__, err)
PYEOF
} >"$OUT/env.txt" 2>&1
note "environment: $OUT/env.txt ($(grep -E '^(torch|device) ' "$OUT/env.txt" | tr '\n' ' '))"

# ---- toolkit: CUDA_HOME, /usr/local/cuda*, nvcc on PATH, or the pip nvidia-cuda-nvcc wheel ---------
find_cuda_home() {
  local c
  for c in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda /usr/local/cuda-13.0 /usr/local/cuda-13 \
    /usr/local/cuda-12.8 /usr/local/cuda-12; do
    [ -n "$c" ] && [ -x "$c/bin/nvcc" ] && { echo "$c"; return 0; }
  done
  if command -v nvcc >/dev/null 2>&1; then dirname "$(dirname "$(command -v nvcc)")"; return 0; fi
  c=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" 2>/dev/null)
  for d in "$c/nvidia/cu13" "$c/nvidia/cuda_nvcc"; do
    [ -x "$d/bin/nvcc" ] && { echo "$d"; return 0; }
  done
  return 1
}
BUILD_OK=0
if ! wants build; then
  note "build phase skipped (RFQ_GPU_PHASES=$PHASES): using the rfq._C that is there"
  BUILD_OK=1
elif CUDA_ROOT=$(find_cuda_home); then
  note "nvcc: $CUDA_ROOT/bin/nvcc ($("$CUDA_ROOT/bin/nvcc" --version 2>&1 | grep -o 'release [0-9.]*'))"
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" \
      2>/dev/null || echo "8.0;9.0")
  fi
  export TORCH_CUDA_ARCH_LIST
  SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  INCLUDES=""
  for d in "$SITE/nvidia/cu13/include" "$SITE/nvidia/cuda_runtime/include"; do
    [ -d "$d" ] && INCLUDES="${INCLUDES:+$INCLUDES:}$d"
  done
  # ---- build in place (editable install) -------------------------------------------------------
  note "building rfq._C with RFQ_CUDA=1, arch $TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS"
  export RFQ_CUDA=1 CUDA_HOME="$CUDA_ROOT" RFQ_CUDA_INCLUDE="$INCLUDES" PATH="$CUDA_ROOT/bin:$PATH"
  if timeout "$(limit "${RFQ_GPU_BUILD_TIMEOUT:-300}" 150)" "$PY" -m pip install -e . \
    --no-build-isolation --no-deps >"$OUT/build.log" 2>&1; then
    BUILD_OK=1
  else
    note "pip install -e failed (rc $?; $OUT/build.log); trying setup.py build_ext --inplace"
    if timeout "$(limit "${RFQ_GPU_BUILD_TIMEOUT:-300}" 150)" "$PY" setup.py build_ext --inplace \
      >"$OUT/build_inplace.log" 2>&1; then
      BUILD_OK=1
    fi
  fi
  note "build log: $(grep -c 'warning' "$OUT"/build*.log 2>/dev/null | tr '\n' ' ') warning lines"
else
  note "FAIL: no nvcc found (CUDA_HOME, /usr/local/cuda*, PATH, nvidia wheels): CUDA kernels not built"
fi
if [ "$BUILD_OK" = 1 ]; then
  "$PY" - >"$OUT/dispatch.txt" 2>&1 <<'PYEOF'
import re, torch, rfq
ops = re.findall(r'm\.def\(\s*"(\w+)\(', open("csrc/registration.cpp").read())
for name in ops:
    dump = torch._C._dispatch_dump(f"rfq::{name}")
    print(name, "CUDA" if re.search(r"^CUDA: registered", dump, re.M) else "NO CUDA KERNEL")
PYEOF
  note "build OK; kernels: $(tr '\n' ';' <"$OUT/dispatch.txt")"
else
  note "FAIL: build failed; see $OUT/build*.log"
fi

# ---- tests on cpu and cuda -------------------------------------------------------------------------
TEST_RC=skipped
if [ "$BUILD_OK" = 1 ] && wants tests; then
  note "tests: RFQ_TEST_DEVICE=cpu,cuda python -m pytest ${RFQ_GPU_TESTS:-(whole suite)}"
  # shellcheck disable=SC2086  # RFQ_GPU_TESTS is a list of paths
  RFQ_TEST_DEVICE=cpu,cuda timeout "$(limit "${RFQ_GPU_TEST_TIMEOUT:-300}" 60)" "$PY" -m pytest -q \
    -p no:cacheprovider --junitxml="$OUT/tests.xml" ${RFQ_GPU_TESTS:-} >"$OUT/tests.log" 2>&1
  TEST_RC=$?
  note "tests rc=$TEST_RC: $(tail -1 "$OUT/tests.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -40 >>"$SUMMARY"
fi

# ---- GPU benchmarks (timings are reported, never asserted) -----------------------------------------
BENCH_RC=skipped
if [ "$BUILD_OK" = 1 ] && wants bench; then
  note "benchmarks: bench/bench_gpu*.py"
  timeout "$(limit "${RFQ_GPU_BENCH_TIMEOUT:-240}" 5)" "$PY" -m pytest bench/bench_gpu*.py -q -p no:cacheprovider \
    --benchmark-json="$OUT/bench_gpu.json" --ratio-json="$OUT/ratios_gpu.json" \
    --ratio-table="$OUT/ratios_gpu.md" >"$OUT/bench.log" 2>&1
  BENCH_RC=$?
  note "benchmarks rc=$BENCH_RC: $(tail -1 "$OUT/bench.log")"
  "$PY" - "$OUT/bench_gpu.json" >"$OUT/bench_extra.txt" 2>&1 <<'PYEOF'
import json, sys
data = json.load(open(sys.argv[1]))
for b in data["benchmarks"]:
    info = b.get("extra_info", {})
    keep = {k: info[k] for k in ("role", "host_syncs", "launches") if k in info}
    print(f"{b['group']:50s} median {b['stats']['median'] * 1e6:10.1f} us  {keep}")
PYEOF
fi

note "done: build=$BUILD_OK tests=$TEST_RC bench=$BENCH_RC (logs in $OUT)"
[ "$BUILD_OK" = 1 ] && [ "$TEST_RC" = 0 ]
