// Packed-weight matmul kernels for one x86 ISA level (see lsq_kernels_impl.h for the scheme).
// Every row's packed bytes are read once per call, whatever M is.
//   default / AVX2: each 128-element block is decoded to q floats in an L1-resident buffer by
//     plain loops the compiler vectorizes, then multiplied with fp32 activations (Vectorized FMA).
//   AVX512: blocks are decoded in registers and the dots run as int16 vpmaddwd on activations
//     rounded to int16 per 128-element block (matmul_rows_avx512); dequantize_rows decodes in
//     registers to fp32 for the dequantize + MKL path.

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <vector>

#include "cpu/packed_kernels.h"
#include "packed_layout.h"

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace rfq::cpu::CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVF = Vec::size();
constexpr int64_t kB = packed::kBlockK;
constexpr int64_t kTileM = 4;  // activation rows sharing one decoded block
static_assert(32 % kVF == 0, "a 32-element group must be whole vectors");

// Decodes one block into q = u - offset as floats (layout: csrc/packed_layout.h).
template <int kBits>
inline void decode_block(const uint8_t* __restrict__ p, float* __restrict__ q) {
  if constexpr (kBits == 4) {
    for (int j = 0; j < 64; ++j) {
      q[j] = static_cast<float>(static_cast<int>(p[j] & 15) - 8);
      q[j + 64] = static_cast<float>(static_cast<int>(p[j] >> 4) - 8);
    }
  } else if constexpr (kBits == 2) {
    for (int j = 0; j < 32; ++j) {
      const int b = p[j];
      q[j] = static_cast<float>((b & 3) - 2);
      q[j + 32] = static_cast<float>(((b >> 2) & 3) - 2);
      q[j + 64] = static_cast<float>(((b >> 4) & 3) - 2);
      q[j + 96] = static_cast<float>((b >> 6) - 2);
    }
  } else {
    const int8_t* s = reinterpret_cast<const int8_t*>(p);
    for (int j = 0; j < kB; ++j) q[j] = static_cast<float>(s[j]);
  }
}

inline float scale_of(const PackedMatmul& a, int64_t n, int64_t k) {
  return a.scales[n * a.scale_row_stride + (k / a.group_size) * a.scale_group_stride];
}

inline float hsum(const Vec& v) {
  alignas(64) float lanes[kVF];
  v.store(lanes);
  float total = 0.f;
  for (int64_t l = 0; l < kVF; ++l) total += lanes[l];
  return total;
}

template <int kBits>
void matmul_rows(const PackedMatmul& a, int64_t n0, int64_t n1, float* y) {
  alignas(64) float q[kB];
  const int64_t blocks = a.kp / kB;
  const int64_t g = a.group_size;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = a.packed + n * a.row_bytes;
    for (int64_t m0 = 0; m0 < a.m; m0 += kTileM) {
      const int64_t tm = std::min(kTileM, a.m - m0);
      std::array<Vec, kTileM> acc;
      acc.fill(Vec(0.f));
      for (int64_t b = 0; b < blocks; ++b) {
        decode_block<kBits>(row + b * packed::block_bytes(kBits), q);
        for (int64_t s = 0; s < kB; s += g) {  // groups inside this block
          const Vec scale(scale_of(a, n, b * kB + s));
          for (int64_t i = 0; i < tm; ++i) {
            const float* xr = a.x + (m0 + i) * a.kp + b * kB + s;
            Vec part(0.f);
            for (int64_t v = 0; v < g; v += kVF) {
              part = at::vec::fmadd(Vec::loadu(q + s + v), Vec::loadu(xr + v), part);
            }
            acc[i] = at::vec::fmadd(part, scale, acc[i]);
          }
        }
      }
      for (int64_t i = 0; i < tm; ++i) y[(m0 + i) * a.n + n] = hsum(acc[i]);
    }
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// AVX512: a block's 128 codes are decoded straight into eight fp32 registers (mask/shift the
// bytes, subtract the offset, sign-extend 16 at a time, convert), never touching memory.
inline __m512 widen(__m128i q8) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q8)); }

