// CPU implementations of the LSQ op family: argument checks, layout, then the best ISA's kernel
// table (lsq_kernels.h). On CPU the step and sel values are read directly: that is no sync here,
// and it lets bad steps raise a named error (the CUDA kernels map them to NaN instead).

#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/contiguous.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <ATen/core/DimVector.h>

#include <array>
#include <optional>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "cpu/huge_pages.h"
#include "cpu/lsq_kernels.h"
#include "lsq_checks.h"

namespace rfq::cpu {

const LsqKernels& lsq_kernels() {
  static const LsqKernels* table = [] {
#ifdef RFQ_X86_DISPATCH
    const std::string cap = at::get_cpu_capability();  // honours ATEN_CPU_CAPABILITY
    if (cap == "AVX512") return &AVX512::kLsqKernels;
    if (cap == "AVX2") return &AVX2::kLsqKernels;
#endif
    return &DEFAULT::kLsqKernels;
  }();
  return *table;
}

namespace {

float read_step(const char* op, const at::Tensor& steps, int64_t j) {
  const float s = steps.const_data_ptr<float>()[j * steps.stride(0)];
  TORCH_CHECK(std::isfinite(s) && s > 0.f, op, ": steps[", j,
              "] must be a finite positive step size, got ", s);
  return s;
}

int64_t read_sel(const char* op, const at::Tensor& sel, int64_t k) {
  const int64_t j = *sel.const_data_ptr<int64_t>();
  TORCH_CHECK(j >= 0 && j < k, op, ": sel=", j, " is out of range for K=", k, " candidate bits");
  return j;
}

// The candidate `sel` picks, checked and resolved: its index and its spec (range and step).
struct Selected {
  int64_t j;
  QuantSpec q;
};

Selected selected_spec(const char* op, const at::Tensor& x, const at::Tensor& steps,
                       c10::IntArrayRef bits, const at::Tensor& sel, bool is_signed) {
  check_steps(op, x, steps, bits);
  check_sel(op, x, sel);
  const int64_t j = read_sel(op, sel, steps.numel());
  return {j, make_spec(bits[j], is_signed, read_step(op, steps, j))};
}

// K <= kMaxCandidates is checked by check_steps.
std::array<QuantSpec, kMaxCandidates> all_specs(const char* op, const at::Tensor& steps,
                                                c10::IntArrayRef bits, bool is_signed) {
  std::array<QuantSpec, kMaxCandidates> specs{};
  for (size_t j = 0; j < bits.size(); ++j) {
    specs[j] = make_spec(bits[j], is_signed, read_step(op, steps, static_cast<int64_t>(j)));
  }
  return specs;
}

at::Tensor coupled_quant(const at::Tensor& x, const at::Tensor& steps, c10::IntArrayRef bits,
                         const at::Tensor& sel, bool is_signed, double /*grad_scale*/) {
  constexpr const char* op = "rfq.coupled_quant";
  check_x(op, x);
  const auto [j, q] = selected_spec(op, x, steps, bits, sel, is_signed);
  const at::Tensor xd = dense_layout(x);
  at::Tensor y = at::empty_like(xd);
  lsq_kernels().forward(x.scalar_type(), xd.const_data_ptr(), y.mutable_data_ptr(), xd.numel(), q);
  return y;
}

std::tuple<at::Tensor, at::Tensor> coupled_quant_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& steps,
    c10::IntArrayRef bits, const at::Tensor& sel, bool is_signed, double grad_scale) {
  constexpr const char* op = "rfq.coupled_quant_backward";
  check_x(op, x);
  check_grad(op, grad_y, x, x.sizes());
  check_grad_scale(op, grad_scale);
  const auto [j, q] = selected_spec(op, x, steps, bits, sel, is_signed);
  const at::Tensor xd = dense_layout(x);
  const at::Tensor gd = in_layout_of(grad_y, xd);
  at::Tensor grad_x = at::empty_like(xd);
  at::Tensor grad_steps = at::zeros({steps.numel()}, steps.options());
  lsq_kernels().backward(x.scalar_type(), gd.const_data_ptr(), xd.const_data_ptr(),
                         grad_x.mutable_data_ptr(), xd.numel(), q, grad_scale,
                         grad_steps.mutable_data_ptr<float>() + j);
  return {grad_x, grad_steps};
}

// A fresh stacked K-plane output is large (128 MB for K=5 at 6.4M fp32); glibc maps it anew
// each call and its 4 KB first-touch faults cost several times the kernel. 2 MB pages (asked
// for from 32 MB on) make them rare.
constexpr size_t kHugePagesFrom = size_t{32} << 20;

at::DimVector stacked_shape(int64_t k, const at::Tensor& x) {
  at::DimVector shape{k};
  shape.insert(shape.end(), x.sizes().begin(), x.sizes().end());
  return shape;
}

at::Tensor coupled_quant_multi(const at::Tensor& x, const at::Tensor& steps,
                               c10::IntArrayRef bits, bool is_signed, double /*grad_scale*/) {
  constexpr const char* op = "rfq.coupled_quant_multi";
  check_x(op, x);
  check_steps(op, x, steps, bits);
  const auto specs = all_specs(op, steps, bits, is_signed);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(stacked_shape(steps.numel(), x), x.options());
  advise_huge_pages(y, kHugePagesFrom);
  lsq_kernels().forward_multi(x.scalar_type(), xc.const_data_ptr(), y.mutable_data_ptr(),
                              xc.numel(), specs.data(), steps.numel());
  return y;
}

std::tuple<at::Tensor, at::Tensor> coupled_quant_multi_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& steps,
    c10::IntArrayRef bits, bool is_signed, double grad_scale) {
  constexpr const char* op = "rfq.coupled_quant_multi_backward";
  check_x(op, x);
  check_steps(op, x, steps, bits);
  check_grad(op, grad_y, x, stacked_shape(steps.numel(), x));
  check_grad_scale(op, grad_scale);
  const auto specs = all_specs(op, steps, bits, is_signed);
  const at::Tensor xc = x.contiguous();
  const at::Tensor gc = grad_y.contiguous();
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_steps = at::empty({steps.numel()}, steps.options());
  lsq_kernels().backward_multi(x.scalar_type(), gc.const_data_ptr(), xc.const_data_ptr(),
                               grad_x.mutable_data_ptr(), xc.numel(), specs.data(),
                               steps.numel(), grad_scale, grad_steps.mutable_data_ptr<float>());
  return {grad_x, grad_steps};
}

