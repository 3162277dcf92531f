"""Triton kernels of rfq (``rfq.triton_kernels``), one module per op family.

    lsq            coupled_quant (+ backward), coupled_quant_multi (+ backward), quant_stats,
                   quantize_codes: kernels and launchers (spec §1-2)
    packed         packed_linear (GEMV/split-K and tiled GEMM), dequantize_weight, unpack_weight
                   on the canonical packed layout (spec §3)
    checks         the launchers' argument checks (no triton import)
    compile_check  compiles every kernel for an NVIDIA target without a GPU and checks the PTX

The PyTorch ops over these (torch.ops.rfq_triton.*) live in rfq/ops/triton_ops.py; rfq.ops routes
CUDA tensors to them when ``rfq.ops.set_gpu_backend("triton")`` selects them. Importing this
package does not import triton; importing ``lsq`` or ``packed`` does.
"""
