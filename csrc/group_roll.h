// Public C++ entry points of the group-wise roll op. They only look the op up in the dispatcher.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>
#include <vector>

#include "group_roll_math.h"

namespace agi_monai {
namespace ops {

// weight (C_out, C_in, k...), offsets (B, n, S), scales (B, n) -> (B, C_out, C_in, k...)
at::Tensor group_roll(const at::Tensor& weight, const at::Tensor& offsets, const at::Tensor& scales);

// Gradients w.r.t. (weight, offsets, scales) given the gradient of the output.
std::tuple<at::Tensor, at::Tensor, at::Tensor> _group_roll_backward(
    const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& offsets, const at::Tensor& scales);

namespace detail {
// How the ops' error messages spell a shape ("[2, 3]") and a dtype (Python's "torch.float32").
std::string shape_of(const at::Tensor& t);
std::string dtype_name(at::ScalarType type);
// float16, bfloat16, float32 or float64: the dtypes the kernels are built for (not the float8 types).
bool is_supported_float(at::ScalarType type);
// Shape, dtype, device and value checks shared by every backend; messages name the argument,
// the shape it got and the shape it expected.
void check_group_roll_inputs(const at::Tensor& weight, const at::Tensor& offsets, const at::Tensor& scales);
void check_group_roll_grad(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& offsets);
// Sizes of one (checked) call, and the output sizes (B, C_out, C_in, k...).
RollShape roll_shape(const at::Tensor& weight, const at::Tensor& offsets);
std::vector<int64_t> output_sizes(const at::Tensor& weight, int64_t batch);
}  // namespace detail

}  // namespace ops
}  // namespace agi_monai
