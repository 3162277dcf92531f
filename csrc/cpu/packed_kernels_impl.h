// Packed-weight matmul kernels for one x86 ISA level (see lsq_kernels_impl.h for the scheme).
// Every row's packed bytes are read once per call, whatever M is.
//   default / AVX2: each 128-element block is decoded to q floats in an L1-resident buffer by
//     plain loops the compiler vectorizes, then multiplied with fp32 activations (Vectorized FMA).
//   AVX512: x is rounded to int16 per 128-element block into a buffer stored in the order the
//     packed fields decode to (in-lane shifts and masks only), and the dots run as int16
//     vpdpwssd (AVX512-VNNI, picked at run time) or vpmaddwd + vpaddd
//     (packed_kernels_avx512_body.h). dequantize_rows decodes to fp32 for the dequantize + MKL
//     path.

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <utility>
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

// Parallel tasks hold at least this many multiply-adds: an OpenMP fork and join costs a few
// microseconds, which a small call (a 1x1 conv at batch 1) would otherwise spend waiting.
constexpr int64_t kMinTaskMacs = int64_t{1} << 17;

// at::parallel_for grain over items of `macs_per_item` multiply-adds each, at least `min_items`.
inline int64_t task_grain(int64_t min_items, int64_t macs_per_item) {
  return std::max(min_items, (kMinTaskMacs + macs_per_item - 1) / std::max<int64_t>(1, macs_per_item));
}
static_assert(32 % kVF == 0, "a 32-element group must be whole vectors");

