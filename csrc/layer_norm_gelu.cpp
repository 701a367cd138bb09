// Schema registration of agi_monai::layer_norm_gelu, its public C++ entry points and input checks.
#include "layer_norm_gelu.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>

#include "group_roll.h"

namespace agi_monai {
namespace ops {

at::Tensor layer_norm_gelu(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("agi_monai::layer_norm_gelu", "")
                       .typed<decltype(layer_norm_gelu)>();
  return op.call(input, weight, bias, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> _layer_norm_gelu_backward(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("agi_monai::_layer_norm_gelu_backward", "")
                       .typed<decltype(_layer_norm_gelu_backward)>();
  return op.call(grad, input, weight, bias, eps);
}

namespace detail {

void check_layer_norm_gelu_inputs(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  TORCH_CHECK(
      input.dim() >= 1 && input.size(-1) >= 1,
      "layer_norm_gelu: input must have shape (..., C) with C >= 1 (the normalised last axis), got shape ",
      shape_of(input));
  const int64_t channels = input.size(-1);
  TORCH_CHECK(
      weight.dim() == 1 && weight.size(0) == channels,
      "layer_norm_gelu: weight must have shape (C,) = (", channels, ",) to match input ", shape_of(input),
      ", got shape ", shape_of(weight));
  TORCH_CHECK(
      bias.dim() == 1 && bias.size(0) == channels,
      "layer_norm_gelu: bias must have shape (C,) = (", channels, ",) to match input ", shape_of(input),
      ", got shape ", shape_of(bias));
  TORCH_CHECK(
      is_supported_float(input.scalar_type()),
      "layer_norm_gelu: input must be float16, bfloat16, float32 or float64, got ", dtype_name(input.scalar_type()));
  TORCH_CHECK(
      weight.scalar_type() == input.scalar_type() && bias.scalar_type() == input.scalar_type(),
      "layer_norm_gelu: input, weight and bias must share one dtype, got input ", dtype_name(input.scalar_type()),
      ", weight ", dtype_name(weight.scalar_type()), ", bias ", dtype_name(bias.scalar_type()));
  TORCH_CHECK(
      weight.device() == input.device() && bias.device() == input.device(),
      "layer_norm_gelu: input, weight and bias must be on one device, got input on ", input.device(), ", weight on ",
      weight.device(), ", bias on ", bias.device());
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "layer_norm_gelu: eps must be finite and >= 0, got ", eps);
}

void check_layer_norm_gelu_grad(const at::Tensor& grad, const at::Tensor& input) {
  TORCH_CHECK(
      grad.sizes() == input.sizes(), "_layer_norm_gelu_backward: grad must have the input's shape ", shape_of(input),
      ", got shape ", shape_of(grad));
  TORCH_CHECK(
      grad.scalar_type() == input.scalar_type() && grad.device() == input.device(),
      "_layer_norm_gelu_backward: grad must match the input's dtype and device, got ", dtype_name(grad.scalar_type()),
      " on ", grad.device(), ", expected ", dtype_name(input.scalar_type()), " on ", input.device());
}

std::tuple<at::Tensor, at::Tensor> parameter_grads(const at::Tensor& partial, at::ScalarType dtype) {
  const at::Tensor sums = partial.sum(0).to(dtype);
  return {sums[0].clone(), sums[1].clone()};
}

}  // namespace detail

TORCH_LIBRARY_FRAGMENT(agi_monai, m) {
  m.def("layer_norm_gelu(Tensor input, Tensor weight, Tensor bias, float eps) -> Tensor");
  m.def(
      "_layer_norm_gelu_backward(Tensor grad, Tensor input, Tensor weight, Tensor bias, float eps) "
      "-> (Tensor, Tensor, Tensor)");
}

}  // namespace ops
}  // namespace agi_monai
