// The LSQ kernel family for one x86 ISA level. Included by exactly one file per level
// (lsq_kernels_{default,avx2,avx512}.cpp), each compiled with that level's flags and with
// CPU_CAPABILITY naming both our namespace and ATen's Vectorized<> backend, as ATen does.
//
// Numerics follow ../shared/spec/kernels.md §1: v = x / s (IEEE division, never x * (1/s)),
// clip to [qn, qp], round half to even, y = k * s in fp32 then one cast to x's dtype.
// Gradients: range test on the unrounded v (inclusive bounds); h = k - v inside, k (= qn or qp)
// outside; step gradient = grad_scale * sum(dy * h) over fp32 per-chunk partials summed in fp64.

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>  // convert_{to,from}_float specializations
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/lsq_kernels.h"

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace rfq::cpu::CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVF = Vec::size();
constexpr int64_t kBlock = 2 * kVF;  // one Vectorized<bf16/fp16>, i.e. two fp32 vectors
constexpr int64_t kGrainChunks = 8;  // tasks of >= 32K elements: small tensors stay on one thread
static_assert(kReduceChunk % kBlock == 0, "chunks must hold whole blocks");
static_assert(at::vec::Vectorized<c10::BFloat16>::size() == kBlock, "bf16 vector != 2 fp32 vectors");

// ---- loads and stores of kBlock elements as two fp32 vectors ----------------------------------
template <typename T>
struct Io {
  static void load(const T* p, Vec& a, Vec& b) {
    std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
  }
  static void store(T* p, const Vec& a, const Vec& b) {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
  // The value y would have after being stored in T (quant_stats measures the stored output).
  static void round_trip(Vec& a, Vec& b) {
    std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(a, b));
  }
};
template <>
struct Io<float> {
  static void load(const float* p, Vec& a, Vec& b) {
    a = Vec::loadu(p);
    b = Vec::loadu(p + kVF);
  }
  static void store(float* p, const Vec& a, const Vec& b) {
    a.store(p);
    b.store(p + kVF);
  }
  static void round_trip(Vec&, Vec&) {}
};

template <typename T>
inline float round_trip(float v) {
  return static_cast<float>(static_cast<T>(v));
}

// ---- the quantizer, vector and scalar (the scalar form finishes each tail) ---------------------
// Code k of v = x/s: clip then round half to even; signed 1-bit takes the sign (+1 at 0). NaN in,
// NaN out (torch.clamp semantics), so bad data is visible instead of becoming a valid code.
struct VecSpec {
  Vec s, qn, qp;
  bool binary = false;
  VecSpec() = default;
  explicit VecSpec(const QuantSpec& q) : s(q.step), qn(q.qn), qp(q.qp), binary(q.binary) {}
};

using VecSpecs = std::array<VecSpec, kMaxCandidates>;

inline VecSpecs vec_specs(const QuantSpec* q, int64_t k) {
  VecSpecs out;
  for (int64_t j = 0; j < k; ++j) out[j] = VecSpec(q[j]);
  return out;
}

// Per-chunk partial sums live in a per-thread buffer that only grows: no heap traffic per call
// (a fresh small allocation can split a freed activation-sized block and make the next big
// allocation fault in new pages).
template <typename T>
T* scratch(int64_t count) {
  thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < count) buffer.resize(count);
  return buffer.data();
}

// round(min(max(v, qn), qp)), NaN kept. On x86: the plain max and min instructions (a NaN v
// gives qn) and one blend that puts the NaN back, where ATen's NaN-propagating maximum and
// minimum cost two more operations each. The operand order is ATen's, so +-0 and every other
// value come out the same.
inline Vec clamp_round(const Vec& v, const Vec& qn, const Vec& qp) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 k = _mm512_roundscale_ps(_mm512_min_ps(_mm512_max_ps(v, qn), qp),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), k, v);
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 k = _mm256_round_ps(_mm256_min_ps(_mm256_max_ps(v, qn), qp),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_blendv_ps(k, v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
#else
  return at::vec::minimum(at::vec::maximum(v, qn), qp).round();
#endif
}

inline Vec code(const Vec& v, const VecSpec& q) {
  if (q.binary) {
    const Vec k = Vec::blendv(Vec(-1.f), Vec(1.f), v >= Vec(0.f));
    return Vec::blendv(k, v, v.isnan());
  }
  return clamp_round(v, q.qn, q.qp);
}

inline float code(float v, const QuantSpec& q) {
  if (std::isnan(v)) return v;
  if (q.binary) return v >= 0.f ? 1.f : -1.f;
  return std::nearbyint(std::min(std::max(v, q.qn), q.qp));
}

// All-ones lanes where qn <= v <= qp (none for NaN). AVX512 chains the two compares in a mask
// register; ATen's operators widen each compare to a vector first.
inline Vec in_range(const Vec& v, const VecSpec& q) {
#if defined(CPU_CAPABILITY_AVX512)
  const __mmask16 k = _mm512_mask_cmp_ps_mask(_mm512_cmp_ps_mask(v, q.qn, _CMP_GE_OQ), v, q.qp,
                                              _CMP_LE_OQ);
  return _mm512_castsi512_ps(_mm512_maskz_set1_epi32(k, -1));
#else
  return (v >= q.qn) & (v <= q.qp);
#endif
}
inline bool in_range(float v, const QuantSpec& q) { return v >= q.qn && v <= q.qp; }

inline double lane_sum(const Vec& acc) {
  alignas(64) float lanes[kVF];
  acc.store(lanes);
  double total = 0.0;
  for (int64_t l = 0; l < kVF; ++l) total += lanes[l];
  return total;
}

inline int64_t num_chunks(int64_t n) { return (n + kReduceChunk - 1) / kReduceChunk; }

// Runs fn(chunk, begin, end) over fixed kReduceChunk-sized chunks of [0, n), in parallel.
// The hot kernels hand each chunk to a function that takes its pointers and specs by value
// (*_chunk below): a Vec store may alias any memory (__m512 is may_alias), so values the loop
// read through the lambda's captures would be loaded again after every store.
template <typename F>
void parallel_chunks(int64_t n, const F& fn) {
  at::parallel_for(0, num_chunks(n), kGrainChunks, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      fn(c, c * kReduceChunk, std::min(n, (c + 1) * kReduceChunk));
    }
  });
}

