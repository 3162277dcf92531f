// AVX512 int16 tile kernels of packed_linear, included twice by packed_kernels_impl.h: in
// namespace plain (vpmaddwd + vpaddd) and, under target("avx512vnni"), in namespace vnni
// (vpdpwssd). Everything that touches a VNNI intrinsic must live here, so there is no include
// guard. Layout of the activation buffer and the decode order: packed_kernels_impl.h.

namespace RFQ_PACKED_BODY_NS {

constexpr bool kVnni = RFQ_PACKED_BODY_VNNI;

inline __m512i dot_acc(__m512i acc, __m512i w, __m512i x) {
  if constexpr (kVnni) {
    return _mm512_dpwssd_epi32(acc, w, x);
  } else {
    return _mm512_add_epi32(acc, _mm512_madd_epi16(w, x));
  }
}

// Field t of a unit as int16 lanes (t is a constant once the loops are unrolled).
template <int C>
inline __m512i field(const __m512i* raw, int t, __m512i low_bits) {
  if constexpr (C == 4) {
    if (t == 3) return _mm512_srli_epi16(raw[0], 12);
    return _mm512_and_si512(t == 0 ? raw[0] : _mm512_srli_epi16(raw[0], 4 * t), low_bits);
  } else if constexpr (C == 2) {
    if (t == 7) return _mm512_srli_epi16(raw[0], 14);
    return _mm512_and_si512(t == 0 ? raw[0] : _mm512_srli_epi16(raw[0], 2 * t), low_bits);
  } else {  // int8: low bytes (t = 0, 1) or high bytes (t = 2, 3) of load t & 1, sign-extended
    const __m512i src = raw[t & 1];
    return t < 2 ? _mm512_srai_epi16(_mm512_slli_epi16(src, 8), 8) : _mm512_srai_epi16(src, 8);
  }
}

// One tile: rows n0..n0+tr-1 (tr <= kRn) times activation rows m0..m0+tm-1 (tm <= kRm), over
// units u0..u1-1; y is stored (first K chunk) or added to. Rows past the tile's end repeat its
// last row and are never stored, so the loops stay branch-free. c: combined scales of these
// units, [kRn][kRm][(u1 - u0) * kSlots].
template <int C, int G, int kRn, int kRm>
void tile(const PackedMatmul& a, const __m512i* xbuf, int64_t u0, int64_t u1, int64_t n0, int tr,
          int64_t m0, int tm, const float* c, bool accumulate, float* y) {
  using K = Cfg<C, G>;
  constexpr int kRaw = C == 8 ? 2 : 1;
  constexpr int64_t kUnitBytes = C == 8 ? 128 : 64;
  const __m512i low_bits = _mm512_set1_epi16(C == 2 ? 3 : 15);
  const __m512i half_idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const uint8_t* rows[kRn];
  for (int r = 0; r < kRn; ++r) rows[r] = a.packed + (n0 + std::min(r, tr - 1)) * a.row_bytes;
  const __m512i* xs[kRm];
  for (int i = 0; i < kRm; ++i) xs[i] = xbuf + (m0 + std::min(i, tm - 1)) * K::kUnitVecs;
  const int64_t ustride = a.m * K::kUnitVecs, cstride = (u1 - u0) * K::kSlots;
  __m512 accf[kRn][kRm];
#pragma GCC unroll 16
  for (int r = 0; r < kRn; ++r) {
#pragma GCC unroll 16
    for (int i = 0; i < kRm; ++i) accf[r][i] = _mm512_setzero_ps();
  }
  for (int64_t u = u0; u < u1; ++u) {
    __m512i raw[kRn][kRaw];
    __m512i acc[kRn][kRm][K::kAccs];
#pragma GCC unroll 16
    for (int r = 0; r < kRn; ++r) {
#pragma GCC unroll 2
      for (int h = 0; h < kRaw; ++h) {
        raw[r][h] = _mm512_loadu_si512(rows[r] + u * kUnitBytes + 64 * h);
      }
    }
#pragma GCC unroll 16
    for (int i = 0; i < kRm; ++i) {
      const __m512i* xu = xs[i] + u * ustride;
#pragma GCC unroll 16
      for (int r = 0; r < kRn; ++r) {
#pragma GCC unroll 4
        for (int j = 0; j < K::kAccs; ++j) {
          acc[r][i][j] = K::kUnsigned ? _mm512_load_si512(xu + K::kVecs + j)
                                      : _mm512_setzero_si512();
        }
      }
    }
#pragma GCC unroll 8
    for (int t = 0; t < K::kVecs; ++t) {
      __m512i d[kRn];
#pragma GCC unroll 16
      for (int r = 0; r < kRn; ++r) d[r] = field<C>(raw[r], t, low_bits);
#pragma GCC unroll 16
      for (int i = 0; i < kRm; ++i) {
        const __m512i x = _mm512_load_si512(xs[i] + u * ustride + t);
#pragma GCC unroll 16
        for (int r = 0; r < kRn; ++r) {
          acc[r][i][K::acc_of(t)] = dot_acc(acc[r][i][K::acc_of(t)], d[r], x);
        }
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < kRn; ++r) {
#pragma GCC unroll 16
      for (int i = 0; i < kRm; ++i) {
        const float* cp = c + (r * kRm + i) * cstride + (u - u0) * K::kSlots;
#pragma GCC unroll 4
        for (int j = 0; j < K::kAccs; ++j) {
          __m512 scale;
          if constexpr (K::kSplit) {  // lanes 0-7: cp[0], lanes 8-15: cp[1]
            const __m128i pair = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(cp + 2 * j));
            scale = _mm512_permutexvar_ps(half_idx,
                                          _mm512_castps128_ps512(_mm_castsi128_ps(pair)));
          } else {
            scale = _mm512_set1_ps(cp[j]);
          }
          accf[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][i][j]), scale, accf[r][i]);
        }
      }
    }
  }
  for (int r = 0; r < tr; ++r) {
    for (int i = 0; i < tm; ++i) {
      float& out = y[(m0 + i) * a.n + n0 + r];
      const float part = _mm512_reduce_add_ps(accf[r][i]);
      out = accumulate ? out + part : part;
    }
  }
}

