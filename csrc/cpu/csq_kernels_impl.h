// The CSQ kernel family for one x86 ISA level, included by exactly one file per level
// (csq_kernels_{default,avx2,avx512}.cpp) with CPU_CAPABILITY naming ATen's Vectorized<> backend.
//
// One pass each way over plane-major p, q [N, n]: every vector of elements reads its N planes,
// computes the gates g(x) = 1 / (1 + exp(-x)) in the input dtype (ATen's vector exp) and either
// sums coef_i (g(beta p) - g(beta q)) in plane order (forward) or writes dp, dq and accumulates
// the per-plane sums of the dm / dscale reductions (backward). No temporaries of size n.

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "cpu/csq_kernels.h"
#include "quant_range.h"

namespace rfq::cpu::CPU_CAPABILITY {
namespace {

constexpr int64_t kGrainChunks = 4;  // tasks of >= 16K elements (x 2N planes read)

inline int64_t num_chunks(int64_t n) { return (n + kReduceChunk - 1) / kReduceChunk; }

template <typename T>
using V = at::vec::Vectorized<T>;

template <typename T>
inline V<T> gate(const V<T>& x) {
  const V<T> one(T(1));
  return one / (one + x.neg().exp());
}

template <typename T>
void forward_typed(const T* p, const T* q, T* w, int64_t planes, int64_t n, const double* coef,
                   double beta_d) {
  constexpr int64_t kV = V<T>::size();
  const V<T> beta(static_cast<T>(beta_d));
  std::array<V<T>, kCsqMaxPlanes> c;
  for (int64_t i = 0; i < planes; ++i) c[i] = V<T>(static_cast<T>(coef[i]));
  at::parallel_for(0, num_chunks(n), kGrainChunks, [&](int64_t first, int64_t last) {
    const int64_t end = std::min(n, last * kReduceChunk);
    for (int64_t e = first * kReduceChunk; e < end; e += kV) {
      const int64_t count = std::min(kV, end - e);
      V<T> acc(T(0));
      for (int64_t i = 0; i < planes; ++i) {
        const V<T> sp = gate(beta * V<T>::loadu(p + i * n + e, count));
        const V<T> sq = gate(beta * V<T>::loadu(q + i * n + e, count));
        acc = acc + c[i] * (sp - sq);
      }
      acc.store(w + e, count);
    }
  });
}

// Gradients of planes larger than the caches are written with streaming (non-temporal) stores:
// no read-for-ownership of lines that are only written, a third less memory traffic.
constexpr int64_t kStreamBytes = int64_t{8} << 20;

template <typename T>
inline void store_grad(const V<T>& v, T* dst, int64_t count, bool stream) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if (stream && count == V<T>::size() &&
      reinterpret_cast<std::uintptr_t>(dst) % sizeof(V<T>) == 0) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, float>) return _mm512_stream_ps(dst, v);
    else return _mm512_stream_pd(dst, v);
#else
    if constexpr (std::is_same_v<T, float>) return _mm256_stream_ps(dst, v);
    else return _mm256_stream_pd(dst, v);
#endif
  }
#endif
  (void)stream;
  v.store(dst, count);
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

template <typename T>
double lane_sum(const V<T>& v) {
  alignas(64) T lanes[V<T>::size()];
  v.store(lanes);
  double total = 0.0;
  for (int64_t l = 0; l < V<T>::size(); ++l) total += lanes[l];
  return total;
}

template <typename T>
void backward_typed(const T* gw, const T* p, const T* q, T* dp, T* dq, int64_t planes,
                    int64_t n, const double* coef, double beta_d, double* plane_sums) {
  constexpr int64_t kV = V<T>::size();
  const V<T> beta(static_cast<T>(beta_d));
  const V<T> one(T(1));
  std::array<V<T>, kCsqMaxPlanes> cb;  // coef_i * beta: the chain rule's constant factor
  for (int64_t i = 0; i < planes; ++i) cb[i] = V<T>(static_cast<T>(coef[i] * beta_d));
  const int64_t chunks = num_chunks(n);
  const bool stream = n * planes * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
  std::vector<double> partial(static_cast<size_t>(chunks * planes), 0.0);
  at::parallel_for(0, chunks, kGrainChunks, [&](int64_t first, int64_t last) {
    for (int64_t ch = first; ch < last; ++ch) {
      const int64_t begin = ch * kReduceChunk, end = std::min(n, begin + kReduceChunk);
      std::array<V<T>, kCsqMaxPlanes> sums;
      for (int64_t i = 0; i < planes; ++i) sums[i] = V<T>(T(0));
      for (int64_t e = begin; e < end; e += kV) {
        const int64_t count = std::min(kV, end - e);
        const V<T> g = V<T>::loadu(gw + e, count);  // lanes past `count` are 0
        for (int64_t i = 0; i < planes; ++i) {
          const V<T> sp = gate(beta * V<T>::loadu(p + i * n + e, count));
          const V<T> sq = gate(beta * V<T>::loadu(q + i * n + e, count));
          const V<T> gc = g * cb[i];
          store_grad(gc * (sp * (one - sp)), dp + i * n + e, count, stream);
          store_grad((gc * (sq * (one - sq))).neg(), dq + i * n + e, count, stream);
          sums[i] = sums[i] + g * (sp - sq);
        }
      }
      for (int64_t i = 0; i < planes; ++i) partial[ch * planes + i] = lane_sum(sums[i]);
    }
    if (stream) stream_fence();
  });
  for (int64_t i = 0; i < planes; ++i) plane_sums[i] = 0.0;
  for (int64_t ch = 0; ch < chunks; ++ch) {
    for (int64_t i = 0; i < planes; ++i) plane_sums[i] += partial[ch * planes + i];
  }
}

template <typename F>
void dispatch_dtype(c10::ScalarType dtype, const F& fn) {
  switch (dtype) {
    case c10::ScalarType::Float: return fn(float{});
    case c10::ScalarType::Double: return fn(double{});
    default: TORCH_CHECK(false, "rfq: unsupported dtype ", dtype);  // the op wrappers check first
  }
}

void forward(c10::ScalarType dt, const void* p, const void* q, void* w, int64_t planes,
             int64_t n, const double* coef, double beta) {
  dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    forward_typed<T>(static_cast<const T*>(p), static_cast<const T*>(q), static_cast<T*>(w),
                     planes, n, coef, beta);
  });
}

void backward(c10::ScalarType dt, const void* gw, const void* p, const void* q, void* dp,
              void* dq, int64_t planes, int64_t n, const double* coef, double beta,
              double* plane_sums) {
  dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    backward_typed<T>(static_cast<const T*>(gw), static_cast<const T*>(p),
                      static_cast<const T*>(q), static_cast<T*>(dp), static_cast<T*>(dq), planes,
                      n, coef, beta, plane_sums);
  });
}

}  // namespace

extern const CsqKernels kCsqKernels = {forward, backward};

}  // namespace rfq::cpu::CPU_CAPABILITY
