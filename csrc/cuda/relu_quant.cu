// CUDA relu_quant and its backward: a block's ReLU output r = relu(x) and the next conv's unsigned
// quantized input y = coupled_quant(x, steps, bits, sel, signed=False) from one read of x, as the
// CPU kernels relu_forward / relu_backward (cpu/lsq_kernels_impl.h), with the CPU wrappers' checks
// and layouts (lsq_checks.h: dense_layout, in_layout_of).
//
// y, the y part of dx and the step gradient are exactly cuda/lsq.cu's coupled_quant and
// coupled_quant_backward at signed = false: the same element math (lsq_math.cuh), the same tiles,
// one fp32 partial per tile and the fp64 finalize in tile order (finalize_selected_kernel), so the
// step gradient depends on n only. dx = (x > 0 ? grad_r : 0) + (in range ? grad_y : 0) in fp32,
// rounded once to x's dtype. A missing gradient (None) counts as 0 (a compile-time variant each).
//
// Zero host syncs: sel and steps[sel] are read on the device. A bad step or an out-of-range sel
// gives NaN in y and, when grad_y is given, in all of dx and in the step gradients (slot sel; every
// slot for a bad sel), where the CPU raises. r needs no step and stays relu(x). Without grad_y the
// step and sel are not read at all: dx is the ReLU gradient and the step gradients are 0.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cuda/common.cuh"
#include "cuda/lsq_math.cuh"
#include "lsq_checks.h"

namespace rfq::cuda {
namespace {

// relu_quant and relu_quant_backward: lsq_math.cuh coupled_forward_kernel (kRelu) and
// coupled_backward_kernel (ReluGrad::kZero / kGiven), shared with lsq.cu's coupled_quant.

// ---- host wrappers -----------------------------------------------------------------------------

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

std::tuple<at::Tensor, at::Tensor> relu_quant(const at::Tensor& x, const at::Tensor& steps,
                                              c10::IntArrayRef bits, const at::Tensor& sel,
                                              double /*grad_scale*/) {
  constexpr const char* op = "rfq.relu_quant";
  check_x(op, x);
  check_steps(op, x, steps, bits);
  check_sel(op, x, sel);
  const c10::cuda::CUDAGuard guard(x.device());
  const QuantRanges ranges = make_ranges(bits, /*is_signed=*/false);
  const at::Tensor xd = dense_layout(x);
  at::Tensor r = at::empty_like(xd);
  at::Tensor y = at::empty_like(xd);
  const int64_t n = xd.numel();
  if (n == 0) return {r, y};
  launch_coupled_forward</*kRelu=*/true>(xd, y, r, steps, sel, ranges, stream());
  return {r, y};
}

std::tuple<at::Tensor, at::Tensor> relu_quant_backward(
    const std::optional<at::Tensor>& grad_r, const std::optional<at::Tensor>& grad_y,
    const at::Tensor& x, const at::Tensor& steps, c10::IntArrayRef bits, const at::Tensor& sel,
    double grad_scale) {
  constexpr const char* op = "rfq.relu_quant_backward";
  check_x(op, x);
  check_steps(op, x, steps, bits);
  check_sel(op, x, sel);
  check_grad_scale(op, grad_scale);
  const c10::cuda::CUDAGuard guard(x.device());
  const QuantRanges ranges = make_ranges(bits, /*is_signed=*/false);
  const at::Tensor xd = dense_layout(x);
  at::Tensor gr, gy;
  if (grad_r.has_value()) {
    check_grad(op, *grad_r, x, x.sizes());
    gr = in_layout_of(*grad_r, xd);
  }
  if (grad_y.has_value()) {
    check_grad(op, *grad_y, x, x.sizes());
    gy = in_layout_of(*grad_y, xd);
  }
  const bool has_r = gr.defined(), has_y = gy.defined();
  const int64_t n = xd.numel();
  at::Tensor grad_x = at::empty_like(xd);
  // With grad_y the kernels write every slot (also for n == 0); without it no step is read.
  at::Tensor grad_steps = has_y ? at::empty({steps.numel()}, steps.options())
                                : at::zeros({steps.numel()}, steps.options());
  if (!has_r && !has_y) {
    grad_x.zero_();
    return {grad_x, grad_steps};
  }
  if (!has_y && n == 0) return {grad_x, grad_steps};
  if (has_r && has_y) {
    launch_coupled_backward<ReluGrad::kGiven, true>(gr, gy, xd, grad_x, steps, sel, ranges,
                                                    grad_steps, grad_scale, stream());
  } else if (has_y) {
    launch_coupled_backward<ReluGrad::kZero, true>(gr, gy, xd, grad_x, steps, sel, ranges,
                                                   grad_steps, grad_scale, stream());
  } else {
    launch_coupled_backward<ReluGrad::kGiven, false>(gr, gy, xd, grad_x, steps, sel, ranges,
                                                     grad_steps, grad_scale, stream());
  }
  return {grad_x, grad_steps};
}

}  // namespace
}  // namespace rfq::cuda

TORCH_LIBRARY_IMPL(rfq, CUDA, m) {
  m.impl("relu_quant", &rfq::cuda::relu_quant);
  m.impl("relu_quant_backward", &rfq::cuda::relu_quant_backward);
}