template <typename F>
void dispatch_dtype(c10::ScalarType dtype, const F& fn) {
  switch (dtype) {
    case c10::ScalarType::Float: return fn(float{});
    case c10::ScalarType::BFloat16: return fn(c10::BFloat16{});
    case c10::ScalarType::Half: return fn(c10::Half{});
    default: TORCH_CHECK(false, "rfq: unsupported dtype ", dtype);  // the op wrappers check first
  }
}

// ---- coupled_quant: one bit ---------------------------------------------------------------------
// y = k * s in Out (forward: x's dtype), or k itself as fp32 (kScaled false: packed_linear's
// input stage), k the code of x / s.
template <typename T, typename Out, bool kScaled>
void code_chunk(const T* x, Out* y, int64_t begin, int64_t end, QuantSpec q) {
  const VecSpec vq(q);
  int64_t i = begin;
  for (; i + kBlock <= end; i += kBlock) {
    Vec a, b;
    Io<T>::load(x + i, a, b);
    a = code(a / vq.s, vq);
    b = code(b / vq.s, vq);
    if constexpr (kScaled) {
      a = a * vq.s;
      b = b * vq.s;
    }
    Io<Out>::store(y + i, a, b);
  }
  for (; i < end; ++i) {
    const float k = code(float(x[i]) / q.step, q);
    y[i] = static_cast<Out>(kScaled ? k * q.step : k);
  }
}

template <typename T, typename Out, bool kScaled>
void code_pass(const T* x, Out* y, int64_t n, const QuantSpec& q) {
  parallel_chunks(n, [&](int64_t, int64_t begin, int64_t end) {
    code_chunk<T, Out, kScaled>(x, y, begin, end, q);
  });
}

// Returns the chunk's sum(dy * h).
template <typename T>
double backward_chunk(const T* dy, const T* x, T* dx, int64_t begin, int64_t end, QuantSpec q) {
  const VecSpec vq(q);
  Vec acc(0.f);
  auto one = [&](const Vec& xv, const Vec& g) {
    const Vec v = xv / vq.s;
    const Vec inside = in_range(v, vq);
    acc = acc + g * (code(v, vq) - (v & inside));  // h = k - v inside, k outside
    return g & inside;
  };
  int64_t i = begin;
  for (; i + kBlock <= end; i += kBlock) {
    Vec xa, xb, ga, gb;
    Io<T>::load(x + i, xa, xb);
    Io<T>::load(dy + i, ga, gb);
    const Vec da = one(xa, ga);
    const Vec db = one(xb, gb);
    Io<T>::store(dx + i, da, db);
  }
  float tail = 0.f;
  for (; i < end; ++i) {
    const float v = float(x[i]) / q.step, g = float(dy[i]);
    const bool inside = in_range(v, q);
    tail += g * (inside ? code(v, q) - v : code(v, q));
    dx[i] = inside ? dy[i] : static_cast<T>(0.f);
  }
  return lane_sum(acc) + tail;
}

template <typename T>
void backward_typed(const T* dy, const T* x, T* dx, int64_t n, const QuantSpec& q,
                    double grad_scale, float* grad_step) {
  const int64_t chunks = num_chunks(n);
  double* partial = scratch<double>(chunks);
  parallel_chunks(n, [&](int64_t c, int64_t begin, int64_t end) {
    partial[c] = backward_chunk(dy, x, dx, begin, end, q);
  });
  double total = 0.0;
  for (int64_t c = 0; c < chunks; ++c) total += partial[c];
  *grad_step = static_cast<float>(grad_scale * total);
}

// ---- coupled_quant_multi: all K bits from one read of x -----------------------------------------
template <typename T>
void forward_multi_typed(const T* x, T* y, int64_t n, const QuantSpec* q, int64_t k) {
  const VecSpecs vq = vec_specs(q, k);
  parallel_chunks(n, [&](int64_t, int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + kBlock <= end; i += kBlock) {
      Vec a, b;
      Io<T>::load(x + i, a, b);
      for (int64_t j = 0; j < k; ++j) {
        Io<T>::store(y + j * n + i, code(a / vq[j].s, vq[j]) * vq[j].s,
                     code(b / vq[j].s, vq[j]) * vq[j].s);
      }
    }
    for (; i < end; ++i) {
      const float xv = float(x[i]);
      for (int64_t j = 0; j < k; ++j) {
        y[j * n + i] = static_cast<T>(code(xv / q[j].step, q[j]) * q[j].step);
      }
    }
  });
}

template <typename T>
void backward_multi_typed(const T* dy, const T* x, T* dx, int64_t n, const QuantSpec* q,
                          int64_t k, double grad_scale, float* grad_steps) {
  const VecSpecs vq = vec_specs(q, k);
  const int64_t chunks = num_chunks(n);
  double* partial = scratch<double>(k * chunks);  // [K][chunks]
  parallel_chunks(n, [&](int64_t c, int64_t begin, int64_t end) {
    std::array<Vec, kMaxCandidates> acc;
    acc.fill(Vec(0.f));
    int64_t i = begin;
    for (; i + kBlock <= end; i += kBlock) {
      Vec xa, xb;
      Io<T>::load(x + i, xa, xb);
      Vec da(0.f), db(0.f);
      for (int64_t j = 0; j < k; ++j) {
        Vec ga, gb;
        Io<T>::load(dy + j * n + i, ga, gb);
        const Vec va = xa / vq[j].s, vb = xb / vq[j].s;
        const Vec ina = in_range(va, vq[j]), inb = in_range(vb, vq[j]);
        da = da + (ga & ina);
        db = db + (gb & inb);
        acc[j] = acc[j] + ga * (code(va, vq[j]) - (va & ina));
        acc[j] = acc[j] + gb * (code(vb, vq[j]) - (vb & inb));
      }
      Io<T>::store(dx + i, da, db);
    }
    std::array<float, kMaxCandidates> tail{};
    for (; i < end; ++i) {
      const float xv = float(x[i]);
      float d = 0.f;
      for (int64_t j = 0; j < k; ++j) {
        const float v = xv / q[j].step, g = float(dy[j * n + i]);
        const bool inside = in_range(v, q[j]);
        d = d + (inside ? g : 0.f);
        tail[j] += g * (inside ? code(v, q[j]) - v : code(v, q[j]));
      }
      dx[i] = static_cast<T>(d);
    }
    for (int64_t j = 0; j < k; ++j) partial[j * chunks + c] = lane_sum(acc[j]) + tail[j];
  });
  for (int64_t j = 0; j < k; ++j) {
    double total = 0.0;
    for (int64_t c = 0; c < chunks; ++c) total += partial[j * chunks + c];
    grad_steps[j] = static_cast<float>(grad_scale * total);
  }
}

