// CUDA batch_norm_quant[_mse] and their backwards (fp32): training-mode BatchNorm fused with one
// coupled quantizer (_mse: plus a feature MSE of the BN output to a teacher), the same computation
// as the CPU kernels bn_stats / bn_forward / bn_backward (cpu/lsq_kernels_impl.h) with the same
// checks and layouts (lsq_checks.h); and batch_norm_add (BatchNorm plus a residual, no
// quantizer) with the same statistics and backward passes. Zero host syncs: `sel`, the step and grad_mse are read on the
// device, so a bad step or an out-of-range `sel` gives NaN (y, dx, dweight, dbias and the step
// gradient) instead of the CPU's error.
//
// Data: bn_layout(x) viewed as [outer, C, inner] (bn_shape). Every kernel uses one geometry:
//   rows   (inner == 1, channels innermost: 2-D or channels_last): a block is ct channels x rt
//          row lanes (ct = min(32, next_pow2(C)), ct * rt = 256); a warp reads whole runs of ct
//          adjacent channels of 32 / ct rows, so loads and stores coalesce. grid = (row chunks,
//          channel tiles); a chunk is rt * kBnPer rows.
//   planes (inner > 1): a block is one channel (ct = 1, rt = 256) and a chunk of kBnPer * 256
//          consecutive values of that channel's outer * inner values (plane after plane; a chunk
//          may span planes); consecutive threads read consecutive addresses within a plane.
//          grid = C * chunks.
// Each thread holds kBnPer values of one channel, positions ty + i * rt of its chunk.
//
// Determinism: no float atomics. A block reduces its chunk per channel in fp64 with a fixed tree
// over the row lanes and writes one partial per (channel, chunk) ([C][chunks]); a finalize kernel
// (one block per channel) sums the partials in fp64 in a fixed order. The geometry depends on the
// shape only, so the results do too (not on the GPU, the grid scheduling or timing).
//   forward:  stats (per chunk: sum and the squared deviations from the chunk's own mean, two
//             passes over registers) -> finalize (mean = sum / n, var = (sum m2_k + sum n_k
//             (mean_k - mean)^2) / n, exact decomposition) -> y.
//   backward: sums of g, g * xhat per channel and dy * h per block -> finalize (dweight, dbias,
//             mean(g), mean(g * xhat), dsteps) -> dx.
// All per-element fp32 math is explicitly rounded (_rn intrinsics, no FMA contraction), as the
// CPU's -ffp-contract=off code: z = x * alpha + beta, v = z / s, y = code(v) * s.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "cuda/common.cuh"
#include "cuda/lsq_math.cuh"
#include "lsq_checks.h"

