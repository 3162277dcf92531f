// Autograd of coupled_quant, registered in C++: every quantized layer calls it twice per pass
// (weight and input), mostly on small tensors, where Python's register_autograd (a Python
// setup_context and backward per call) costs more than the kernels. The backward is the
// coupled_quant_backward op, so compiled graphs stay fused. The other ops' autograd is
// registered from Python (rfq/ops/autograd.py).

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

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

}  // namespace
}  // namespace rfq

TORCH_LIBRARY_IMPL(rfq, Autograd, m) {
  m.impl("coupled_quant", &rfq::coupled_quant_autograd);
}
