// CUDA implementations of the LSQ op family (spec §1-2): same checks and layouts as the CPU
// wrappers (lsq_checks.h), kernels on the current stream, zero host syncs. `sel` and the steps are
// read by the kernels, so a bad step or an out-of-range `sel` cannot raise without a sync: they
// give NaN in y, dx and the step gradients instead (the CPU raises).
//
// Reductions: each block reduces whole tiles of kTile elements into one fp32 partial per tile
// (fixed-order warp/block trees); a one-block finalize kernel sums the partials in fp64 in tile
// order. No float atomics, and the result depends on n only (not on the grid or timing). When x
// fits in one tile the main kernel finalizes itself: one launch.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <ATen/core/DimVector.h>

#include <cmath>

#include "cuda/common.cuh"
#include "cuda/lsq_math.cuh"
#include "lsq_checks.h"

namespace rfq::cuda {
namespace {

// coupled_quant and coupled_quant_backward: lsq_math.cuh coupled_forward_kernel and
// coupled_backward_kernel (shared with relu_quant.cu).

// ---- coupled_quant_multi: all K planes from one read of x -------------------------------------
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    forward_multi_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t n,
                         const float* __restrict__ steps, int64_t step_stride,
                         QuantRanges ranges) {
  constexpr int W = VecWidth<T>::value;
  float s[kMaxCandidates];
#pragma unroll
  for (int j = 0; j < kMaxCandidates; ++j) {
    s[j] = j < ranges.k ? read_step(steps, step_stride, j) : 1.f;
  }
  const int64_t tiles = (n + kTile - 1) / kTile;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
#pragma unroll
    for (int g = 0; g < kPerThread / W; ++g) {
      const int64_t i = group_start<W>(tile, g);
      if (i >= n) break;
      float xv[W];
      load_group<T, W, kVec>(x, i, n, xv);
#pragma unroll
      for (int j = 0; j < kMaxCandidates; ++j) {
        if (j >= ranges.k) continue;
        const QuantRange<float> q = ranges.at(j);
        float out[W];
#pragma unroll
        for (int e = 0; e < W; ++e) out[e] = fake_quant(xv[e], s[j], q);
        store_group<T, W, kVec>(y + j * n, i, n, out);
      }
    }
  }
}

// ---- coupled_quant_multi_backward: dx = sum_j in_range_j * dy_j (fp32, j in order), K sums ------
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    backward_multi_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                          int64_t n, const float* __restrict__ steps, int64_t step_stride,
                          QuantRanges ranges, float* __restrict__ partial,
                          float* __restrict__ grad_steps, double grad_scale) {
  constexpr int W = VecWidth<T>::value;
  __shared__ float smem[kMaxCandidates * kWarps];
  float s[kMaxCandidates];
  bool all_ok = true;
#pragma unroll
  for (int j = 0; j < kMaxCandidates; ++j) {
    s[j] = j < ranges.k ? read_step(steps, step_stride, j) : 1.f;
    all_ok = all_ok && !isnan(s[j]);
  }
  const int64_t tiles = (n + kTile - 1) / kTile;
  const bool finalize_here = partial == nullptr;
  float only_tile = 0.f;  // thread j holds candidate j's total
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    float acc[kMaxCandidates];
#pragma unroll
    for (int j = 0; j < kMaxCandidates; ++j) acc[j] = 0.f;
#pragma unroll
    for (int g = 0; g < kPerThread / W; ++g) {
      const int64_t i = group_start<W>(tile, g);
      if (i >= n) break;
      float xv[W], d[W];
      load_group<T, W, kVec>(x, i, n, xv);
#pragma unroll
      for (int e = 0; e < W; ++e) d[e] = 0.f;
#pragma unroll
      for (int j = 0; j < kMaxCandidates; ++j) {
        if (j >= ranges.k) continue;
        const QuantRange<float> q = ranges.at(j);
        float gv[W];
        load_group<T, W, kVec>(dy + j * n, i, n, gv);
#pragma unroll
        for (int e = 0; e < W; ++e) {
          const float v = div_rn(xv[e], s[j]);
          const bool inside = in_range(v, q);
          d[e] = add_rn(d[e], inside ? gv[e] : 0.f);
          if (i + e < n) acc[j] += gv[e] * step_term(v, quant_code(v, q), inside);
        }
      }
      if (!all_ok) {
#pragma unroll
        for (int e = 0; e < W; ++e) d[e] = kNaN;
      }
      store_group<T, W, kVec>(dx, i, n, d);
    }
    const float total = block_sum_each<float, kMaxCandidates>(acc, ranges.k, smem);
    if (static_cast<int>(threadIdx.x) < ranges.k) {
      if (finalize_here) {
        only_tile = total;
      } else {
        partial[threadIdx.x * tiles + tile] = total;
      }
    }
  }
  if (finalize_here && static_cast<int>(threadIdx.x) < ranges.k) {
    const int j = threadIdx.x;  // re-read the step: s[j] with a run-time j would go to local memory
    const bool ok = !isnan(read_step(steps, step_stride, j));
    grad_steps[j] = ok ? static_cast<float>(grad_scale * double(only_tile)) : kNaN;
  }
}

