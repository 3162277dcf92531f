"""The offline GPU compile check of the Triton kernels (sm_90 PTX without a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys

from triton_cases import (  # noqa: F401  (skips this module without triton)
    ROOT,
)


# ---- offline GPU compile check ----------------------------------------------------------------


def test_kernels_compile_for_sm90():
    """Every kernel family compiles for sm_90 (Triton's own ptxas), and the PTX has only
    correctly rounded division, no FMA in the LSQ kernels, and the rounding constant."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "rfq.triton_kernels.compile_check", "--quick"],
                         env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 with problems" in out.stdout


def test_compile_check_detects_approximate_division():
    """The PTX check itself can fail: plain `/` (div.full.f32) and an FMA are caught."""
    from rfq.triton_kernels import compile_check

    assert compile_check.check_ptx("_forward_kernel", "div.rn.f32 add 0f4B400000 0fCB400000",
                                   {"BIN": (False,)}) == []
    problems = compile_check.check_ptx("_forward_kernel", "div.full.f32 %r1, %r2, %r3; "
                                       "fma.rn.f32 %r4", {"BIN": (False,)})
    assert len(problems) == 4


