// CPU implementations of pack_weight, unpack_weight and packed_linear (layout:
// csrc/packed_layout.h). packed_linear reads the packed weight once per call: small M runs the
// decode-in-L1 kernel (packed_kernels.h); large M, where the FMAs dominate, dequantizes row tiles
// that stay in cache and hands each to MKL (spec §3: the dispatcher's fallback).

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "cpu/huge_pages.h"
#include "cpu/lsq_kernels.h"
#include "cpu/packed_kernels.h"
#include "packed_checks.h"
#include "packed_layout.h"
#include "quant_range.h"

namespace rfq::cpu {

const PackedKernels& packed_kernels() {
  static const PackedKernels* table = [] {
#ifdef RFQ_X86_DISPATCH
    const std::string cap = at::get_cpu_capability();
    if (cap == "AVX512") return &AVX512::kPackedKernels;
    if (cap == "AVX2") return &AVX2::kPackedKernels;
#endif
    return &DEFAULT::kPackedKernels;
  }();
  return *table;
}

namespace {

// From this many activation rows on, packed_linear dequantizes row tiles and calls MKL; each
// kernel level brings its default (PackedKernels::gemm_min_m) and RFQ_PACKED_GEMM_MIN_M
// overrides it (read once) for tuning on other machines.
int64_t gemm_min_m(const PackedKernels& kernels) {
  static const int64_t forced = [] {
    const char* env = std::getenv("RFQ_PACKED_GEMM_MIN_M");
    return env ? std::max<int64_t>(1, std::atoll(env)) : int64_t{0};
  }();
  return forced ? forced : kernels.gemm_min_m;
}
constexpr int64_t kGemmTileN = 512;  // dequantized rows per MKL call: 512 x 4608 fp32 = 9 MB (L3)
constexpr int64_t kGemmWholeFloats = int64_t{4} << 20;  // up to 16 MB: dequantize whole, one call

// Per-thread fp32 scratch that only grows: the quantized input codes (slot 0) and the dequantized
// weight tiles (slot 1) are rewritten every call, and fresh multi-MB buffers would fault in new
// pages each time.
float* scratch_floats(int64_t count, int slot) {
  thread_local std::vector<float> buffers[2];
  std::vector<float>& b = buffers[slot];
  if (static_cast<int64_t>(b.size()) < count) b.resize(count);
  return b.data();
}

FloatKind float_kind(at::ScalarType t) {
  return t == at::kBFloat16 ? FloatKind::kBFloat16
                            : (t == at::kHalf ? FloatKind::kFloat16 : FloatKind::kFloat32);
}

// Packed weights are long-lived and streamed whole by every small-M call. On 4 KB pages the
// rows' TLB misses cap that stream; 2 MB pages remove them (rates in bench/README.md), so
// pack_weight asks for them on its output before the first touch.

at::Tensor pack_weight(const at::Tensor& codes, int64_t bits) {
  constexpr const char* op = "rfq.pack_weight";
  check_bit(op, "bits", bits);
  TORCH_CHECK(codes.scalar_type() == at::kChar, op,
              ": codes must be int8 (quantize_codes of a signed weight), got ", codes.scalar_type());
  TORCH_CHECK(codes.dim() == 2, op, ": codes must be 2-D [N, K] (flatten conv weights to ",
              "[C_out, C_in*kh*kw]), got shape ", codes.sizes());
  const at::Tensor c = codes.contiguous();
  const int64_t n = c.size(0), k = c.size(1);
  const auto [lo, hi, binary] = quant_range<int64_t>(bits, /*is_signed=*/true);
  const int8_t* src = c.const_data_ptr<int8_t>();
  for (int64_t i = 0; i < n * k; ++i) {  // cheap next to packing, and catches wrong bit-widths
    TORCH_CHECK(src[i] >= lo && src[i] <= hi && !(binary && src[i] == 0), op, ": codes[",
                i / k, ", ", i % k, "] = ", int(src[i]), " is not a signed ", bits,
                "-bit code (range [", lo, ", ", hi, "]", binary ? ", binary: -1 or +1" : "",
                ")");
  }
  const int64_t rb = packed::row_bytes(k, bits), kp = packed::padded_k(k);
  const int64_t cb = packed::container_bits(bits), off = packed::code_offset(bits);
  at::Tensor out = at::empty({n, rb}, c.options().dtype(at::kByte));
  advise_huge_pages(out, 0);
  out.zero_();  // the row padding stays 0
  uint8_t* dst = out.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    std::vector<uint8_t> u(kp);
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t j = 0; j < kp; ++j) u[j] = static_cast<uint8_t>((j < k ? src[r * k + j] : 0) + off);
      uint8_t* row = dst + r * rb;
      for (int64_t b = 0; b < kp / packed::kBlockK; ++b) {
        const uint8_t* ub = u.data() + b * packed::kBlockK;
        uint8_t* pb = row + b * packed::block_bytes(bits);
        if (cb == 4) {
          constexpr int kBytes = packed::block_bytes(4);  // byte j: elements j, j + kBytes
          for (int j = 0; j < kBytes; ++j) pb[j] = ub[j] | (ub[j + kBytes] << 4);
        } else if (cb == 2) {
          constexpr int kBytes = packed::block_bytes(2);  // byte j: j + f * kBytes, f = 0..3
          for (int j = 0; j < kBytes; ++j) {
            pb[j] = ub[j] | (ub[j + kBytes] << 2) | (ub[j + 2 * kBytes] << 4) |
                    (ub[j + 3 * kBytes] << 6);
          }
        } else {
          std::memcpy(pb, ub, packed::kBlockK);
        }
      }
    }
  });
  return out;
}