// partial: [k][tiles]; grad_steps[j] = grad_scale * sum_t partial[j][t] (NaN for a bad step).
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_all_kernel(const float* __restrict__ partial, int64_t tiles,
                        const float* __restrict__ steps, int64_t step_stride, int k,
                        float* __restrict__ grad_steps, double grad_scale) {
  __shared__ double smem[kMaxCandidates * (kFinalizeThreads / 32)];
  for (int j = 0; j < k; ++j) {
    const double total = sum_partials(partial + j * tiles, tiles, smem);
    if (threadIdx.x == 0) {
      const bool ok = !isnan(read_step(steps, step_stride, j));
      grad_steps[j] = ok ? static_cast<float>(grad_scale * total) : kNaN;
    }
  }
}

// ---- quant_stats: per candidate, sum (y - x)^2 of the stored y and the near-boundary count ------
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    stats_kernel(const T* __restrict__ x, int64_t n, const float* __restrict__ steps,
                 int64_t step_stride, QuantRanges ranges, float near_threshold, float delta,
                 float* __restrict__ sq_partial, unsigned* __restrict__ count_partial,
                 float* __restrict__ mse, float* __restrict__ share) {
  constexpr int W = VecWidth<T>::value;
  __shared__ float smem_sq[kMaxCandidates * kWarps];
  __shared__ unsigned smem_n[kMaxCandidates * kWarps];
  float s[kMaxCandidates];
#pragma unroll
  for (int j = 0; j < kMaxCandidates; ++j) {
    s[j] = j < ranges.k ? read_step(steps, step_stride, j) : 1.f;
  }
  const int64_t tiles = (n + kTile - 1) / kTile;
  const bool finalize_here = sq_partial == nullptr;
  float only_sq = 0.f;
  unsigned only_n = 0;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    float acc_sq[kMaxCandidates];
    unsigned acc_n[kMaxCandidates];
#pragma unroll
    for (int j = 0; j < kMaxCandidates; ++j) {
      acc_sq[j] = 0.f;
      acc_n[j] = 0;
    }
#pragma unroll
    for (int g = 0; g < kPerThread / W; ++g) {
      const int64_t i = group_start<W>(tile, g);
      if (i >= n) break;
      float xv[W];
      load_group<T, W, kVec>(x, i, n, xv);
#pragma unroll
      for (int j = 0; j < kMaxCandidates; ++j) {
        if (j >= ranges.k) continue;
        const QuantRange<float> q = ranges.at(j);
#pragma unroll
        for (int e = 0; e < W; ++e) {
          if (i + e >= n) continue;
          const float v = div_rn(xv[e], s[j]);
          const float k = quant_code(v, q);
          const float d = sub_rn(round_trip<T>(mul_rn(k, s[j])), xv[e]);
          acc_sq[j] += d * d;
          const bool near = q.binary ? fabsf(v) < delta : fabsf(sub_rn(v, k)) > near_threshold;
          acc_n[j] += (in_range(v, q) && near) ? 1u : 0u;
        }
      }
    }
    const float tile_sq = block_sum_each<float, kMaxCandidates>(acc_sq, ranges.k, smem_sq);
    const unsigned tile_n = block_sum_each<unsigned, kMaxCandidates>(acc_n, ranges.k, smem_n);
    if (static_cast<int>(threadIdx.x) < ranges.k) {
      if (finalize_here) {
        only_sq = tile_sq;
        only_n = tile_n;
      } else {
        sq_partial[threadIdx.x * tiles + tile] = tile_sq;
        count_partial[threadIdx.x * tiles + tile] = tile_n;
      }
    }
  }
  if (finalize_here && static_cast<int>(threadIdx.x) < ranges.k) {
    const int j = threadIdx.x;
    const bool ok = !isnan(read_step(steps, step_stride, j));
    mse[j] = !ok ? kNaN : (n ? static_cast<float>(double(only_sq) / double(n)) : 0.f);
    share[j] = !ok ? kNaN : (n ? static_cast<float>(double(only_n) / double(n)) : 0.f);
  }
}

