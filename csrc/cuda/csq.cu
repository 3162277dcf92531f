// CUDA implementations of the CSQ bit-level weight (spec methods_seeds.md §C.1): csq_weight and
// csq_weight_backward. Same checks as the CPU wrappers (csq_checks.h), kernels on the current
// stream, zero host syncs: m, scale and beta are read by the kernels.
//
// g is the sigmoid 1 / (1 + exp(-x)) (expf / exp, never __expf). The elementwise math is in p's
// dtype T (fp32 or fp64) with explicit _rn arithmetic, so nvcc's FMA contraction cannot change the
// evaluation order, which is that of the CPU kernels (cpu/csq.cpp) and rfq/reference.py:
//   G_i     = g(beta m_i),  place_i = T(2^(N-1-i) / L) (quotient in fp64),  L = 2^N - 1
//   coef_i  = (scale G_i) place_i,  cb_i = coef_i beta
//   w_e     = sum_i (i = 0..N-1 in order) coef_i (g(beta p_ie) - g(beta q_ie))
//   dp_ie   = (gw_e cb_i) (sp (1 - sp)),  dq_ie = -((gw_e cb_i) (sq (1 - sq)))
//   T_i     = sum_e gw_e (sp - sq)   (fp64: each term is double(gw) * double(sp - sq), exact)
//   dm_i    = beta G_i (1 - G_i) place_i scale T_i   (fp64 from the T values, rounded once)
//   dscale  = sum_i G_i place_i T_i                   (fp64 in i order, rounded once)
//
// p and q are [N, E] planes (E = numel / N), read once per element and plane; each thread owns
// the same element indices in every plane. Reductions: each block reduces whole tiles of kTile
// elements into one fp64 partial per plane and tile (fixed-order warp/block trees); a one-block
// finalize kernel sums the partials in tile order. No atomics, and the result depends on E only
// (not on the grid). When the planes fit in one tile the main kernel finalizes itself: one launch.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "csq_checks.h"
#include "cuda/common.cuh"
#include "quant_range.h"

