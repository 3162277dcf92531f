// Per-element LSQ quantizer math of ../shared/spec/kernels.md §1, shared by every CUDA kernel
// (and usable from host code); under nvcc also the device-side read of the selected candidate
// (sel, steps[sel]; NaN for bad values), its step-gradient finalize, and the coupled_quant
// forward/backward kernels with their launches (lsq.cu; relu_quant.cu fuses a ReLU into them).
// The explicit _rn intrinsics matter: nvcc contracts a*b+c into an FMA by default, which would
// skip y's rounding (y = k*s must be rounded before y - x), and __fdiv_rn is the correctly rounded
// division whatever -prec-div says.
#pragma once

#include <c10/util/ArrayRef.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>

#include "quant_range.h"

#if defined(__CUDACC__)
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>

#include "cuda/common.cuh"
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
  // at(j) for a run-time j without indexing the arrays dynamically (in a kernel that would copy
  // the parameter struct to local memory in every thread); candidate 0 for j < 0.
  RFQ_HD QuantRange<float> select(int j) const {
    QuantRange<float> q = at(0);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int c = 1; c < kMaxCandidates; ++c) {
      if (c == j) q = at(c);
    }
    return q;
  }
};

// The ranges of `bits` (checked by the caller); the steps are not part of it: the kernels read
// them on the device.
inline QuantRanges make_ranges(c10::IntArrayRef bits, bool is_signed) {
  QuantRanges r{};
  r.k = static_cast<int>(bits.size());
  for (size_t j = 0; j < bits.size(); ++j) {
    const QuantRange<float> q = quant_range<float>(bits[j], is_signed);
    r.qn[j] = q.qn;
    r.qp[j] = q.qp;
    r.binary[j] = q.binary;
  }
  return r;
}

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

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

// y = k * s with k the code of x / s: fp32, each operation rounded (cast to T by the caller).
RFQ_HD float fake_quant(float x, float s, QuantRange<float> q) {
  return mul_rn(quant_code(div_rn(x, s), q), s);
}

#if defined(__CUDACC__)
// ---- the selected candidate, read on the device (no host sync) ---------------------------------
// sel as an index in [0, k), or -1 when out of range (then every output that needs the step is
// NaN).
__device__ __forceinline__ int read_sel(const int64_t* sel, int k) {
  const int64_t j = *sel;
  return (j >= 0 && j < k) ? static_cast<int>(j) : -1;
}

// steps[j], or NaN for a bad step: NaN then flows through v = x/s into y and the step sums.
__device__ __forceinline__ float read_step(const float* steps, int64_t stride, int j) {
  const float s = steps[j * stride];
  return step_ok(s) ? s : kNaN;
}

// read_step for j = read_sel(...): NaN also for an out-of-range sel (j < 0).
__device__ __forceinline__ float read_selected_step(const float* steps, int64_t stride, int j) {
  return j >= 0 ? read_step(steps, stride, j) : kNaN;
}

// The selected candidate of a launch: its index j (-1: sel out of range), step s (NaN for a bad
// step or sel) and range q (candidate 0's for j < 0, where s is NaN anyway).
struct Selected {
  int j;
  float s;
  QuantRange<float> q;
};

__device__ __forceinline__ Selected read_selected(const int64_t* sel, const float* steps,
                                                  int64_t stride, const QuantRanges& ranges) {
  const int j = read_sel(sel, ranges.k);
  return {j, read_selected_step(steps, stride, j), ranges.select(j)};
}

// Writes grad_steps[0..k): slot sel gets grad_scale * total (NaN for a bad step or sel), the
// others 0 (all NaN when sel itself is out of range).
__device__ __forceinline__ void write_selected_grad(float* grad_steps, int k, int j, bool ok,
                                                    double total, double grad_scale) {
  for (int slot = 0; slot < k; ++slot) {
    float value = 0.f;
    if (j < 0) {
      value = kNaN;
    } else if (slot == j) {
      value = ok ? static_cast<float>(grad_scale * total) : kNaN;
    }
    grad_steps[slot] = value;
  }
}

// One block: grad_steps[0..k) from the partials of the selected candidate's step-gradient sum
// (common.cuh sum_partials: fp64, in order), written by thread 0. smem: blockDim.x / 32 doubles.
template <typename P>
__device__ __forceinline__ void finalize_selected(const P* __restrict__ partial, int64_t count,
                                                  const float* __restrict__ steps,
                                                  int64_t step_stride,
                                                  const int64_t* __restrict__ sel, int k,
                                                  float* __restrict__ grad_steps,
                                                  double grad_scale, double* smem) {
  const double total = sum_partials(partial, count, smem);
  if (threadIdx.x == 0) {
    const int j = read_sel(sel, k);
    const bool ok = !isnan(read_selected_step(steps, step_stride, j));
    write_selected_grad(grad_steps, k, j, ok, total, grad_scale);
  }
}

