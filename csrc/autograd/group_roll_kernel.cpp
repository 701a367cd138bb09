// Autograd support of agi_monai::group_roll: forward runs the op below autograd, backward runs the
// registered backward op (one kernel per device computes the weight, offset and scale gradients).
#include <torch/autograd.h>
#include <torch/library.h>

#include "../group_roll.h"

namespace agi_monai {
namespace ops {

namespace {

class GroupRollFunction : public torch::autograd::Function<GroupRollFunction> {
 public:
  static torch::autograd::Variable forward(
      torch::autograd::AutogradContext* ctx, const torch::autograd::Variable& weight,
      const torch::autograd::Variable& offsets, const torch::autograd::Variable& scales) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = group_roll(weight, offsets, scales);
    ctx->save_for_backward({weight, offsets, scales});
    return out;
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx, const torch::autograd::variable_list& grad_output) {
    const auto saved = ctx->get_saved_variables();
    auto grads = _group_roll_backward(grad_output[0], saved[0], saved[1], saved[2]);
    return {std::get<0>(grads), std::get<1>(grads), std::get<2>(grads)};
  }
};

// The backward op is not differentiable itself (no double backward); say so instead of returning zeros.
class GroupRollBackwardFunction : public torch::autograd::Function<GroupRollBackwardFunction> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const torch::autograd::Variable& grad,
      const torch::autograd::Variable& weight, const torch::autograd::Variable& offsets,
      const torch::autograd::Variable& scales) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto grads = _group_roll_backward(grad, weight, offsets, scales);
    return {std::get<0>(grads), std::get<1>(grads), std::get<2>(grads)};
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx, const torch::autograd::variable_list& grad_output) {
    TORCH_CHECK(false, "agi_monai::group_roll: double backward is not supported");
  }
};

at::Tensor group_roll_autograd(const at::Tensor& weight, const at::Tensor& offsets, const at::Tensor& scales) {
  return GroupRollFunction::apply(weight, offsets, scales);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_roll_backward_autograd(
    const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& offsets, const at::Tensor& scales) {
  auto result = GroupRollBackwardFunction::apply(grad, weight, offsets, scales);
  return {result[0], result[1], result[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(agi_monai, Autograd, m) {
  m.impl(TORCH_SELECTIVE_NAME("agi_monai::group_roll"), TORCH_FN(group_roll_autograd));
  m.impl(TORCH_SELECTIVE_NAME("agi_monai::_group_roll_backward"), TORCH_FN(group_roll_backward_autograd));
}

}  // namespace ops
}  // namespace agi_monai
