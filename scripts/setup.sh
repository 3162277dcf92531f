#!/usr/bin/env bash
# Sets up rfq in the current Python (PYTHON=..., default python3): torch (the CPU wheel pinned in
# constraints.txt, 2.13.0, unless a torch >= 2.11 is already installed), the test and demo
# dependencies at the tested versions in constraints.txt, then builds the C++ extension in place.
#   RFQ_UNPINNED=1  the newest releases instead of constraints.txt's pins (torch: as above)
#   RFQ_REBUILD=1   rebuild rfq._C even when nothing changed
#   MAX_JOBS        compile jobs (default 2)
# Idempotent. A second run rebuilds rfq._C only if something it depends on changed: the build is
# skipped when build/rfq-build.stamp (written after each successful build) still matches csrc/**,
# setup.py, pyproject.toml, torch, Python, the build's environment variables and the built
# rfq/_C*.so, and this Python has an editable install of this checkout that imports.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-2}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
CONSTRAINTS=constraints.txt
STAMP=build/rfq-build.stamp
UNPINNED=${RFQ_UNPINNED:-0}
TORCH_PIN=$(grep -E '^torch==' "$CONSTRAINTS")  # the torch setup.sh installs, in both modes

torch_ok() {
  "$PY" - <<'PYEOF' 2>/dev/null
import sys, torch
major, minor = (int(p) for p in torch.__version__.split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 11) else 1)
PYEOF
}

PIN_ARGS=()
pip_install() {
  if ! "$PY" -m pip install -q ${PIN_ARGS[@]+"${PIN_ARGS[@]}"} "$@"; then
    echo "[setup] ERROR: pip install $* failed" >&2
    if [ "$UNPINNED" = 0 ]; then
      echo "[setup] the pins in $CONSTRAINTS were tested on CPython 3.11, Linux x86_64; elsewhere" \
        "RFQ_UNPINNED=1 bash scripts/setup.sh installs the newest releases instead" >&2
    fi
    exit 1
  fi
}

# A torch that was already there decides its own dependencies: the pins of torch and of what it
# requires are dropped (a CUDA torch, for one, requires its own triton).
constraints_without_torch() {
  "$PY" - "$CONSTRAINTS" <<'PYEOF'
import re, sys
from importlib import metadata

norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
split = lambda spec: re.split(r"[\s\[<>=!~;(]", spec.strip(), maxsplit=1)[0]
owned = {"torch"} | {norm(split(r)) for r in metadata.requires("torch") or [] if "extra" not in r}
for line in open(sys.argv[1]):
    if line.strip() and not line.lstrip().startswith("#") and norm(split(line)) in owned:
        line = "# left to the installed torch: " + line
    sys.stdout.write(line)
PYEOF
}

if [ "$UNPINNED" != 0 ]; then
  echo "[setup] RFQ_UNPINNED=$UNPINNED: the newest releases, not the pins in $CONSTRAINTS"
  UNPINNED=1
fi
if torch_ok; then
  if [ "$UNPINNED" = 0 ]; then
    TMP_CONSTRAINTS=$(mktemp "${TMPDIR:-/tmp}/rfq-constraints.XXXXXX")
    trap 'rm -f "$TMP_CONSTRAINTS"' EXIT
    constraints_without_torch >"$TMP_CONSTRAINTS"
    PIN_ARGS=(-c "$TMP_CONSTRAINTS")
  fi
else
  if [ "$UNPINNED" = 0 ]; then
    PIN_ARGS=(-c "$CONSTRAINTS")
  fi
  echo "[setup] installing $TORCH_PIN (CPU build)"
  pip_install "$TORCH_PIN"
fi
echo "[setup] installing test and demo dependencies"
# The same packages as pyproject.toml's dependencies and its test and tensorboard extras, plus
# setuptools, which builds the extension (no build isolation: pip does not install it then).
pip_install numpy pytest hypothesis pytest-benchmark expecttest scikit-learn "triton>=3.6" \
  tqdm matplotlib tensorboard "setuptools>=64"  # the CLI: progress bars, Pareto plot, --tensorboard
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

