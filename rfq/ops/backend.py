"""The GPU backend switch of rfq.ops.

CUDA tensors go to the C++/CUDA kernels (torch.ops.rfq, "cuda") or to the Triton kernels
(torch.ops.rfq_triton, "triton"), chosen per op family: "lsq" (coupled_quant, coupled_quant_multi,
quant_stats, quantize_codes) and "packed" (packed_linear). CPU tensors always take the C++ ops.
The default stays "cuda" until GPU measurements show Triton faster; RFQ_GPU_BACKEND sets it at
import ("triton", or per family: "lsq=triton,packed=cuda"). A wrapper pays one global bool test
on the default path; torch.compile guards on it, so switching recompiles instead of going stale.
"""

from __future__ import annotations

import contextlib
import os

GPU_BACKENDS = ("cuda", "triton")
GPU_FAMILIES = ("lsq", "packed")
triton_lsq = False
triton_packed = False


def _load_triton_ops():
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        raise RuntimeError("rfq.ops.set_gpu_backend: the triton backend needs the triton package "
                           "(pip install triton), which is not installed")
    from rfq.ops import triton_ops  # registers torch.ops.rfq_triton.*

    return triton_ops


def set_gpu_backend(backend: str, family: str | None = None) -> None:
    """Routes CUDA tensors of one op family ("lsq" or "packed"; None: both) to the C++/CUDA
    kernels ("cuda", the default) or the Triton kernels ("triton")."""
    global triton_lsq, triton_packed
    if backend not in GPU_BACKENDS:
        raise ValueError(f"rfq.ops.set_gpu_backend: backend must be one of {GPU_BACKENDS}, "
                         f"got {backend!r}")
    if family is not None and family not in GPU_FAMILIES:
        raise ValueError(f"rfq.ops.set_gpu_backend: family must be one of {GPU_FAMILIES} or None, "
                         f"got {family!r}")
    if backend == "triton":
        _load_triton_ops()
    use_triton = backend == "triton"
    if family in (None, "lsq"):
        triton_lsq = use_triton
    if family in (None, "packed"):
        triton_packed = use_triton


def get_gpu_backend(family: str) -> str:
    """The backend CUDA tensors of ``family`` ("lsq" or "packed") go to."""
    if family not in GPU_FAMILIES:
        raise ValueError(f"rfq.ops.get_gpu_backend: family must be one of {GPU_FAMILIES}, "
                         f"got {family!r}")
    return "triton" if (triton_lsq if family == "lsq" else triton_packed) else "cuda"


@contextlib.contextmanager
def gpu_backend(backend: str, family: str | None = None):
    """``with rfq.ops.gpu_backend("triton"):`` set_gpu_backend for the block, then restore the
    previous choice of every family (also when the block raises)."""
    saved = {f: get_gpu_backend(f) for f in GPU_FAMILIES}
    set_gpu_backend(backend, family)
    try:
        yield
    finally:
        for f, b in saved.items():
            set_gpu_backend(b, f)


def _backend_from_env(value: str) -> None:
    """RFQ_GPU_BACKEND: "cuda", "triton", or comma-separated family=backend pairs."""
    for item in (v.strip() for v in value.split(",")):
        if not item:
            continue
        family, _, backend = item.rpartition("=")
        try:
            set_gpu_backend(backend.strip(), family.strip() or None)
        except (ValueError, RuntimeError) as err:
            raise RuntimeError(f"RFQ_GPU_BACKEND={value!r}: {err}") from None


if os.environ.get("RFQ_GPU_BACKEND"):
    _backend_from_env(os.environ["RFQ_GPU_BACKEND"])
