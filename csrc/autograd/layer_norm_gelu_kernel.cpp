// Autograd support of agi_monai::layer_norm_gelu: forward runs the op below autograd and saves only its
// inputs (the backward recomputes the row statistics), backward runs the registered backward op.
#include <torch/autograd.h>
#include <torch/library.h>

#include "../layer_norm_gelu.h"

namespace agi_monai {
namespace ops {

namespace {

class LayerNormGeluFunction : public torch::autograd::Function<LayerNormGeluFunction> {
 public:
  static torch::autograd::Variable forward(
      torch::autograd::AutogradContext* ctx, const torch::autograd::Variable& input,
      const torch::autograd::Variable& weight, const torch::autograd::Variable& bias, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = layer_norm_gelu(input, weight, bias, eps);
    ctx->save_for_backward({input, weight, bias});
    ctx->saved_data["eps"] = eps;
    return out;
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx, const torch::autograd::variable_list& grad_output) {
    const auto saved = ctx->get_saved_variables();
    auto grads =
        _layer_norm_gelu_backward(grad_output[0], saved[0], saved[1], saved[2], ctx->saved_data["eps"].toDouble());
    return {std::get<0>(grads), std::get<1>(grads), std::get<2>(grads), at::Tensor()};
  }
};

// The backward op is not differentiable itself (no double backward); say so instead of returning zeros.
class LayerNormGeluBackwardFunction : public torch::autograd::Function<LayerNormGeluBackwardFunction> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const torch::autograd::Variable& grad,
      const torch::autograd::Variable& input, const torch::autograd::Variable& weight,
      const torch::autograd::Variable& bias, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto grads = _layer_norm_gelu_backward(grad, input, weight, bias, eps);
    return {std::get<0>(grads), std::get<1>(grads), std::get<2>(grads)};
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx, const torch::autograd::variable_list& grad_output) {
    TORCH_CHECK(false, "agi_monai::layer_norm_gelu: double backward is not supported");
  }
};

at::Tensor layer_norm_gelu_autograd(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  return LayerNormGeluFunction::apply(input, weight, bias, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_gelu_backward_autograd(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  auto result = LayerNormGeluBackwardFunction::apply(grad, input, weight, bias, eps);
  return {result[0], result[1], result[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(agi_monai, Autograd, m) {
  m.impl(TORCH_SELECTIVE_NAME("agi_monai::layer_norm_gelu"), TORCH_FN(layer_norm_gelu_autograd));
  m.impl(TORCH_SELECTIVE_NAME("agi_monai::_layer_norm_gelu_backward"), TORCH_FN(layer_norm_gelu_backward_autograd));
}

}  // namespace ops
}  // namespace agi_monai