// ---- quant_stats: per bit, MSE of the stored output and the near-boundary share ----------------
// Near a boundary: in range and |v - rint(v)| > 1/2 - delta (given as near_threshold); for signed
// 1-bit the only boundary is 0, so near means |v| < delta. Counts are exact (fp32 lane counters
// stay far below 2^24 within a chunk).
template <typename T>
void stats_typed(const T* x, int64_t n, const QuantSpec* q, int64_t k, float near_threshold,
                 float delta, float* mse, float* share) {
  const VecSpecs vq = vec_specs(q, k);
  const int64_t chunks = num_chunks(n);
  double* sq = scratch<double>(k * chunks);
  int64_t* count = scratch<int64_t>(k * chunks);
  const Vec thr(near_threshold), dlt(delta), one(1.f);
  parallel_chunks(n, [&](int64_t c, int64_t begin, int64_t end) {
    std::array<Vec, kMaxCandidates> acc_sq, acc_n;
    acc_sq.fill(Vec(0.f));
    acc_n.fill(Vec(0.f));
    auto one_vec = [&](const Vec& xv, Vec y, const Vec& v, const Vec& kk, int64_t j) {
      const Vec d = y - xv;
      acc_sq[j] = acc_sq[j] + d * d;
      const Vec dist = vq[j].binary ? (v.abs() < dlt) : ((v - kk).abs() > thr);
      acc_n[j] = acc_n[j] + (one & (in_range(v, vq[j]) & dist));
    };
    int64_t i = begin;
    for (; i + kBlock <= end; i += kBlock) {
      Vec xa, xb;
      Io<T>::load(x + i, xa, xb);
      for (int64_t j = 0; j < k; ++j) {
        const Vec va = xa / vq[j].s, vb = xb / vq[j].s;
        const Vec ka = code(va, vq[j]), kb = code(vb, vq[j]);
        Vec ya = ka * vq[j].s, yb = kb * vq[j].s;
        Io<T>::round_trip(ya, yb);
        one_vec(xa, ya, va, ka, j);
        one_vec(xb, yb, vb, kb, j);
      }
    }
    std::array<float, kMaxCandidates> tail_sq{};
    std::array<int64_t, kMaxCandidates> tail_n{};
    for (; i < end; ++i) {
      const float xv = float(x[i]);
      for (int64_t j = 0; j < k; ++j) {
        const float v = xv / q[j].step, kk = code(v, q[j]);
        const float d = round_trip<T>(kk * q[j].step) - xv;
        tail_sq[j] += d * d;
        const bool near = q[j].binary ? std::abs(v) < delta : std::abs(v - kk) > near_threshold;
        tail_n[j] += (in_range(v, q[j]) && near) ? 1 : 0;
      }
    }
    for (int64_t j = 0; j < k; ++j) {
      sq[j * chunks + c] = lane_sum(acc_sq[j]) + tail_sq[j];
      count[j * chunks + c] = static_cast<int64_t>(lane_sum(acc_n[j])) + tail_n[j];
    }
  });
  for (int64_t j = 0; j < k; ++j) {
    double total_sq = 0.0;
    int64_t total_n = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      total_sq += sq[j * chunks + c];
      total_n += count[j * chunks + c];
    }
    mse[j] = n ? static_cast<float>(total_sq / double(n)) : 0.f;
    share[j] = n ? static_cast<float>(double(total_n) / double(n)) : 0.f;
  }
}

// ---- quantize_codes: integer codes at one bit (NaN maps to code 0) ------------------------------
template <typename T, typename Code>
void codes_chunk(const T* x, Code* out, int64_t begin, int64_t end, QuantSpec q) {
  const VecSpec vq(q);
  alignas(64) int32_t buf[kBlock];
  int64_t i = begin;
  for (; i + kBlock <= end; i += kBlock) {
    Vec a, b;
    Io<T>::load(x + i, a, b);
    a = code(a / vq.s, vq);
    b = code(b / vq.s, vq);
    // exact integers in [-128, 255]: the int32 conversion is exact, the narrowing vectorizes
    at::vec::convert_to_int_of_same_size(Vec::blendv(a, Vec(0.f), a.isnan())).store(buf);
    at::vec::convert_to_int_of_same_size(Vec::blendv(b, Vec(0.f), b.isnan())).store(buf + kVF);
    Code narrow[kBlock];  // local: a store through int8_t* may alias buf and blocks SIMD
    for (int64_t l = 0; l < kBlock; ++l) narrow[l] = static_cast<Code>(buf[l]);
    std::memcpy(out + i, narrow, sizeof(narrow));
  }
  for (; i < end; ++i) {
    const float kk = code(float(x[i]) / q.step, q);
    out[i] = std::isnan(kk) ? Code(0) : static_cast<Code>(kk);
  }
}

template <typename T, typename Code>
void codes_typed(const T* x, Code* out, int64_t n, const QuantSpec& q) {
  parallel_chunks(n, [&](int64_t, int64_t begin, int64_t end) {
    codes_chunk(x, out, begin, end, q);
  });
}

