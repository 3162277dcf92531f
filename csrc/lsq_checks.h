// Argument checks shared by the CPU and CUDA wrappers of the LSQ ops. Every message starts with
// the op name and names the argument. Checks here read metadata only: no device values, no syncs.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <utility>

#include "cpu/lsq_kernels.h"
#include "quant_range.h"

namespace rfq {

inline void check_x(const char* op, const at::Tensor& x) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": x must be float32, bfloat16 or float16, got ", dt);
}

inline void check_bit(const char* op, const char* name, int64_t b) {
  TORCH_CHECK(bits_ok(b), op, ": ", name, " must be in ", kMinBits, "..", kMaxBits, ", got ", b);
}

// steps: fp32 [K] on x's device, one per candidate in `bits`.
inline void check_steps(const char* op, const at::Tensor& x, const at::Tensor& steps,
                        c10::IntArrayRef bits) {
  TORCH_CHECK(steps.device() == x.device(), op, ": steps must be on x's device (", x.device(),
              "), got ", steps.device());
  TORCH_CHECK(steps.scalar_type() == at::kFloat, op, ": steps must be float32, got ",
              steps.scalar_type());
  TORCH_CHECK(steps.dim() == 1, op, ": steps must be 1-D [K], got shape ", steps.sizes());
  TORCH_CHECK(steps.numel() > 0, op, ": steps is empty: one step per candidate bit is needed");
  TORCH_CHECK(!bits.empty(), op, ": bits is empty: at least one candidate bit-width is needed");
  TORCH_CHECK(steps.numel() == static_cast<int64_t>(bits.size()), op, ": steps has K=",
              steps.numel(), " entries but bits lists ", bits.size(), " candidates");
  TORCH_CHECK(static_cast<int64_t>(bits.size()) <= kMaxCandidates, op,
              ": at most ", kMaxCandidates, " candidate bits, got ", bits.size());
  for (int64_t b : bits) check_bit(op, "bits", b);
}

inline void check_sel(const char* op, const at::Tensor& x, const at::Tensor& sel) {
  TORCH_CHECK(sel.device() == x.device(), op, ": sel must be on x's device (", x.device(),
              "), got ", sel.device());
  TORCH_CHECK(sel.scalar_type() == at::kLong, op, ": sel must be int64, got ", sel.scalar_type());
  TORCH_CHECK(sel.numel() == 1, op, ": sel must hold one index, got shape ", sel.sizes());
}

inline void check_grad(const char* op, const at::Tensor& grad, const at::Tensor& x,
                       c10::IntArrayRef expected_sizes) {
  TORCH_CHECK(grad.device() == x.device(), op, ": grad_y must be on x's device");
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), op, ": grad_y must have x's dtype (",
              x.scalar_type(), "), got ", grad.scalar_type());
  TORCH_CHECK(grad.sizes() == expected_sizes, op, ": grad_y must have shape ", expected_sizes,
              ", got ", grad.sizes());
}

// quantize_codes' arguments: x, the bit-width and a one-value fp32 step on x's device (its value
// is checked where it can be read without a host sync: on the CPU).
inline void check_codes_args(const char* op, const at::Tensor& x, const at::Tensor& step,
                             int64_t bits) {
  check_x(op, x);
  check_bit(op, "bits", bits);
  TORCH_CHECK(step.device() == x.device(), op, ": step must be on x's device (", x.device(),
              "), got ", step.device());
  TORCH_CHECK(step.scalar_type() == at::kFloat, op, ": step must be float32, got ",
              step.scalar_type());
  TORCH_CHECK(step.numel() == 1, op, ": step must hold one value, got shape ", step.sizes());
}

inline void check_delta(const char* op, double delta) {
  TORCH_CHECK(delta >= 0.0 && delta <= 0.5, op, ": delta must be in [0, 0.5], got ", delta);
}

inline void check_grad_scale(const char* op, double grad_scale) {
  TORCH_CHECK(std::isfinite(grad_scale), op, ": grad_scale must be finite, got ", grad_scale);
}

// One candidate resolved for the CPU kernels: its range (quant_range.h) and its step.
inline cpu::QuantSpec make_spec(int64_t bits, bool is_signed, float step) {
  const QuantRange<float> r = quant_range<float>(bits, is_signed);
  return {step, r.qn, r.qp, r.binary};
}

// Elementwise kernels walk flat storage. Dense inputs keep their layout (channels_last stays
// channels_last); others are copied into the layout empty_like gives them, which is also what
// the fake kernels in rfq/ops/fakes.py promise.
inline at::Tensor dense_layout(const at::Tensor& x) {
  if (x.is_non_overlapping_and_dense()) return x;
  return at::empty_like(x).copy_(x);
}