__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_stats_kernel(const float* __restrict__ sq_partial,
                          const unsigned* __restrict__ count_partial, int64_t tiles, int64_t n,
                          const float* __restrict__ steps, int64_t step_stride, int k,
                          float* __restrict__ mse, float* __restrict__ share) {
  __shared__ double smem[kMaxCandidates * (kFinalizeThreads / 32)];
  __shared__ unsigned long long smem_n[kMaxCandidates * (kFinalizeThreads / 32)];
  for (int j = 0; j < k; ++j) {
    const double total_sq = sum_partials(sq_partial + j * tiles, tiles, smem);
    unsigned long long cnt[1] = {0};
    for (int64_t t = threadIdx.x; t < tiles; t += blockDim.x) cnt[0] += count_partial[j * tiles + t];
    const unsigned long long total_n = block_sum_each<unsigned long long, 1>(cnt, 1, smem_n);
    if (threadIdx.x == 0) {
      const bool ok = !isnan(read_step(steps, step_stride, j));
      mse[j] = ok ? static_cast<float>(total_sq / double(n)) : kNaN;
      share[j] = ok ? static_cast<float>(double(total_n) / double(n)) : kNaN;
    }
  }
}

// ---- quantize_codes: integer codes at one bit; NaN (and a bad step) give code 0 -----------------
template <typename T, typename Code, bool kVec>
__global__ void __launch_bounds__(kThreads)
    codes_kernel(const T* __restrict__ x, Code* __restrict__ out, int64_t n,
                 const float* __restrict__ step, QuantRange<float> q) {
  constexpr int W = VecWidth<T>::value;
  const float s0 = *step;
  const float s = step_ok(s0) ? s0 : kNaN;
  const int64_t tiles = (n + kTile - 1) / kTile;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
#pragma unroll
    for (int g = 0; g < kPerThread / W; ++g) {
      const int64_t i = group_start<W>(tile, g);
      if (i >= n) break;
      float xv[W];
      load_group<T, W, kVec>(x, i, n, xv);
      Pack<Code, W> pk;
#pragma unroll
      for (int e = 0; e < W; ++e) {
        const float k = quant_code(div_rn(xv[e], s), q);
        pk.v[e] = isnan(k) ? Code(0) : static_cast<Code>(__float2int_rn(k));
      }
      if (kVec && i + W <= n) {
        *reinterpret_cast<Pack<Code, W>*>(out + i) = pk;
      } else {
#pragma unroll
        for (int e = 0; e < W; ++e) {
          if (i + e < n) out[i + e] = pk.v[e];
        }
      }
    }
  }
}

// ---- host wrappers ------------------------------------------------------------------------------

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

at::Tensor coupled_quant(const at::Tensor& x, const at::Tensor& steps, c10::IntArrayRef bits,
                         const at::Tensor& sel, bool is_signed, double /*grad_scale*/) {
  constexpr const char* op = "rfq.coupled_quant";
  check_x(op, x);
  check_steps(op, x, steps, bits);
  check_sel(op, x, sel);
  const c10::cuda::CUDAGuard guard(x.device());
  const QuantRanges ranges = make_ranges(bits, is_signed);
  const at::Tensor xd = dense_layout(x);
  at::Tensor y = at::empty_like(xd);
  const int64_t n = xd.numel();
  if (n == 0) return y;
  launch_coupled_forward</*kRelu=*/false>(xd, y, at::Tensor(), steps, sel, ranges, stream());
  return y;
}

