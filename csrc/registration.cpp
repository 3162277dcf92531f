// The only TORCH_LIBRARY(rfq, m): every op's schema, once. Kernels register per dispatch key in
// csrc/cpu/*.cpp and csrc/cuda/*.cu; fake (meta) kernels and autograd live in rfq/ops/ (fakes.py, autograd.py).
// Semantics of every op: ../shared/spec/kernels.md §1-2 and rfq/reference.py (the oracle).

#include <Python.h>  // limited API (Py_LIMITED_API is set by setup.py): only for the module stub
#include <torch/library.h>

extern "C" {
// `import rfq._C` loads this library so the static registrations below run; it has no methods.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(rfq, m) {
  const std::vector<at::Tag> pt2 = {at::Tag::pt2_compliant_tag};
  // LSQ fake quantization of x at candidate bits[sel] with step steps[sel]; steps: fp32 [K];
  // sel: 0-dim int64 on x's device, read by the kernel (re-selecting neither syncs nor recompiles).
  m.def("coupled_quant(Tensor x, Tensor steps, int[] bits, Tensor sel, bool signed=True, "
        "float grad_scale=1.0) -> Tensor", pt2);
  // One fused pass: (dx, dsteps[K]); STE inside the range, LSQ step gradient in slot sel only.
  m.def("coupled_quant_backward(Tensor grad_y, Tensor x, Tensor steps, int[] bits, Tensor sel, "
        "bool signed, float grad_scale) -> (Tensor, Tensor)", pt2);
  // All K fake-quantized outputs [K, *x.shape] from one read of x.
  m.def("coupled_quant_multi(Tensor x, Tensor steps, int[] bits, bool signed=True, "
        "float grad_scale=1.0) -> Tensor", pt2);
  // One pass: dx = sum_j in_range_j * grad_y[j] (fp32, j in order), and all K step gradients.
  m.def("coupled_quant_multi_backward(Tensor grad_y, Tensor x, Tensor steps, int[] bits, "
        "bool signed, float grad_scale) -> (Tensor, Tensor)", pt2);
  // Per candidate bit, one read of x: (mse[K], share[K]); share = fraction of in-range values
  // within delta of a rounding boundary (the bit-width scheduler's turbulence).
  m.def("quant_stats(Tensor x, Tensor steps, int[] bits, bool signed=True, float delta=0.125) "
        "-> (Tensor, Tensor)", pt2);
  // (relu(x), coupled_quant(x, steps, bits, sel, signed=False)) from one read of x: a block's ReLU
  // output (for its shortcut) and the next conv's unsigned quantized input, which clamps at 0.
  m.def("relu_quant(Tensor x, Tensor steps, int[] bits, Tensor sel, float grad_scale=1.0) "
        "-> (Tensor, Tensor)", pt2);
  // One pass: (dx = (x > 0) grad_r + in_range grad_y, dsteps[K]); a missing gradient counts as 0.
  m.def("relu_quant_backward(Tensor? grad_r, Tensor? grad_y, Tensor x, Tensor steps, int[] bits, "
        "Tensor sel, float grad_scale) -> (Tensor, Tensor)", pt2);
  // Training-mode BatchNorm fused with the next layer's input quantizer, fp32 x [N, C, ...]:
  // (coupled_quant(x * alpha + beta, ...), batch mean, biased batch variance), alpha = weight /
  // sqrt(var + eps), beta = bias - mean * alpha per channel; running statistics are the caller's.
  m.def("batch_norm_quant(Tensor x, Tensor weight, Tensor bias, float eps, Tensor steps, "
        "int[] bits, Tensor sel, bool signed=False, float grad_scale=1.0) "
        "-> (Tensor, Tensor, Tensor)", pt2);
  // Two passes: (dx, dweight, dbias, dsteps[K]) from x and the saved batch statistics.
  m.def("batch_norm_quant_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor bias, "
        "Tensor mean, Tensor var, float eps, Tensor steps, int[] bits, Tensor sel, bool signed, "
        "float grad_scale) -> (Tensor, Tensor, Tensor, Tensor)", pt2);
  // batch_norm_quant plus mean((z - teacher)^2) of its BN output z against a same-shape fp32
  // teacher (a feature MSE, as IDM's), without writing z: (y, mean, var, mse [0-dim]).
  m.def("batch_norm_quant_mse(Tensor x, Tensor weight, Tensor bias, float eps, Tensor steps, "
        "int[] bits, Tensor sel, Tensor teacher, bool signed=False, float grad_scale=1.0) "
        "-> (Tensor, Tensor, Tensor, Tensor)", pt2);
  // Its backward: batch_norm_quant_backward with z's gradient plus 2 grad_mse (z - teacher) / n.
  m.def("batch_norm_quant_mse_backward(Tensor grad_y, Tensor grad_mse, Tensor x, Tensor weight, "
        "Tensor bias, Tensor mean, Tensor var, float eps, Tensor steps, int[] bits, Tensor sel, "
        "Tensor teacher, bool signed, float grad_scale) -> (Tensor, Tensor, Tensor, Tensor)", pt2);
  // Training-mode BatchNorm plus a residual of x's shape, fp32: (x * alpha + beta + residual,
  // batch mean, biased batch variance), alpha and beta as batch_norm_quant's: a residual block's
  // last BN and its shortcut add in one pass; running statistics are the caller's.
  m.def("batch_norm_add(Tensor x, Tensor weight, Tensor bias, float eps, Tensor residual) "
        "-> (Tensor, Tensor, Tensor)", pt2);
  // Two passes: (dx, dweight, dbias) from x and the saved statistics (the residual's gradient is
  // grad_y itself).
  m.def("batch_norm_add_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor mean, Tensor var, "
        "float eps) -> (Tensor, Tensor, Tensor)", pt2);
  // Integer codes of x at one bit-width (step: one fp32 value): int8 when signed, uint8 when
  // unsigned (codes up to 255); the input of pack_weight.
  m.def("quantize_codes(Tensor x, Tensor step, int bits, bool signed=True) -> Tensor", pt2);
  // Signed int8 codes [N, K] at `bits` -> uint8 [N, row_bytes] in the packed layout
  // (csrc/packed_layout.h): 2-bit container for 1-2 bits, 4-bit for 3-4, int8 for 5-8.
  m.def("pack_weight(Tensor codes, int bits) -> Tensor", pt2);
  // Exact inverse of pack_weight: int8 codes of the logical shape [N, K].
  m.def("unpack_weight(Tensor packed, int bits, int[] shape) -> Tensor", pt2);
  // CSQ bit-level weight (spec methods_seeds.md §C.1): w = scale / (2^N - 1) * sum_i
  // g(beta m_i) (g(beta p_i) - g(beta q_i)) 2^(N-1-i), g the sigmoid; p, q: [N, *shape] (plane i
  // the i-th most significant bit), m: [N], scale and beta: one value each; fp32 or fp64 -> [*shape].
  m.def("csq_weight(Tensor p, Tensor q, Tensor m, Tensor scale, Tensor beta) -> Tensor", pt2);
  // One fused pass: (dp, dq, dm [N], dscale shaped like scale) of csq_weight; beta gets none.
  m.def("csq_weight_backward(Tensor grad_w, Tensor p, Tensor q, Tensor m, Tensor scale, "
        "Tensor beta) -> (Tensor, Tensor, Tensor, Tensor)", pt2);
  // y = x @ dequant(W)^T (+ bias), x [..., K] -> [..., N] in x's dtype, fp32 accumulation.
  // group_size 0: per-tensor LSQ, w = scales * q (scales: one fp32 value, zeros None);
  // group_size 32/64/128: w = (u - zeros) * scales per [N, ceil(K/g)] group, zeros defaulting to
  // the container offset (so w = q * scale). With x_step, x first passes the deployed layer's LSQ
  // input quantizer inside the op: y = x_step * (k @ W^T) + bias, k = codes of x at x_bits.
  m.def("packed_linear(Tensor x, Tensor packed, Tensor scales, Tensor? zeros, int bits, "
        "int group_size, Tensor? bias=None, Tensor? x_step=None, int x_bits=8, "
        "bool x_signed=False) -> Tensor", pt2);
}

// Statistics and codes are not differentiable: skipping the Autograd key gives outputs that do
// not require grad, instead of autograd's warn-on-backward fallback.
TORCH_LIBRARY_IMPL(rfq, Autograd, m) {
  m.impl("quant_stats", torch::CppFunction::makeFallthrough());
  m.impl("quantize_codes", torch::CppFunction::makeFallthrough());
  m.impl("pack_weight", torch::CppFunction::makeFallthrough());
  m.impl("unpack_weight", torch::CppFunction::makeFallthrough());
}