// ---- relu_quant: a block's ReLU and the next conv's unsigned quantizer from one read of x -----
// max(x, 0), NaN kept: as clamp_round, the plain instruction (0 for NaN) and one blend.
inline Vec relu(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q),
                              _mm512_max_ps(x, _mm512_setzero_ps()), x);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_blendv_ps(_mm256_max_ps(x, _mm256_setzero_ps()), x,
                          _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
#else
  return Vec::blendv(at::vec::maximum(x, Vec(0.f)), x, x.isnan());
#endif
}
inline float relu(float x) { return std::isnan(x) ? x : std::max(x, 0.f); }

template <typename T>
void relu_forward_chunk(const T* x, T* r, T* y, int64_t begin, int64_t end, QuantSpec q) {
  const VecSpec vq(q);
  int64_t i = begin;
  for (; i + kBlock <= end; i += kBlock) {
    Vec a, b;
    Io<T>::load(x + i, a, b);
    Io<T>::store(r + i, relu(a), relu(b));
    Io<T>::store(y + i, code(a / vq.s, vq) * vq.s, code(b / vq.s, vq) * vq.s);
  }
  for (; i < end; ++i) {
    const float xv = float(x[i]);
    r[i] = static_cast<T>(relu(xv));
    y[i] = static_cast<T>(code(xv / q.step, q) * q.step);
  }
}

template <typename T>
void relu_forward_typed(const T* x, T* r, T* y, int64_t n, const QuantSpec& q) {
  parallel_chunks(n, [&](int64_t, int64_t begin, int64_t end) {
    relu_forward_chunk(x, r, y, begin, end, q);
  });
}

// kR / kY: whether that output's gradient exists (compile-time: no branch per element). Returns
// the chunk's sum(dy * h).
template <typename T, bool kR, bool kY>
double relu_backward_chunk(const T* dr, const T* dy, const T* x, T* dx, int64_t begin,
                           int64_t end, QuantSpec q) {
  const VecSpec vq(q);
  Vec acc(0.f);
  auto one = [&](const Vec& xv, const Vec& gr, const Vec& gy) {
    Vec d(0.f);
    if constexpr (kR) d = gr & (xv > Vec(0.f));
    if constexpr (kY) {
      const Vec v = xv / vq.s;
      const Vec inside = in_range(v, vq);
      acc = acc + gy * (code(v, vq) - (v & inside));
      d = d + (gy & inside);
    }
    return d;
  };
  int64_t i = begin;
  for (; i + kBlock <= end; i += kBlock) {
    Vec xa, xb, ra(0.f), rb(0.f), ga(0.f), gb(0.f);
    Io<T>::load(x + i, xa, xb);
    if constexpr (kR) Io<T>::load(dr + i, ra, rb);
    if constexpr (kY) Io<T>::load(dy + i, ga, gb);
    Io<T>::store(dx + i, one(xa, ra, ga), one(xb, rb, gb));
  }
  float tail = 0.f;
  for (; i < end; ++i) {
    const float xv = float(x[i]);
    float d = 0.f;
    if constexpr (kR) d = xv > 0.f ? float(dr[i]) : 0.f;
    if constexpr (kY) {
      const float v = xv / q.step, g = float(dy[i]);
      const bool inside = in_range(v, q);
      tail += g * (inside ? code(v, q) - v : code(v, q));
      d = d + (inside ? g : 0.f);
    }
    dx[i] = static_cast<T>(d);
  }
  return lane_sum(acc) + tail;
}

template <typename T, bool kR, bool kY>
void relu_backward_typed(const T* dr, const T* dy, const T* x, T* dx, int64_t n,
                         const QuantSpec& q, double grad_scale, float* grad_step) {
  const int64_t chunks = num_chunks(n);
  double* partial = scratch<double>(chunks);
  parallel_chunks(n, [&](int64_t c, int64_t begin, int64_t end) {
    partial[c] = relu_backward_chunk<T, kR, kY>(dr, dy, x, dx, begin, end, q);
  });
  double total = 0.0;
  for (int64_t c = 0; c < chunks; ++c) total += partial[c];
  *grad_step = kY ? static_cast<float>(grad_scale * total) : 0.f;
}

// ---- batch_norm_quant: training-mode BatchNorm fused with one quantizer (fp32) -----------------
// The data is [outer, C, inner]. Reductions run over fixed chunks: with inner == 1, runs of
// max(1, kReduceChunk / C) rows (every channel); otherwise kReduceChunk-element pieces of one
// (n, c) plane. Within a chunk fp32, across chunks fp64 in chunk order: the results do not
// depend on the thread count.
struct BnChunks {
  ChannelShape s;
  int64_t rows;   // inner == 1: rows per chunk
  int64_t pieces; // inner > 1: chunks per (n, c) plane
  int64_t count;
  bool by_rows() const { return s.inner == 1; }
  int64_t grain() const {  // chunks per task: >= 32K elements, as parallel_chunks
    const int64_t per = by_rows() ? rows * s.channels : std::min(s.inner, kReduceChunk);
    return std::max<int64_t>(1, kGrainChunks * kReduceChunk / std::max<int64_t>(per, 1));
  }
};

inline BnChunks bn_chunks(const ChannelShape& s) {
  BnChunks ch{s, 1, 1, 0};
  if (s.inner == 1) {
    ch.rows = std::max<int64_t>(1, kReduceChunk / std::max<int64_t>(s.channels, 1));
    ch.count = (s.outer + ch.rows - 1) / ch.rows;
  } else {
    ch.pieces = (s.inner + kReduceChunk - 1) / kReduceChunk;
    ch.count = s.outer * s.channels * ch.pieces;
  }
  return ch;
}

template <typename F>
void parallel_bn_chunks(const BnChunks& ch, const F& fn) {
  at::parallel_for(0, ch.count, ch.grain(), [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) fn(k);
  });
}

// Reductions keep kSumChains independent vector sums per column, which the visit below feeds
// in turn: one chain would wait for every add's result (latency, not throughput).
constexpr int kSumChains = 4;
template <int U>
using Chain = std::integral_constant<int, U>;

