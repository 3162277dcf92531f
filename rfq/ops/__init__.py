"""The Python index of ``torch.ops.rfq``: typed wrappers, fake kernels, autograd formulas, the GPU
backend switch and the Triton ops (``torch.ops.rfq_triton``).

Schemas and kernels are C++ (csrc/registration.cpp, csrc/cpu, csrc/cuda); this module adds what
torch.compile and autograd need, in Python, as torchao and pytorch/extension-cpp do. Backwards are
themselves rfq ops, so compiled graphs stay fused. Method code calls these wrappers, never the
kernels' internals. Semantics: ../shared/spec/kernels.md §1-3; oracle: rfq/reference.py.

    layout.py    range and packed-layout facts (qrange, MAX_CANDIDATES, packed_row_bytes, ...)
    fakes.py     fake/meta kernels          autograd.py  backward registrations
    lsq.py       LSQ-family wrappers         packed.py    packed-weight wrappers, packed conv
    backend.py   GPU backend switch          triton_ops.py  torch.ops.rfq_triton (Triton kernels)
    weight_codes.py  DF-MPC's data-free ternary / DoReFa weight codes (plain PyTorch)
    csq.py       CSQ's bit-level weight (csq_weight, fused forward and backward)
    integer_conv.py  convolution on integer codes (oneDNN's u8 x s8 kernel where fast)

Conventions shared by the LSQ family:
    x      fp32 / bf16 / fp16 tensor of any shape and strides
    steps  fp32 [K] step sizes, one per candidate in ``bits`` (K <= 8), on x's device
    bits   candidate bit-widths, each in 1..8; signed 1-bit means binary codes {-1, +1}
    sel    0-dim int64 tensor on x's device selecting the candidate (read in-kernel: changing
           it with ``sel.fill_(j)`` neither syncs the host nor recompiles)
    signed True: range [-2^(b-1), 2^(b-1)-1] (weights); False: [0, 2^b-1] (activations)
"""

from __future__ import annotations

import torch

from rfq import _C  # noqa: F401  (registers the schemas and kernels)
from rfq.ops import autograd, fakes  # noqa: F401,E402  (register fake kernels and autograd)
from rfq.ops.backend import (GPU_BACKENDS, GPU_FAMILIES, get_gpu_backend,  # noqa: E402
                             gpu_backend, set_gpu_backend)
from rfq.ops.csq import csq_weight  # noqa: E402
from rfq.ops.integer_conv import (PackedConvCodes, integer_conv2d,  # noqa: E402
                                  integer_conv_fast, pack_conv_codes)
from rfq.ops.layout import (MAX_CANDIDATES, code_offset, container_bits,  # noqa: E402
                            packed_row_bytes, qrange)
from rfq.ops.lsq import (batch_norm_add, batch_norm_quant, batch_norm_quant_mse,  # noqa: E402
                         coupled_quant, coupled_quant_multi, quant_stats, quantize_codes,
                         relu_quant)
from rfq.ops.packed import (conv_reads_packed, dequantize_weight, pack_weight,  # noqa: E402
                            packed_conv2d, packed_linear, unpack_weight)
from rfq.ops.weight_codes import (dequantize_dorefa, dequantize_ternary,  # noqa: E402
                                  dorefa_codes, ternary_codes)


def cpu_capability() -> str:
    """The ISA level whose CPU kernels run here (ATEN_CPU_CAPABILITY can lower it)."""
    return torch.backends.cpu.get_cpu_capability()


__all__ = [
    "set_gpu_backend", "get_gpu_backend", "gpu_backend", "GPU_BACKENDS", "GPU_FAMILIES",
    "pack_weight", "unpack_weight", "dequantize_weight", "packed_linear", "packed_conv2d",
    "conv_reads_packed", "packed_row_bytes", "container_bits", "code_offset", "qrange", "MAX_CANDIDATES",
    "coupled_quant", "coupled_quant_multi", "batch_norm_quant", "batch_norm_quant_mse", "batch_norm_add", "relu_quant", "quant_stats", "quantize_codes", "cpu_capability",
    "PackedConvCodes", "pack_conv_codes", "integer_conv2d", "integer_conv_fast",
    "ternary_codes", "dorefa_codes", "dequantize_ternary", "dequantize_dorefa", "csq_weight",
]
