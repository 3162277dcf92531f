// CPU implementations of the CSQ ops: checks (csq_checks.h), the per-plane coefficients from
// m, scale and beta (read directly: no sync on the CPU), then the best ISA's kernel table.

#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <string>
#include <tuple>

#include "cpu/csq_kernels.h"
#include "csq_checks.h"

namespace rfq::cpu {

const CsqKernels& csq_kernels() {
  static const CsqKernels* table = [] {
#ifdef RFQ_X86_DISPATCH
    const std::string cap = at::get_cpu_capability();  // honours ATEN_CPU_CAPABILITY
    if (cap == "AVX512") return &AVX512::kCsqKernels;
    if (cap == "AVX2") return &AVX2::kCsqKernels;
#endif
    return &DEFAULT::kCsqKernels;
  }();
  return *table;
}

namespace {

double read_one(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? *t.const_data_ptr<double>()
                                        : static_cast<double>(*t.const_data_ptr<float>());
}

// Per-plane factors in the op's dtype (fp32 results are rounded like the reference's fp32
// products): gate_i = g(beta m_i), coef_i = scale gate_i 2^(N-1-i) / (2^N - 1).
struct PlaneCoefs {
  std::array<double, kCsqMaxPlanes> gate{}, weight{}, coef{};
  double beta = 0.0, scale = 0.0, levels = 0.0;
};

PlaneCoefs plane_coefs(const at::Tensor& m, const at::Tensor& scale, const at::Tensor& beta) {
  PlaneCoefs c;
  const int64_t planes = m.size(0);
  const bool fp32 = m.scalar_type() == at::kFloat;
  const auto round = [fp32](double v) { return fp32 ? static_cast<double>(static_cast<float>(v)) : v; };
  const at::Tensor mc = m.contiguous();
  c.beta = read_one(beta);
  c.scale = read_one(scale);
  c.levels = static_cast<double>((int64_t{1} << planes) - 1);
  for (int64_t i = 0; i < planes; ++i) {
    const double mi = mc.scalar_type() == at::kDouble ? mc.const_data_ptr<double>()[i]
                                                      : mc.const_data_ptr<float>()[i];
    const double x = round(c.beta * mi);
    c.gate[i] = fp32 ? static_cast<double>(1.0f / (1.0f + std::exp(-static_cast<float>(x))))
                     : 1.0 / (1.0 + std::exp(-x));
    c.weight[i] = round(static_cast<double>(int64_t{1} << (planes - 1 - i)) / c.levels);
    c.coef[i] = round(round(c.scale * c.gate[i]) * c.weight[i]);
  }
  return c;
}

at::Tensor csq_weight_cpu(const at::Tensor& p, const at::Tensor& q, const at::Tensor& m,
                          const at::Tensor& scale, const at::Tensor& beta) {
  check_csq_args("rfq.csq_weight", p, q, m, scale, beta);
  const at::Tensor pc = p.contiguous(), qc = q.contiguous();
  const int64_t planes = p.size(0), n = planes ? p.numel() / planes : 0;
  at::Tensor w = at::empty(p.sizes().slice(1), p.options());
  if (n == 0) return w;
  const PlaneCoefs c = plane_coefs(m, scale, beta);
  csq_kernels().forward(p.scalar_type(), pc.const_data_ptr(), qc.const_data_ptr(),
                        w.mutable_data_ptr(), planes, n, c.coef.data(), c.beta);
  return w;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> csq_weight_backward_cpu(
    const at::Tensor& grad_w, const at::Tensor& p, const at::Tensor& q, const at::Tensor& m,
    const at::Tensor& scale, const at::Tensor& beta) {
  const char* op = "rfq.csq_weight_backward";
  check_csq_args(op, p, q, m, scale, beta);
  check_csq_grad(op, grad_w, p);
  const at::Tensor pc = p.contiguous(), qc = q.contiguous(), gc = grad_w.contiguous();
  const int64_t planes = p.size(0), n = p.numel() / planes;
  at::Tensor dp = at::empty(p.sizes(), p.options()), dq = at::empty(p.sizes(), p.options());
  std::array<double, kCsqMaxPlanes> sums{};
  const PlaneCoefs c = plane_coefs(m, scale, beta);
  if (n > 0) {
    csq_kernels().backward(p.scalar_type(), gc.const_data_ptr(), pc.const_data_ptr(),
                           qc.const_data_ptr(), dp.mutable_data_ptr(), dq.mutable_data_ptr(),
                           planes, n, c.coef.data(), c.beta, sums.data());
  }
  // dm_i = beta g_i (1 - g_i) 2^(N-1-i) scale / (2^N - 1) T_i; dscale = sum_i g_i 2^(N-1-i) /
  // (2^N - 1) T_i, in fp64, then one rounding to the op's dtype.
  at::Tensor dm = at::empty({planes}, m.options().dtype(at::kDouble));
  double* dmp = dm.mutable_data_ptr<double>();
  double ds = 0.0;
  for (int64_t i = 0; i < planes; ++i) {
    dmp[i] = c.beta * c.gate[i] * (1.0 - c.gate[i]) * c.weight[i] * c.scale * sums[i];
    ds += c.gate[i] * c.weight[i] * sums[i];
  }
  at::Tensor dscale = at::empty(scale.sizes(), scale.options().dtype(at::kDouble)).fill_(ds);
  return {dp, dq, dm.to(p.scalar_type()), dscale.to(p.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(rfq, CPU, m) {
  m.impl("csq_weight", &csq_weight_cpu);
  m.impl("csq_weight_backward", &csq_weight_backward_cpu);
}

}  // namespace rfq::cpu
