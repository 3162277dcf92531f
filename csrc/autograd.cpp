// Autograd of the per-layer ops (coupled_quant, relu_quant, batch_norm_quant[_mse],
// batch_norm_add), registered
// in C++:
// every quantized layer calls them on every pass, often on small tensors, where Python's
// register_autograd (a Python setup_context and backward per call) costs more than the
// kernels. Each backward is an op of its own, so compiled graphs stay fused. The other ops'
// autograd is registered from Python (rfq/ops/autograd.py).

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace rfq {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor coupled_quant_op(const at::Tensor& x, const at::Tensor& steps, c10::IntArrayRef bits,
                            const at::Tensor& sel, bool is_signed, double grad_scale) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("rfq::coupled_quant", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::IntArrayRef,
                            const at::Tensor&, bool, double)>();
  return op.call(x, steps, bits, sel, is_signed, grad_scale);
}

std::tuple<at::Tensor, at::Tensor> coupled_quant_backward_op(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& steps,
    c10::IntArrayRef bits, const at::Tensor& sel, bool is_signed, double grad_scale) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("rfq::coupled_quant_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, c10::IntArrayRef,
                                                    const at::Tensor&, bool, double)>();
  return op.call(grad_y, x, steps, bits, sel, is_signed, grad_scale);
}

// Saves x, steps and sel (no output-sized tensor); dx is the clipped STE, dsteps the LSQ step
// gradient in slot sel.
class CoupledQuant : public torch::autograd::Function<CoupledQuant> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& steps,
                            c10::IntArrayRef bits, const at::Tensor& sel, bool is_signed,
                            double grad_scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, steps, sel});
    ctx->saved_data["bits"] = bits.vec();
    ctx->saved_data["signed"] = is_signed;
    ctx->saved_data["grad_scale"] = grad_scale;
    return coupled_quant_op(x, steps, bits, sel, is_signed, grad_scale);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const std::vector<int64_t> bits = ctx->saved_data["bits"].toIntVector();
    auto [grad_x, grad_steps] = coupled_quant_backward_op(
        grads[0], saved[0], saved[1], bits, saved[2], ctx->saved_data["signed"].toBool(),
        ctx->saved_data["grad_scale"].toDouble());
    return {grad_x, grad_steps, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor coupled_quant_autograd(const at::Tensor& x, const at::Tensor& steps,
                                  c10::IntArrayRef bits, const at::Tensor& sel, bool is_signed,
                                  double grad_scale) {
  return CoupledQuant::apply(x, steps, bits, sel, is_signed, grad_scale);
}

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// (relu(x), quantized x): saves x, steps and sel; an unused output's gradient stays undefined
// (the backward op takes it as None and reads nothing for it).
class ReluQuant : public torch::autograd::Function<ReluQuant> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const at::Tensor& steps, c10::IntArrayRef bits,
                               const at::Tensor& sel, double grad_scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, c10::IntArrayRef, const at::Tensor&, double)>(
        "rfq::relu_quant");
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, steps, sel});
    ctx->saved_data["bits"] = bits.vec();
    ctx->saved_data["grad_scale"] = grad_scale;
    auto [r, y] = op.call(x, steps, bits, sel, grad_scale);
    return {r, y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(
        const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const at::Tensor&,
        const at::Tensor&, c10::IntArrayRef, const at::Tensor&, double)>(
        "rfq::relu_quant_backward");
    const auto saved = ctx->get_saved_variables();
    auto given = [](const at::Tensor& g) {
      return g.defined() ? std::optional<at::Tensor>(g) : std::nullopt;
    };
    const std::vector<int64_t> bits = ctx->saved_data["bits"].toIntVector();
    auto [grad_x, grad_steps] = op.call(given(grads[0]), given(grads[1]), saved[0], saved[1],
                                        bits, saved[2], ctx->saved_data["grad_scale"].toDouble());
    return {grad_x, grad_steps, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> relu_quant_autograd(const at::Tensor& x,
                                                       const at::Tensor& steps,
                                                       c10::IntArrayRef bits,
                                                       const at::Tensor& sel, double grad_scale) {
  auto out = ReluQuant::apply(x, steps, bits, sel, grad_scale);
  return {out[0], out[1]};
}

// (quantized BN output, mean, var): saves x, weight, bias, mean, var, steps and sel (no
// BN-output-sized tensor); mean and var are not differentiable.
class BatchNormQuant : public torch::autograd::Function<BatchNormQuant> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const at::Tensor& weight, const at::Tensor& bias, double eps,
                               const at::Tensor& steps, c10::IntArrayRef bits,
                               const at::Tensor& sel, bool is_signed, double grad_scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, double, const at::Tensor&,
        c10::IntArrayRef, const at::Tensor&, bool, double)>("rfq::batch_norm_quant");
    auto [y, mean, var] = op.call(x, weight, bias, eps, steps, bits, sel, is_signed, grad_scale);
    ctx->mark_non_differentiable({mean, var});
    ctx->save_for_backward({x, weight, bias, mean, var, steps, sel});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["bits"] = bits.vec();
    ctx->saved_data["signed"] = is_signed;
    ctx->saved_data["grad_scale"] = grad_scale;
    return {y, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
            const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
            const at::Tensor&, const at::Tensor&, double, const at::Tensor&, c10::IntArrayRef,
            const at::Tensor&, bool, double)>("rfq::batch_norm_quant_backward");
    const auto s = ctx->get_saved_variables();
    const std::vector<int64_t> bits = ctx->saved_data["bits"].toIntVector();
    auto [grad_x, grad_weight, grad_bias, grad_steps] =
        op.call(grads[0], s[0], s[1], s[2], s[3], s[4], ctx->saved_data["eps"].toDouble(), s[5],
                bits, s[6], ctx->saved_data["signed"].toBool(),
                ctx->saved_data["grad_scale"].toDouble());
    return {grad_x,       grad_weight,  grad_bias,    at::Tensor(), grad_steps,
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_quant_autograd(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
    const at::Tensor& steps, c10::IntArrayRef bits, const at::Tensor& sel, bool is_signed,
    double grad_scale) {
  auto out = BatchNormQuant::apply(x, weight, bias, eps, steps, bits, sel, is_signed, grad_scale);
  return {out[0], out[1], out[2]};
}

// (BN output + residual, mean, var): saves x, weight, mean and var; the residual's gradient is
// the output's.
class BatchNormAdd : public torch::autograd::Function<BatchNormAdd> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const at::Tensor& weight, const at::Tensor& bias, double eps,
                               const at::Tensor& residual) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, double, const at::Tensor&)>(
        "rfq::batch_norm_add");
    auto [y, mean, var] = op.call(x, weight, bias, eps, residual);
    ctx->mark_non_differentiable({mean, var});
    ctx->save_for_backward({x, weight, mean, var});
    ctx->saved_data["eps"] = eps;
    return {y, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, double)>("rfq::batch_norm_add_backward");
    const auto s = ctx->get_saved_variables();
    auto [grad_x, grad_weight, grad_bias] =
        op.call(grads[0], s[0], s[1], s[2], s[3], ctx->saved_data["eps"].toDouble());
    return {grad_x, grad_weight, grad_bias, at::Tensor(), grads[0]};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_add_autograd(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
    const at::Tensor& residual) {
  auto out = BatchNormAdd::apply(x, weight, bias, eps, residual);
  return {out[0], out[1], out[2]};
}

