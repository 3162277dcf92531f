"""The GPU backend switch of rfq.ops (cuda / triton per op family)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from triton_cases import (  # noqa: F401  (skips this module without triton)
    ROOT,
    triton_ops,
)
from rfq import ops  # noqa: E402
from rfq.ops import backend  # noqa: E402


# ---- the backend switch --------------------------------------------------------------------------


@pytest.fixture
def restore_backend():
    saved = {f: ops.get_gpu_backend(f) for f in ops.GPU_FAMILIES}
    yield
    for f, b in saved.items():
        ops.set_gpu_backend(b, f)


def test_switch_set_get_and_context_manager(restore_backend):
    ops.set_gpu_backend("cuda")
    assert [ops.get_gpu_backend(f) for f in ("lsq", "packed")] == ["cuda", "cuda"]
    ops.set_gpu_backend("triton", "packed")
    assert [ops.get_gpu_backend(f) for f in ("lsq", "packed")] == ["cuda", "triton"]
    with ops.gpu_backend("triton"):
        assert ops.get_gpu_backend("lsq") == "triton"
        with ops.gpu_backend("cuda", family="packed"):
            assert [ops.get_gpu_backend(f) for f in ("lsq", "packed")] == ["triton", "cuda"]
        assert ops.get_gpu_backend("packed") == "triton"
    assert [ops.get_gpu_backend(f) for f in ("lsq", "packed")] == ["cuda", "triton"]
    with pytest.raises(KeyError):
        with ops.gpu_backend("triton", "lsq"):
            raise KeyError("inside")
    assert ops.get_gpu_backend("lsq") == "cuda"  # restored when the block raises
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.set_gpu_backend("cutlass")
    with pytest.raises(ValueError, match="family must be one of"):
        ops.set_gpu_backend("triton", "conv")
    with pytest.raises(ValueError, match="family must be one of"):
        ops.get_gpu_backend(None)


def test_switch_env_var_forms(restore_backend):
    for value, want in [("triton", ["triton", "triton"]), ("cuda", ["cuda", "cuda"]),
                        ("lsq=triton", ["triton", "cuda"]),
                        ("cuda, packed=triton", ["cuda", "triton"])]:
        ops.set_gpu_backend("cuda")
        backend._backend_from_env(value)
        assert [ops.get_gpu_backend(f) for f in ("lsq", "packed")] == want, value
    with pytest.raises(RuntimeError, match="RFQ_GPU_BACKEND='lsq=tvm'.*backend must be one of"):
        backend._backend_from_env("lsq=tvm")


@pytest.mark.parametrize("env, want", [(None, "cuda cuda False"),
                                       ("packed=triton", "cuda triton True")])
def test_switch_env_var_at_import(env, want):
    """RFQ_GPU_BACKEND is read at import; import rfq never imports triton, and registers the
    rfq_triton ops only when the Triton backend is chosen."""
    code = ("import sys, rfq; from rfq import ops; "
            "print(ops.get_gpu_backend('lsq'), ops.get_gpu_backend('packed'), "
            "'rfq.ops.triton_ops' in sys.modules, 'triton' in sys.modules)")
    environ = {k: v for k, v in os.environ.items() if k != "RFQ_GPU_BACKEND"}
    if env:
        environ["RFQ_GPU_BACKEND"] = env
    out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == want.split() + ["False"]


def _traced_ops(fn, *args):
    from torch.fx.experimental.proxy_tensor import make_fx

    graph = make_fx(fn, tracing_mode="fake")(*args)
    return [str(n.target) for n in graph.graph.nodes if n.op == "call_function"
            and str(n.target).startswith("rfq")]


def _fake_cuda_inputs():
    """CUDA tensors without a GPU: fake tensors carry the device, so routing can be traced (as
    long as the traced code does not view them: slicing a fake CUDA tensor needs CUDA)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return (torch.empty(6, 64, device="cuda"),  # x
                torch.empty(2, device="cuda"),  # steps
                torch.empty((), dtype=torch.long, device="cuda"),  # sel
                torch.empty(4, 64, dtype=torch.uint8, device="cuda"),  # packed weight
                torch.empty(1, device="cuda"),  # one scale / step
                torch.empty(2, 6, 64, device="cuda"),  # grad of a K=2 multi output
                torch.empty(6, 4, device="cuda"))  # grad of the packed_linear output


