// Public C++ entry points of agi_monai::layer_norm_gelu: GELU(LayerNorm over the last axis), fused.
// AGI-Net's routing function applies it to full-resolution channels-last features twice per CAGR block:
// as two ATen ops it is a LayerNorm whose backward reduces gamma/beta over millions of short rows, then a
// GELU that saves a second full-size tensor; fused it reads x once forward and twice backward
// (docs/benchmarks.md, "H100 again").
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "layer_norm_gelu_math.h"

namespace agi_monai {
namespace ops {

// input (..., C), weight (C), bias (C) -> gelu(layer_norm(input, (C,), weight, bias, eps)), shaped as input
at::Tensor layer_norm_gelu(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, double eps);

// Gradients w.r.t. (input, weight, bias) given the gradient of the output.
std::tuple<at::Tensor, at::Tensor, at::Tensor> _layer_norm_gelu_backward(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, double eps);

namespace detail {
// Shape, dtype and device checks shared by every backend; messages name the argument, the shape it got
// and the shape it expected.
void check_layer_norm_gelu_inputs(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, double eps);
void check_layer_norm_gelu_grad(const at::Tensor& grad, const at::Tensor& input);
// The weight and bias gradients, in dtype, from a backward kernel's (blocks, [dgamma, dbeta], C) partial sums.
std::tuple<at::Tensor, at::Tensor> parameter_grads(const at::Tensor& partial, at::ScalarType dtype);
}  // namespace detail

}  // namespace ops
}  // namespace agi_monai