namespace rfq::cuda {
namespace {

constexpr int kBnThreads = 256;  // ct * rt
constexpr int kBnPer = 16;       // values per thread per chunk
constexpr int kBnWarps = kBnThreads / 32;
constexpr int kMaxGridY = 65535;
constexpr int64_t kMaxGridX = 2147483647;

// ---- geometry ------------------------------------------------------------------------------------

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

struct BnGeom {
  int64_t channels;
  int64_t inner;
  int64_t len;     // values per channel: outer * inner
  int64_t chunk;   // values of one channel per block: rt * kBnPer
  int64_t chunks;  // chunks per channel
  int64_t lane_q;  // planes: rt = lane_q * inner + lane_r (a lane's step in (plane, offset))
  int64_t lane_r;
  int ct;          // channels per block (rows; planes: 1)
  int ct_shift;    // log2(ct)
  int rt;          // lanes per channel: kBnThreads / ct
};

BnGeom make_geom(const cpu::ChannelShape& s) {
  BnGeom g{};
  g.channels = s.channels;
  g.inner = s.inner;
  g.len = s.outer * s.inner;
  if (s.inner == 1) {
    int ct = 1, shift = 0;
    while (ct < 32 && ct < s.channels) {
      ct <<= 1;
      ++shift;
    }
    g.ct = ct;
    g.ct_shift = shift;
  } else {
    g.ct = 1;
    g.ct_shift = 0;
  }
  g.rt = kBnThreads / g.ct;
  g.lane_q = s.inner > 1 ? g.rt / s.inner : 0;
  g.lane_r = s.inner > 1 ? g.rt % s.inner : 0;
  g.chunk = int64_t{g.rt} * kBnPer;
  g.chunks = (g.len + g.chunk - 1) / g.chunk;
  return g;
}

dim3 grid_of(const BnGeom& g, bool rows, const char* op) {
  if (rows) {
    const int64_t tiles = (g.channels + g.ct - 1) / g.ct;
    TORCH_CHECK(tiles <= kMaxGridY && g.chunks <= kMaxGridX, op, ": x is too large (", g.channels,
                " channels of ", g.len, " values) for the CUDA kernel's grid");
    return dim3(static_cast<unsigned>(g.chunks), static_cast<unsigned>(tiles));
  }
  TORCH_CHECK(g.chunks <= kMaxGridX / g.channels, op, ": x is too large (", g.channels,
              " channels of ", g.len, " values) for the CUDA kernel's grid");
  return dim3(static_cast<unsigned>(g.channels * g.chunks));
}

// This thread's place: lane (tx, ty), channel c (>= channels: an idle column of the last rows
// tile), chunk k, and how many of its kBnPer positions exist (a prefix).
struct BnThread {
  int tx;
  int ty;
  int64_t c;
  int64_t k;
  int count;
};

template <bool kRows>
__device__ __forceinline__ BnThread bn_thread(const BnGeom& g) {
  BnThread t;
  const int tid = static_cast<int>(threadIdx.x);
  if (kRows) {
    t.tx = tid & (g.ct - 1);
    t.ty = tid >> g.ct_shift;
    t.k = blockIdx.x;
    t.c = int64_t{blockIdx.y} * g.ct + t.tx;
  } else {
    t.tx = 0;
    t.ty = tid;
    t.c = int64_t{blockIdx.x} / g.chunks;
    t.k = int64_t{blockIdx.x} - t.c * g.chunks;
  }
  const int64_t p0 = t.k * g.chunk + t.ty;
  const int64_t left = g.len - p0;  // positions p0, p0 + rt, ... below len
  t.count = (t.c >= g.channels || left <= 0)
                ? 0
                : static_cast<int>(min64(kBnPer, (left + g.rt - 1) / g.rt));
  return t;
}

// Flat offsets of the thread's positions p0 + i * rt, generated in order (i = 0, 1, ...).
template <bool kRows>
struct BnCursor {
  int64_t off, step;           // rows: off += step
  int64_t n, r, plane, inner;  // planes: (plane index, offset in plane)
  int64_t q, rm, base;
  __device__ __forceinline__ BnCursor(const BnGeom& g, const BnThread& t) {
    const int64_t p0 = t.k * g.chunk + t.ty;
    if (kRows) {
      off = p0 * g.channels + t.c;
      step = int64_t{g.rt} * g.channels;
    } else {
      inner = g.inner;
      n = p0 / inner;
      r = p0 - n * inner;
      plane = g.channels * inner;
      base = t.c * inner;
      q = g.lane_q;
      rm = g.lane_r;
    }
  }
  __device__ __forceinline__ int64_t at() const { return kRows ? off : n * plane + base + r; }
  __device__ __forceinline__ void next() {
    if (kRows) {
      off += step;
    } else {
      r += rm;
      n += q;
      if (r >= inner) {
        r -= inner;
        ++n;
      }
    }
  }
};

// v[i] = p[off[i]] for the thread's positions (0 past count), at load_values' offsets.
__device__ __forceinline__ void load_at(const float* __restrict__ p, const BnThread& t,
                                        const int64_t (&off)[kBnPer], float (&v)[kBnPer]) {
#pragma unroll
  for (int i = 0; i < kBnPer; ++i) v[i] = i < t.count ? p[off[i]] : 0.f;
}

// Loads the thread's values (0 past count) and returns their offsets.
template <bool kRows>
__device__ __forceinline__ void load_values(const float* __restrict__ p, const BnGeom& g,
                                            const BnThread& t, float (&v)[kBnPer],
                                            int64_t (&off)[kBnPer]) {
  BnCursor<kRows> cur(g, t);
#pragma unroll
  for (int i = 0; i < kBnPer; ++i) {
    off[i] = cur.at();
    cur.next();
  }
  load_at(p, t, off, v);
}

// Sums v[q] over the rt lanes of each channel column tx with a fixed tree; every thread gets its
// column's totals. smem: NV * kBnThreads doubles. Ends with a barrier (smem reusable).
template <int NV>
__device__ __forceinline__ void reduce_lanes(double (&v)[NV], double* smem, const BnGeom& g,
                                             const BnThread& t) {
  const int tid = static_cast<int>(threadIdx.x);
#pragma unroll
  for (int q = 0; q < NV; ++q) smem[q * kBnThreads + tid] = v[q];
  __syncthreads();
  for (int s = g.rt >> 1; s > 0; s >>= 1) {
    if (t.ty < s) {
#pragma unroll
      for (int q = 0; q < NV; ++q) {
        smem[q * kBnThreads + tid] =
            __dadd_rn(smem[q * kBnThreads + tid], smem[q * kBnThreads + tid + (s << g.ct_shift)]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int q = 0; q < NV; ++q) v[q] = smem[q * kBnThreads + t.tx];
  __syncthreads();
}

// invstd = 1 / sqrt(var + eps), alpha = weight * invstd, beta = bias - mean * alpha: fp32, each
// operation rounded (the CPU's bn_affine); z(x) = x * alpha + beta is what the quantizer sees,
// xhat(x) = (x - mean) * invstd.
struct Affine {
  float alpha, beta, invstd, mean;
  __device__ __forceinline__ float z(float x) const { return add_rn(mul_rn(x, alpha), beta); }
  __device__ __forceinline__ float xhat(float x) const { return mul_rn(sub_rn(x, mean), invstd); }
};

__device__ __forceinline__ Affine affine_of(const float* __restrict__ weight,
                                            const float* __restrict__ bias,
                                            const float* __restrict__ mean,
                                            const float* __restrict__ var, float eps, int64_t c,
                                            bool active) {
  Affine a{0.f, 0.f, 0.f, 0.f};
  if (!active) return a;
  a.mean = mean[c];
  a.invstd = __fdiv_rn(1.f, __fsqrt_rn(add_rn(var[c], eps)));
  a.alpha = mul_rn(weight[c], a.invstd);
  a.beta = sub_rn(bias[c], mul_rn(a.mean, a.alpha));
  return a;
}

// Values of channel c in chunk k.
__device__ __forceinline__ double chunk_count(const BnGeom& g, int64_t k) {
  return static_cast<double>(min64(g.chunk, g.len - k * g.chunk));
}

// ---- forward: per-chunk statistics --------------------------------------------------------------
// part: [2][C][chunks]: the chunk's sum and its squared deviations from its own mean (fp64).
template <bool kRows>
__global__ void __launch_bounds__(kBnThreads)
    bn_stats_kernel(const float* __restrict__ x, BnGeom g, double* __restrict__ part) {
  __shared__ double smem[kBnThreads];
  const BnThread t = bn_thread<kRows>(g);
  float v[kBnPer];
  int64_t off[kBnPer];
  load_values<kRows>(x, g, t, v, off);
  double sum[1] = {0.0};
#pragma unroll
  for (int i = 0; i < kBnPer; ++i) {
    if (i < t.count) sum[0] = __dadd_rn(sum[0], static_cast<double>(v[i]));
  }
  reduce_lanes<1>(sum, smem, g, t);
  const bool writer = t.ty == 0 && t.c < g.channels;
  const double n = t.c < g.channels ? chunk_count(g, t.k) : 1.0;
  const double m = __ddiv_rn(sum[0], n);
  double m2[1] = {0.0};
#pragma unroll
  for (int i = 0; i < kBnPer; ++i) {
    if (i < t.count) {
      const double d = __dsub_rn(static_cast<double>(v[i]), m);
      m2[0] = __dadd_rn(m2[0], __dmul_rn(d, d));
    }
  }
  reduce_lanes<1>(m2, smem, g, t);
  if (writer) {
    const int64_t slot = t.c * g.chunks + t.k;
    part[slot] = sum[0];
    part[g.channels * g.chunks + slot] = m2[0];
  }
}

// One block per channel: mean = sum / n, var = (sum_k m2_k + sum_k n_k (mean_k - mean)^2) / n.
__global__ void __launch_bounds__(kFinalizeThreads)
    bn_stats_finalize_kernel(const double* __restrict__ part, BnGeom g, float* __restrict__ mean,
                             float* __restrict__ var) {
  __shared__ double smem[kFinalizeThreads / 32];
  __shared__ double mean_shared;
  const int64_t c = blockIdx.x;
  const double* ps = part + c * g.chunks;
  const double* pm = part + g.channels * g.chunks + c * g.chunks;
  const double n = static_cast<double>(g.len);
  const double total = sum_partials(ps, g.chunks, smem);
  if (threadIdx.x == 0) mean_shared = __ddiv_rn(total, n);
  __syncthreads();
  const double m = mean_shared;
  double acc[1] = {0.0};
  for (int64_t k = threadIdx.x; k < g.chunks; k += blockDim.x) {
    const double nk = chunk_count(g, k);
    const double d = __dsub_rn(__ddiv_rn(ps[k], nk), m);
    acc[0] = __dadd_rn(acc[0], __dadd_rn(pm[k], __dmul_rn(nk, __dmul_rn(d, d))));
  }
  const double m2 = block_sum_each<double, 1>(acc, 1, smem);
  if (threadIdx.x == 0) {
    mean[c] = static_cast<float>(m);
    var[c] = static_cast<float>(__ddiv_rn(m2, n));
  }
}

// ---- forward: y = code(z / s) * s, z = x * alpha + beta -------------------------------------------
template <bool kRows>
__global__ void __launch_bounds__(kBnThreads)
    bn_forward_kernel(const float* __restrict__ x, float* __restrict__ y, BnGeom g,
                      const float* __restrict__ weight, const float* __restrict__ bias,
                      const float* __restrict__ mean, const float* __restrict__ var, float eps,
                      const float* __restrict__ steps, int64_t step_stride,
                      const int64_t* __restrict__ sel, QuantRanges ranges) {
  const BnThread t = bn_thread<kRows>(g);
  if (t.count == 0) return;  // no barrier in this kernel
  const Selected sq = read_selected(sel, steps, step_stride, ranges);
  const Affine a = affine_of(weight, bias, mean, var, eps, t.c, true);
  float v[kBnPer];
  int64_t off[kBnPer];
  load_values<kRows>(x, g, t, v, off);
#pragma unroll
  for (int i = 0; i < kBnPer; ++i) {
    if (i < t.count) y[off[i]] = fake_quant(a.z(v[i]), sq.s, sq.q);
  }
}

// ---- batch_norm_add forward: y = z + residual ------------------------------------------------------
template <bool kRows>
__global__ void __launch_bounds__(kBnThreads)
    bn_add_forward_kernel(const float* __restrict__ x, const float* __restrict__ residual,
                          float* __restrict__ y, BnGeom g, const float* __restrict__ weight,
                          const float* __restrict__ bias, const float* __restrict__ mean,
                          const float* __restrict__ var, float eps) {
  const BnThread t = bn_thread<kRows>(g);
  if (t.count == 0) return;  // no barrier in this kernel
  const Affine a = affine_of(weight, bias, mean, var, eps, t.c, true);
  float v[kBnPer], r[kBnPer];
  int64_t off[kBnPer];
  load_values<kRows>(x, g, t, v, off);
  load_at(residual, t, off, r);
#pragma unroll
  for (int i = 0; i < kBnPer; ++i) {
    if (i < t.count) y[off[i]] = add_rn(a.z(v[i]), r[i]);
  }
}

// ---- batch_norm_quant_mse forward: y as above and one sum((z - teacher)^2) partial per block ------
template <bool kRows>
__global__ void __launch_bounds__(kBnThreads)
    bn_forward_mse_kernel(const float* __restrict__ x, const float* __restrict__ teacher,
                          float* __restrict__ y, BnGeom g, const float* __restrict__ weight,
                          const float* __restrict__ bias, const float* __restrict__ mean,
                          const float* __restrict__ var, float eps,
                          const float* __restrict__ steps, int64_t step_stride,
                          const int64_t* __restrict__ sel, QuantRanges ranges,
                          double* __restrict__ part) {
  __shared__ double smem[kBnWarps];
  const BnThread t = bn_thread<kRows>(g);  // every thread reaches the block sum below
  const Selected sq = read_selected(sel, steps, step_stride, ranges);
  const Affine a = affine_of(weight, bias, mean, var, eps, t.c, t.c < g.channels);
  float v[kBnPer], tv[kBnPer];
  int64_t off[kBnPer];
  load_values<kRows>(x, g, t, v, off);
  load_at(teacher, t, off, tv);
  double sq_err[1] = {0.0};
#pragma unroll
  for (int i = 0; i < kBnPer; ++i) {
    if (i < t.count) {
      const float z = a.z(v[i]);
      y[off[i]] = fake_quant(z, sq.s, sq.q);
      const float d = sub_rn(z, tv[i]);
      sq_err[0] = __dadd_rn(sq_err[0], static_cast<double>(mul_rn(d, d)));
    }
  }
  const double block = block_sum_each<double, 1>(sq_err, 1, smem);
  if (threadIdx.x == 0) part[int64_t{blockIdx.y} * gridDim.x + blockIdx.x] = block;
}

// One block: mse[0] = sum of the block partials (fixed order) / n.
__global__ void __launch_bounds__(kFinalizeThreads)
    bn_mse_finalize_kernel(const double* __restrict__ part, int64_t count, double n,
                           float* __restrict__ mse) {
  __shared__ double smem[kFinalizeThreads / 32];
  const double total = sum_partials(part, count, smem);
  if (threadIdx.x == 0) mse[0] = n > 0.0 ? static_cast<float>(__ddiv_rn(total, n)) : 0.f;
}

// ---- backward pass 1: per-channel sums of g and g * xhat, the block's sum of dy * h --------------
// part: [2][C][chunks] (g, g * xhat), then one step partial per block (blocks in grid order).
// With kTeacher, z's gradient also gets match * (z - teacher), match = 2 * grad_mse / n (fp32, as the
// CPU's): batch_norm_quant_mse's backward.
__device__ __forceinline__ float match_of(const float* __restrict__ grad_mse, double n) {
  return n > 0.0 ? static_cast<float>(__ddiv_rn(__dmul_rn(2.0, static_cast<double>(grad_mse[0])), n))
                 : 0.f;
}

// kQuant false (batch_norm_add): g = dy, no step partials (steps and sel unused).
template <bool kRows, bool kTeacher, bool kQuant = true>
__global__ void __launch_bounds__(kBnThreads)
    bn_backward_reduce_kernel(const float* __restrict__ dy, const float* __restrict__ x, BnGeom g,
                              const float* __restrict__ weight, const float* __restrict__ bias,
                              const float* __restrict__ mean, const float* __restrict__ var,
                              float eps, const float* __restrict__ steps, int64_t step_stride,
                              const int64_t* __restrict__ sel, QuantRanges ranges,
                              const float* __restrict__ teacher,
                              const float* __restrict__ grad_mse, double n,
                              double* __restrict__ part) {
  __shared__ double smem[2 * kBnThreads];
  __shared__ double smem_step[kBnWarps];
  static_assert(kQuant || !kTeacher, "the feature MSE comes with the quantizer");
  const BnThread t = bn_thread<kRows>(g);
  const Selected sq = kQuant ? read_selected(sel, steps, step_stride, ranges) : Selected{};
  const Affine a = affine_of(weight, bias, mean, var, eps, t.c, t.c < g.channels);
  float xv[kBnPer], gv[kBnPer], tv[kBnPer];
  int64_t off[kBnPer];
  load_values<kRows>(x, g, t, xv, off);
  load_at(dy, t, off, gv);
  float match = 0.f;
  if (kTeacher) {
    load_at(teacher, t, off, tv);
    match = match_of(grad_mse, n);
  }
  double sums[2] = {0.0, 0.0};
  double step[1] = {0.0};
#pragma unroll
  for (int i = 0; i < kBnPer; ++i) {
    if (i < t.count) {
      float gi = gv[i];
      if (kQuant) {
        const float z = a.z(xv[i]);
        const float v = div_rn(z, sq.s);
        const bool inside = in_range(v, sq.q);
        const float h = step_term(v, quant_code(v, sq.q), inside);
        step[0] = __dadd_rn(step[0], static_cast<double>(mul_rn(gv[i], h)));
        gi = inside ? gv[i] : 0.f;
        if (kTeacher) gi = add_rn(gi, mul_rn(match, sub_rn(z, tv[i])));
      }
      sums[0] = __dadd_rn(sums[0], static_cast<double>(gi));
      sums[1] = __dadd_rn(sums[1], static_cast<double>(mul_rn(gi, a.xhat(xv[i]))));
    }
  }
  reduce_lanes<2>(sums, smem, g, t);
  if (t.ty == 0 && t.c < g.channels) {
    const int64_t slot = t.c * g.chunks + t.k;
    part[slot] = sums[0];
    part[g.channels * g.chunks + slot] = sums[1];
  }
  if (!kQuant) return;
  const double block_step = block_sum_each<double, 1>(step, 1, smem_step);
  if (threadIdx.x == 0) {
    const int64_t block = int64_t{blockIdx.y} * gridDim.x + blockIdx.x;
    part[2 * g.channels * g.chunks + block] = block_step;
  }
}

// Blocks 0..C-1: channel sums -> dbias, dweight, mean(g), mean(g * xhat) (mg: [2][C]);
// block C: the step gradient (slot sel = grad_scale * sum, the others 0; NaN as lsq.cu).
// Without a quantizer (steps null: batch_norm_add) only the channel blocks run.
__global__ void __launch_bounds__(kFinalizeThreads)
    bn_backward_finalize_kernel(const double* __restrict__ part, int64_t step_parts, BnGeom g,
                                const float* __restrict__ steps, int64_t step_stride,
                                const int64_t* __restrict__ sel, int k, double grad_scale,
                                float* __restrict__ grad_weight, float* __restrict__ grad_bias,
                                float* __restrict__ mg, float* __restrict__ grad_steps) {
  __shared__ double smem[2 * (kFinalizeThreads / 32)];
  const int64_t c = blockIdx.x;
  if (c == g.channels) {
    finalize_selected(part + 2 * g.channels * g.chunks, step_parts, steps, step_stride, sel, k,
                      grad_steps, grad_scale, smem);
    return;
  }
  const bool ok = !steps || !isnan(read_selected_step(steps, step_stride, read_sel(sel, k)));
  // thread 0: the sum of g, thread 1: of g * xhat
  const double total =
      sum_partials_each<2>(part + c * g.chunks, g.channels * g.chunks, 2, g.chunks, smem);
  const double n = static_cast<double>(g.len);
  if (threadIdx.x == 0) {
    grad_bias[c] = ok ? static_cast<float>(total) : kNaN;
    mg[c] = static_cast<float>(__ddiv_rn(total, n));
  } else if (threadIdx.x == 1) {
    grad_weight[c] = ok ? static_cast<float>(total) : kNaN;
    mg[g.channels + c] = static_cast<float>(__ddiv_rn(total, n));
  }
}

// ---- backward pass 2: dx = alpha * (g - mean(g) - xhat * mean(g * xhat)) -------------------------
template <bool kRows, bool kTeacher, bool kQuant = true>
__global__ void __launch_bounds__(kBnThreads)
    bn_backward_dx_kernel(const float* __restrict__ dy, const float* __restrict__ x,
                          float* __restrict__ dx, BnGeom g, const float* __restrict__ weight,
                          const float* __restrict__ bias, const float* __restrict__ mean,
                          const float* __restrict__ var, float eps,
                          const float* __restrict__ steps, int64_t step_stride,
                          const int64_t* __restrict__ sel, QuantRanges ranges,
                          const float* __restrict__ teacher, const float* __restrict__ grad_mse,
                          double n, const float* __restrict__ mg) {
  const BnThread t = bn_thread<kRows>(g);
  if (t.count == 0) return;  // no barrier in this kernel
  const Selected sq = kQuant ? read_selected(sel, steps, step_stride, ranges) : Selected{};
  const bool ok = !kQuant || !isnan(sq.s);
  const Affine a = affine_of(weight, bias, mean, var, eps, t.c, true);
  const float mgc = mg[t.c], mgxc = mg[g.channels + t.c];
  float xv[kBnPer], gv[kBnPer], tv[kBnPer];
  int64_t off[kBnPer];
  load_values<kRows>(x, g, t, xv, off);
  load_at(dy, t, off, gv);
  float match = 0.f;
  if (kTeacher) {
    load_at(teacher, t, off, tv);
    match = match_of(grad_mse, n);
  }
#pragma unroll
  for (int i = 0; i < kBnPer; ++i) {
    if (i < t.count) {
      float gi = gv[i];
      if (kQuant) {
        const float z = a.z(xv[i]);
        gi = in_range(div_rn(z, sq.s), sq.q) ? gi : 0.f;
        if (kTeacher) gi = add_rn(gi, mul_rn(match, sub_rn(z, tv[i])));
      }
      const float d = mul_rn(a.alpha, sub_rn(sub_rn(gi, mgc), mul_rn(a.xhat(xv[i]), mgxc)));
      dx[off[i]] = ok ? d : kNaN;
    }
  }
}

// ---- host wrappers ------------------------------------------------------------------------------

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

// Batch mean and biased variance of xd (bn_layout) per channel: the stats and finalize kernels.
std::tuple<at::Tensor, at::Tensor> bn_batch_stats(const at::Tensor& xd, const BnGeom& g,
                                                  const dim3& grid, bool rows,
                                                  const at::Tensor& weight) {
  at::Tensor mean = at::empty({g.channels}, weight.options());
  at::Tensor var = at::empty({g.channels}, weight.options());
  at::Tensor part = at::empty({2 * g.channels * g.chunks}, weight.options().dtype(at::kDouble));
  const float* xp = xd.const_data_ptr<float>();
  double* pp = part.mutable_data_ptr<double>();
  if (rows) {
    bn_stats_kernel<true><<<grid, kBnThreads, 0, stream()>>>(xp, g, pp);
  } else {
    bn_stats_kernel<false><<<grid, kBnThreads, 0, stream()>>>(xp, g, pp);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  bn_stats_finalize_kernel<<<static_cast<unsigned>(g.channels), kFinalizeThreads, 0, stream()>>>(
      part.const_data_ptr<double>(), g, mean.mutable_data_ptr<float>(),
      var.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {mean, var};
}

// Both forwards: (y, mean, var) and, with a teacher, mean((z - teacher)^2) as a 0-dim tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_quant_forward(
    const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    double eps, const at::Tensor& steps, c10::IntArrayRef bits, const at::Tensor& sel,
    bool is_signed, const at::Tensor* teacher) {
  check_bn_args(op, x, weight, bias, eps);
  check_steps(op, x, steps, bits);
  check_sel(op, x, sel);
  if (teacher) check_teacher(op, x, *teacher);
  const c10::cuda::CUDAGuard guard(x.device());
  const QuantRanges ranges = make_ranges(bits, is_signed);
  const at::Tensor xd = bn_layout(x);
  const BnGeom g = make_geom(bn_shape(xd));
  const bool rows = g.inner == 1;
  const dim3 grid = grid_of(g, rows, op);
  const at::Tensor wc = weight.contiguous(), bc = bias.contiguous();
  auto [mean, var] = bn_batch_stats(xd, g, grid, rows, weight);
  at::Tensor y = at::empty_like(xd);
  const float* xp = xd.const_data_ptr<float>();
  const float* wp = wc.const_data_ptr<float>();
  const float* bp = bc.const_data_ptr<float>();
  const float* mp = mean.const_data_ptr<float>();
  const float* vp = var.const_data_ptr<float>();
  const float epsf = static_cast<float>(eps);
  if (!teacher) {
    auto forward = rows ? bn_forward_kernel<true> : bn_forward_kernel<false>;
    forward<<<grid, kBnThreads, 0, stream()>>>(xp, y.mutable_data_ptr<float>(), g, wp, bp, mp, vp,
                                               epsf, steps.const_data_ptr<float>(),
                                               steps.stride(0), sel.const_data_ptr<int64_t>(),
                                               ranges);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {y, mean, var, at::Tensor()};
  }
  const at::Tensor td = in_layout_of(*teacher, xd);
  const int64_t blocks = int64_t{grid.x} * grid.y;
  at::Tensor mse_part = at::empty({blocks}, weight.options().dtype(at::kDouble));
  at::Tensor mse = at::empty({}, weight.options());
  auto forward = rows ? bn_forward_mse_kernel<true> : bn_forward_mse_kernel<false>;
  forward<<<grid, kBnThreads, 0, stream()>>>(
      xp, td.const_data_ptr<float>(), y.mutable_data_ptr<float>(), g, wp, bp, mp, vp, epsf,
      steps.const_data_ptr<float>(), steps.stride(0), sel.const_data_ptr<int64_t>(), ranges,
      mse_part.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  bn_mse_finalize_kernel<<<1, kFinalizeThreads, 0, stream()>>>(
      mse_part.const_data_ptr<double>(), blocks, static_cast<double>(x.numel()),
      mse.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, mean, var, mse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_quant(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
    const at::Tensor& steps, c10::IntArrayRef bits, const at::Tensor& sel, bool is_signed,
    double /*grad_scale*/) {
  auto [y, mean, var, mse] = bn_quant_forward("rfq.batch_norm_quant", x, weight, bias, eps,
                                              steps, bits, sel, is_signed, nullptr);
  return {y, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_quant_mse(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
    const at::Tensor& steps, c10::IntArrayRef bits, const at::Tensor& sel,
    const at::Tensor& teacher, bool is_signed, double /*grad_scale*/) {
  return bn_quant_forward("rfq.batch_norm_quant_mse", x, weight, bias, eps, steps, bits, sel,
                          is_signed, &teacher);
}

// Both backwards; with a teacher, z's gradient also gets 2 * grad_mse / n * (z - teacher).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_quant_backward(
    const char* op, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& var, double eps,
    const at::Tensor& steps, c10::IntArrayRef bits, const at::Tensor& sel, bool is_signed,
    double grad_scale, const at::Tensor* teacher, const at::Tensor* grad_mse) {
  check_bn_args(op, x, weight, bias, eps);
  check_bn_stats(op, x, mean, var);
  check_steps(op, x, steps, bits);
  check_sel(op, x, sel);
  check_grad(op, grad_y, x, x.sizes());
  check_grad_scale(op, grad_scale);
  if (teacher) {
    check_teacher(op, x, *teacher);
    check_grad_mse(op, x, *grad_mse);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const QuantRanges ranges = make_ranges(bits, is_signed);
  const at::Tensor xd = bn_layout(x);
  const at::Tensor gd = in_layout_of(grad_y, xd);
  const at::Tensor td = teacher ? in_layout_of(*teacher, xd) : at::Tensor();
  const BnGeom g = make_geom(bn_shape(xd));
  const bool rows = g.inner == 1;
  const dim3 grid = grid_of(g, rows, op);
  const int64_t step_parts = int64_t{grid.x} * grid.y;
  const at::Tensor wc = weight.contiguous(), bc = bias.contiguous();
  const at::Tensor mc = mean.contiguous(), vc = var.contiguous();
  at::Tensor grad_x = at::empty_like(xd);
  at::Tensor grad_weight = at::empty({x.size(1)}, weight.options());
  at::Tensor grad_bias = at::empty({x.size(1)}, weight.options());
  at::Tensor grad_steps = at::empty({steps.numel()}, steps.options());  // every slot is written
  at::Tensor part = at::empty({2 * g.channels * g.chunks + step_parts},
                              weight.options().dtype(at::kDouble));
  at::Tensor mg = at::empty({2 * g.channels}, weight.options());  // mean(g), mean(g * xhat)
  const float* dyp = gd.const_data_ptr<float>();
  const float* xp = xd.const_data_ptr<float>();
  const float* wp = wc.const_data_ptr<float>();
  const float* bp = bc.const_data_ptr<float>();
  const float* mp = mc.const_data_ptr<float>();
  const float* vp = vc.const_data_ptr<float>();
  const float epsf = static_cast<float>(eps);
  const float* sp = steps.const_data_ptr<float>();
  const int64_t* selp = sel.const_data_ptr<int64_t>();
  const float* tp = teacher ? td.const_data_ptr<float>() : nullptr;
  const float* gmp = teacher ? grad_mse->const_data_ptr<float>() : nullptr;
  const double n = static_cast<double>(x.numel());
  auto reduce = teacher ? (rows ? bn_backward_reduce_kernel<true, true>
                                : bn_backward_reduce_kernel<false, true>)
                        : (rows ? bn_backward_reduce_kernel<true, false>
                                : bn_backward_reduce_kernel<false, false>);
  reduce<<<grid, kBnThreads, 0, stream()>>>(dyp, xp, g, wp, bp, mp, vp, epsf, sp,
                                             steps.stride(0), selp, ranges, tp, gmp, n,
                                             part.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  bn_backward_finalize_kernel<<<static_cast<unsigned>(g.channels + 1), kFinalizeThreads, 0,
                                stream()>>>(
      part.const_data_ptr<double>(), step_parts, g, sp, steps.stride(0), selp, ranges.k,
      grad_scale, grad_weight.mutable_data_ptr<float>(), grad_bias.mutable_data_ptr<float>(),
      mg.mutable_data_ptr<float>(), grad_steps.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto dx = teacher ? (rows ? bn_backward_dx_kernel<true, true> : bn_backward_dx_kernel<false, true>)
                    : (rows ? bn_backward_dx_kernel<true, false>
                            : bn_backward_dx_kernel<false, false>);
  dx<<<grid, kBnThreads, 0, stream()>>>(dyp, xp, grad_x.mutable_data_ptr<float>(), g, wp, bp, mp,
                                         vp, epsf, sp, steps.stride(0), selp, ranges, tp, gmp, n,
                                         mg.const_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_x, grad_weight, grad_bias, grad_steps};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_quant_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& var, double eps,
    const at::Tensor& steps, c10::IntArrayRef bits, const at::Tensor& sel, bool is_signed,
    double grad_scale) {
  return bn_quant_backward("rfq.batch_norm_quant_backward", grad_y, x, weight, bias, mean, var,
                           eps, steps, bits, sel, is_signed, grad_scale, nullptr, nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_quant_mse_backward(
    const at::Tensor& grad_y, const at::Tensor& grad_mse, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mean,
    const at::Tensor& var, double eps, const at::Tensor& steps, c10::IntArrayRef bits,
    const at::Tensor& sel, const at::Tensor& teacher, bool is_signed, double grad_scale) {
  return bn_quant_backward("rfq.batch_norm_quant_mse_backward", grad_y, x, weight, bias, mean,
                           var, eps, steps, bits, sel, is_signed, grad_scale, &teacher,
                           &grad_mse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_add(const at::Tensor& x,
                                                              const at::Tensor& weight,
                                                              const at::Tensor& bias, double eps,
                                                              const at::Tensor& residual) {
  constexpr const char* op = "rfq.batch_norm_add";
  check_bn_add_args(op, x, weight, bias, eps, residual);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xd = bn_layout(x);
  const at::Tensor rd = in_layout_of(residual, xd);
  const BnGeom g = make_geom(bn_shape(xd));
  const bool rows = g.inner == 1;
  const dim3 grid = grid_of(g, rows, op);
  const at::Tensor wc = weight.contiguous(), bc = bias.contiguous();
  auto [mean, var] = bn_batch_stats(xd, g, grid, rows, weight);
  at::Tensor y = at::empty_like(xd);
  auto forward = rows ? bn_add_forward_kernel<true> : bn_add_forward_kernel<false>;
  forward<<<grid, kBnThreads, 0, stream()>>>(
      xd.const_data_ptr<float>(), rd.const_data_ptr<float>(), y.mutable_data_ptr<float>(), g,
      wc.const_data_ptr<float>(), bc.const_data_ptr<float>(), mean.const_data_ptr<float>(),
      var.const_data_ptr<float>(), static_cast<float>(eps));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_add_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& mean, const at::Tensor& var, double eps) {
  constexpr const char* op = "rfq.batch_norm_add_backward";
  check_bn_add_backward_args(op, grad_y, x, weight, mean, var, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xd = bn_layout(x);
  const at::Tensor gd = in_layout_of(grad_y, xd);
  const BnGeom g = make_geom(bn_shape(xd));
  const bool rows = g.inner == 1;
  const dim3 grid = grid_of(g, rows, op);
  const at::Tensor wc = weight.contiguous();
  const at::Tensor mc = mean.contiguous(), vc = var.contiguous();
  at::Tensor grad_x = at::empty_like(xd);
  at::Tensor grad_weight = at::empty({x.size(1)}, weight.options());
  at::Tensor grad_bias = at::empty({x.size(1)}, weight.options());
  at::Tensor part = at::empty({2 * g.channels * g.chunks}, weight.options().dtype(at::kDouble));
  at::Tensor mg = at::empty({2 * g.channels}, weight.options());  // mean(g), mean(g * xhat)
  const float* dyp = gd.const_data_ptr<float>();
  const float* xp = xd.const_data_ptr<float>();
  const float* wp = wc.const_data_ptr<float>();
  const float* mp = mc.const_data_ptr<float>();
  const float* vp = vc.const_data_ptr<float>();
  const float epsf = static_cast<float>(eps);
  const QuantRanges none{};
  // bias only shifts beta, which no pass without a quantizer reads: weight stands in for it
  auto reduce = rows ? bn_backward_reduce_kernel<true, false, false>
                     : bn_backward_reduce_kernel<false, false, false>;
  reduce<<<grid, kBnThreads, 0, stream()>>>(dyp, xp, g, wp, wp, mp, vp, epsf, nullptr, 0,
                                             nullptr, none, nullptr, nullptr, 0.0,
                                             part.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  bn_backward_finalize_kernel<<<static_cast<unsigned>(g.channels), kFinalizeThreads, 0,
                                stream()>>>(
      part.const_data_ptr<double>(), 0, g, nullptr, 0, nullptr, 0, 0.0,
      grad_weight.mutable_data_ptr<float>(), grad_bias.mutable_data_ptr<float>(),
      mg.mutable_data_ptr<float>(), nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto dx = rows ? bn_backward_dx_kernel<true, false, false>
                 : bn_backward_dx_kernel<false, false, false>;
  dx<<<grid, kBnThreads, 0, stream()>>>(dyp, xp, grad_x.mutable_data_ptr<float>(), g, wp, wp, mp,
                                         vp, epsf, nullptr, 0, nullptr, none, nullptr, nullptr,
                                         0.0, mg.const_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace
}  // namespace rfq::cuda

TORCH_LIBRARY_IMPL(rfq, CUDA, m) {
  m.impl("batch_norm_quant", &rfq::cuda::batch_norm_quant);
  m.impl("batch_norm_quant_backward", &rfq::cuda::batch_norm_quant_backward);
  m.impl("batch_norm_quant_mse", &rfq::cuda::batch_norm_quant_mse);
  m.impl("batch_norm_quant_mse_backward", &rfq::cuda::batch_norm_quant_mse_backward);
  m.impl("batch_norm_add", &rfq::cuda::batch_norm_add);
  m.impl("batch_norm_add_backward", &rfq::cuda::batch_norm_add_backward);
}