std::tuple<at::Tensor, at::Tensor> quant_stats(const at::Tensor& x, const at::Tensor& steps,
                                               c10::IntArrayRef bits, bool is_signed,
                                               double delta) {
  constexpr const char* op = "rfq.quant_stats";
  check_x(op, x);
  check_steps(op, x, steps, bits);
  check_delta(op, delta);
  const auto specs = all_specs(op, steps, bits, is_signed);
  const at::Tensor xd = dense_layout(x);  // order does not matter to a reduction over all of x
  at::Tensor mse = at::empty({steps.numel()}, steps.options());
  at::Tensor share = at::empty({steps.numel()}, steps.options());
  // |v - rint(v)| > 1/2 - delta, with the threshold rounded once to fp32 (as the reference does).
  const float near_threshold = static_cast<float>(0.5 - delta);
  lsq_kernels().stats(x.scalar_type(), xd.const_data_ptr(), xd.numel(), specs.data(),
                      steps.numel(), near_threshold, static_cast<float>(delta),
                      mse.mutable_data_ptr<float>(), share.mutable_data_ptr<float>());
  return {mse, share};
}

at::Tensor quantize_codes(const at::Tensor& x, const at::Tensor& step, int64_t bits,
                          bool is_signed) {
  constexpr const char* op = "rfq.quantize_codes";
  check_codes_args(op, x, step, bits);
  const float s = *step.const_data_ptr<float>();
  TORCH_CHECK(std::isfinite(s) && s > 0.f, op, ": step must be a finite positive step size, got ",
              s);
  const at::Tensor xd = dense_layout(x);
  at::Tensor codes = at::empty_like(xd, xd.options().dtype(is_signed ? at::kChar : at::kByte));
  lsq_kernels().codes(x.scalar_type(), xd.const_data_ptr(), codes.mutable_data_ptr(),
                      xd.numel(), make_spec(bits, is_signed, s));
  return codes;
}