inline float load_float(const void* p, FloatKind kind, int64_t i) {
  switch (kind) {
    case FloatKind::kBFloat16: return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
    case FloatKind::kFloat16: return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// Scale of group g of row n; groups past the last real one (K padding) weigh nothing, and a
// per-tensor scale (strides 0) covers every group.
inline float scale_at(const PackedMatmul& a, int64_t n, int64_t g) {
  if (g >= a.groups && a.scale_group_stride != 0) return 0.f;
  return load_float(a.scales, a.scale_kind, n * a.scale_row_stride + g * a.scale_group_stride);
}

// Decodes one block into q = u - offset as floats (layout: csrc/packed_layout.h).
template <int kBits>
inline void decode_block(const uint8_t* __restrict__ p, float* __restrict__ q) {
  constexpr int kBytes = packed::block_bytes(kBits);
  constexpr int kOff = packed::code_offset(kBits);
  if constexpr (kBits == 4) {
    for (int j = 0; j < kBytes; ++j) {
      q[j] = static_cast<float>(static_cast<int>(p[j] & 15) - kOff);
      q[j + kBytes] = static_cast<float>(static_cast<int>(p[j] >> 4) - kOff);
    }
  } else if constexpr (kBits == 2) {
    for (int j = 0; j < kBytes; ++j) {
      const int b = p[j];
      q[j] = static_cast<float>((b & 3) - kOff);
      q[j + kBytes] = static_cast<float>(((b >> 2) & 3) - kOff);
      q[j + 2 * kBytes] = static_cast<float>(((b >> 4) & 3) - kOff);
      q[j + 3 * kBytes] = static_cast<float>((b >> 6) - kOff);
    }
  } else {
    const int8_t* s = reinterpret_cast<const int8_t*>(p);
    for (int j = 0; j < kB; ++j) q[j] = static_cast<float>(s[j]);
  }
}

inline float hsum(const Vec& v) {
  alignas(64) float lanes[kVF];
  v.store(lanes);
  float total = 0.f;
  for (int64_t l = 0; l < kVF; ++l) total += lanes[l];
  return total;
}

// Generic kernel: x as padded fp32 [m, kp], scales as an fp32 table [n, kp / g].
template <int kBits>
void matmul_rows(const PackedMatmul& a, const float* xp, const float* sp, int64_t n0, int64_t n1,
                 float* y) {
  alignas(64) float q[kB];
  const int64_t blocks = a.kp / kB;
  const int64_t g = a.group_size, row_groups = a.kp / g;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = a.packed + n * a.row_bytes;
    const float* row_scales = sp + n * row_groups;
    for (int64_t m0 = 0; m0 < a.m; m0 += kTileM) {
      const int64_t tm = std::min(kTileM, a.m - m0);
      std::array<Vec, kTileM> acc;
      acc.fill(Vec(0.f));
      for (int64_t b = 0; b < blocks; ++b) {
        decode_block<kBits>(row + b * packed::block_bytes(kBits), q);
        for (int64_t s = 0; s < kB; s += g) {  // groups inside this block
          const Vec scale(row_scales[(b * kB + s) / g]);
          for (int64_t i = 0; i < tm; ++i) {
            const float* xr = xp + (m0 + i) * a.kp + b * kB + s;
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

void matmul_generic(const PackedMatmul& a, float* y) {
  // Per-call fp32 copies (this path serves CPUs without AVX512; the copies are O(m k + n k/g)).
  thread_local std::vector<float> xp, sp;
  const int64_t row_groups = a.kp / a.group_size;
  xp.assign(a.m * a.kp, 0.f);
  sp.resize(a.n * row_groups);
  for (int64_t r = 0; r < a.m; ++r) {
    for (int64_t j = 0; j < a.k; ++j) xp[r * a.kp + j] = load_float(a.x, a.x_kind, r * a.k + j);
  }
  for (int64_t n = 0; n < a.n; ++n) {
    for (int64_t g = 0; g < row_groups; ++g) sp[n * row_groups + g] = scale_at(a, n, g);
  }
  const float* xs = xp.data();
  const float* ss = sp.data();
  // rows in tasks of >= 16: a row is one K-long dot per activation row
  at::parallel_for(0, a.n, task_grain(16, a.kp * a.m), [&](int64_t n0, int64_t n1) {
    switch (a.container_bits) {
      case 2: return matmul_rows<2>(a, xs, ss, n0, n1, y);
      case 4: return matmul_rows<4>(a, xs, ss, n0, n1, y);
      default: return matmul_rows<8>(a, xs, ss, n0, n1, y);
    }
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
          const Vec scale(scale_at(a, n, (b * kB + s) / a.group_size));
          for (int64_t v = 0; v < a.group_size; v += kVF) {
            (Vec::loadu(out + b * kB + s + v) * scale).store(out + b * kB + s + v);
          }
        }
      }
    }
  });
}

#if defined(CPU_CAPABILITY_AVX512)
// GCC 12's AVX-512 intrinsic headers start some results from a self-initialized "undefined"
// register (__Y = __Y) and -Wall then reports it at every inlined call site.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// ---- AVX512 integer path -------------------------------------------------------------------
// A "unit" is what one 64-byte load of a packed row covers: one block at 4 bits (one of two
// loads at 8 bits), two blocks at 2 bits. Decoding a unit gives kVecs int16 vectors d_t; the
// activation buffer holds, per (unit, activation row), the matching int16 vectors X_t, so that
// sum_t d_t * X_t (lane by lane) is the unit's dot product:
//   4-bit: 16-bit word i of the load holds elements 2i, 64+2i, 2i+1, 65+2i in its nibbles, so
//          d_0..d_3 = w & 15, (w >> 4) & 15, (w >> 8) & 15, w >> 12, and X_0..X_3 = x at
//          even 0..62, even 64..126, odd 1..63, odd 65..127.
//   8-bit: the two loads' low / high bytes (sign-extended in place); X as for 4 bits.
//   2-bit: word i of block h holds 2i + (t >> 2) + 32 (t & 3) in its bits 2t..2t+1, t = 0..7;
//          X_t lanes 0-15 are block b's elements, lanes 16-31 block b+1's.
// vpdpwssd sums lane pairs into 16 int32 lanes: lanes 0-7 come from int16 lanes 0-15, lanes
// 8-15 from 16-31. A group of 32 or the second block of a 2-bit unit therefore lands in one
// half of the int32 lanes, and each int32 accumulator ("acc") gets one scale per half.
// Unsigned fields (2/4 bits) are multiplied as stored, u = q + offset; each acc starts from
// -offset * sum(X) of its lanes (precomputed per activation row), so int32 sums are exact q*x.

// The unit scheme, the shuffles and the eight 16-lane vectors per block below are written for
// 128-element blocks.
static_assert(kB == 128, "the AVX512 packed kernels assume 128-element K-blocks");

template <int C, int G>  // container bits, group size (per-tensor: kB)
struct Cfg {
  static constexpr int kUnitBlocks = C == 2 ? 2 : 1;
  static constexpr int64_t kUnitBytes = kUnitBlocks * packed::block_bytes(C);  // 64 or 128
  static constexpr int kVecs = C == 2 ? 8 : 4;
  static constexpr bool kSplit = C == 2 || G == 32;  // the two int32 halves scale differently
  static constexpr int kHalves = kSplit ? 2 : 1;
  static constexpr int kAccs = G == kB ? 1 : (C == 2 ? kB / G : 2);
  static constexpr int kSlots = kAccs * kHalves;  // scales per unit
  static constexpr bool kUnsigned = C != 8;
  static constexpr int kOffset = packed::code_offset(C);  // used when kUnsigned
  static constexpr int kUnitVecs = kVecs + (kUnsigned ? kAccs : 0);  // X_t, then the acc inits
  // units per K chunk: a tile's activation rows of one chunk fill at most 32 KB of L1; one
  // activation row (M = 1) at most 16 KB, so that it stays in L1 beside the weight lines
  // streaming through (a 22 KB row on 11008-long rows was re-read from L2: C8 in
  // bench/README.md)
  static constexpr int64_t chunk_units(int rm) {
    const int64_t bytes = rm == 1 ? 16 << 10 : 32 << 10;
    return bytes / (rm * kUnitVecs * 64) > 0 ? bytes / (rm * kUnitVecs * 64) : 1;
  }
  static constexpr int acc_of(int t) {
    return G == kB ? 0 : (C == 2 ? (G == 64 ? (t & 3) >> 1 : t & 3) : (t & 1));
  }
  // slot s = acc * kHalves + half: its block within the unit and its group within that block
  static constexpr int block_of(int s) { return C == 2 ? s % kHalves : 0; }
  static constexpr int group_in_block(int s) {
    return G == kB ? 0 : (C == 2 ? s / kHalves : s);  // 4/8-bit g32: s = 2 acc + half
  }
};

inline __mmask16 tail_mask(int64_t count) {  // first min(count, 16) lanes
  return count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << std::max<int64_t>(count, 0)) - 1);
}

template <FloatKind kKind>
inline __m512 load16(const void* base, int64_t offset, __mmask16 mask) {
  if constexpr (kKind == FloatKind::kFloat32) {
    return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(base) + offset);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(base) + offset);
    if constexpr (kKind == FloatKind::kBFloat16) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      return _mm512_cvtph_ps(h);
    }
  }
}