namespace rfq::cuda {
namespace {

// ---- device arithmetic: correctly rounded, never contracted into an FMA ----------------------------
__device__ __forceinline__ float rn_add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float rn_sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float rn_mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double rn_add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double rn_sub(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ double rn_mul(double a, double b) { return __dmul_rn(a, b); }

// g(x) = 1 / (1 + exp(-x)): 0 for a large negative x (exp overflows to inf), 1 for a large one.
__device__ __forceinline__ float sigmoid(float x) {
  return __fdiv_rn(1.f, __fadd_rn(1.f, expf(-x)));
}
__device__ __forceinline__ double sigmoid(double x) {
  return __ddiv_rn(1.0, __dadd_rn(1.0, exp(-x)));
}

// place_i = 2^(N-1-i) / (2^N - 1) (plane 0 is the most significant bit): the quotient in fp64,
// rounded once to T, as the reference's fp64 table cast to m's dtype.
template <typename T>
__device__ __forceinline__ T plane_place(int n, int i) {
  const double levels = static_cast<double>((int64_t{1} << n) - 1);
  return static_cast<T>(__ddiv_rn(static_cast<double>(int64_t{1} << (n - 1 - i)), levels));
}

// coef[i] = (scale g(beta m_i)) place_i and cb[i] = coef[i] beta for i < n, into shared memory
// (the plane loops index them at run time; a register array would go to local memory). Ends with
// a barrier.
template <typename T>
__device__ __forceinline__ void plane_coefs(const T* __restrict__ m, int64_t m_stride, T scale,
                                            T beta, int n, T* coef, T* cb) {
  const int i = static_cast<int>(threadIdx.x);
  if (i < n) {
    const T gate = sigmoid(rn_mul(beta, m[i * m_stride]));
    const T c = rn_mul(rn_mul(scale, gate), plane_place<T>(n, i));
    coef[i] = c;
    if (cb != nullptr) cb[i] = rn_mul(c, beta);
  }
  __syncthreads();
}

// dm[0..n) and dscale from the plane totals T_i (one thread): see the header comment.
template <typename T>
__device__ __forceinline__ void write_param_grads(const double* totals, int n,
                                                  const T* __restrict__ m, int64_t m_stride,
                                                  const T* __restrict__ scale_p,
                                                  const T* __restrict__ beta_p,
                                                  T* __restrict__ dm, T* __restrict__ dscale) {
  const T beta = *beta_p;
  const double beta_d = static_cast<double>(beta), scale_d = static_cast<double>(*scale_p);
  double ds = 0.0;
  for (int i = 0; i < n; ++i) {
    const double gate = static_cast<double>(sigmoid(rn_mul(beta, m[i * m_stride])));
    const double place = static_cast<double>(plane_place<T>(n, i));
    double v = __dmul_rn(__dmul_rn(beta_d, gate), __dsub_rn(1.0, gate));
    v = __dmul_rn(__dmul_rn(__dmul_rn(v, place), scale_d), totals[i]);
    dm[i] = static_cast<T>(v);
    ds = __dadd_rn(ds, __dmul_rn(__dmul_rn(gate, place), totals[i]));
  }
  *dscale = static_cast<T>(ds);
}

// ---- csq_weight: w[e] from N planes of p and q ---------------------------------------------------
// Planes outermost (not unrolled), this thread's kPerThread elements of the tile innermost: the
// element accumulators stay in registers across planes and each plane's loads are independent.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ p, const T* __restrict__ q, T* __restrict__ w, int n,
                   int64_t numel_e, const T* __restrict__ m, int64_t m_stride,
                   const T* __restrict__ scale_p, const T* __restrict__ beta_p) {
  constexpr int W = VecWidth<T>::value;
  constexpr int kGroups = kPerThread / W;
  __shared__ T coef[kCsqMaxPlanes];
  const T beta = *beta_p;
  plane_coefs<T>(m, m_stride, *scale_p, beta, n, coef, nullptr);
  const int64_t tiles = (numel_e + kTile - 1) / kTile;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    T acc[kGroups][W];
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
#pragma unroll
      for (int e = 0; e < W; ++e) acc[g][e] = T(0);
    }
#pragma unroll 1
    for (int j = 0; j < n; ++j) {
      const T c = coef[j];
      const T* pj = p + j * numel_e;
      const T* qj = q + j * numel_e;
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        const int64_t i = group_start<W>(tile, g);
        if (i >= numel_e) continue;
        T pv[W], qv[W];
        load_group<T, W, kVec>(pj, i, numel_e, pv);
        load_group<T, W, kVec>(qj, i, numel_e, qv);
#pragma unroll
        for (int e = 0; e < W; ++e) {
          const T d = rn_sub(sigmoid(rn_mul(beta, pv[e])), sigmoid(rn_mul(beta, qv[e])));
          acc[g][e] = rn_add(acc[g][e], rn_mul(c, d));
        }
      }
    }
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
      const int64_t i = group_start<W>(tile, g);
      if (i < numel_e) store_group<T, W, kVec>(w, i, numel_e, acc[g]);
    }
  }
}

// ---- csq_weight_backward: dp, dq and the per-tile plane sums T_i ----------------------------------
// partial: [n][tiles] fp64, or nullptr when there is at most one tile (then this single block
// writes dm and dscale itself). grad_w is read once per tile and kept in registers for all planes.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const T* __restrict__ gw, const T* __restrict__ p, const T* __restrict__ q,
                    T* __restrict__ dp, T* __restrict__ dq, int n, int64_t numel_e,
                    const T* __restrict__ m, int64_t m_stride, const T* __restrict__ scale_p,
                    const T* __restrict__ beta_p, double* __restrict__ partial,
                    T* __restrict__ dm, T* __restrict__ dscale) {
  constexpr int W = VecWidth<T>::value;
  constexpr int kGroups = kPerThread / W;
  __shared__ T coef[kCsqMaxPlanes], cbs[kCsqMaxPlanes];
  __shared__ double smem[kCsqMaxPlanes * kWarps];
  __shared__ double totals[kCsqMaxPlanes];
  const T beta = *beta_p;
  plane_coefs<T>(m, m_stride, *scale_p, beta, n, coef, cbs);
  const int64_t tiles = (numel_e + kTile - 1) / kTile;
  const bool finalize_here = partial == nullptr;  // host passes none when tiles <= 1
  double only_tile = 0.0;  // thread j holds plane j's total
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    T gv[kGroups][W];
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
      load_group<T, W, kVec>(gw, group_start<W>(tile, g), numel_e, gv[g]);  // 0 past the end
    }
    double acc[kCsqMaxPlanes];