// Loop nest of one task (row tiles t0..t1-1): K in chunks whose activations (kRm rows) stay in
// L1, rows in blocks whose packed chunk stays in L2, then activation tiles, then row tiles.
template <int C, int G, int kRn, int kRm>
void run_tiles(const PackedMatmul& a, const __m512i* xbuf, const float* sx, int64_t units,
               float* y) {
  using K = Cfg<C, G>;
  constexpr int64_t kUnitBytes = C == 8 ? 128 : 64;
  constexpr int64_t kGroupsPerUnit = K::kUnitBlocks * (128 / G);
  const int64_t bpad = units * K::kUnitBlocks;
  const int64_t chunk = std::max<int64_t>(1, (32 << 10) / (kRm * K::kUnitVecs * 64));
  const int64_t block_tiles = std::max<int64_t>(1, (256 << 10) / (kRn * chunk * kUnitBytes));
  const int64_t tiles = (a.n + kRn - 1) / kRn;
  at::parallel_for(0, tiles, std::max(1, 16 / kRn), [&](int64_t t0, int64_t t1) {
    const int64_t cu = std::min(chunk, units);
    float* swf = tile_scratch(kRn * cu * kGroupsPerUnit + kRn * kRm * cu * K::kSlots);
    float* c = swf + kRn * cu * kGroupsPerUnit;
    for (int64_t u0 = 0; u0 < units; u0 += chunk) {
      const int64_t u1 = std::min(units, u0 + chunk);
      const int64_t g0 = u0 * kGroupsPerUnit, gn = (u1 - u0) * kGroupsPerUnit;
      for (int64_t b0 = t0; b0 < t1; b0 += block_tiles) {
        const int64_t b1 = std::min(t1, b0 + block_tiles);
        for (int64_t m0 = 0; m0 < a.m; m0 += kRm) {
          const int tm = static_cast<int>(std::min<int64_t>(kRm, a.m - m0));
          for (int64_t t = b0; t < b1; ++t) {
            const int64_t n0 = t * kRn;
            const int tr = static_cast<int>(std::min<int64_t>(kRn, a.n - n0));
            for (int r = 0; r < tr; ++r) row_scales_f32(a, n0 + r, g0, gn, swf + r * gn);
            combined_scales<C, G>(swf, gn, tr, sx + u0 * K::kUnitBlocks, bpad, m0, tm, kRm,
                                  u1 - u0, c);
            tile<C, G, kRn, kRm>(a, xbuf, u0, u1, n0, tr, m0, tm, c, u0 > 0, y);
          }
        }
      }
    }
  });
}
// Tile shapes: as many accumulators as the 32 zmm registers hold without spilling.
template <int C, int G>
void run(const PackedMatmul& a, const __m512i* xbuf, const float* sx, int64_t units, float* y) {
  if constexpr (G == 128) {
    if (a.m == 1) return run_tiles<C, G, 4, 1>(a, xbuf, sx, units, y);
    return run_tiles<C, G, 2, 4>(a, xbuf, sx, units, y);
  } else {
    if (a.m == 1) return run_tiles<C, G, 2, 1>(a, xbuf, sx, units, y);
    return run_tiles<C, G, 1, 4>(a, xbuf, sx, units, y);
  }
}

}  // namespace RFQ_PACKED_BODY_NS
