"""What the GPU benches (bench_gpu.py: CUDA kernels, bench_gpu_triton.py: Triton kernels) share:
the timer, the device/version record, host-sync and launch counts, the LSQ inputs.

Timing: triton.testing.do_bench (L2 flushed before every call) when triton is importable, else
CUDA events around each call with a 256 MB buffer written in between (same flush). The samples
become the benchmark's rounds, so bench/conftest.py's ratio table (baseline median / rfq median,
same run) and --ratio-json work as for the CPU benches. Timings are never assertions.
"""

import importlib.util
import warnings

import torch

DEV = "cuda"
BITS5 = [6, 5, 4, 3, 2]

try:
    import triton.testing as _tt
except Exception:  # noqa: BLE001 - any import problem means: use CUDA events
    _tt = None


def versions():
    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        import triton

        triton_version = triton.__version__
    return dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                cuda=torch.version.cuda, triton=triton_version,
                timer="triton.testing.do_bench (L2 flushed)" if _tt else "CUDA events (L2 flushed)")


_FLUSH = None


def _event_samples_ms(fn, rounds=50):
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(256 << 20, dtype=torch.uint8, device=DEV)
    out = []
    for _ in range(rounds):
        _FLUSH.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end))
    return out


def samples_ms(fn):
    if _tt is not None:
        return list(_tt.do_bench(fn, warmup=25, rep=100, return_mode="all"))
    for _ in range(5):
        fn()
    return _event_samples_ms(fn)


def record_samples(benchmark, fn, times):
    """The GPU samples (ms) become the benchmark's rounds."""
    make_stats = getattr(benchmark, "_make_stats", None)
    if make_stats is None:  # another pytest-benchmark: wall time with a sync per call
        benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=len(times))
        return
    stats = make_stats(1)
    for t in times:
        stats.update(t / 1e3)


def count_host_syncs(fn):
    """Synchronizing CUDA calls made by fn (torch's sync debug mode, as warnings)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def count_launches(fn):
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def lsq_inputs(n, k=1, dtype=torch.float32):
    """x (needs grad), the step(s) of 4 bits or of BITS5 (k > 1), and an upstream gradient."""
    g = torch.Generator(device=DEV).manual_seed(0)
    x = (torch.randn(n, generator=g, device=DEV) * 0.5).to(dtype).requires_grad_()
    steps = torch.tensor([0.5 / 2 ** (b - 2) for b in (BITS5 if k > 1 else [4])], device=DEV,
                         requires_grad=True)
    grad = torch.randn((k, n) if k > 1 else (n,), generator=g, device=DEV).to(dtype)
    return x, steps, grad


def fwd_bwd(fn, x, steps, grad):
    y = fn(x, steps)
    if isinstance(y, list):  # baselines: one output per bit-width, autograd sums the gradients
        return torch.autograd.grad(y, (x, steps), list(grad))
    return torch.autograd.grad(y, (x, steps), grad)