std::tuple<at::Tensor, at::Tensor> relu_quant(const at::Tensor& x, const at::Tensor& steps,
                                              c10::IntArrayRef bits, const at::Tensor& sel,
                                              double /*grad_scale*/) {
  constexpr const char* op = "rfq.relu_quant";
  check_x(op, x);
  const auto [j, q] = selected_spec(op, x, steps, bits, sel, /*is_signed=*/false);
  const at::Tensor xd = dense_layout(x);
  at::Tensor r = at::empty_like(xd);
  at::Tensor y = at::empty_like(xd);
  lsq_kernels().relu_forward(x.scalar_type(), xd.const_data_ptr(), r.mutable_data_ptr(),
                             y.mutable_data_ptr(), xd.numel(), q);
  return {r, y};
}

std::tuple<at::Tensor, at::Tensor> relu_quant_backward(
    const std::optional<at::Tensor>& grad_r, const std::optional<at::Tensor>& grad_y,
    const at::Tensor& x, const at::Tensor& steps, c10::IntArrayRef bits, const at::Tensor& sel,
    double grad_scale) {
  constexpr const char* op = "rfq.relu_quant_backward";
  check_x(op, x);
  check_grad_scale(op, grad_scale);
  const auto [j, q] = selected_spec(op, x, steps, bits, sel, /*is_signed=*/false);
  const at::Tensor xd = dense_layout(x);
  at::Tensor gr, gy;
  if (grad_r.has_value()) {
    check_grad(op, *grad_r, x, x.sizes());
    gr = in_layout_of(*grad_r, xd);
  }
  if (grad_y.has_value()) {
    check_grad(op, *grad_y, x, x.sizes());
    gy = in_layout_of(*grad_y, xd);
  }
  at::Tensor grad_x = at::empty_like(xd);
  at::Tensor grad_steps = at::zeros({steps.numel()}, steps.options());
  lsq_kernels().relu_backward(x.scalar_type(), gr.defined() ? gr.const_data_ptr() : nullptr,
                              gy.defined() ? gy.const_data_ptr() : nullptr, xd.const_data_ptr(),
                              grad_x.mutable_data_ptr(), xd.numel(), q, grad_scale,
                              grad_steps.mutable_data_ptr<float>() + j);
  return {grad_x, grad_steps};
}

// alpha = weight * invstd, beta = bias - mean * alpha, invstd = 1 / sqrt(var + eps): fp32, each
// operation rounded (the forward and the backward must see the same z = x * alpha + beta).
struct BnAffine {
  std::vector<float> alpha, beta, invstd;
};

BnAffine bn_affine(const at::Tensor& weight, const at::Tensor& bias, const float* mean,
                   const float* var, double eps) {
  const int64_t c = weight.numel();
  const at::Tensor wc = weight.contiguous(), bc = bias.contiguous();
  const float* w = wc.const_data_ptr<float>();
  const float* b = bc.const_data_ptr<float>();
  BnAffine a{std::vector<float>(c), std::vector<float>(c), std::vector<float>(c)};
  for (int64_t i = 0; i < c; ++i) {
    a.invstd[i] = 1.f / std::sqrt(var[i] + static_cast<float>(eps));
    a.alpha[i] = w[i] * a.invstd[i];
    a.beta[i] = b[i] - mean[i] * a.alpha[i];
  }
  return a;
}

// Batch mean and biased variance of xd (bn_layout) per channel, and the affine they give.
std::tuple<at::Tensor, at::Tensor, BnAffine> bn_batch_stats(const at::Tensor& xd,
                                                            const at::Tensor& weight,
                                                            const at::Tensor& bias, double eps) {
  at::Tensor mean = at::empty({xd.size(1)}, weight.options());
  at::Tensor var = at::empty({xd.size(1)}, weight.options());
  lsq_kernels().bn_stats(xd.const_data_ptr<float>(), bn_shape(xd),
                         mean.mutable_data_ptr<float>(), var.mutable_data_ptr<float>());
  BnAffine a = bn_affine(weight, bias, mean.const_data_ptr<float>(), var.const_data_ptr<float>(),
                         eps);
  return {mean, var, std::move(a)};
}