// Rounds 128 elements of x (from element offset `start` of a row holding `valid` more) to int16
// with step max|x| / 32767: v[0..3] hold elements 0-31, 32-63, 64-95, 96-127. Returns the step;
// NaN when the block holds inf or NaN, so that the outputs it touches become NaN. Integer codes
// (`codes`: the fused input quantizer's, |k| <= 255) take step 1: the products stay exact.
template <FloatKind kKind>
inline float quantize_block(const void* x, int64_t start, int64_t valid, bool codes,
                            __m512i v[4]) {
  __m512 f[8];
  __m512 mx = _mm512_setzero_ps();
  __mmask16 bad = 0;
  const __m512 inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  for (int j = 0; j < 8; ++j) {
    f[j] = load16<kKind>(x, start + 16 * j, tail_mask(valid - 16 * j));
    const __m512 ab = _mm512_abs_ps(f[j]);
    bad |= _mm512_cmp_ps_mask(ab, inf, _CMP_NLT_UQ);
    mx = _mm512_max_ps(mx, ab);
  }
  const float maxabs = _mm512_reduce_max_ps(mx);
  if (bad) {
    for (int j = 0; j < 4; ++j) v[j] = _mm512_setzero_si512();
    return std::numeric_limits<float>::quiet_NaN();
  }
  const __m512 inv = _mm512_set1_ps(codes ? 1.f : (maxabs > 0.f ? 32767.f / maxabs : 0.f));
  for (int j = 0; j < 4; ++j) {
    const __m256i lo = _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(f[2 * j], inv)));
    const __m256i hi =
        _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(f[2 * j + 1], inv)));
    v[j] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  }
  return codes ? 1.f : maxabs / 32767.f;
}