std::tuple<at::Tensor, at::Tensor> coupled_quant_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& steps,
    c10::IntArrayRef bits, const at::Tensor& sel, bool is_signed, double grad_scale) {
  constexpr const char* op = "rfq.coupled_quant_backward";
  check_x(op, x);
  check_steps(op, x, steps, bits);
  check_sel(op, x, sel);
  check_grad(op, grad_y, x, x.sizes());
  check_grad_scale(op, grad_scale);
  const c10::cuda::CUDAGuard guard(x.device());
  const QuantRanges ranges = make_ranges(bits, is_signed);
  const at::Tensor xd = dense_layout(x);
  const at::Tensor gd = in_layout_of(grad_y, xd);
  at::Tensor grad_x = at::empty_like(xd);
  at::Tensor grad_steps = at::empty({steps.numel()}, steps.options());  // every slot is written
  launch_coupled_backward<ReluGrad::kNone, /*kY=*/true>(at::Tensor(), gd, xd, grad_x, steps, sel,
                                                         ranges, grad_steps, grad_scale, stream());
  return {grad_x, grad_steps};
}

at::DimVector stacked_shape(int64_t k, const at::Tensor& x) {
  at::DimVector shape{k};
  shape.insert(shape.end(), x.sizes().begin(), x.sizes().end());
  return shape;
}