// Visits chunk k: vec(i, c, lanes) for kVF elements from flat index i, scalar(i, c) for the
// rest. `lanes(p)` gives the per-channel parameter array p as the elements' Vec: channels
// c..c+kVF-1 (rows) or channel c broadcast (planes). kColumns (reductions): rows are walked
// once per kVF-channel column of the chunk (in cache after the first), so that a column's sums
// stay in registers, and vec gets a fourth argument, the Chain<u> that vector adds to (u cycles
// through kSumChains in a fixed order); otherwise row by row (streaming).
// Always inlined: an out-of-line visit would read the lambdas' captures through memory, again
// after every store (see parallel_chunks).
template <bool kColumns = false, typename VF, typename SF>
__attribute__((always_inline)) inline void visit_bn_chunk(const BnChunks& ch, int64_t k,
                                                          const VF& vec, const SF& scalar) {
  static_assert(kSumChains == 4, "the unrolled visits below feed four chains");
  const ChannelShape& s = ch.s;
  if (ch.by_rows()) {
    const int64_t C = s.channels, r0 = k * ch.rows;
    const int64_t r1 = std::min(s.outer, (k + 1) * ch.rows);
    const int64_t cv = C - C % kVF;  // channels in whole vectors
    if constexpr (kColumns) {
      for (int64_t c = 0; c < cv; c += kVF) {
        const auto lanes = [c](const float* p) { return Vec::loadu(p + c); };
        int64_t r = r0;
        for (; r + 4 <= r1; r += 4) {
          vec(r * C + c, c, lanes, Chain<0>{});
          vec((r + 1) * C + c, c, lanes, Chain<1>{});
          vec((r + 2) * C + c, c, lanes, Chain<2>{});
          vec((r + 3) * C + c, c, lanes, Chain<3>{});
        }
        for (; r < r1; ++r) vec(r * C + c, c, lanes, Chain<0>{});
      }
      for (int64_t c = cv; c < C; ++c) {
        for (int64_t r = r0; r < r1; ++r) scalar(r * C + c, c);
      }
    } else {
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t c = 0; c < cv; c += kVF) {
          vec(r * C + c, c, [c](const float* p) { return Vec::loadu(p + c); });
        }
        for (int64_t c = cv; c < C; ++c) scalar(r * C + c, c);
      }
    }
  } else {
    const int64_t plane = k / ch.pieces, piece = k % ch.pieces, c = plane % s.channels;
    const int64_t i1 = plane * s.inner + std::min(s.inner, (piece + 1) * kReduceChunk);
    int64_t i = plane * s.inner + piece * kReduceChunk;
    const auto lanes = [c](const float* p) { return Vec(p[c]); };
    if constexpr (kColumns) {
      for (; i + 4 * kVF <= i1; i += 4 * kVF) {
        vec(i, c, lanes, Chain<0>{});
        vec(i + kVF, c, lanes, Chain<1>{});
        vec(i + 2 * kVF, c, lanes, Chain<2>{});
        vec(i + 3 * kVF, c, lanes, Chain<3>{});
      }
      for (; i + kVF <= i1; i += kVF) vec(i, c, lanes, Chain<0>{});
    } else {
      for (; i + kVF <= i1; i += kVF) vec(i, c, lanes);
    }
    for (; i < i1; ++i) scalar(i, c);
  }
}

// Per-chunk, per-channel fp32 sums, fed column by column (visit_bn_chunk<true>): the current
// column's kSumChains vector sums stay in registers and are added to `row` (rows: C floats per
// thread), in a fixed order, when the column changes; planes have one channel and keep
// everything in the registers.
struct BnSums {
  float* row;
  std::array<Vec, kSumChains> acc{Vec(0.f), Vec(0.f), Vec(0.f), Vec(0.f)};
  float tail = 0.f;
  int64_t column = -1;
  template <int U>
  void add(const Vec& v, int64_t c, Chain<U>) {
    if (row && c != column) {
      flush();
      column = c;
    }
    std::get<U>(acc) = std::get<U>(acc) + v;
  }
  void add(float v, int64_t c) {
    if (row) row[c] += v; else tail += v;
  }
  Vec chains() const { return (acc[0] + acc[1]) + (acc[2] + acc[3]); }
  void flush() {
    if (row && column >= 0) (Vec::loadu(row + column) + chains()).store(row + column);
    if (row) acc.fill(Vec(0.f));
    column = -1;
  }
  double total(int64_t c) const { return row ? double(row[c]) : lane_sum(chains()) + tail; }
};

// The chunk's channels and how many values each has in it.
template <typename F>
void for_chunk_channels(const BnChunks& ch, int64_t k, const F& fn) {
  const ChannelShape& s = ch.s;
  if (ch.by_rows()) {
    const int64_t n = std::min(s.outer, (k + 1) * ch.rows) - k * ch.rows;
    for (int64_t c = 0; c < s.channels; ++c) fn(c, k * s.channels + c, n);
  } else {
    const int64_t plane = k / ch.pieces, piece = k % ch.pieces;
    const int64_t n = std::min(s.inner, (piece + 1) * kReduceChunk) - piece * kReduceChunk;
    fn(plane % s.channels, k, n);
  }
}

// fn(slot) for every chunk of channel c, in chunk order (the partial slot of that chunk).
template <typename F>
void for_channel_slots(const BnChunks& ch, int64_t c, const F& fn) {
  const ChannelShape& s = ch.s;
  if (ch.by_rows()) {
    for (int64_t k = 0; k < ch.count; ++k) fn(k * s.channels + c);
  } else {
    for (int64_t n = 0; n < s.outer; ++n) {
      for (int64_t p = 0; p < ch.pieces; ++p) fn((n * s.channels + c) * ch.pieces + p);
    }
  }
}

// Slots of per-(chunk, channel) partials.
inline int64_t bn_slots(const BnChunks& ch) {
  return ch.by_rows() ? ch.count * ch.s.channels : ch.count;
}

inline float* zeroed_row_sums(const BnChunks& ch, int64_t copies) {
  if (!ch.by_rows()) return nullptr;
  float* row = scratch<float>(copies * ch.s.channels);
  std::fill(row, row + copies * ch.s.channels, 0.f);
  return row;
}