// One block of kBlock threads: finalize_selected over the per-tile partials. A template so that
// every .cu that includes this header launches its own instance.
template <int kBlock>
__global__ void __launch_bounds__(kBlock)
    finalize_selected_kernel(const float* __restrict__ partial, int64_t tiles,
                             const float* __restrict__ steps, int64_t step_stride,
                             const int64_t* __restrict__ sel, int k,
                             float* __restrict__ grad_steps, double grad_scale) {
  __shared__ double smem[kBlock / 32];
  finalize_selected(partial, tiles, steps, step_stride, sel, k, grad_steps, grad_scale, smem);
}

// ---- coupled_quant at the selected candidate (cuda/lsq.cu), with relu_quant's ReLU fused -------
// (cuda/relu_quant.cu). Elementwise tiles of common.cuh; the step gradient is one fp32 partial per
// tile, summed by finalize_selected_kernel in tile order (the main kernel finalizes itself when
// there is at most one tile), so it depends on n only.

// relu(x) with NaN kept (torch.relu); -0.0 gives +0.0.
__device__ __forceinline__ float relu(float x) { return (x > 0.f || x != x) ? x : 0.f; }

// y = fake_quant(x) at bits[sel]; kRelu: also r = relu(x) from the same read of x (else r unused).
template <typename T, bool kVec, bool kRelu>
__global__ void __launch_bounds__(kThreads)
    coupled_forward_kernel(const T* __restrict__ x, T* __restrict__ y, T* __restrict__ r,
                           int64_t n, const float* __restrict__ steps, int64_t step_stride,
                           const int64_t* __restrict__ sel, QuantRanges ranges) {
  constexpr int W = VecWidth<T>::value;
  const Selected c = read_selected(sel, steps, step_stride, ranges);
  const int64_t tiles = (n + kTile - 1) / kTile;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
#pragma unroll
    for (int g = 0; g < kPerThread / W; ++g) {
      const int64_t i = group_start<W>(tile, g);
      if (i >= n) break;
      float xv[W], yv[W];
      load_group<T, W, kVec>(x, i, n, xv);
      if constexpr (kRelu) {
        float rv[W];
#pragma unroll
        for (int e = 0; e < W; ++e) rv[e] = relu(xv[e]);
        store_group<T, W, kVec>(r, i, n, rv);
      }
#pragma unroll
      for (int e = 0; e < W; ++e) yv[e] = fake_quant(xv[e], c.s, c.q);
      store_group<T, W, kVec>(y, i, n, yv);
    }
  }
}

// The ReLU part of dx in coupled_backward_kernel.
enum class ReluGrad {
  kNone,   // coupled_quant_backward: dx = in range ? dy : 0
  kZero,   // relu_quant_backward without grad_r: dx = 0 + (in range ? dy : 0) (fp32: -0 gives +0)
  kGiven,  // relu_quant_backward: dx = (x > 0 ? dr : 0) [+ (in range ? dy : 0) with kY]
};

// dx and, with kY (dy given), the step-gradient partials: partial[tile], or (partial == nullptr:
// at most one tile) grad_steps written here. Without kY no step or sel is read.
template <typename T, bool kVec, ReluGrad kR, bool kY>
__global__ void __launch_bounds__(kThreads)
    coupled_backward_kernel(const T* __restrict__ dr, const T* __restrict__ dy,
                            const T* __restrict__ x, T* __restrict__ dx, int64_t n,
                            const float* __restrict__ steps, int64_t step_stride,
                            const int64_t* __restrict__ sel, QuantRanges ranges,
                            float* __restrict__ partial, float* __restrict__ grad_steps,
                            double grad_scale) {
  static_assert(kY || kR == ReluGrad::kGiven, "no gradient: the host writes zeros");
  constexpr int W = VecWidth<T>::value;
  __shared__ float smem[kWarps];
  Selected c{0, 1.f, ranges.at(0)};
  if constexpr (kY) c = read_selected(sel, steps, step_stride, ranges);
  const bool ok = !isnan(c.s);
  const int64_t tiles = (n + kTile - 1) / kTile;
  const bool finalize_here = partial == nullptr;  // host passes none when tiles <= 1
  float only_tile = 0.f;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    float acc[1] = {0.f};
#pragma unroll
    for (int g = 0; g < kPerThread / W; ++g) {
      const int64_t i = group_start<W>(tile, g);
      if (i >= n) break;
      float xv[W], rv[W], gv[W], d[W];
      load_group<T, W, kVec>(x, i, n, xv);
      if constexpr (kR == ReluGrad::kGiven) load_group<T, W, kVec>(dr, i, n, rv);
      if constexpr (kY) load_group<T, W, kVec>(dy, i, n, gv);
#pragma unroll
      for (int e = 0; e < W; ++e) {
        float de = 0.f;
        if constexpr (kR == ReluGrad::kGiven) de = xv[e] > 0.f ? rv[e] : 0.f;
        if constexpr (kY) {
          const float v = div_rn(xv[e], c.s);
          const bool inside = in_range(v, c.q);
          const float dq = inside ? gv[e] : 0.f;
          if constexpr (kR == ReluGrad::kNone) {
            de = ok ? dq : kNaN;
          } else {
            de = ok ? add_rn(de, dq) : kNaN;
          }
          if (i + e < n) acc[0] += gv[e] * step_term(v, quant_code(v, c.q), inside);
        }
        d[e] = de;
      }
      store_group<T, W, kVec>(dx, i, n, d);
    }
    if constexpr (kY) {
      const float total = block_sum_each<float, 1>(acc, 1, smem);
      if (threadIdx.x == 0) {
        if (finalize_here) {
          only_tile = total;
        } else {
          partial[tile] = total;
        }
      }
    }
  }
  if constexpr (kY) {
    if (finalize_here && threadIdx.x == 0) {
      write_selected_grad(grad_steps, ranges.k, c.j, ok, only_tile, grad_scale);
    }
  }
}