// (quantized BN output, mean, var, mse against the teacher): saves what BatchNormQuant saves
// plus the teacher (not differentiable: IDM's teacher features are detached).
class BatchNormQuantMse : public torch::autograd::Function<BatchNormQuantMse> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const at::Tensor& weight, const at::Tensor& bias, double eps,
                               const at::Tensor& steps, c10::IntArrayRef bits,
                               const at::Tensor& sel, const at::Tensor& teacher, bool is_signed,
                               double grad_scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op =
        op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
            const at::Tensor&, const at::Tensor&, const at::Tensor&, double, const at::Tensor&,
            c10::IntArrayRef, const at::Tensor&, const at::Tensor&, bool, double)>(
            "rfq::batch_norm_quant_mse");
    auto [y, mean, var, mse] =
        op.call(x, weight, bias, eps, steps, bits, sel, teacher, is_signed, grad_scale);
    ctx->mark_non_differentiable({mean, var});
    ctx->save_for_backward({x, weight, bias, mean, var, steps, sel, teacher});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["bits"] = bits.vec();
    ctx->saved_data["signed"] = is_signed;
    ctx->saved_data["grad_scale"] = grad_scale;
    return {y, mean, var, mse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
            const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
            const at::Tensor&, const at::Tensor&, const at::Tensor&, double, const at::Tensor&,
            c10::IntArrayRef, const at::Tensor&, const at::Tensor&, bool, double)>(
            "rfq::batch_norm_quant_mse_backward");
    const auto s = ctx->get_saved_variables();
    const std::vector<int64_t> bits = ctx->saved_data["bits"].toIntVector();
    // unused outputs come as undefined gradients: zeros of their shapes
    const at::Tensor grad_y = grads[0].defined() ? grads[0] : at::zeros_like(s[0]);
    const at::Tensor grad_mse = grads[3].defined() ? grads[3] : at::zeros({}, s[1].options());
    auto [grad_x, grad_weight, grad_bias, grad_steps] =
        op.call(grad_y, grad_mse, s[0], s[1], s[2], s[3], s[4],
                ctx->saved_data["eps"].toDouble(), s[5], bits, s[6], s[7],
                ctx->saved_data["signed"].toBool(), ctx->saved_data["grad_scale"].toDouble());
    return {grad_x,       grad_weight,  grad_bias,    at::Tensor(), grad_steps,
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_quant_mse_autograd(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
    const at::Tensor& steps, c10::IntArrayRef bits, const at::Tensor& sel,
    const at::Tensor& teacher, bool is_signed, double grad_scale) {
  auto out = BatchNormQuantMse::apply(x, weight, bias, eps, steps, bits, sel, teacher, is_signed,
                                      grad_scale);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace
}  // namespace rfq

TORCH_LIBRARY_IMPL(rfq, Autograd, m) {
  m.impl("coupled_quant", &rfq::coupled_quant_autograd);
  m.impl("relu_quant", &rfq::relu_quant_autograd);
  m.impl("batch_norm_quant", &rfq::batch_norm_quant_autograd);
  m.impl("batch_norm_quant_mse", &rfq::batch_norm_quant_mse_autograd);
  m.impl("batch_norm_add", &rfq::batch_norm_add_autograd);
}