at::Tensor coupled_quant_multi(const at::Tensor& x, const at::Tensor& steps,
                               c10::IntArrayRef bits, bool is_signed, double /*grad_scale*/) {
  constexpr const char* op = "rfq.coupled_quant_multi";
  check_x(op, x);
  check_steps(op, x, steps, bits);
  const c10::cuda::CUDAGuard guard(x.device());
  const QuantRanges ranges = make_ranges(bits, is_signed);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(stacked_shape(steps.numel(), x), x.options());
  const int64_t n = xc.numel();
  if (n == 0) return y;
  dispatch_float_types(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int W = VecWidth<T>::value;
    const T* xp = static_cast<const T*>(xc.const_data_ptr());
    T* yp = static_cast<T*>(y.mutable_data_ptr());
    // every plane y + j*n must be aligned too
    const bool vec = aligned_to(xp, 16) && aligned_to(yp, 16) && (ranges.k == 1 || n % W == 0);
    auto kernel = vec ? forward_multi_kernel<T, true> : forward_multi_kernel<T, false>;
    kernel<<<grid_for(num_tiles(n)), kThreads, 0, stream()>>>(
        xp, yp, n, steps.const_data_ptr<float>(), steps.stride(0), ranges);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> coupled_quant_multi_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& steps,
    c10::IntArrayRef bits, bool is_signed, double grad_scale) {
  constexpr const char* op = "rfq.coupled_quant_multi_backward";
  check_x(op, x);
  check_steps(op, x, steps, bits);
  check_grad(op, grad_y, x, stacked_shape(steps.numel(), x));
  check_grad_scale(op, grad_scale);
  const c10::cuda::CUDAGuard guard(x.device());
  const QuantRanges ranges = make_ranges(bits, is_signed);
  const at::Tensor xc = x.contiguous();
  const at::Tensor gc = grad_y.contiguous();
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_steps = at::empty({steps.numel()}, steps.options());
  const int64_t n = xc.numel(), tiles = num_tiles(n);
  at::Tensor partial;
  if (tiles > 1) partial = at::empty({ranges.k * tiles}, steps.options());  // [K][tiles]
  dispatch_float_types(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int W = VecWidth<T>::value;
    const T* gp = static_cast<const T*>(gc.const_data_ptr());
    const T* xp = static_cast<const T*>(xc.const_data_ptr());
    T* dxp = static_cast<T*>(grad_x.mutable_data_ptr());
    const bool vec = aligned_to(gp, 16) && aligned_to(xp, 16) && aligned_to(dxp, 16) &&
                     (ranges.k == 1 || n % W == 0);
    auto kernel = vec ? backward_multi_kernel<T, true> : backward_multi_kernel<T, false>;
    kernel<<<grid_for(tiles), kThreads, 0, stream()>>>(
        gp, xp, dxp, n, steps.const_data_ptr<float>(), steps.stride(0), ranges,
        partial.defined() ? partial.mutable_data_ptr<float>() : nullptr,
        grad_steps.mutable_data_ptr<float>(), grad_scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (partial.defined()) {
    finalize_all_kernel<<<1, kFinalizeThreads, 0, stream()>>>(
        partial.const_data_ptr<float>(), tiles, steps.const_data_ptr<float>(), steps.stride(0),
        ranges.k, grad_steps.mutable_data_ptr<float>(), grad_scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {grad_x, grad_steps};
}

std::tuple<at::Tensor, at::Tensor> quant_stats(const at::Tensor& x, const at::Tensor& steps,
                                               c10::IntArrayRef bits, bool is_signed,
                                               double delta) {
  constexpr const char* op = "rfq.quant_stats";
  check_x(op, x);
  check_steps(op, x, steps, bits);
  check_delta(op, delta);
  const c10::cuda::CUDAGuard guard(x.device());
  const QuantRanges ranges = make_ranges(bits, is_signed);
  const at::Tensor xd = dense_layout(x);  // order does not matter to a reduction over all of x
  at::Tensor mse = at::empty({steps.numel()}, steps.options());
  at::Tensor share = at::empty({steps.numel()}, steps.options());
  const int64_t n = xd.numel(), tiles = num_tiles(n);
  at::Tensor sq_partial, count_partial;
  if (tiles > 1) {
    sq_partial = at::empty({ranges.k * tiles}, steps.options());
    count_partial = at::empty({ranges.k * tiles}, steps.options().dtype(at::kInt));
  }
  // |v - rint(v)| > 1/2 - delta, with the threshold rounded once to fp32 (as the reference does).
  const float near_threshold = static_cast<float>(0.5 - delta);
  dispatch_float_types(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(xd.const_data_ptr());
    auto kernel = aligned_to(xp, 16) ? stats_kernel<T, true> : stats_kernel<T, false>;
    kernel<<<grid_for(tiles), kThreads, 0, stream()>>>(
        xp, n, steps.const_data_ptr<float>(), steps.stride(0), ranges, near_threshold,
        static_cast<float>(delta),
        sq_partial.defined() ? sq_partial.mutable_data_ptr<float>() : nullptr,
        count_partial.defined() ? static_cast<unsigned*>(count_partial.mutable_data_ptr())
                                : nullptr,
        mse.mutable_data_ptr<float>(), share.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (tiles > 1) {
    finalize_stats_kernel<<<1, kFinalizeThreads, 0, stream()>>>(
        sq_partial.const_data_ptr<float>(),
        static_cast<const unsigned*>(count_partial.const_data_ptr()), tiles, n,
        steps.const_data_ptr<float>(), steps.stride(0), ranges.k, mse.mutable_data_ptr<float>(),
        share.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {mse, share};
}

at::Tensor quantize_codes(const at::Tensor& x, const at::Tensor& step, int64_t bits,
                          bool is_signed) {
  constexpr const char* op = "rfq.quantize_codes";
  check_codes_args(op, x, step, bits);
  const c10::cuda::CUDAGuard guard(x.device());
  const QuantRange<float> q = quant_range<float>(bits, is_signed);  // the step is read on device
  const at::Tensor xd = dense_layout(x);
  at::Tensor codes = at::empty_like(xd, xd.options().dtype(is_signed ? at::kChar : at::kByte));
  const int64_t n = xd.numel();
  if (n == 0) return codes;
  dispatch_float_types(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int W = VecWidth<T>::value;
    const T* xp = static_cast<const T*>(xd.const_data_ptr());
    const bool vec = aligned_to(xp, 16) && aligned_to(codes.const_data_ptr(), W);
    const float* sp = step.const_data_ptr<float>();
    const unsigned grid = grid_for(num_tiles(n));
    if (is_signed) {
      int8_t* out = static_cast<int8_t*>(codes.mutable_data_ptr());
      auto kernel = vec ? codes_kernel<T, int8_t, true> : codes_kernel<T, int8_t, false>;
      kernel<<<grid, kThreads, 0, stream()>>>(xp, out, n, sp, q);
    } else {
      uint8_t* out = static_cast<uint8_t*>(codes.mutable_data_ptr());
      auto kernel = vec ? codes_kernel<T, uint8_t, true> : codes_kernel<T, uint8_t, false>;
      kernel<<<grid, kThreads, 0, stream()>>>(xp, out, n, sp, q);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return codes;
}

}  // namespace
}  // namespace rfq::cuda

TORCH_LIBRARY_IMPL(rfq, CUDA, m) {
  m.impl("coupled_quant", &rfq::cuda::coupled_quant);
  m.impl("coupled_quant_backward", &rfq::cuda::coupled_quant_backward);
  m.impl("coupled_quant_multi", &rfq::cuda::coupled_quant_multi);
  m.impl("coupled_quant_multi_backward", &rfq::cuda::coupled_quant_multi_backward);
  m.impl("quant_stats", &rfq::cuda::quant_stats);
  m.impl("quantize_codes", &rfq::cuda::quantize_codes);
}
