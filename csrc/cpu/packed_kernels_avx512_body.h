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

// Keeps v in a register: without it GCC folds the load into every instruction that reads v,
// and the tiles run out of load ports (a zmm load per use instead of one per value).
inline void in_register(__m512i& v) { asm("" : "+v"(v)); }

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

// Lane j of the result = sum of the 16 lanes of v[j] (a transposing add tree: 24 shuffles and
// adds for 8 sums instead of 8 separate reductions).
inline __m256 sum8(const __m512 v[8]) {
  __m512 p[4], q[2];
  for (int j = 0; j < 4; ++j) {
    p[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]),
                         _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
  }
  for (int j = 0; j < 2; ++j) {
    q[j] = _mm512_add_ps(_mm512_shuffle_ps(p[2 * j], p[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(p[2 * j], p[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  const __m512 r = _mm512_add_ps(_mm512_shuffle_f32x4(q[0], q[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_f32x4(q[0], q[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 t = _mm512_add_ps(r, _mm512_shuffle_f32x4(r, r, _MM_SHUFFLE(2, 3, 0, 1)));
  // t's 128-bit lanes: [v0-3, v0-3, v4-7, v4-7]
  return _mm512_castps512_ps256(_mm512_shuffle_f32x4(t, t, _MM_SHUFFLE(2, 0, 2, 0)));
}

// One tile: rows n0..n0+tr-1 (tr <= kRn) times activation rows m0..m0+tm-1 (tm <= kRm), over
// units u0..u1-1; y is stored (first K chunk) or added to. Rows past the tile's end repeat its
// last row and are never stored, so the loops stay branch-free. swf: the rows' scales of these
// units (gn apart), sx: activation steps from the chunk's first block (bpad apart). A last
// unit whose second half is K padding (half_tail) only runs its first half.
template <int C, int G, int kRn, int kRm>
void tile(const PackedMatmul& a, const __m512i* xbuf, int64_t u0, int64_t u1, bool half_tail,
          int64_t n0, int tr, int64_t m0, int tm, const float* swf, int64_t gn, const float* sx,
          int64_t bpad, bool accumulate, float* y) {
  using K = Cfg<C, G>;
  constexpr int kRaw = C == 8 ? 2 : 1;
  constexpr int64_t kUnitBytes = K::kUnitBytes;
  constexpr int64_t kMaxSlots = K::chunk_units(kRm) * K::kSlots;
  const __m512i low_bits = _mm512_set1_epi16(C == 2 ? 3 : 15);
  const __m512i half_idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const uint8_t* rows[kRn];
  for (int r = 0; r < kRn; ++r) rows[r] = a.packed + (n0 + std::min(r, tr - 1)) * a.row_bytes;
  const __m512i* xs[kRm];
  const int64_t units = (a.kp / kB + K::kUnitBlocks - 1) / K::kUnitBlocks;
  for (int i = 0; i < kRm; ++i) {
    xs[i] = xbuf + x_offset(m0 + std::min(i, tm - 1), 0, units, kRm) * K::kUnitVecs;
  }
  const int64_t ustride = kRm * K::kUnitVecs;

  // c[(r * kRm + i) * kMaxSlots + slot]: row scale * activation step, the one factor of each
  // int32 acc half
  alignas(64) float c[kRn * kRm * kMaxSlots];
  if constexpr (G == kB) {  // slots are blocks, in order
    const int64_t nb = (u1 - u0) * K::kUnitBlocks;
#pragma GCC unroll 16
    for (int r = 0; r < kRn; ++r) {
      const float* sw = swf + std::min(r, tr - 1) * gn;
#pragma GCC unroll 16
      for (int i = 0; i < kRm; ++i) {
        const float* sa = sx + (m0 + std::min(i, tm - 1)) * bpad;
        for (int64_t b = 0; b < nb; b += 16) {
          const __mmask16 mask = tail_mask(nb - b);
          _mm512_mask_storeu_ps(c + (r * kRm + i) * kMaxSlots + b, mask,
                                _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, sw + b),
                                              _mm512_maskz_loadu_ps(mask, sa + b)));
        }
      }
    }
  } else {
    combined_scales<C, G>(swf, gn, tr, kRn, sx, bpad, m0, tm, kRm, kMaxSlots, u1 - u0, c);
  }

  __m512 accf[kRn][kRm];
#pragma GCC unroll 16
  for (int r = 0; r < kRn; ++r) {
#pragma GCC unroll 16
    for (int i = 0; i < kRm; ++i) accf[r][i] = _mm512_setzero_ps();
  }
  // Rows are only a few KB long: the hardware prefetchers lose each one before they have
  // learned it. Fetch the same unit kPrefetchRows rows ahead instead (the last rows fetch
  // themselves again). Long rows at M = 1 stream each weight once, from memory: they fetch
  // into L2, whose queue keeps more lines in flight than L1's, and the L1 prefetcher brings
  // them on from there (C8 in bench/README.md: 1.2-1.5x the cold rate of L1 fetches).
  constexpr int64_t kPrefetchRows = 8;
  const uint8_t* ahead[kRn];
  for (int r = 0; r < kRn; ++r) {
    const int64_t row = n0 + std::min(r, tr - 1) + kPrefetchRows;
    ahead[r] = row < a.n ? a.packed + row * a.row_bytes : rows[r];
  }
  auto unit = [&](int64_t u, auto half) __attribute__((always_inline)) {
    constexpr bool kHalf = decltype(half)::value;  // fields of elements 0-63 only (4/8-bit)
#pragma GCC unroll 16
    for (int r = 0; r < kRn; ++r) {
#pragma GCC unroll 2
      for (int h = 0; h < kRaw; ++h) {
        const char* line = reinterpret_cast<const char*>(ahead[r] + u * kUnitBytes + 64 * h);
        if constexpr (kRn == 1 && kRm == 1) {  // long rows at M = 1 (single_row_tiles)
          _mm_prefetch(line, _MM_HINT_T1);
        } else {
          _mm_prefetch(line, _MM_HINT_T0);
        }
      }
    }
    __m512i raw[kRn][kRaw];
    __m512i acc[kRn][kRm][K::kAccs];
#pragma GCC unroll 16
    for (int r = 0; r < kRn; ++r) {
#pragma GCC unroll 2
      for (int h = 0; h < (kHalf ? 1 : kRaw); ++h) {
        raw[r][h] = _mm512_loadu_si512(rows[r] + u * kUnitBytes + 64 * h);
      }
    }
#pragma GCC unroll 16
    for (int i = 0; i < kRm; ++i) {
      const __m512i* xu = xs[i] + u * ustride;
#pragma GCC unroll 4
      for (int j = 0; j < K::kAccs; ++j) {
        __m512i init = _mm512_setzero_si512();
        if constexpr (K::kUnsigned) {
          init = _mm512_load_si512(xu + K::kVecs + j);
          in_register(init);
        }
#pragma GCC unroll 16
        for (int r = 0; r < kRn; ++r) acc[r][i][j] = init;
      }
    }
#pragma GCC unroll 8
    for (int t = 0; t < K::kVecs; ++t) {
      if (kHalf && (t & 1)) continue;  // t = 1, 3: elements 64-127
      __m512i d[kRn];
#pragma GCC unroll 16
      for (int r = 0; r < kRn; ++r) d[r] = field<C>(raw[r], t, low_bits);
#pragma GCC unroll 16
      for (int i = 0; i < kRm; ++i) {
        __m512i x = _mm512_load_si512(xs[i] + u * ustride + t);
        in_register(x);
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
        const float* cp = c + (r * kRm + i) * kMaxSlots + (u - u0) * K::kSlots;
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
  };
  const int64_t full_end = (C != 2 && half_tail) ? u1 - 1 : u1;
  for (int64_t u = u0; u < full_end; ++u) unit(u, std::false_type{});
  if (full_end < u1) unit(full_end, std::true_type{});

  constexpr int kOut = kRn * kRm, kSums = (kOut + 7) / 8 * 8;
  __m512 flat[kSums];
#pragma GCC unroll 16
  for (int j = 0; j < kSums; ++j) flat[j] = j < kOut ? accf[j / kRm][j % kRm] : _mm512_setzero_ps();
  alignas(32) float sums[kSums];
#pragma GCC unroll 2
  for (int j = 0; j < kSums; j += 8) _mm256_store_ps(sums + j, sum8(flat + j));
  for (int r = 0; r < tr; ++r) {
    for (int i = 0; i < tm; ++i) {
      float& out = y[(m0 + i) * a.n + n0 + r];
      out = accumulate ? out + sums[r * kRm + i] : sums[r * kRm + i];
    }
  }
}

// Loop nest of one task (row tiles t0..t1-1): K in chunks whose activations (kRm rows) stay in
// L1, rows in blocks whose packed chunk stays in L2, then activation tiles, then row tiles.
template <int C, int G, int kRn, int kRm>
void run_tiles(const PackedMatmul& a, const __m512i* xbuf, const float* sx, int64_t units,
               float* y) {
  using K = Cfg<C, G>;
  constexpr int64_t kUnitBytes = K::kUnitBytes;
  constexpr int64_t kGroupsPerUnit = K::kUnitBlocks * (kB / G);
  const int64_t bpad = units * K::kUnitBlocks;
  const int64_t chunk = std::min(units, K::chunk_units(kRm));
  const int64_t block_tiles = std::max<int64_t>(1, (256 << 10) / (kRn * chunk * kUnitBytes));
  const int64_t tiles = (a.n + kRn - 1) / kRn;
  // the last block holds at most kB / 2 real elements: its second half is padding
  const bool half_tail = a.k - (a.kp - kB) <= kB / 2;
  at::parallel_for(0, tiles, task_grain(std::max(1, 16 / kRn), kRn * a.kp * a.m),
                   [&](int64_t t0, int64_t t1) {
    const int64_t gn_max = chunk * kGroupsPerUnit;
    const int64_t rows_max = std::min(t1 - t0, block_tiles) * kRn;
    float* swf = tile_scratch(rows_max * gn_max);
    // one K chunk (units u0..) of one row block (tiles b0..)
    auto chunk_of_block = [&](int64_t u0, int64_t b0) {
      const int64_t u1 = std::min(units, u0 + chunk);
      const int64_t g0 = u0 * kGroupsPerUnit, gn = (u1 - u0) * kGroupsPerUnit;
      const int64_t b1 = std::min(t1, b0 + block_tiles);
      const int64_t r1 = std::min(a.n, b1 * kRn);
      for (int64_t n = b0 * kRn; n < r1; ++n) {
        row_scales_f32(a, n, g0, gn, swf + (n - b0 * kRn) * gn);
      }
      for (int64_t m0 = 0; m0 < a.m; m0 += kRm) {
        const int tm = static_cast<int>(std::min<int64_t>(kRm, a.m - m0));
        for (int64_t t = b0; t < b1; ++t) {
          const int64_t n0 = t * kRn;
          const int tr = static_cast<int>(std::min<int64_t>(kRn, a.n - n0));
          tile<C, G, kRn, kRm>(a, xbuf, u0, u1, half_tail && u1 == units, n0, tr, m0, tm,
                               swf + (t - b0) * kRn * gn, gn, sx + u0 * K::kUnitBlocks, bpad,
                               u0 > 0, y);
        }
      }
    };
    if constexpr (kRm == 1) {  // M = 1: a block's chunks in turn, so rows are read block by block
      for (int64_t b0 = t0; b0 < t1; b0 += block_tiles) {
        for (int64_t u0 = 0; u0 < units; u0 += chunk) chunk_of_block(u0, b0);
      }
    } else {
      for (int64_t u0 = 0; u0 < units; u0 += chunk) {
        for (int64_t b0 = t0; b0 < t1; b0 += block_tiles) chunk_of_block(u0, b0);
      }
    }
  });
}

// M = 1 on long rows: one row per tile, so each thread reads the weight as one sequential
// stream (4-row tiles make 4 streams a few KB apart, which the prefetchers serve worse; rates in
// bench/README.md). Short rows keep the multi-row tiles: their per-row overhead dominates there.
// RFQ_PACKED_M1_ROWS=1 or 4 forces one choice (tuning, tests).
inline bool single_row_tiles(const PackedMatmul& a) {
  static const int forced = [] {
    const char* e = std::getenv("RFQ_PACKED_M1_ROWS");
    return e ? std::atoi(e) : 0;
  }();
  if (forced) return forced == 1;
  return a.row_bytes >= 1024;
}

// Tile shapes: as many accumulators as the 32 zmm registers hold without spilling.
// (kRm must be tile_m(M): the activation buffer is laid out for it.)
template <int C, int G>
void run(const PackedMatmul& a, const __m512i* xbuf, const float* sx, int64_t units, float* y) {
  if constexpr (G == kB) {
    if (tile_m(a.m) == 1) {
      if (single_row_tiles(a)) return run_tiles<C, G, 1, 1>(a, xbuf, sx, units, y);
      return run_tiles<C, G, 4, 1>(a, xbuf, sx, units, y);
    }
    return run_tiles<C, G, 2, 4>(a, xbuf, sx, units, y);
  } else {
    if (tile_m(a.m) == 1) {
      if (single_row_tiles(a)) return run_tiles<C, G, 1, 1>(a, xbuf, sx, units, y);
      return run_tiles<C, G, 2, 1>(a, xbuf, sx, units, y);
    }
    return run_tiles<C, G, 1, 4>(a, xbuf, sx, units, y);
  }
}

}  // namespace RFQ_PACKED_BODY_NS
