// Per-element LSQ quantizer math of ../shared/spec/kernels.md §1, shared by every CUDA kernel
// (and usable from host code). The explicit _rn intrinsics matter: nvcc contracts a*b+c into an
// FMA by default, which would skip y's rounding (y = k*s must be rounded before y - x), and
// __fdiv_rn is the correctly rounded division whatever -prec-div says.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "quant_range.h"

#if defined(__CUDACC__)
#define RFQ_HD __host__ __device__ __forceinline__
#else
#define RFQ_HD inline
#endif

namespace rfq::cuda {

// All K candidates' ranges (quant_range.h, as fp32), passed to kernels by value (kernel
// parameters, no device copy).
struct QuantRanges {
  float qn[kMaxCandidates];
  float qp[kMaxCandidates];
  bool binary[kMaxCandidates];
  int k;
  RFQ_HD QuantRange<float> at(int j) const { return {qn[j], qp[j], binary[j]}; }
};

RFQ_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

RFQ_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

RFQ_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

RFQ_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// A usable step: finite and > 0. NaN, inf, 0 and negatives fail. CUDA never syncs to report a bad
// step; the kernels turn it into NaN outputs and gradients instead (spec §1 "Bad steps").
RFQ_HD bool step_ok(float s) { return s > 0.f && s <= FLT_MAX; }

// Code k of v = x/s: clip, then round half to even (rintf); signed 1-bit takes the sign, +1 at 0
// and at -0.0. NaN stays NaN (torch.clamp semantics), so bad data stays visible.
RFQ_HD float quant_code(float v, QuantRange<float> q) {
  if (v != v) return v;
  if (q.binary) return v >= 0.f ? 1.f : -1.f;
  return rintf(fminf(fmaxf(v, q.qn), q.qp));
}

// Range test on the unrounded v, inclusive bounds (false for NaN).
RFQ_HD bool in_range(float v, QuantRange<float> q) { return v >= q.qn && v <= q.qp; }

// Step-gradient term h: k - v inside the range, k (= qn or qp) outside.
RFQ_HD float step_term(float v, float k, bool inside) { return inside ? sub_rn(k, v) : k; }

}  // namespace rfq::cuda