// ---- host side: the launches on `stream`, for x's dtype ----------------------------------------

// y (and, with kRelu, r) from xd: dense, n > 0; y and r: empty_like(xd) (r unused without kRelu).
template <bool kRelu>
void launch_coupled_forward(const at::Tensor& xd, const at::Tensor& y, const at::Tensor& r,
                            const at::Tensor& steps, const at::Tensor& sel,
                            const QuantRanges& ranges, cudaStream_t stream) {
  const int64_t n = xd.numel();
  dispatch_float_types(xd.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(xd.const_data_ptr());
    T* yp = static_cast<T*>(y.mutable_data_ptr());
    T* rp = kRelu ? static_cast<T*>(r.mutable_data_ptr()) : nullptr;
    const bool vec = aligned_to(xp, 16) && aligned_to(yp, 16) && (!kRelu || aligned_to(rp, 16));
    auto kernel =
        vec ? coupled_forward_kernel<T, true, kRelu> : coupled_forward_kernel<T, false, kRelu>;
    kernel<<<grid_for(num_tiles(n)), kThreads, 0, stream>>>(
        xp, yp, rp, n, steps.const_data_ptr<float>(), steps.stride(0),
        sel.const_data_ptr<int64_t>(), ranges);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// grad_x (empty_like(xd)) from dr (ReluGrad::kGiven) and dy (kY), both in xd's layout; with kY
// also grad_steps (every slot written, also for n == 0): coupled_backward_kernel, then, for more
// than one tile, finalize_selected_kernel over one fp32 partial per tile.
template <ReluGrad kR, bool kY>
void launch_coupled_backward(const at::Tensor& dr, const at::Tensor& dy, const at::Tensor& xd,
                             const at::Tensor& grad_x, const at::Tensor& steps,
                             const at::Tensor& sel, const QuantRanges& ranges,
                             const at::Tensor& grad_steps, double grad_scale,
                             cudaStream_t stream) {
  const int64_t n = xd.numel(), tiles = num_tiles(n);
  at::Tensor partial;
  if (kY && tiles > 1) partial = at::empty({tiles}, steps.options());
  float* pp = partial.defined() ? partial.mutable_data_ptr<float>() : nullptr;
  dispatch_float_types(xd.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* drp = kR == ReluGrad::kGiven ? static_cast<const T*>(dr.const_data_ptr()) : nullptr;
    const T* dyp = kY ? static_cast<const T*>(dy.const_data_ptr()) : nullptr;
    const T* xp = static_cast<const T*>(xd.const_data_ptr());
    T* dxp = static_cast<T*>(grad_x.mutable_data_ptr());
    const bool vec = aligned_to(xp, 16) && aligned_to(dxp, 16) &&
                     (kR != ReluGrad::kGiven || aligned_to(drp, 16)) &&
                     (!kY || aligned_to(dyp, 16));
    auto kernel = vec ? coupled_backward_kernel<T, true, kR, kY>
                      : coupled_backward_kernel<T, false, kR, kY>;
    kernel<<<grid_for(tiles), kThreads, 0, stream>>>(
        drp, dyp, xp, dxp, n, steps.const_data_ptr<float>(), steps.stride(0),
        sel.const_data_ptr<int64_t>(), ranges, pp, grad_steps.mutable_data_ptr<float>(),
        grad_scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (pp != nullptr) {
    finalize_selected_kernel<kFinalizeThreads><<<1, kFinalizeThreads, 0, stream>>>(
        pp, tiles, steps.const_data_ptr<float>(), steps.stride(0), sel.const_data_ptr<int64_t>(),
        ranges.k, grad_steps.mutable_data_ptr<float>(), grad_scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}
#endif  // __CUDACC__

}  // namespace rfq::cuda