at::Tensor unpack_weight(const at::Tensor& packed, int64_t bits, c10::IntArrayRef shape) {
  constexpr const char* op = "rfq.unpack_weight";
  check_unpack(op, packed, bits, shape);
  const at::Tensor p = packed.contiguous();
  const int64_t n = shape[0], k = shape[1], rb = p.size(1);
  const int64_t cb = packed::container_bits(bits), off = packed::code_offset(bits);
  at::Tensor out = at::empty({n, k}, p.options().dtype(at::kChar));
  const uint8_t* src = p.const_data_ptr<uint8_t>();
  int8_t* dst = out.mutable_data_ptr<int8_t>();
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t j = 0; j < k; ++j) {
        const uint8_t* pb = src + r * rb + (j / packed::kBlockK) * packed::block_bytes(bits);
        const int64_t e = j % packed::kBlockK;
        int64_t u;
        if (cb == 4) {
          constexpr int64_t kBytes = packed::block_bytes(4);
          u = e < kBytes ? (pb[e] & 15) : (pb[e - kBytes] >> 4);
        } else if (cb == 2) {
          constexpr int64_t kBytes = packed::block_bytes(2);
          u = (pb[e % kBytes] >> (2 * (e / kBytes))) & 3;
        } else {
          u = static_cast<int8_t>(pb[e]);
        }
        dst[r * k + j] = static_cast<int8_t>(u - off);
      }
    }
  });
  return out;
}

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                         const std::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size,
                         const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& x_step, int64_t x_bits, bool x_signed) {
  constexpr const char* op = "rfq.packed_linear";
  const LinearDims dims =
      check_packed_linear(op, x, packed, scales, zeros, bits, group_size, bias);
  check_input_quant(op, x, x_step, x_bits);
  const float in_step = x_step.has_value() ? *x_step->const_data_ptr<float>() : 1.f;
  TORCH_CHECK(std::isfinite(in_step) && in_step > 0.f, op,
              ": x_step must be a finite positive step size, got ", in_step);
  const int64_t m = dims.m, k = dims.k, n = dims.n, groups = dims.groups;

  const auto f32 = x.options().dtype(at::kFloat);
  if (is_empty_product(dims)) return empty_product(dims, x, bias);

  const int64_t kp = packed::padded_k(k);
  at::Tensor x2 = x.reshape({m, k}).contiguous();
  if (x_step.has_value()) {  // the input quantizer as this op's activation stage: exact fp32 codes
    at::Tensor codes = at::from_blob(scratch_floats(m * k, 0), {m, k}, f32);
    lsq_kernels().codes_float(x2.scalar_type(), x2.const_data_ptr(),
                              codes.mutable_data_ptr<float>(), m * k,
                              make_spec(x_bits, x_signed, in_step));
    x2 = codes;
  }
  // fp32, bf16 and fp16 scales are read in place; other float types once converted
  const auto sdt = scales.scalar_type();
  const at::Tensor s = (sdt == at::kFloat || sdt == at::kBFloat16 || sdt == at::kHalf)
                           ? scales.contiguous()
                           : scales.to(at::kFloat).contiguous();
  const at::Tensor packed_c = packed.contiguous();
  // per-tensor: one scale for every "group" of 128 (strides 0)
  const PackedMatmul args{x2.const_data_ptr(), float_kind(x2.scalar_type()), m, k, kp,
                          packed_c.const_data_ptr<uint8_t>(), packed.size(1),
                          packed::container_bits(bits), n, s.const_data_ptr(),
                          float_kind(s.scalar_type()), group_size ? groups : 0,
                          group_size ? 1 : 0, groups, group_size ? group_size : packed::kBlockK,
                          x_step.has_value()};

  at::Tensor y = at::empty({m, n}, f32);
  const PackedKernels& kernels = packed_kernels();
  if (m < gemm_min_m(kernels)) {
    kernels.matmul(args, y.mutable_data_ptr<float>());
  } else {
    const at::Tensor xf = x2.to(at::kFloat);
    if (n * kp <= kGemmWholeFloats) {  // small weight: one dequantize, one MKL call into y
      at::Tensor w = at::from_blob(scratch_floats(n * kp, 1), {n, kp}, f32);
      kernels.dequantize_rows(args, 0, n, w.mutable_data_ptr<float>());
      at::mm_out(y, xf, w.narrow(1, 0, k).t());
    } else {
      at::Tensor w = at::from_blob(scratch_floats(std::min(n, kGemmTileN) * kp, 1),
                                   {std::min(n, kGemmTileN), kp}, f32);
      for (int64_t n0 = 0; n0 < n; n0 += kGemmTileN) {
        const int64_t rows = std::min(kGemmTileN, n - n0);
        kernels.dequantize_rows(args, n0, n0 + rows, w.mutable_data_ptr<float>());
        y.narrow(1, n0, rows).copy_(at::mm(xf, w.narrow(0, 0, rows).narrow(1, 0, k).t()));
      }
    }
  }
  if (zeros.has_value()) {  // w = (u - z) s = q s + (offset - z) s: add xsum_g (offset - z) s
    const double off = static_cast<double>(packed::code_offset(bits));
    const at::Tensor sf = s.to(at::kFloat);
    const at::Tensor zterm = sf.mul(zeros->to(at::kFloat).neg().add(off)).contiguous();  // [N, G]
    at::Tensor xg = at::zeros({m, groups * group_size}, f32);
    xg.narrow(1, 0, k).copy_(x2);
    y.addmm_(xg.view({m, groups, group_size}).sum(-1), zterm.t());
  }
  if (x_step.has_value() || bias.has_value()) {  // y = s_x (k @ W^T) + bias, one pass over y
    const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
    const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
    float* yp = y.mutable_data_ptr<float>();
    at::parallel_for(0, m, std::max<int64_t>(1, (int64_t{1} << 16) / n), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        float* row = yp + r * n;
        for (int64_t j = 0; j < n; ++j) row[j] = row[j] * in_step + (bp ? bp[j] : 0.f);
      }
    });
  }
  return y.to(x.scalar_type()).reshape(dims.out_shape);
}

}  // namespace
}  // namespace rfq::cpu

TORCH_LIBRARY_IMPL(rfq, CPU, m) {
  m.impl("pack_weight", &rfq::cpu::pack_weight);
  m.impl("unpack_weight", &rfq::cpu::unpack_weight);
  m.impl("packed_linear", &rfq::cpu::packed_linear);
}
