// Shared pieces of the CUDA kernels: 128-bit vector loads/stores, fixed-order block reductions,
// dtype dispatch and launch geometry. Only ATen/c10 headers (no cuBLAS, no torch/extension.h).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace rfq::cuda {

// Elementwise/reduction geometry: a block of kThreads owns whole tiles of kTile elements; each
// thread holds kPerThread of a tile as groups of one 128-bit vector. The tile is also the
// reduction chunk: one fp32 partial per tile, so results depend on n only, not on the grid.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPerThread = 8;
constexpr int64_t kTile = int64_t{kThreads} * kPerThread;
constexpr int64_t kMaxBlocks = 65536;  // grid-stride over tiles beyond this
constexpr int kFinalizeThreads = 256;

inline int64_t num_tiles(int64_t n) { return (n + kTile - 1) / kTile; }
inline unsigned grid_for(int64_t tiles) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(tiles, kMaxBlocks)));
}

// Element index of group g (of W elements) of this thread in a tile (a warp's groups are
// contiguous).
template <int W>
__device__ __forceinline__ int64_t group_start(int64_t tile, int g) {
  return tile * kTile + (static_cast<int64_t>(g) * kThreads + threadIdx.x) * W;
}

// Elements per 128-bit vector.
template <typename T>
struct VecWidth {
  static constexpr int value = 16 / static_cast<int>(sizeof(T));
};

template <typename T, int W>
struct alignas(sizeof(T) * W) Pack {
  T v[W];
};

inline bool aligned_to(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// W elements of p starting at i (i a multiple of W), converted once to U (fp32 for the half
// types; fp64 stays fp64); elements at or past n read as 0. kVec: p is 16-byte aligned, so a
// full group is one 128-bit load.
template <typename T, int W, bool kVec, typename U>
__device__ __forceinline__ void load_group(const T* __restrict__ p, int64_t i, int64_t n,
                                           U (&out)[W]) {
  if (kVec && i + W <= n) {
    const Pack<T, W> pk = *reinterpret_cast<const Pack<T, W>*>(p + i);
#pragma unroll
    for (int e = 0; e < W; ++e) out[e] = static_cast<U>(pk.v[e]);
  } else {
#pragma unroll
    for (int e = 0; e < W; ++e) out[e] = i + e < n ? static_cast<U>(p[i + e]) : U(0);
  }
}

// Stores W values (fp32 or T) rounded once to T; elements at or past n are not written.
template <typename T, int W, bool kVec, typename U>
__device__ __forceinline__ void store_group(T* __restrict__ p, int64_t i, int64_t n,
                                            const U (&in)[W]) {
  if (kVec && i + W <= n) {
    Pack<T, W> pk;
#pragma unroll
    for (int e = 0; e < W; ++e) pk.v[e] = static_cast<T>(in[e]);
    *reinterpret_cast<Pack<T, W>*>(p + i) = pk;
  } else {
#pragma unroll
    for (int e = 0; e < W; ++e) {
      if (i + e < n) p[i + e] = static_cast<T>(in[e]);
    }
  }
}

// The value a float has after being stored as T (quant_stats measures the stored output).
template <typename T>
__device__ __forceinline__ float round_trip(float v) {
  return static_cast<float>(static_cast<T>(v));
}
template <>
__device__ __forceinline__ float round_trip<float>(float v) {
  return v;
}

// Warp tree sum (fixed order: the same inputs always give the same bits).
template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Sums vals[0..k) over the block in a fixed order; thread j (< k) returns the total of vals[j].
// smem: at least KMax * (blockDim.x / 32) elements. Ends with a barrier, so smem can be reused.
template <typename V, int KMax>
__device__ __forceinline__ V block_sum_each(const V (&vals)[KMax], int k, V* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
#pragma unroll
  for (int j = 0; j < KMax; ++j) {
    if (j < k) {
      const V s = warp_sum(vals[j]);
      if (lane == 0) smem[j * warps + warp] = s;
    }
  }
  __syncthreads();
  V total = V(0);
  const int t = static_cast<int>(threadIdx.x);
  if (t < k) {
    for (int w = 0; w < warps; ++w) total += smem[t * warps + w];
  }
  __syncthreads();
  return total;
}

// fp64 sums of k rows of partials (fp32 or fp64), in a fixed order (per-thread strided sums, then
// block_sum_each): thread j (< k) returns the sum of partial[j * stride + 0..count). smem: at least
// KMax * (blockDim.x / 32) elements.
template <int KMax, typename P>
__device__ __forceinline__ double sum_partials_each(const P* __restrict__ partial, int64_t stride,
                                                    int k, int64_t count, double* smem) {
  double acc[KMax];
#pragma unroll
  for (int j = 0; j < KMax; ++j) {
    acc[j] = 0.0;
    if (j >= k) continue;
    for (int64_t t = threadIdx.x; t < count; t += blockDim.x) {
      acc[j] = __dadd_rn(acc[j], static_cast<double>(partial[j * stride + t]));
    }
  }
  return block_sum_each<double, KMax>(acc, k, smem);
}

// fp64 sum of partial[0..count), returned in thread 0. smem: at least blockDim.x / 32 elements.
template <typename P>
__device__ __forceinline__ double sum_partials(const P* __restrict__ partial, int64_t count,
                                               double* smem) {
  return sum_partials_each<1>(partial, 0, 1, count, smem);
}

template <typename F>
void dispatch_float_types(c10::ScalarType dtype, const F& fn) {
  switch (dtype) {
    case c10::ScalarType::Float: return fn(float{});
    case c10::ScalarType::BFloat16: return fn(c10::BFloat16{});
    case c10::ScalarType::Half: return fn(c10::Half{});
    default: TORCH_CHECK(false, "rfq: unsupported dtype ", dtype);  // the op wrappers check first
  }
}

}  // namespace rfq::cuda
