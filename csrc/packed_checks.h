// Argument checks of the packed-weight ops, shared by the CPU and CUDA implementations so that
// both reject the same inputs with the same messages (tests/test_packed.py runs them on each).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "lsq_checks.h"
#include "packed_layout.h"

namespace rfq {

inline void check_packed(const char* op, const at::Tensor& packed_w, int64_t k, int64_t bits) {
  TORCH_CHECK(packed_w.scalar_type() == at::kByte, op,
              ": packed must be uint8 (from pack_weight), got ", packed_w.scalar_type());
  TORCH_CHECK(packed_w.dim() == 2, op, ": packed must be 2-D [N, row_bytes], got shape ",
              packed_w.sizes());
  TORCH_CHECK(packed_w.size(1) == packed::row_bytes(k, bits), op, ": packed rows hold ",
              packed_w.size(1), " bytes but K=", k, " at ", bits, " bits needs ",
              packed::row_bytes(k, bits), " (wrong bits, K or layout)");
}

inline void check_unpack(const char* op, const at::Tensor& packed_w, int64_t bits,
                         c10::IntArrayRef shape) {
  check_bit(op, "bits", bits);
  TORCH_CHECK(shape.size() == 2 && shape[0] >= 0 && shape[1] >= 0, op,
              ": shape must be [N, K], got ", shape);
  check_packed(op, packed_w, shape[1], bits);
  TORCH_CHECK(packed_w.size(0) == shape[0], op, ": packed has ", packed_w.size(0),
              " rows but shape asks for N=", shape[0]);
}

// The sizes of y = x · dequant(W)^T: m rows of x (all leading dims), k, n, scale groups per row.
struct LinearDims {
  int64_t m, k, n, groups;
  std::vector<int64_t> out_shape;  // x's shape with K replaced by N
};

inline LinearDims check_packed_linear(const char* op, const at::Tensor& x,
                                      const at::Tensor& packed_w, const at::Tensor& scales,
                                      const std::optional<at::Tensor>& zeros, int64_t bits,
                                      int64_t group_size, const std::optional<at::Tensor>& bias) {
  check_x(op, x);
  check_bit(op, "bits", bits);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have a last dimension K, got a 0-dim tensor");
  const int64_t k = x.size(-1);
  check_packed(op, packed_w, k, bits);
  const int64_t n = packed_w.size(0);
  TORCH_CHECK(group_size == 0 || group_size == 32 || group_size == 64 || group_size == 128, op,
              ": group_size must be 0 (per-tensor) or 32, 64, 128, got ", group_size);
  for (const auto* t : {&packed_w, &scales}) {
    TORCH_CHECK(t->device() == x.device(), op, ": all tensors must be on x's device");
  }
  TORCH_CHECK(at::isFloatingType(scales.scalar_type()), op, ": scales must be floating point, got ",
              scales.scalar_type());
  const int64_t groups = group_size ? (k + group_size - 1) / group_size : 1;
  if (group_size == 0) {
    TORCH_CHECK(scales.numel() == 1, op, ": per-tensor scales must hold one value, got shape ",
                scales.sizes());
    TORCH_CHECK(!zeros.has_value(), op, ": zeros need group-wise scales (group_size 32/64/128)");
  } else {
    TORCH_CHECK(scales.dim() == 2 && scales.size(0) == n && scales.size(1) == groups, op,
                ": scales must be [N, ceil(K/group_size)] = [", n, ", ", groups, "], got ",
                scales.sizes());
    if (zeros.has_value()) {
      TORCH_CHECK(zeros->sizes() == scales.sizes(), op, ": zeros must have scales' shape ",
                  scales.sizes(), ", got ", zeros->sizes());
      TORCH_CHECK(at::isFloatingType(zeros->scalar_type()), op, ": zeros must be floating point");
      TORCH_CHECK(zeros->device() == x.device(), op, ": zeros must be on x's device");
    }
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, op, ": bias must be [N] = [", n,
                "], got ", bias->sizes());
    TORCH_CHECK(bias->device() == x.device(), op, ": bias must be on x's device");
  }
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = n;
  return {k ? x.numel() / k : 0, k, n, groups, std::move(out_shape)};
}

// packed_linear's fused input quantizer: x_step one fp32 value on x's device, x_bits a valid
// bit-width. Its value is checked where it can be read without a host sync (the CPU wrapper).
inline void check_input_quant(const char* op, const at::Tensor& x,
                              const std::optional<at::Tensor>& x_step, int64_t x_bits) {
  if (!x_step.has_value()) return;
  check_bit(op, "x_bits", x_bits);
  TORCH_CHECK(x_step->device() == x.device(), op, ": x_step must be on x's device (", x.device(),
              "), got ", x_step->device());
  TORCH_CHECK(x_step->scalar_type() == at::kFloat, op, ": x_step must be float32, got ",
              x_step->scalar_type());
  TORCH_CHECK(x_step->numel() == 1, op, ": x_step must hold one value, got shape ",
              x_step->sizes());
}

// An empty product (M, N or K = 0): y is the bias broadcast over the rows (zeros without bias).
inline bool is_empty_product(const LinearDims& d) { return d.m == 0 || d.n == 0 || d.k == 0; }

inline at::Tensor empty_product(const LinearDims& d, const at::Tensor& x,
                                const std::optional<at::Tensor>& bias) {
  at::Tensor y = at::zeros(d.out_shape, x.options());
  if (bias.has_value() && y.numel() > 0) y.add_(bias->to(y.scalar_type()));
  return y;
}

}  // namespace rfq
