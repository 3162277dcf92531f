// Interface between the packed-weight op wrappers (packed.cpp) and the per-ISA kernel files
// (packed_kernels_{default,avx2,avx512}.cpp), which all compile packed_kernels_impl.h.
#pragma once

#include <cstdint>

namespace rfq::cpu {

// Element types the kernels read directly, so the wrapper never converts x or scales per call.
enum class FloatKind : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Scales are read as scales[n * scale_row_stride + g * scale_group_stride] for group g of row n
// (per-tensor: both strides 0). Codes enter as q = u - offset; zero points are the wrapper's job.
struct PackedMatmul {
  const void* x;  // [m, k], contiguous rows of x_kind
  FloatKind x_kind;
  int64_t m;
  int64_t k;
  int64_t kp;  // k padded to whole 128-element blocks
  const uint8_t* packed;  // [n, row_bytes]
  int64_t row_bytes;
  int64_t container_bits;  // 2, 4 or 8
  int64_t n;
  const void* scales;
  FloatKind scale_kind;
  int64_t scale_row_stride;
  int64_t scale_group_stride;
  int64_t groups;      // scale columns that exist (per-tensor: 1); later groups are padding
  int64_t group_size;  // 32, 64 or 128 (per-tensor runs as 128 with one scale)
  bool x_codes;        // x holds integer codes (|k| <= 255): kernels that round x keep them exact
};

struct PackedKernels {
  // y[m, n] = sum_g scale(n, g) * sum_{k in g} q[n, k] * x[m, k]   (y: [m, n] fp32)
  void (*matmul)(const PackedMatmul& args, float* y);
  // w[r, k] = q[n0 + r, k] * scale(n0 + r, k / g) for r < n1 - n0 (w: [n1 - n0, kp] fp32)
  void (*dequantize_rows)(const PackedMatmul& args, int64_t n0, int64_t n1, float* w);
  // from this many activation rows on, dequantize + MKL beats `matmul` (bench/README.md)
  int64_t gemm_min_m;
};

namespace DEFAULT { extern const PackedKernels kPackedKernels; }
#ifdef RFQ_X86_DISPATCH
namespace AVX2 { extern const PackedKernels kPackedKernels; }
namespace AVX512 { extern const PackedKernels kPackedKernels; }
#endif

const PackedKernels& packed_kernels();

}  // namespace rfq::cpu