// Chunk k's count, mean and sum of squared deviations from that mean per channel, into its
// slots of part ([count, mean, m2] x slots): two passes over the chunk, the second in cache.
void bn_stats_chunk(const float* x, BnChunks ch, int64_t k, double* part) {
  const ChannelShape s = ch.s;
  const int64_t slots = bn_slots(ch);
  float* row = zeroed_row_sums(ch, 2);
  BnSums sum{row}, dev{row ? row + s.channels : nullptr};
  visit_bn_chunk<true>(ch, k,
                       [&](int64_t i, int64_t c, auto, auto u) { sum.add(Vec::loadu(x + i), c, u); },
                       [&](int64_t i, int64_t c) { sum.add(x[i], c); });
  sum.flush();
  thread_local std::vector<float> means;
  if (static_cast<int64_t>(means.size()) < s.channels) means.resize(s.channels);
  float* const mp = means.data();
  for_chunk_channels(ch, k, [&](int64_t c, int64_t slot, int64_t n) {
    mp[c] = static_cast<float>(sum.total(c) / double(n));
    part[slot] = double(n);
    part[slots + slot] = double(mp[c]);
  });
  visit_bn_chunk<true>(ch, k,
                       [&](int64_t i, int64_t c, auto lanes, auto u) {
                         const Vec d = Vec::loadu(x + i) - lanes(mp);
                         dev.add(d * d, c, u);
                       },
                       [&](int64_t i, int64_t c) {
                         const float d = x[i] - mp[c];
                         dev.add(d * d, c);
                       });
  dev.flush();
  for_chunk_channels(ch, k, [&](int64_t c, int64_t slot, int64_t) {
    part[2 * slots + slot] = dev.total(c);
  });
}

// Mean and biased variance per channel from the chunks' own means and squared deviations,
// combined in fp64 in chunk order: mean = sum(n_b m_b) / n, m2 = sum(m2_b + n_b (m_b - mean)^2)
// (one division per channel).
void bn_stats(const float* x, ChannelShape s, float* mean, float* var) {
  const BnChunks ch = bn_chunks(s);
  double* part = scratch<double>(3 * bn_slots(ch));
  const int64_t slots = bn_slots(ch);
  parallel_bn_chunks(ch, [&](int64_t k) { bn_stats_chunk(x, ch, k, part); });
  for (int64_t c = 0; c < s.channels; ++c) {
    double n = 0.0, total = 0.0;
    for_channel_slots(ch, c, [&](int64_t slot) {
      n += part[slot];
      total += part[slot] * part[slots + slot];
    });
    const double m = n > 0.0 ? total / n : 0.0;
    double m2 = 0.0;
    for_channel_slots(ch, c, [&](int64_t slot) {
      const double d = part[slots + slot] - m;
      m2 += part[2 * slots + slot] + part[slot] * d * d;
    });
    mean[c] = static_cast<float>(m);
    var[c] = static_cast<float>(n > 0.0 ? m2 / n : 0.0);
  }
}

// Chunk k of the forward; with a teacher returns its sum((z - teacher)^2) (fp32 in the chunk).
template <bool kTeacher>
double bn_forward_chunk(const float* x, float* y, BnChunks ch, int64_t k, const float* alpha,
                        const float* beta, QuantSpec q, const float* teacher) {
  const VecSpec vq(q);
  Vec acc(0.f);
  float tail = 0.f;
  visit_bn_chunk(ch, k,
                 [&](int64_t i, int64_t, auto lanes) {
                   const Vec z = Vec::loadu(x + i) * lanes(alpha) + lanes(beta);
                   (code(z / vq.s, vq) * vq.s).store(y + i);
                   if constexpr (kTeacher) {
                     const Vec d = z - Vec::loadu(teacher + i);
                     acc = acc + d * d;
                   }
                 },
                 [&](int64_t i, int64_t c) {
                   const float z = x[i] * alpha[c] + beta[c];
                   y[i] = code(z / q.step, q) * q.step;
                   if constexpr (kTeacher) {
                     const float d = z - teacher[i];
                     tail += d * d;
                   }
                 });
  return kTeacher ? lane_sum(acc) + tail : 0.0;
}

void bn_forward(const float* x, float* y, ChannelShape s, const float* alpha, const float* beta,
                QuantSpec q, const float* teacher, double* sq_err) {
  const BnChunks ch = bn_chunks(s);
  if (!teacher) {
    parallel_bn_chunks(ch, [&](int64_t k) {
      bn_forward_chunk<false>(x, y, ch, k, alpha, beta, q, nullptr);
    });
    return;
  }
  double* part = scratch<double>(ch.count);  // fp64 across chunks, in chunk order
  parallel_bn_chunks(ch, [&](int64_t k) {
    part[k] = bn_forward_chunk<true>(x, y, ch, k, alpha, beta, q, teacher);
  });
  double total = 0.0;
  for (int64_t k = 0; k < ch.count; ++k) total += part[k];
  *sq_err = total;
}

// Pass 1: per channel sum(g) and sum(g * xhat) with g = dy inside the range, and the step's
// sum(dy * h); pass 2: dx = alpha * (g - mean(g) - xhat * mean(g * xhat)).
// With a teacher, the BN output's gradient also gets match * (z - teacher) (the gradient of a
// feature MSE to the teacher; match = 2 * grad_mse / n), in both passes.
// The tensors both passes read, per element or per channel (mg, mgx: pass 2's channel means).
struct BnGradArgs {
  const float* dy;
  const float* x;
  float* dx;
  const float* alpha;
  const float* beta;
  const float* mean;
  const float* invstd;
  const float* teacher;
  float match;
  const float* mg;
  const float* mgx;
};