// Activation rows per register tile (the tile kernels' kRm).
inline int64_t tile_m(int64_t m) { return m == 1 ? 1 : 4; }

// Activation buffer, tile-major so that a tile's rows of one K chunk are contiguous (with a
// row-major [unit][m] order, M = 64 puts them 20 KB apart and they fight over the same L1
// sets): row m = mt * rm + i of unit u at buf[((mt * units + u) * rm + i) * kUnitVecs], rm =
// tile_m(M). Steps sx[m * bpad + block] (bpad = units * kUnitBlocks).
inline int64_t x_offset(int64_t m, int64_t u, int64_t units, int64_t rm) {
  return ((m / rm) * units + u) * rm + m % rm;
}

template <int C, int G, FloatKind kKind>
void quantize_rows(const PackedMatmul& a, int64_t m0, int64_t m1, int64_t units, __m512i* buf,
                   float* sx) {
  using K = Cfg<C, G>;
  const int64_t bpad = units * K::kUnitBlocks;
  const __m512i even = _mm512_set_epi16(62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36,
                                        34, 32, 30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6,
                                        4, 2, 0);
  const __m512i odd = _mm512_add_epi16(even, _mm512_set1_epi16(1));
  const __m512i ones = _mm512_set1_epi16(1);
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t u = 0; u < units; ++u) {
      __m512i v[K::kUnitBlocks][4];
      for (int h = 0; h < K::kUnitBlocks; ++h) {
        const int64_t b = u * K::kUnitBlocks + h, start = b * kB;
        sx[m * bpad + b] = quantize_block<kKind>(a.x, m * a.k + start, a.k - start, a.x_codes,
                                                    v[h]);
      }
      __m512i* out = buf + x_offset(m, u, units, tile_m(a.m)) * K::kUnitVecs;
      if constexpr (C == 2) {
        for (int t = 0; t < 8; ++t) {
          const int f = t & 3;
          out[t] = _mm512_permutex2var_epi16(v[0][f], (t >> 2) ? odd : even, v[1][f]);
        }
      } else {
        out[0] = _mm512_permutex2var_epi16(v[0][0], even, v[0][1]);
        out[1] = _mm512_permutex2var_epi16(v[0][2], even, v[0][3]);
        out[2] = _mm512_permutex2var_epi16(v[0][0], odd, v[0][1]);
        out[3] = _mm512_permutex2var_epi16(v[0][2], odd, v[0][3]);
      }
      if constexpr (K::kUnsigned) {
        for (int j = 0; j < K::kAccs; ++j) {
          __m512i s = _mm512_setzero_si512();
          for (int t = 0; t < K::kVecs; ++t) {
            if (K::acc_of(t) == j) s = _mm512_add_epi32(s, _mm512_madd_epi16(out[t], ones));
          }
          alignas(64) int32_t init[16] = {};
          init[0] = -K::kOffset * _mm512_mask_reduce_add_epi32(0x00FF, s);
          init[8] = -K::kOffset * _mm512_mask_reduce_add_epi32(0xFF00, s);
          out[K::kVecs + j] = _mm512_load_si512(init);
        }
      }
    }
  }
}

// Groups g0..g0+count-1 of row n's scales as fp32, zeros past the last real group.
inline void row_scales_f32(const PackedMatmul& a, int64_t n, int64_t g0, int64_t count,
                           float* out) {
  if (a.scale_group_stride == 0) {
    const float s = load_float(a.scales, a.scale_kind, n * a.scale_row_stride);
    std::fill(out, out + count, s);
    return;
  }
  const int64_t base = n * a.scale_row_stride + g0;
  for (int64_t g = 0; g < count; g += 16) {
    const __mmask16 mask = tail_mask(a.groups - g0 - g);
    __m512 v;
    switch (a.scale_kind) {
      case FloatKind::kBFloat16: v = load16<FloatKind::kBFloat16>(a.scales, base + g, mask); break;
      case FloatKind::kFloat16: v = load16<FloatKind::kFloat16>(a.scales, base + g, mask); break;
      default: v = load16<FloatKind::kFloat32>(a.scales, base + g, mask); break;
    }
    _mm512_mask_storeu_ps(out + g, tail_mask(count - g), v);
  }
}