template <int kBits>
inline void decode_block_regs(const uint8_t* p, __m512 w[8]) {
  if constexpr (kBits == 4) {
    const __m512i b = _mm512_loadu_si512(p);
    const __m512i mask = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8);
    const __m512i lo = _mm512_sub_epi8(_mm512_and_si512(b, mask), eight);
    const __m512i hi = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(b, 4), mask), eight);
    w[0] = widen(_mm512_castsi512_si128(lo));
    w[1] = widen(_mm512_extracti32x4_epi32(lo, 1));
    w[2] = widen(_mm512_extracti32x4_epi32(lo, 2));
    w[3] = widen(_mm512_extracti32x4_epi32(lo, 3));
    w[4] = widen(_mm512_castsi512_si128(hi));
    w[5] = widen(_mm512_extracti32x4_epi32(hi, 1));
    w[6] = widen(_mm512_extracti32x4_epi32(hi, 2));
    w[7] = widen(_mm512_extracti32x4_epi32(hi, 3));
  } else if constexpr (kBits == 2) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i mask = _mm256_set1_epi8(3), two = _mm256_set1_epi8(2);
    const __m256i v0 = _mm256_sub_epi8(_mm256_and_si256(b, mask), two);
    const __m256i v1 = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(b, 2), mask), two);
    const __m256i v2 = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(b, 4), mask), two);
    const __m256i v3 = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(b, 6), mask), two);
    w[0] = widen(_mm256_castsi256_si128(v0));
    w[1] = widen(_mm256_extracti128_si256(v0, 1));
    w[2] = widen(_mm256_castsi256_si128(v1));
    w[3] = widen(_mm256_extracti128_si256(v1, 1));
    w[4] = widen(_mm256_castsi256_si128(v2));
    w[5] = widen(_mm256_extracti128_si256(v2, 1));
    w[6] = widen(_mm256_castsi256_si128(v3));
    w[7] = widen(_mm256_extracti128_si256(v3, 1));
  } else {
    for (int i = 0; i < 8; ++i) {
      w[i] = widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * i)));
    }
  }
}

// The dot products run in integers: activations are quantized to int16 per (row, 128-block)
// (error <= max|x_block| / 65534 per element), codes widened to int16, vpmaddwd gives int32
// pair sums, and each group's sum is scaled once in fp32 by scale_g * x_scale_block.
template <int kBits>
inline void decode_block_i16(const uint8_t* p, __m512i w[4]) {  // 4 x 32 codes, one per 32-group
  if constexpr (kBits == 4) {
    const __m512i b = _mm512_loadu_si512(p);
    const __m512i mask = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8);
    const __m512i lo = _mm512_sub_epi8(_mm512_and_si512(b, mask), eight);
    const __m512i hi = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(b, 4), mask), eight);
    w[0] = _mm512_cvtepi8_epi16(_mm512_castsi512_si256(lo));
    w[1] = _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(lo, 1));
    w[2] = _mm512_cvtepi8_epi16(_mm512_castsi512_si256(hi));
    w[3] = _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(hi, 1));
  } else if constexpr (kBits == 2) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i mask = _mm256_set1_epi8(3), two = _mm256_set1_epi8(2);
    w[0] = _mm512_cvtepi8_epi16(_mm256_sub_epi8(_mm256_and_si256(b, mask), two));
    w[1] = _mm512_cvtepi8_epi16(
        _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(b, 2), mask), two));
    w[2] = _mm512_cvtepi8_epi16(
        _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(b, 4), mask), two));
    w[3] = _mm512_cvtepi8_epi16(
        _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(b, 6), mask), two));
  } else {
    for (int i = 0; i < 4; ++i) {
      w[i] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * i)));
    }
  }
}

struct QuantizedActivations {
  std::vector<int16_t> values;  // [m, kp]
  std::vector<float> scales;    // [m, kp / 128]
};

QuantizedActivations quantize_activations(const PackedMatmul& a) {
  const int64_t blocks = a.kp / kB;
  QuantizedActivations q{std::vector<int16_t>(a.m * a.kp), std::vector<float>(a.m * blocks)};
  for (int64_t r = 0; r < a.m * blocks; ++r) {
    const float* x = a.x + r * kB;
    __m512 mx = _mm512_setzero_ps();
    for (int v = 0; v < 8; ++v) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(x + 16 * v)));
    const float maxabs = _mm512_reduce_max_ps(mx);
    const float scale = maxabs / 32767.f;
    q.scales[r] = scale;
    const __m512 inv = _mm512_set1_ps(maxabs > 0.f ? 32767.f / maxabs : 0.f);
    for (int v = 0; v < 8; ++v) {
      const __m512i i32 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + 16 * v), inv));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q.values.data() + r * kB + 16 * v),
                          _mm512_cvtsepi32_epi16(i32));
    }
  }
  return q;
}