// Pass 1 over chunk k: its slots of sum(g) and sum(g * xhat); returns the step's sum(dy * h).
// Without the quantizer (kQuant false: batch_norm_add) g = dy and there is no step.
template <bool kTeacher, bool kQuant = true>
double bn_grad_sums_chunk(BnGradArgs a, BnChunks ch, int64_t k, QuantSpec q, double* part) {
  static_assert(kQuant || !kTeacher, "the feature MSE comes with the quantizer");
  const float *dy = a.dy, *x = a.x, *alpha = a.alpha, *beta = a.beta, *mean = a.mean,
              *invstd = a.invstd, *teacher = a.teacher;
  const float match = a.match;
  const Vec match_v(match);
  const VecSpec vq(q);
  const int64_t slots = bn_slots(ch);
  float* row = zeroed_row_sums(ch, 2);
  BnSums sg{row}, sgx{row ? row + ch.s.channels : nullptr};
  std::array<Vec, kSumChains> step_acc{Vec(0.f), Vec(0.f), Vec(0.f), Vec(0.f)};
  float step_tail = 0.f;
  visit_bn_chunk<true>(ch, k,
                       [&](int64_t i, int64_t c, auto lanes, auto u) {
                         const Vec xv = Vec::loadu(x + i), d = Vec::loadu(dy + i);
                         Vec g = d;
                         if constexpr (kQuant) {
                           const Vec z = xv * lanes(alpha) + lanes(beta);
                           const Vec v = z / vq.s;
                           const Vec inside = in_range(v, vq);
                           Vec& sa = std::get<decltype(u)::value>(step_acc);
                           sa = sa + d * (code(v, vq) - (v & inside));
                           g = d & inside;
                           if constexpr (kTeacher) g = g + match_v * (z - Vec::loadu(teacher + i));
                         }
                         sg.add(g, c, u);
                         sgx.add(g * ((xv - lanes(mean)) * lanes(invstd)), c, u);
                       },
                       [&](int64_t i, int64_t c) {
                         float g = dy[i];
                         if constexpr (kQuant) {
                           const float z = x[i] * alpha[c] + beta[c];
                           const float v = z / q.step;
                           const bool inside = in_range(v, q);
                           step_tail += dy[i] * (inside ? code(v, q) - v : code(v, q));
                           g = inside ? dy[i] : 0.f;
                           if constexpr (kTeacher) g = g + match * (z - teacher[i]);
                         }
                         sg.add(g, c);
                         sgx.add(g * ((x[i] - mean[c]) * invstd[c]), c);
                       });
  sg.flush();
  sgx.flush();
  for_chunk_channels(ch, k, [&](int64_t c, int64_t slot, int64_t) {
    part[slot] = sg.total(c);
    part[slots + slot] = sgx.total(c);
  });
  return lane_sum((step_acc[0] + step_acc[1]) + (step_acc[2] + step_acc[3])) + step_tail;
}

// Pass 2 over chunk k: dx.
template <bool kTeacher, bool kQuant = true>
void bn_grad_input_chunk(BnGradArgs a, BnChunks ch, int64_t k, QuantSpec q) {
  const float *dy = a.dy, *x = a.x, *alpha = a.alpha, *beta = a.beta, *mean = a.mean,
              *invstd = a.invstd, *teacher = a.teacher, *mgp = a.mg, *mgxp = a.mgx;
  float* dx = a.dx;
  const float match = a.match;
  const Vec match_v(match);
  const VecSpec vq(q);
  visit_bn_chunk(ch, k,
                 [&](int64_t i, int64_t, auto lanes) {
                   const Vec xv = Vec::loadu(x + i), al = lanes(alpha);
                   Vec g = Vec::loadu(dy + i);
                   if constexpr (kQuant) {
                     const Vec z = xv * al + lanes(beta);
                     g = g & in_range(z / vq.s, vq);
                     if constexpr (kTeacher) g = g + match_v * (z - Vec::loadu(teacher + i));
                   }
                   const Vec xhat = (xv - lanes(mean)) * lanes(invstd);
                   (al * (g - lanes(mgp) - xhat * lanes(mgxp))).store(dx + i);
                 },
                 [&](int64_t i, int64_t c) {
                   float g = dy[i];
                   if constexpr (kQuant) {
                     const float z = x[i] * alpha[c] + beta[c];
                     g = in_range(z / q.step, q) ? g : 0.f;
                     if constexpr (kTeacher) g = g + match * (z - teacher[i]);
                   }
                   const float xhat = (x[i] - mean[c]) * invstd[c];
                   dx[i] = alpha[c] * (g - mgp[c] - xhat * mgxp[c]);
                 });
}

// Pass 1: per channel sum(g) and sum(g * xhat) with g = dy inside the range, and the step's
// sum(dy * h); pass 2: dx = alpha * (g - mean(g) - xhat * mean(g * xhat)).
// With a teacher, the BN output's gradient also gets match * (z - teacher) (the gradient of a
// feature MSE to the teacher; match = 2 * grad_mse / n), in both passes.
// Without the quantizer (kQuant false) there is no step gradient (grad_step unused).
template <bool kTeacher, bool kQuant = true>
void bn_backward_impl(BnGradArgs a, ChannelShape s, QuantSpec q, double grad_scale,
                      float* grad_weight, float* grad_bias, float* grad_step) {
  const BnChunks ch = bn_chunks(s);
  const int64_t slots = bn_slots(ch);
  double* part = scratch<double>(2 * slots + ch.count);  // [g, g * xhat] per slot, step per chunk
  parallel_bn_chunks(ch, [&](int64_t k) {
    part[2 * slots + k] = bn_grad_sums_chunk<kTeacher, kQuant>(a, ch, k, q, part);
  });
  if constexpr (kQuant) {
    double step = 0.0;
    for (int64_t k = 0; k < ch.count; ++k) step += part[2 * slots + k];
    *grad_step = static_cast<float>(grad_scale * step);
  }
  const double n = double(s.outer) * double(s.inner);
  thread_local std::vector<float> mg, mgx;
  mg.resize(s.channels);
  mgx.resize(s.channels);
  for (int64_t c = 0; c < s.channels; ++c) {
    double g = 0.0, gx = 0.0;
    for_channel_slots(ch, c, [&](int64_t slot) {
      g += part[slot];
      gx += part[slots + slot];
    });
    grad_bias[c] = static_cast<float>(g);
    grad_weight[c] = static_cast<float>(gx);
    mg[c] = static_cast<float>(g / n);
    mgx[c] = static_cast<float>(gx / n);
  }
  a.mg = mg.data();
  a.mgx = mgx.data();
  parallel_bn_chunks(ch, [&](int64_t k) { bn_grad_input_chunk<kTeacher, kQuant>(a, ch, k, q); });
}