#pragma unroll
    for (int j = 0; j < kCsqMaxPlanes; ++j) acc[j] = 0.0;
#pragma unroll 1
    for (int j = 0; j < n; ++j) {
      const T cb = cbs[j];
      const T* pj = p + j * numel_e;
      const T* qj = q + j * numel_e;
      double sum = 0.0;  // this thread's share of T_j in this tile, in element order
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        const int64_t i = group_start<W>(tile, g);
        if (i >= numel_e) continue;
        T pv[W], qv[W], dpv[W], dqv[W];
        load_group<T, W, kVec>(pj, i, numel_e, pv);
        load_group<T, W, kVec>(qj, i, numel_e, qv);
#pragma unroll
        for (int e = 0; e < W; ++e) {
          const T sp = sigmoid(rn_mul(beta, pv[e]));
          const T sq = sigmoid(rn_mul(beta, qv[e]));
          const T gcb = rn_mul(gv[g][e], cb);
          dpv[e] = rn_mul(gcb, rn_mul(sp, rn_sub(T(1), sp)));
          dqv[e] = -rn_mul(gcb, rn_mul(sq, rn_sub(T(1), sq)));
          if (i + e < numel_e) {
            sum = __dadd_rn(sum, __dmul_rn(static_cast<double>(gv[g][e]),
                                           static_cast<double>(rn_sub(sp, sq))));
          }
        }
        store_group<T, W, kVec>(dp + j * numel_e, i, numel_e, dpv);
        store_group<T, W, kVec>(dq + j * numel_e, i, numel_e, dqv);
      }
      // acc[j] = sum without a run-time index into acc (that would put it in local memory)
#pragma unroll
      for (int slot = 0; slot < kCsqMaxPlanes; ++slot) {
        if (slot == j) acc[slot] = sum;
      }
    }
    const double total = block_sum_each<double, kCsqMaxPlanes>(acc, n, smem);
    if (static_cast<int>(threadIdx.x) < n) {
      if (finalize_here) {
        only_tile = total;
      } else {
        partial[threadIdx.x * tiles + tile] = total;
      }
    }
  }
  if (finalize_here) {  // uniform over the (single) block
    if (static_cast<int>(threadIdx.x) < n) totals[threadIdx.x] = only_tile;
    __syncthreads();
    if (threadIdx.x == 0) write_param_grads(totals, n, m, m_stride, scale_p, beta_p, dm, dscale);
  }
}

// T_i = sum of partial[i][0..tiles) in a fixed order (fp64), then dm and dscale.
template <typename T>
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_kernel(const double* __restrict__ partial, int64_t tiles, int n,
                    const T* __restrict__ m, int64_t m_stride, const T* __restrict__ scale_p,
                    const T* __restrict__ beta_p, T* __restrict__ dm, T* __restrict__ dscale) {
  __shared__ double smem[kCsqMaxPlanes * (kFinalizeThreads / 32)];
  __shared__ double totals[kCsqMaxPlanes];
  const double total = sum_partials_each<kCsqMaxPlanes>(partial, tiles, n, tiles, smem);
  if (static_cast<int>(threadIdx.x) < n) totals[threadIdx.x] = total;
  __syncthreads();
  if (threadIdx.x == 0) write_param_grads(totals, n, m, m_stride, scale_p, beta_p, dm, dscale);
}

// ---- host wrappers --------------------------------------------------------------------------------

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

// fp32 or fp64 (check_csq_args has rejected every other dtype).
template <typename F>
void dispatch_csq_types(c10::ScalarType dtype, const F& fn) {
  switch (dtype) {
    case c10::ScalarType::Float: return fn(float{});
    case c10::ScalarType::Double: return fn(double{});
    default: TORCH_CHECK(false, "rfq: unsupported dtype ", dtype);  // the op wrappers check first
  }
}

