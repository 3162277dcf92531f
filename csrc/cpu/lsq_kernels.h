// Interface between the CPU op wrappers (lsq.cpp) and the per-ISA kernel files
// (lsq_kernels_{default,avx2,avx512}.cpp), which all compile lsq_kernels_impl.h.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "quant_range.h"

namespace rfq::cpu {

// One candidate bit-width, resolved (make_spec in lsq_checks.h): its integer range [qn, qp]
// (quant_range.h) and its step. `binary` is signed 1-bit, whose codes are {-1, +1} (sign).
struct QuantSpec {
  float step;
  float qn;
  float qp;
  bool binary;
};

// Reductions run over fixed chunks of this many elements (fp32 partials, combined in fp64 in
// chunk order), so results do not depend on the thread count or the ISA's scheduling.
constexpr int64_t kReduceChunk = 4096;

// x viewed as [outer, channels, inner] (2-D and channels_last inputs: inner == 1, one row of
// `channels` values per position).
struct ChannelShape {
  int64_t outer;
  int64_t channels;
  int64_t inner;
};

// Elementwise kernels over `n` elements of flat, dense storage. `dtype` is x's (fp32/bf16/fp16);
// grad_y/grad_x share it. Step gradients come back as fp32, already multiplied by grad_scale.
struct LsqKernels {
  void (*forward)(c10::ScalarType dtype, const void* x, void* y, int64_t n, QuantSpec q);
  void (*backward)(c10::ScalarType dtype, const void* grad_y, const void* x, void* grad_x,
                   int64_t n, QuantSpec q, double grad_scale, float* grad_step);
  // y: K planes of n elements each.
  void (*forward_multi)(c10::ScalarType dtype, const void* x, void* y, int64_t n,
                        const QuantSpec* q, int64_t k);
  void (*backward_multi)(c10::ScalarType dtype, const void* grad_y, const void* x, void* grad_x,
                         int64_t n, const QuantSpec* q, int64_t k, double grad_scale,
                         float* grad_steps);
  void (*stats)(c10::ScalarType dtype, const void* x, int64_t n, const QuantSpec* q, int64_t k,
                float near_threshold, float delta, float* mse, float* share);
  // int8 codes for signed ranges, uint8 for unsigned ones ([0, 255] does not fit int8).
  void (*codes)(c10::ScalarType dtype, const void* x, void* codes, int64_t n, QuantSpec q);
  // The same codes as exact fp32 integers, NaN kept (packed_linear's fused input quantizer).
  void (*codes_float)(c10::ScalarType dtype, const void* x, float* codes, int64_t n, QuantSpec q);
  // relu_quant: r = relu(x) and y = code(x / s) * s (unsigned q); backward dx = (x > 0) * dr +
  // in_range * dy, either gradient may be null (an unused output).
  void (*relu_forward)(c10::ScalarType dtype, const void* x, void* r, void* y, int64_t n,
                       QuantSpec q);
  void (*relu_backward)(c10::ScalarType dtype, const void* grad_r, const void* grad_y,
                        const void* x, void* grad_x, int64_t n, QuantSpec q, double grad_scale,
                        float* grad_step);
  // batch_norm_quant (fp32): per-channel batch mean and biased variance; y = code(z / s) * s with
  // z = x * alpha[c] + beta[c]; and the backward's two passes (reductions, then dx).
  // batch_norm_quant_mse: a teacher (x's layout, or null) adds sum((z - teacher)^2) to the
  // forward (*sq_err) and match * (z - teacher) to z's gradient in the backward.
  void (*bn_stats)(const float* x, ChannelShape s, float* mean, float* var);
  void (*bn_forward)(const float* x, float* y, ChannelShape s, const float* alpha,
                     const float* beta, QuantSpec q, const float* teacher, double* sq_err);
  void (*bn_backward)(const float* dy, const float* x, float* dx, ChannelShape s,
                      const float* alpha, const float* beta, const float* mean,
                      const float* invstd, QuantSpec q, double grad_scale, const float* teacher,
                      float match, float* grad_weight, float* grad_bias, float* grad_step);
  // batch_norm_add: y = x * alpha + beta + residual, and its backward (no quantizer).
  void (*bn_add_forward)(const float* x, const float* residual, float* y, ChannelShape s,
                         const float* alpha, const float* beta);
  void (*bn_add_backward)(const float* dy, const float* x, float* dx, ChannelShape s,
                          const float* alpha, const float* mean, const float* invstd,
                          float* grad_weight, float* grad_bias);
};

namespace DEFAULT { extern const LsqKernels kLsqKernels; }
#ifdef RFQ_X86_DISPATCH
namespace AVX2 { extern const LsqKernels kLsqKernels; }
namespace AVX512 { extern const LsqKernels kLsqKernels; }
#endif

// The best table this CPU supports; honours ATEN_CPU_CAPABILITY (e.g. =default) like ATen.
const LsqKernels& lsq_kernels();

}  // namespace rfq::cpu