void bn_backward(const float* dy, const float* x, float* dx, ChannelShape s, const float* alpha,
                 const float* beta, const float* mean, const float* invstd, QuantSpec q,
                 double grad_scale, const float* teacher, float match, float* grad_weight,
                 float* grad_bias, float* grad_step) {
  const BnGradArgs a{dy, x, dx, alpha, beta, mean, invstd, teacher, match, nullptr, nullptr};
  if (teacher) {
    bn_backward_impl<true>(a, s, q, grad_scale, grad_weight, grad_bias, grad_step);
  } else {
    bn_backward_impl<false>(a, s, q, grad_scale, grad_weight, grad_bias, grad_step);
  }
}

// ---- batch_norm_add: training-mode BatchNorm plus a residual (fp32), no quantizer --------------
void bn_add_forward_chunk(const float* x, const float* r, float* y, BnChunks ch, int64_t k,
                          const float* alpha, const float* beta) {
  visit_bn_chunk(ch, k,
                 [&](int64_t i, int64_t, auto lanes) {
                   const Vec z = Vec::loadu(x + i) * lanes(alpha) + lanes(beta);
                   (z + Vec::loadu(r + i)).store(y + i);
                 },
                 [&](int64_t i, int64_t c) { y[i] = (x[i] * alpha[c] + beta[c]) + r[i]; });
}

void bn_add_forward(const float* x, const float* residual, float* y, ChannelShape s,
                    const float* alpha, const float* beta) {
  const BnChunks ch = bn_chunks(s);
  parallel_bn_chunks(ch, [&](int64_t k) {
    bn_add_forward_chunk(x, residual, y, ch, k, alpha, beta);
  });
}

void bn_add_backward(const float* dy, const float* x, float* dx, ChannelShape s,
                     const float* alpha, const float* mean, const float* invstd,
                     float* grad_weight, float* grad_bias) {
  const BnGradArgs a{dy, x, dx, alpha, nullptr, mean, invstd, nullptr, 0.f, nullptr, nullptr};
  bn_backward_impl<false, false>(a, s, QuantSpec{}, 0.0, grad_weight, grad_bias, nullptr);
}

// ---- type-erased entry points --------------------------------------------------------------------
void forward(c10::ScalarType dt, const void* x, void* y, int64_t n, QuantSpec q) {
  dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    code_pass<T, T, true>(static_cast<const T*>(x), static_cast<T*>(y), n, q);
  });
}

void backward(c10::ScalarType dt, const void* dy, const void* x, void* dx, int64_t n,
              QuantSpec q, double grad_scale, float* grad_step) {
  dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    backward_typed<T>(static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<T*>(dx),
                      n, q, grad_scale, grad_step);
  });
}

void forward_multi(c10::ScalarType dt, const void* x, void* y, int64_t n, const QuantSpec* q,
                   int64_t k) {
  TORCH_CHECK(k >= 1 && k <= kMaxCandidates, "rfq: K must be in 1..", kMaxCandidates);
  dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    forward_multi_typed<T>(static_cast<const T*>(x), static_cast<T*>(y), n, q, k);
  });
}

void backward_multi(c10::ScalarType dt, const void* dy, const void* x, void* dx, int64_t n,
                    const QuantSpec* q, int64_t k, double grad_scale, float* grad_steps) {
  TORCH_CHECK(k >= 1 && k <= kMaxCandidates, "rfq: K must be in 1..", kMaxCandidates);
  dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    backward_multi_typed<T>(static_cast<const T*>(dy), static_cast<const T*>(x),
                            static_cast<T*>(dx), n, q, k, grad_scale, grad_steps);
  });
}

void stats(c10::ScalarType dt, const void* x, int64_t n, const QuantSpec* q, int64_t k,
           float near_threshold, float delta, float* mse, float* share) {
  TORCH_CHECK(k >= 1 && k <= kMaxCandidates, "rfq: K must be in 1..", kMaxCandidates);
  dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    stats_typed<T>(static_cast<const T*>(x), n, q, k, near_threshold, delta, mse, share);
  });
}

void codes(c10::ScalarType dt, const void* x, void* out, int64_t n, QuantSpec q) {
  dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    if (q.qn < 0) {
      codes_typed<T>(static_cast<const T*>(x), static_cast<int8_t*>(out), n, q);
    } else {
      codes_typed<T>(static_cast<const T*>(x), static_cast<uint8_t*>(out), n, q);
    }
  });
}

void codes_float(c10::ScalarType dt, const void* x, float* out, int64_t n, QuantSpec q) {
  dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    code_pass<T, float, false>(static_cast<const T*>(x), out, n, q);  // NaN kept
  });
}

void relu_forward(c10::ScalarType dt, const void* x, void* r, void* y, int64_t n, QuantSpec q) {
  dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    relu_forward_typed<T>(static_cast<const T*>(x), static_cast<T*>(r), static_cast<T*>(y), n, q);
  });
}

void relu_backward(c10::ScalarType dt, const void* dr, const void* dy, const void* x, void* dx,
                   int64_t n, QuantSpec q, double grad_scale, float* grad_step) {
  dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const auto* r = static_cast<const T*>(dr);
    const auto* y = static_cast<const T*>(dy);
    const auto* xt = static_cast<const T*>(x);
    auto* d = static_cast<T*>(dx);
    if (r && y) return relu_backward_typed<T, true, true>(r, y, xt, d, n, q, grad_scale, grad_step);
    if (r) return relu_backward_typed<T, true, false>(r, y, xt, d, n, q, grad_scale, grad_step);
    if (y) return relu_backward_typed<T, false, true>(r, y, xt, d, n, q, grad_scale, grad_step);
    relu_backward_typed<T, false, false>(r, y, xt, d, n, q, grad_scale, grad_step);
  });
}

}  // namespace

extern const LsqKernels kLsqKernels = {forward,     backward,   forward_multi, backward_multi,
                                       stats,       codes,      codes_float,   relu_forward,
                                       relu_backward, bn_stats, bn_forward,    bn_backward,
                                       bn_add_forward, bn_add_backward};

}  // namespace rfq::cpu::CPU_CAPABILITY
