// The quantizer's range facts (../shared/spec/kernels.md §1), stated once for the CPU wrappers and
// kernels, the CUDA host code and CUDA device code (constexpr; __host__ __device__ under nvcc).
// Python twin: rfq/ops/layout.py. Error messages are built from these constants.
//
//   bit-width    every candidate in kMinBits..kMaxBits (1..8)
//   candidates   at most kMaxCandidates (K = 8) per quantizer, one step each
//   range        signed b >= 2: [-2^(b-1), 2^(b-1) - 1]; unsigned: [0, 2^b - 1];
//                signed 1-bit: binary, codes {-1, +1} by sign (no zero, not rint)
//   CSQ planes   a csq_weight has N bit planes, N in kCsqMinPlanes..kCsqMaxPlanes (2..8)
#pragma once

#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define RFQ_HOST_DEVICE __host__ __device__
#else
#define RFQ_HOST_DEVICE
#endif

namespace rfq {

constexpr int kMinBits = 1;
constexpr int kMaxBits = 8;
constexpr int kMaxCandidates = 8;
constexpr int kCsqMinPlanes = 2;
constexpr int kCsqMaxPlanes = 8;

// Integer code range [qn, qp] of one candidate, as T: int64_t for codes, float for the kernels'
// compares (every bound is exact in fp32). `binary`: signed 1-bit.
template <typename T>
struct QuantRange {
  T qn;
  T qp;
  bool binary;
};

RFQ_HOST_DEVICE constexpr bool bits_ok(int64_t bits) {
  return bits >= kMinBits && bits <= kMaxBits;
}

// bits must satisfy bits_ok (the op wrappers check it first).
template <typename T>
RFQ_HOST_DEVICE constexpr QuantRange<T> quant_range(int64_t bits, bool is_signed) {
  if (is_signed && bits == 1) return {T(-1), T(1), true};
  if (is_signed) {
    const int64_t half = int64_t{1} << (bits - 1);
    return {T(-half), T(half - 1), false};
  }
  return {T(0), T((int64_t{1} << bits) - 1), false};
}

// quantize_codes returns int8 codes for signed ranges and uint8 for unsigned ones.
static_assert(quant_range<int64_t>(kMaxBits, true).qn >= std::numeric_limits<int8_t>::min() &&
                  quant_range<int64_t>(kMaxBits, true).qp <= std::numeric_limits<int8_t>::max() &&
                  quant_range<int64_t>(kMaxBits, false).qp <= std::numeric_limits<uint8_t>::max(),
              "codes of the widest candidate must fit int8 (signed) / uint8 (unsigned)");

}  // namespace rfq