// c[(r * kRm + i) * stride + u * kSlots + s] = row scale * activation step, the one factor
// each int32 acc half is multiplied with, for groups of 32 or 64 (128: in the tile itself);
// swf and sx start at the chunk's first unit (swf rows gn apart, sx rows bpad apart). Rows and
// activation rows past rn / rm repeat the last real one.
template <int C, int G>
void combined_scales(const float* swf, int64_t gn, int rn, int kRn, const float* sx,
                     int64_t bpad, int64_t m0, int rm, int kRm, int64_t stride, int64_t units,
                     float* c) {
  using K = Cfg<C, G>;
  for (int r = 0; r < kRn; ++r) {
    for (int i = 0; i < kRm; ++i) {
      float* cr = c + (r * kRm + i) * stride;
      const float* sw = swf + std::min(r, rn - 1) * gn;
      const float* sa = sx + (m0 + std::min(i, rm - 1)) * bpad;
      for (int64_t u = 0; u < units; ++u) {
        for (int s = 0; s < K::kSlots; ++s) {
          const int64_t block = u * K::kUnitBlocks + K::block_of(s);
          cr[u * K::kSlots + s] = sw[block * (kB / G) + K::group_in_block(s)] * sa[block];
        }
      }
    }
  }
}

struct alignas(64) Zmm {  // storage of one vector (std::vector<__m512i> drops the alignment)
  int32_t lanes[16];
};

// Scratch for one task's row scales and combined scales (per thread, only grows).
inline float* tile_scratch(int64_t count) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < count) buffer.resize(count);
  return buffer.data();
}

#define RFQ_PACKED_BODY_NS plain
#define RFQ_PACKED_BODY_VNNI false
#include "cpu/packed_kernels_avx512_body.h"
#undef RFQ_PACKED_BODY_NS
#undef RFQ_PACKED_BODY_VNNI

// The same kernels with vpdpwssd: compiled for AVX512-VNNI, run only where the CPU has it.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512vnni"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512vnni")
#endif
#define RFQ_PACKED_BODY_NS vnni
#define RFQ_PACKED_BODY_VNNI true
#include "cpu/packed_kernels_avx512_body.h"
#undef RFQ_PACKED_BODY_NS
#undef RFQ_PACKED_BODY_VNNI
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// vpdpwssd where the CPU has AVX512-VNNI; RFQ_PACKED_VNNI=0 forces vpmaddwd (tests both).
bool use_vnni() {
  static const bool value = [] {
    const char* env = std::getenv("RFQ_PACKED_VNNI");
    if (env && env[0] == '0') return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni") != 0;
  }();
  return value;
}

template <int C, int G>
void matmul_cfg(const PackedMatmul& a, float* y) {
  using K = Cfg<C, G>;
  const int64_t units = (a.kp / kB + K::kUnitBlocks - 1) / K::kUnitBlocks;
  thread_local std::vector<Zmm> xbuf;
  thread_local std::vector<float> steps;
  const int64_t rm = tile_m(a.m);
  const int64_t vecs = units * (a.m + rm - 1) / rm * rm * K::kUnitVecs;
  const int64_t nsteps = a.m * units * K::kUnitBlocks;
  if (static_cast<int64_t>(xbuf.size()) < vecs) xbuf.resize(vecs);
  if (static_cast<int64_t>(steps.size()) < nsteps) steps.resize(nsteps);
  __m512i* xb = reinterpret_cast<__m512i*>(xbuf.data());
  float* sx = steps.data();
  // rounding x is O(m k): in parallel only once it is worth a task
  at::parallel_for(0, a.m, std::max<int64_t>(1, 32768 / a.kp), [&](int64_t m0, int64_t m1) {
    switch (a.x_kind) {
      case FloatKind::kBFloat16:
        return quantize_rows<C, G, FloatKind::kBFloat16>(a, m0, m1, units, xb, sx);
      case FloatKind::kFloat16:
        return quantize_rows<C, G, FloatKind::kFloat16>(a, m0, m1, units, xb, sx);
      default: return quantize_rows<C, G, FloatKind::kFloat32>(a, m0, m1, units, xb, sx);
    }
  });
  if (use_vnni()) {
    vnni::run<C, G>(a, xb, sx, units, y);
  } else {
    plain::run<C, G>(a, xb, sx, units, y);
  }
}