def _all_wrappers(x, steps, sel, packed_w, scale, *_):
    return (ops.coupled_quant(x, steps, [4, 2], sel), ops.coupled_quant_multi(x, steps, [4, 2]),
            ops.quant_stats(x, steps, [4, 2]), ops.quantize_codes(x, scale, 4),
            ops.packed_linear(x, packed_w, scale, 4))


WRAPPED = ["coupled_quant", "coupled_quant_multi", "quant_stats", "quantize_codes",
           "packed_linear"]


def test_switch_routes_cuda_tensors_per_family(restore_backend):
    args = _fake_cuda_inputs()
    ops.set_gpu_backend("cuda")
    assert _traced_ops(_all_wrappers, *args) == [f"rfq.{n}.default" for n in WRAPPED]
    ops.set_gpu_backend("triton", "lsq")
    assert _traced_ops(_all_wrappers, *args) == (
        [f"rfq_triton.{n}.default" for n in WRAPPED[:4]] + ["rfq.packed_linear.default"])
    with ops.gpu_backend("triton", "packed"):
        assert _traced_ops(_all_wrappers, *args)[-1] == "rfq_triton.packed_linear.default"
    ops.set_gpu_backend("cuda", "lsq")
    assert _traced_ops(_all_wrappers, *args) == [f"rfq.{n}.default" for n in WRAPPED]


def test_backward_formulas_use_triton_ops():
    """The rfq_triton autograd formulas call rfq_triton backward ops (traced on fake CUDA
    tensors; the autograd engine itself needs a real device)."""
    from types import SimpleNamespace

    def backwards(x, steps, sel, packed_w, scale, grad_multi, grad_linear):
        ctx = SimpleNamespace(saved_tensors=(x, steps, sel), bits=[4, 2], signed=True,
                              grad_scale=1.0)
        one = triton_ops._coupled_quant_grad(ctx, x)
        ctx.saved_tensors = (x, steps)
        multi = triton_ops._coupled_quant_multi_grad(ctx, grad_multi)
        ctx = SimpleNamespace(saved_tensors=(packed_w, scale, None, None, None), bits=4,
                              group_size=0, k=64, x_dtype=x.dtype, x_bits=8, x_signed=False)
        lin = triton_ops._packed_linear_grad(ctx, grad_linear)
        return one[:2], multi[:2], lin[0]

    assert _traced_ops(backwards, *_fake_cuda_inputs()) == [
        "rfq_triton.coupled_quant_backward.default",
        "rfq_triton.coupled_quant_multi_backward.default",
        "rfq_triton.dequantize_weight.default"]


def test_switch_never_routes_cpu_tensors(restore_backend):
    """CPU tensors take the C++ ops under either backend: the C++ CPU kernel raises for a zero
    step, where the rfq_triton CPU kernel would return NaN."""
    x, steps = torch.randn(5), torch.tensor([0.0])
    for choice in ("cuda", "triton"):
        ops.set_gpu_backend(choice)
        with pytest.raises(RuntimeError, match=r"rfq.coupled_quant: steps\[0\] must be"):
            ops.coupled_quant(x, steps, [4], torch.tensor(0))
        assert _traced_ops(_all_wrappers, torch.randn(6, 64), torch.tensor([0.1, 0.2]),
                           torch.tensor(0), ops.pack_weight(torch.zeros(4, 64, dtype=torch.int8),
                                                            4), torch.tensor([0.1])) == [
            f"rfq.{n}.default" for n in WRAPPED]