# build_state check: exit 0 if the last build is current (else say why); build_state write: record
# the current build in $STAMP.
build_state() {
  "$PY" - "$1" "$STAMP" <<'PYEOF'
import hashlib, json, os, platform, sys
from pathlib import Path
from urllib.parse import unquote, urlparse

mode, stamp = sys.argv[1], Path(sys.argv[2])
root = Path.cwd().resolve()
sys.path[:] = [p for p in sys.path if p not in ("", ".")]  # rfq must come from the install
BUILD_ENV = ("RFQ_CUDA", "TORCH_CUDA_ARCH_LIST", "RFQ_CUDA_INCLUDE", "CUDA_HOME", "CUDA_PATH",
             "CC", "CXX", "CFLAGS", "CXXFLAGS", "CPPFLAGS", "LDFLAGS")


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def the_so():
    found = sorted((root / "rfq").glob("_C*.so"))
    return found[0] if len(found) == 1 else None


def state():
    """What the extension's build depends on (every file under csrc/, headers included)."""
    import torch

    h = hashlib.sha256()
    files = sorted(p for p in (root / "csrc").rglob("*") if p.is_file())
    for path in files + [root / "setup.py", root / "pyproject.toml"]:
        data = path.read_bytes()
        h.update(f"{path.relative_to(root)}\0{len(data)}\0".encode() + data)
    s = {"sources": h.hexdigest(),
         "torch": f"{torch.__version__} git {torch.version.git_version} cuda {torch.version.cuda}",
         "python": f"{sys.implementation.name} {platform.python_version()} {platform.machine()}",
         "env": {k: os.environ[k] for k in BUILD_ENV if k in os.environ}}
    if torch.version.cuda:  # RFQ_CUDA=auto builds the CUDA kernels iff it finds a toolkit
        from torch.utils import cpp_extension
        s["cuda_home"] = str(cpp_extension.CUDA_HOME)
    return s


def why_stale():
    if not stamp.is_file():
        return f"no {stamp} (no build recorded)"
    so = the_so()
    if so is None:
        return "not exactly one rfq/_C*.so"
    old = json.loads(stamp.read_text())
    for key, value in state().items():
        if old.get(key) != value:
            return f"{key} changed since the last build"
    if old.get("so") != sha256(so.read_bytes()):
        return f"{so.name} is not the one the last build made"
    from importlib import metadata
    try:
        direct = json.loads(metadata.distribution("rfq").read_text("direct_url.json") or "{}")
    except metadata.PackageNotFoundError:
        return "rfq is not installed in this Python"
    url = urlparse(direct.get("url", ""))
    if not direct.get("dir_info", {}).get("editable") or url.scheme != "file" \
            or Path(unquote(url.path)).resolve() != root:
        return f"this Python's rfq is not an editable install of {root}"
    try:
        import rfq
        from rfq import _C
    except Exception as err:  # noqa: BLE001
        return f"import rfq fails ({type(err).__name__}: {err})"
    if Path(rfq.__file__).resolve().parent != root / "rfq" or Path(_C.__file__).resolve() != so:
        return f"import rfq does not load {root / 'rfq'}"
    return None


if mode == "check":
    reason = why_stale()
    if reason:
        print(f"[setup] rebuilding rfq._C: {reason}")
    sys.exit(1 if reason else 0)
so = the_so()
if so is None:
    sys.exit("[setup] the build left not exactly one rfq/_C*.so")
stamp.parent.mkdir(parents=True, exist_ok=True)
stamp.write_text(json.dumps(dict(state(), so=sha256(so.read_bytes())), indent=1) + "\n")
PYEOF
}

if [ "${RFQ_REBUILD:-0}" = 0 ] && build_state check; then
  echo "[setup] rfq._C is up to date ($STAMP; RFQ_REBUILD=1 rebuilds it)"
else
  echo "[setup] building rfq._C (MAX_JOBS=$MAX_JOBS)"
  rm -f "$STAMP"
  pip_install -e . --no-build-isolation
  build_state write
fi
"$PY" -c "import rfq, torch; print('[setup] rfq ready: torch', torch.__version__, '| CPU kernels', rfq.ops.cpu_capability())"