at::Tensor csq_weight(const at::Tensor& p, const at::Tensor& q, const at::Tensor& m,
                      const at::Tensor& scale, const at::Tensor& beta) {
  constexpr const char* op = "rfq.csq_weight";
  check_csq_args(op, p, q, m, scale, beta);
  const c10::cuda::CUDAGuard guard(p.device());
  const at::Tensor pc = p.contiguous();
  const at::Tensor qc = q.contiguous();
  const int n = static_cast<int>(p.size(0));
  const int64_t numel_e = p.numel() / n;
  at::Tensor w = at::empty(p.sizes().slice(1), p.options());
  if (numel_e == 0) return w;
  dispatch_csq_types(p.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int W = VecWidth<T>::value;
    const T* pp = pc.const_data_ptr<T>();
    const T* qp = qc.const_data_ptr<T>();
    T* wp = w.mutable_data_ptr<T>();
    // every plane p + j*E, q + j*E must be aligned too
    const bool vec =
        aligned_to(pp, 16) && aligned_to(qp, 16) && aligned_to(wp, 16) && numel_e % W == 0;
    auto kernel = vec ? forward_kernel<T, true> : forward_kernel<T, false>;
    kernel<<<grid_for(num_tiles(numel_e)), kThreads, 0, stream()>>>(
        pp, qp, wp, n, numel_e, m.const_data_ptr<T>(), m.stride(0), scale.const_data_ptr<T>(),
        beta.const_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return w;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> csq_weight_backward(
    const at::Tensor& grad_w, const at::Tensor& p, const at::Tensor& q, const at::Tensor& m,
    const at::Tensor& scale, const at::Tensor& beta) {
  constexpr const char* op = "rfq.csq_weight_backward";
  check_csq_args(op, p, q, m, scale, beta);
  check_csq_grad(op, grad_w, p);
  const c10::cuda::CUDAGuard guard(p.device());
  const at::Tensor pc = p.contiguous();
  const at::Tensor qc = q.contiguous();
  const at::Tensor gc = grad_w.contiguous();
  const int n = static_cast<int>(p.size(0));
  const int64_t numel_e = p.numel() / n, tiles = num_tiles(numel_e);
  at::Tensor dp = at::empty(p.sizes(), p.options());
  at::Tensor dq = at::empty(p.sizes(), p.options());
  at::Tensor dm = at::empty({n}, p.options());                 // every slot is written
  at::Tensor dscale = at::empty(scale.sizes(), p.options());  // one value
  // fp64 partials [n][tiles], only when there is more than one tile to combine. E == 0 still
  // launches the main kernel once: it writes dm and dscale from T_i = 0.
  at::Tensor partial;
  if (tiles > 1) partial = at::empty({n * tiles}, p.options().dtype(at::kDouble));
  dispatch_csq_types(p.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int W = VecWidth<T>::value;
    const T* gp = gc.const_data_ptr<T>();
    const T* pp = pc.const_data_ptr<T>();
    const T* qp = qc.const_data_ptr<T>();
    T* dpp = dp.mutable_data_ptr<T>();
    T* dqp = dq.mutable_data_ptr<T>();
    const bool vec = aligned_to(gp, 16) && aligned_to(pp, 16) && aligned_to(qp, 16) &&
                     aligned_to(dpp, 16) && aligned_to(dqp, 16) && numel_e % W == 0;
    const T* mp = m.const_data_ptr<T>();
    const T* sp = scale.const_data_ptr<T>();
    const T* bp = beta.const_data_ptr<T>();
    auto kernel = vec ? backward_kernel<T, true> : backward_kernel<T, false>;
    kernel<<<grid_for(tiles), kThreads, 0, stream()>>>(
        gp, pp, qp, dpp, dqp, n, numel_e, mp, m.stride(0), sp, bp,
        partial.defined() ? partial.mutable_data_ptr<double>() : nullptr,
        dm.mutable_data_ptr<T>(), dscale.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (partial.defined()) {
      finalize_kernel<T><<<1, kFinalizeThreads, 0, stream()>>>(
          partial.const_data_ptr<double>(), tiles, n, mp, m.stride(0), sp, bp,
          dm.mutable_data_ptr<T>(), dscale.mutable_data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {dp, dq, dm, dscale};
}

}  // namespace
}  // namespace rfq::cuda

TORCH_LIBRARY_IMPL(rfq, CUDA, m) {
  m.impl("csq_weight", &rfq::cuda::csq_weight);
  m.impl("csq_weight_backward", &rfq::cuda::csq_weight_backward);
}