// Both forwards: (y, mean, var) and, with a teacher, mean((z - teacher)^2) as a 0-dim tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_quant_forward(
    const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    double eps, const at::Tensor& steps, c10::IntArrayRef bits, const at::Tensor& sel,
    bool is_signed, const at::Tensor* teacher) {
  check_bn_args(op, x, weight, bias, eps);
  const auto [j, q] = selected_spec(op, x, steps, bits, sel, is_signed);
  if (teacher) check_teacher(op, x, *teacher);
  const at::Tensor xd = bn_layout(x);
  const ChannelShape shape = bn_shape(xd);
  const auto [mean, var, a] = bn_batch_stats(xd, weight, bias, eps);
  at::Tensor y = at::empty_like(xd);
  const at::Tensor td = teacher ? in_layout_of(*teacher, xd) : at::Tensor();
  double sq_err = 0.0;
  lsq_kernels().bn_forward(xd.const_data_ptr<float>(), y.mutable_data_ptr<float>(), shape,
                           a.alpha.data(), a.beta.data(), q,
                           teacher ? td.const_data_ptr<float>() : nullptr, &sq_err);
  at::Tensor mse;
  if (teacher) {
    mse = at::empty({}, weight.options());
    *mse.mutable_data_ptr<float>() =
        static_cast<float>(x.numel() > 0 ? sq_err / static_cast<double>(x.numel()) : 0.0);
  }
  return {y, mean, var, mse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_quant(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
    const at::Tensor& steps, c10::IntArrayRef bits, const at::Tensor& sel, bool is_signed,
    double /*grad_scale*/) {
  auto [y, mean, var, mse] = bn_quant_forward("rfq.batch_norm_quant", x, weight, bias, eps,
                                              steps, bits, sel, is_signed, nullptr);
  return {y, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_quant_mse(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
    const at::Tensor& steps, c10::IntArrayRef bits, const at::Tensor& sel,
    const at::Tensor& teacher, bool is_signed, double /*grad_scale*/) {
  return bn_quant_forward("rfq.batch_norm_quant_mse", x, weight, bias, eps, steps, bits, sel,
                          is_signed, &teacher);
}

// Both backwards; with a teacher, z's gradient also gets 2 * grad_mse / n * (z - teacher).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_quant_backward(
    const char* op, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& var, double eps,
    const at::Tensor& steps, c10::IntArrayRef bits, const at::Tensor& sel, bool is_signed,
    double grad_scale, const at::Tensor* teacher, const at::Tensor* grad_mse) {
  check_bn_args(op, x, weight, bias, eps);
  check_bn_stats(op, x, mean, var);
  check_grad(op, grad_y, x, x.sizes());
  check_grad_scale(op, grad_scale);
  const auto [j, q] = selected_spec(op, x, steps, bits, sel, is_signed);
  if (teacher) {
    check_teacher(op, x, *teacher);
    check_grad_mse(op, x, *grad_mse);
  }
  const at::Tensor xd = bn_layout(x);
  const at::Tensor gd = in_layout_of(grad_y, xd);
  const at::Tensor td = teacher ? in_layout_of(*teacher, xd) : at::Tensor();
  const float match =
      teacher && x.numel() > 0
          ? static_cast<float>(2.0 * static_cast<double>(*grad_mse->const_data_ptr<float>()) /
                               static_cast<double>(x.numel()))
          : 0.f;
  const at::Tensor mc = mean.contiguous(), vc = var.contiguous();
  const BnAffine a = bn_affine(weight, bias, mc.const_data_ptr<float>(),
                               vc.const_data_ptr<float>(), eps);
  at::Tensor grad_x = at::empty_like(xd);
  at::Tensor grad_weight = at::empty({x.size(1)}, weight.options());
  at::Tensor grad_bias = at::empty({x.size(1)}, weight.options());
  at::Tensor grad_steps = at::zeros({steps.numel()}, steps.options());
  lsq_kernels().bn_backward(gd.const_data_ptr<float>(), xd.const_data_ptr<float>(),
                            grad_x.mutable_data_ptr<float>(), bn_shape(xd), a.alpha.data(),
                            a.beta.data(), mc.const_data_ptr<float>(), a.invstd.data(), q,
                            grad_scale, teacher ? td.const_data_ptr<float>() : nullptr, match,
                            grad_weight.mutable_data_ptr<float>(),
                            grad_bias.mutable_data_ptr<float>(),
                            grad_steps.mutable_data_ptr<float>() + j);
  return {grad_x, grad_weight, grad_bias, grad_steps};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_quant_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& var, double eps,
    const at::Tensor& steps, c10::IntArrayRef bits, const at::Tensor& sel, bool is_signed,
    double grad_scale) {
  return bn_quant_backward("rfq.batch_norm_quant_backward", grad_y, x, weight, bias, mean, var,
                           eps, steps, bits, sel, is_signed, grad_scale, nullptr, nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_quant_mse_backward(
    const at::Tensor& grad_y, const at::Tensor& grad_mse, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mean,
    const at::Tensor& var, double eps, const at::Tensor& steps, c10::IntArrayRef bits,
    const at::Tensor& sel, const at::Tensor& teacher, bool is_signed, double grad_scale) {
  return bn_quant_backward("rfq.batch_norm_quant_mse_backward", grad_y, x, weight, bias, mean,
                           var, eps, steps, bits, sel, is_signed, grad_scale, &teacher,
                           &grad_mse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_add(const at::Tensor& x,
                                                              const at::Tensor& weight,
                                                              const at::Tensor& bias, double eps,
                                                              const at::Tensor& residual) {
  constexpr const char* op = "rfq.batch_norm_add";
  check_bn_add_args(op, x, weight, bias, eps, residual);
  const at::Tensor xd = bn_layout(x);
  const at::Tensor rd = in_layout_of(residual, xd);
  const auto [mean, var, a] = bn_batch_stats(xd, weight, bias, eps);
  at::Tensor y = at::empty_like(xd);
  lsq_kernels().bn_add_forward(xd.const_data_ptr<float>(), rd.const_data_ptr<float>(),
                               y.mutable_data_ptr<float>(), bn_shape(xd), a.alpha.data(),
                               a.beta.data());
  return {y, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_add_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& mean, const at::Tensor& var, double eps) {
  check_bn_add_backward_args("rfq.batch_norm_add_backward", grad_y, x, weight, mean, var, eps);
  const at::Tensor xd = bn_layout(x);
  const at::Tensor gd = in_layout_of(grad_y, xd);
  const at::Tensor mc = mean.contiguous(), vc = var.contiguous();
  const BnAffine a = bn_affine(weight, weight, mc.const_data_ptr<float>(),
                               vc.const_data_ptr<float>(), eps);  // beta unused
  at::Tensor grad_x = at::empty_like(xd);
  at::Tensor grad_weight = at::empty({x.size(1)}, weight.options());
  at::Tensor grad_bias = at::empty({x.size(1)}, weight.options());
  lsq_kernels().bn_add_backward(gd.const_data_ptr<float>(), xd.const_data_ptr<float>(),
                                grad_x.mutable_data_ptr<float>(), bn_shape(xd), a.alpha.data(),
                                mc.const_data_ptr<float>(), a.invstd.data(),
                                grad_weight.mutable_data_ptr<float>(),
                                grad_bias.mutable_data_ptr<float>());
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace
}  // namespace rfq::cpu

TORCH_LIBRARY_IMPL(rfq, CPU, m) {
  m.impl("coupled_quant", &rfq::cpu::coupled_quant);
  m.impl("coupled_quant_backward", &rfq::cpu::coupled_quant_backward);
  m.impl("coupled_quant_multi", &rfq::cpu::coupled_quant_multi);
  m.impl("coupled_quant_multi_backward", &rfq::cpu::coupled_quant_multi_backward);
  m.impl("quant_stats", &rfq::cpu::quant_stats);
  m.impl("quantize_codes", &rfq::cpu::quantize_codes);
  m.impl("relu_quant", &rfq::cpu::relu_quant);
  m.impl("relu_quant_backward", &rfq::cpu::relu_quant_backward);
  m.impl("batch_norm_quant", &rfq::cpu::batch_norm_quant);
  m.impl("batch_norm_quant_backward", &rfq::cpu::batch_norm_quant_backward);
  m.impl("batch_norm_quant_mse", &rfq::cpu::batch_norm_quant_mse);
  m.impl("batch_norm_quant_mse_backward", &rfq::cpu::batch_norm_quant_mse_backward);
  m.impl("batch_norm_add", &rfq::cpu::batch_norm_add);
  m.impl("batch_norm_add_backward", &rfq::cpu::batch_norm_add_backward);
}
