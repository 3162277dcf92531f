// The packed weight layout (../shared/spec/kernels.md §3, canonical CPU layout), shared by the
// pack/unpack ops and every packed matmul kernel.
//
//   containers   bits 1-2 -> 2-bit, 3-4 -> 4-bit, 5-8 -> int8
//   codes        offset-binary u = q + 2 (2-bit), u = q + 8 (4-bit); int8 stores q itself
//   rows         row-major over N; each row is a run of 128-element K-blocks
//   4-bit block  64 bytes: byte j holds element j (low nibble) and j + 64 (high nibble)
//   2-bit block  32 bytes: byte j holds j, j + 32, j + 64, j + 96 at bit offsets 0, 2, 4, 6
//   int8 block   128 bytes, element j in byte j
//   padding      K is padded to a multiple of 128 with q = 0; each row to a multiple of 64 bytes
//
// One SIMD load plus a mask/shift gives a contiguous run of codes, so activations need no shuffle.
#pragma once

#include <cstdint>

#include "quant_range.h"  // RFQ_HOST_DEVICE, kMaxBits

// constexpr and __host__ __device__ under nvcc: the CUDA kernels use these in device code. A
// container's own width maps to itself (container_bits(4) == 4), so every function taking `bits`
// also takes container bits. Python twin: rfq/ops/layout.py.
namespace rfq::packed {

constexpr int64_t kBlockK = 128;
constexpr int64_t kRowAlign = 64;

RFQ_HOST_DEVICE constexpr int64_t container_bits(int64_t bits) {
  return bits <= 2 ? 2 : (bits <= 4 ? 4 : 8);
}

// u - q for the container: what a stored code minus the offset gives back.
RFQ_HOST_DEVICE constexpr int64_t code_offset(int64_t bits) {
  const int64_t c = container_bits(bits);
  return c == 2 ? 2 : (c == 4 ? 8 : 0);
}

// Bytes of one K-block; a 2/4-bit block's byte j holds elements j + f * block_bytes, field f at
// bit offset f * container_bits.
RFQ_HOST_DEVICE constexpr int64_t block_bytes(int64_t bits) {
  return kBlockK * container_bits(bits) / 8;
}

RFQ_HOST_DEVICE constexpr int64_t padded_k(int64_t k) {
  return (k + kBlockK - 1) / kBlockK * kBlockK;
}

// Bytes of a row's K-blocks, before the row padding.
RFQ_HOST_DEVICE constexpr int64_t data_bytes(int64_t k, int64_t bits) {
  return padded_k(k) / kBlockK * block_bytes(bits);
}

RFQ_HOST_DEVICE constexpr int64_t row_bytes(int64_t k, int64_t bits) {
  return (data_bytes(k, bits) + kRowAlign - 1) / kRowAlign * kRowAlign;
}

static_assert(container_bits(kMaxBits) == 8, "the widest candidate must fit the int8 container");

}  // namespace rfq::packed