template <int C>
void matmul_bits(const PackedMatmul& a, float* y) {
  switch (a.group_size) {
    case 32: return matmul_cfg<C, 32>(a, y);
    case 64: return matmul_cfg<C, 64>(a, y);
    default: return matmul_cfg<C, kB>(a, y);
  }
}

// AVX512 fp32 decode for the dequantize + MKL path: a block's 128 codes straight into eight fp32
// registers (mask/shift the bytes, subtract the offset, sign-extend, convert).
inline __m512 widen(__m128i q8) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q8)); }

template <int kBits>
inline void decode_block_regs(const uint8_t* p, __m512 w[8]) {
  if constexpr (kBits == 4) {
    const __m512i b = _mm512_loadu_si512(p);
    const __m512i mask = _mm512_set1_epi8(0x0F), off = _mm512_set1_epi8(packed::code_offset(4));
    const __m512i lo = _mm512_sub_epi8(_mm512_and_si512(b, mask), off);
    const __m512i hi = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(b, 4), mask), off);
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
    const __m256i mask = _mm256_set1_epi8(3), off = _mm256_set1_epi8(packed::code_offset(2));
    const __m256i v0 = _mm256_sub_epi8(_mm256_and_si256(b, mask), off);
    const __m256i v1 = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(b, 2), mask), off);
    const __m256i v2 = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(b, 4), mask), off);
    const __m256i v3 = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(b, 6), mask), off);
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

template <int kBits>
void dequantize_avx512(const PackedMatmul& a, int64_t n0, int64_t n1, float* w) {
  const int64_t per_group = a.group_size / 16, row_groups = a.kp / a.group_size;
  at::parallel_for(n0, n1, 16, [&](int64_t r0, int64_t r1) {
    float* row_scales = tile_scratch(row_groups);
    for (int64_t n = r0; n < r1; ++n) {
      const uint8_t* row = a.packed + n * a.row_bytes;
      row_scales_f32(a, n, 0, row_groups, row_scales);
      float* out = w + (n - n0) * a.kp;
      for (int64_t b = 0; b < a.kp / kB; ++b) {
        __m512 q[8];
        decode_block_regs<kBits>(row + b * packed::block_bytes(kBits), q);
        for (int64_t v = 0; v < 8; ++v) {
          const __m512 scale = _mm512_set1_ps(row_scales[(b * 8 + v) / per_group]);
          _mm512_storeu_ps(out + b * kB + v * 16, _mm512_mul_ps(q[v], scale));
        }
      }
    }
  });
}

#endif  // CPU_CAPABILITY_AVX512

void matmul(const PackedMatmul& a, float* y) {
#if defined(CPU_CAPABILITY_AVX512)
  switch (a.container_bits) {
    case 2: return matmul_bits<2>(a, y);
    case 4: return matmul_bits<4>(a, y);
    default: return matmul_bits<8>(a, y);
  }
#else
  matmul_generic(a, y);
#endif
}

void dequantize_rows(const PackedMatmul& a, int64_t n0, int64_t n1, float* w) {
#if defined(CPU_CAPABILITY_AVX512)
  switch (a.container_bits) {
    case 2: return dequantize_avx512<2>(a, n0, n1, w);
    case 4: return dequantize_avx512<4>(a, n0, n1, w);
    default: return dequantize_avx512<8>(a, n0, n1, w);
  }
#else
  switch (a.container_bits) {
    case 2: return dequantize_typed<2>(a, n0, n1, w);
    case 4: return dequantize_typed<4>(a, n0, n1, w);
    default: return dequantize_typed<8>(a, n0, n1, w);
  }
#endif
}

}  // namespace

// AVX512's int16 kernel is faster than dequantize + MKL at every M (bench/README.md); the fp32
// decode kernels hand over at M = 32.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kGemmMinM = std::numeric_limits<int64_t>::max();
#else
constexpr int64_t kGemmMinM = 32;
#endif

extern const PackedKernels kPackedKernels = {matmul, dequantize_rows, kGemmMinM};

}  // namespace rfq::cpu::CPU_CAPABILITY