template <int kBits>
void matmul_rows_avx512(const PackedMatmul& a, const QuantizedActivations& xq, int64_t n0,
                        int64_t n1, float* y) {
  const int64_t blocks = a.kp / kB;
  const int64_t per_group = a.group_size / 32;  // 32-element subgroups per group: 1, 2 or 4
  std::array<__m512, 64> acc_store;            // per activation row, M < 64 on this path
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = a.packed + n * a.row_bytes;
    const float* row_scales = a.scales + n * a.scale_row_stride;
    for (int64_t m0 = 0; m0 < a.m; m0 += 64) {
      const int64_t tm = std::min<int64_t>(64, a.m - m0);
      for (int64_t i = 0; i < tm; ++i) acc_store[i] = _mm512_setzero_ps();
      int64_t group = 0;
      for (int64_t b = 0; b < blocks; ++b) {
        __m512i w[4];
        decode_block_i16<kBits>(row + b * packed::block_bytes(kBits), w);  // once for all m
        for (int64_t s0 = 0; s0 < 4; s0 += per_group, ++group) {
          const float scale = row_scales[group * a.scale_group_stride];
          for (int64_t i = 0; i < tm; ++i) {
            const int16_t* xr = xq.values.data() + (m0 + i) * a.kp + b * kB;
            __m512i sum = _mm512_madd_epi16(w[s0], _mm512_loadu_si512(xr + 32 * s0));
            for (int64_t s = s0 + 1; s < s0 + per_group; ++s) {
              sum = _mm512_add_epi32(sum, _mm512_madd_epi16(w[s], _mm512_loadu_si512(xr + 32 * s)));
            }
            const float combined = scale * xq.scales[(m0 + i) * blocks + b];
            acc_store[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(combined),
                                           acc_store[i]);
          }
        }
      }
      for (int64_t i = 0; i < tm; ++i) y[(m0 + i) * a.n + n] = _mm512_reduce_add_ps(acc_store[i]);
    }
  }
}
#endif

void matmul(const PackedMatmul& a, float* y) {
#if defined(CPU_CAPABILITY_AVX512)
  const QuantizedActivations xq = quantize_activations(a);
#endif
  // rows in tasks of >= 16: a row is one K-long dot per activation row
  at::parallel_for(0, a.n, 16, [&](int64_t n0, int64_t n1) {
#if defined(CPU_CAPABILITY_AVX512)
    switch (a.container_bits) {
      case 2: return matmul_rows_avx512<2>(a, xq, n0, n1, y);
      case 4: return matmul_rows_avx512<4>(a, xq, n0, n1, y);
      default: return matmul_rows_avx512<8>(a, xq, n0, n1, y);
    }
#else
    switch (a.container_bits) {
      case 2: return matmul_rows<2>(a, n0, n1, y);
      case 4: return matmul_rows<4>(a, n0, n1, y);
      default: return matmul_rows<8>(a, n0, n1, y);
    }
#endif
  });
}

template <int kBits>
void dequantize_typed(const PackedMatmul& a, int64_t n0, int64_t n1, float* w) {
  at::parallel_for(n0, n1, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t n = r0; n < r1; ++n) {
      const uint8_t* row = a.packed + n * a.row_bytes;
      float* out = w + (n - n0) * a.kp;
      for (int64_t b = 0; b < a.kp / kB; ++b) {
        decode_block<kBits>(row + b * packed::block_bytes(kBits), out + b * kB);
        for (int64_t s = 0; s < kB; s += a.group_size) {
          const Vec scale(scale_of(a, n, b * kB + s));
          for (int64_t v = 0; v < a.group_size; v += kVF) {
            (Vec::loadu(out + b * kB + s + v) * scale).store(out + b * kB + s + v);
          }
        }
      }
    }
  });
}

#if defined(CPU_CAPABILITY_AVX512)
template <int kBits>
void dequantize_avx512(const PackedMatmul& a, int64_t n0, int64_t n1, float* w) {
  const int64_t per_group = a.group_size / 16;
  at::parallel_for(n0, n1, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t n = r0; n < r1; ++n) {
      const uint8_t* row = a.packed + n * a.row_bytes;
      const float* row_scales = a.scales + n * a.scale_row_stride;
      float* out = w + (n - n0) * a.kp;
      int64_t group = 0;
      for (int64_t b = 0; b < a.kp / kB; ++b) {
        __m512 q[8];
        decode_block_regs<kBits>(row + b * packed::block_bytes(kBits), q);
        for (int64_t v = 0; v < 8; ++v) {
          if (v % per_group == 0 && v) ++group;
          _mm512_storeu_ps(out + b * kB + v * 16,
                           _mm512_mul_ps(q[v], _mm512_set1_ps(row_scales[group * a.scale_group_stride])));
        }
        ++group;
      }
    }
  });
}
#endif

void dequantize_rows(const PackedMatmul& a, int64_t n0, int64_t n1, float* w) {
#if defined(CPU_CAPABILITY_AVX512)
  switch (a.container_bits) {
    case 2: return dequantize_avx512<2>(a, n0, n1, w);
    case 4: return dequantize_avx512<4>(a, n0, n1, w);
    default: return dequantize_avx512<8>(a, n0, n1, w);
  }
#endif
  switch (a.container_bits) {
    case 2: return dequantize_typed<2>(a, n0, n1, w);
    case 4: return dequantize_typed<4>(a, n0, n1, w);
    default: return dequantize_typed<8>(a, n0, n1, w);
  }
}

}  // namespace

extern const PackedKernels kPackedKernels = {matmul, dequantize_rows};

}  // namespace rfq::cpu::CPU_CAPABILITY
