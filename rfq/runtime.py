"""Process-wide runtime settings the trainers and the search share: denormal flushing, the
allocator's treatment of freed memory, and the torchrun process group."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from dataclasses import dataclass

import torch


@contextlib.contextmanager
def flush_denormals():
    """Flush denormals to zero while training/evaluating (torch's default is off, and it has
    no getter): tiny activations and gradients otherwise run through slow microcode paths on
    x86. The kernels' exactness tests run without it."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


@functools.cache
def retain_freed_memory() -> bool:
    """On glibc, keep freed tensor memory in the process instead of returning it to the OS.

    glibc's defaults (an adaptive mmap threshold, a 128 KB trim threshold) hand each training
    step's freed activations back to the kernel, so the next step page-faults them in again.
    Fixed thresholds (mmap above 32 MB, trim above 1 GB) keep them. Process-wide and idempotent;
    ``RFQ_KEEP_FREED_MEMORY=0`` opts out. Returns whether the thresholds were set."""
    if os.environ.get("RFQ_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...): leave the allocator alone
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