// `t` (same shape as `like`, which is dense) with exactly like's strides.
inline at::Tensor in_layout_of(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides() && t.is_non_overlapping_and_dense()) return t;
  return at::empty_like(like).copy_(t);
}

// batch_norm_quant's x [N, C, ...] (fp32) and its per-channel weight and bias (fp32 [C]).
inline void check_bn_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                          const at::Tensor& bias, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 2, op, ": x must be [N, C, ...] (at least 2 dims), got shape ",
              x.sizes());
  const int64_t c = x.size(1);
  TORCH_CHECK(c > 0 && x.numel() / c > 1, op,
              ": x needs more than one value per channel for batch statistics, got shape ",
              x.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"weight", weight},
                                std::pair<const char*, const at::Tensor&>{"bias", bias}}) {
    TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on x's device (", x.device(),
                "), got ", t.device());
    TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
                t.scalar_type());
    TORCH_CHECK(t.dim() == 1 && t.size(0) == c, op, ": ", name, " must be [C] = [", c,
                "], got shape ", t.sizes());
  }
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0, op, ": eps must be finite and >= 0, got ", eps);
}

// batch_norm_quant_backward's saved statistics: fp32 [C] on x's device.
inline void check_bn_stats(const char* op, const at::Tensor& x, const at::Tensor& mean,
                           const at::Tensor& var) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"mean", mean},
                                std::pair<const char*, const at::Tensor&>{"var", var}}) {
    TORCH_CHECK(t.device() == x.device() && t.scalar_type() == at::kFloat && t.dim() == 1 &&
                    t.size(0) == x.size(1),
                op, ": ", name, " must be float32 [C] = [", x.size(1), "] on x's device, got ",
                t.scalar_type(), " ", t.sizes(), " on ", t.device());
  }
}

// The layout batch_norm_quant computes in (and returns): 4-D channels_last stays channels_last
// (channels innermost); anything else becomes contiguous [N, C, inner].
inline at::Tensor bn_layout(const at::Tensor& x) {
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) return x;
  return x.contiguous();
}

// A tensor that goes element for element with x (batch_norm_quant_mse's teacher,
// batch_norm_add's residual): x's shape, fp32, x's device.
inline void check_like_x(const char* op, const char* name, const at::Tensor& x,
                         const at::Tensor& t) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on x's device (", x.device(),
              "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " must have x's shape ", x.sizes(),
              ", got ", t.sizes());
}

// batch_norm_quant_mse's teacher and its backward's grad_mse (one fp32 value on x's device).
inline void check_teacher(const char* op, const at::Tensor& x, const at::Tensor& teacher) {
  check_like_x(op, "teacher", x, teacher);
}

inline void check_grad_mse(const char* op, const at::Tensor& x, const at::Tensor& grad_mse) {
  TORCH_CHECK(grad_mse.device() == x.device() && grad_mse.scalar_type() == at::kFloat &&
                  grad_mse.numel() == 1,
              op, ": grad_mse must be one float32 value on x's device, got ",
              grad_mse.scalar_type(), " ", grad_mse.sizes(), " on ", grad_mse.device());
}

// batch_norm_add's arguments: batch_norm_quant's x, weight, bias and eps, and a residual like x.
inline void check_bn_add_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& bias, double eps, const at::Tensor& residual) {
  check_bn_args(op, x, weight, bias, eps);
  check_like_x(op, "residual", x, residual);
}

// batch_norm_add_backward's: no bias (without a quantizer the backward never needs z).
inline void check_bn_add_backward_args(const char* op, const at::Tensor& grad_y,
                                       const at::Tensor& x, const at::Tensor& weight,
                                       const at::Tensor& mean, const at::Tensor& var,
                                       double eps) {
  check_bn_args(op, x, weight, weight, eps);
  check_bn_stats(op, x, mean, var);
  check_grad(op, grad_y, x, x.sizes());
}

inline cpu::ChannelShape bn_shape(const at::Tensor& xd) {
  const int64_t c = xd.size(1), n = xd.size(0);
  if (xd.dim() == 4 && !xd.is_contiguous() && xd.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return {xd.numel() / c, c, 1};
  }
  const int64_t inner = n == 0 ? 1 : xd.numel() / (n * c);
  return inner == 1 ? cpu::ChannelShape{n, c, 1} : cpu::ChannelShape{n, c, inner};
}

}  // namespace rfq
