// Schema registration of agi_monai::group_roll, its public C++ entry points and the checks shared by the ops.
#include "group_roll.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cctype>
#include <sstream>
#include <vector>

namespace agi_monai {
namespace ops {

at::Tensor group_roll(const at::Tensor& weight, const at::Tensor& offsets, const at::Tensor& scales) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("agi_monai::group_roll", "")
                       .typed<decltype(group_roll)>();
  return op.call(weight, offsets, scales);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> _group_roll_backward(
    const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& offsets, const at::Tensor& scales) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("agi_monai::_group_roll_backward", "")
                       .typed<decltype(_group_roll_backward)>();
  return op.call(grad, weight, offsets, scales);
}

namespace detail {

std::string shape_of(const at::Tensor& t) {
  std::ostringstream ss;
  ss << t.sizes();
  return ss.str();
}

// Python's spelling of a dtype, so that messages read the same as the pure-PyTorch path's.
std::string dtype_name(at::ScalarType type) {
  switch (type) {
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexHalf: return "torch.complex32";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: {  // c10's names lower-cased are Python's for the rest ("Float8_e4m3fn" -> torch.float8_e4m3fn)
      std::string name = c10::toString(type);
      for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      return "torch." + name;
    }
  }
}

bool is_supported_float(at::ScalarType type) {
  return type == at::kHalf || type == at::kBFloat16 || type == at::kFloat || type == at::kDouble;
}

// Bad arguments raise ValueError (shapes, groups, devices, values) or TypeError (dtypes) in Python, as the
// pure-PyTorch reference's checks do (agi_monai/ops/reference.py), so that callers catch the same errors whether
// or not the extension is built.
void check_group_roll_inputs(const at::Tensor& weight, const at::Tensor& offsets, const at::Tensor& scales) {
  TORCH_CHECK_VALUE(
      offsets.dim() == 3,
      "group_roll: offsets must have shape (B, n, S) with S = 2 (2D) or 3 (3D), got shape ", shape_of(offsets));
  const int64_t spatial = offsets.size(2);
  TORCH_CHECK_VALUE(
      spatial == 2 || spatial == 3,
      "group_roll: offsets must have shape (B, n, S) with S = 2 (2D) or 3 (3D), got shape ", shape_of(offsets));
  TORCH_CHECK_VALUE(
      weight.dim() == 2 + spatial,
      "group_roll: weight must have shape (C_out, C_in", spatial == 3 ? ", kz" : "", ", ky, kx) to match offsets ",
      shape_of(offsets), " (S = ", spatial, "), got shape ", shape_of(weight));
  const int64_t batch = offsets.size(0);
  const int64_t groups = offsets.size(1);
  TORCH_CHECK_VALUE(
      groups >= 1, "group_roll: offsets must have at least one group (n >= 1), got shape ", shape_of(offsets));
  TORCH_CHECK_VALUE(
      scales.dim() == 2 && scales.size(0) == batch && scales.size(1) == groups,
      "group_roll: scales must have shape (B, n) = (", batch, ", ", groups, ") to match offsets ", shape_of(offsets),
      ", got shape ", shape_of(scales));
  const int64_t in_channels = weight.size(1);
  TORCH_CHECK_VALUE(
      in_channels % groups == 0,
      "group_roll: the number of groups n = ", groups, " (offsets.size(1)) must divide C_in = ", in_channels,
      " (weight.size(1)); weight has shape ", shape_of(weight));
  for (int64_t d = 2; d < weight.dim(); ++d) {
    TORCH_CHECK_VALUE(
        weight.size(d) >= 1, "group_roll: weight must have non-empty kernel axes, got shape ", shape_of(weight));
  }
  TORCH_CHECK_TYPE(
      is_supported_float(weight.scalar_type()),
      "group_roll: weight must be float16, bfloat16, float32 or float64, got ", dtype_name(weight.scalar_type()));
  TORCH_CHECK_TYPE(
      offsets.scalar_type() == weight.scalar_type() && scales.scalar_type() == weight.scalar_type(),
      "group_roll: weight, offsets and scales must share one dtype, got weight ", dtype_name(weight.scalar_type()),
      ", offsets ", dtype_name(offsets.scalar_type()), ", scales ", dtype_name(scales.scalar_type()));
  TORCH_CHECK_VALUE(
      offsets.device() == weight.device() && scales.device() == weight.device(),
      "group_roll: weight, offsets and scales must be on one device, got weight on ", weight.device(), ", offsets on ",
      offsets.device(), ", scales on ", scales.device());
  // A non-finite offset has no roll; reject it rather than produce NaN kernels downstream. On CUDA the
  // check would synchronise the device at every call (20 times per AGI-Net training step), so there
  // the kernels instead propagate NaN (group_roll_math.h) and the caller sees NaN outputs.
  TORCH_CHECK_VALUE(
      !offsets.device().is_cpu() || offsets.numel() == 0 || at::isfinite(offsets).all().item<bool>(),
      "group_roll: offsets must be finite, got NaN or Inf in offsets of shape ", shape_of(offsets));
}

RollShape roll_shape(const at::Tensor& weight, const at::Tensor& offsets) {
  RollShape s;
  s.batch = offsets.size(0);
  s.groups = offsets.size(1);
  s.spatial = offsets.size(2);
  s.out_channels = weight.size(0);
  s.in_channels = weight.size(1);
  s.channels_per_group = s.in_channels / s.groups;
  s.kx = weight.size(-1);
  s.ky = weight.size(-2);
  s.kz = s.spatial == 3 ? weight.size(-3) : 1;
  return s;
}

std::vector<int64_t> output_sizes(const at::Tensor& weight, int64_t batch) {
  std::vector<int64_t> sizes{batch};
  sizes.insert(sizes.end(), weight.sizes().begin(), weight.sizes().end());
  return sizes;
}

void check_group_roll_grad(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& offsets) {
  const std::vector<int64_t> expected = output_sizes(weight, offsets.size(0));
  TORCH_CHECK(
      grad.sizes() == at::IntArrayRef(expected), "_group_roll_backward: grad must have shape ",
      at::IntArrayRef(expected), " (B, C_out, C_in, k...), got shape ", shape_of(grad));
  TORCH_CHECK(
      grad.scalar_type() == weight.scalar_type() && grad.device() == weight.device(),
      "_group_roll_backward: grad must match weight's dtype and device, got ", dtype_name(grad.scalar_type()), " on ",
      grad.device(), ", expected ", dtype_name(weight.scalar_type()), " on ", weight.device());
}

}  // namespace detail

TORCH_LIBRARY(agi_monai, m) {
  m.def("group_roll(Tensor weight, Tensor offsets, Tensor scales) -> Tensor");
  m.def(
      "_group_roll_backward(Tensor grad, Tensor weight, Tensor offsets, Tensor scales) "
      "-> (Tensor, Tensor, Tensor)");
}

}  // namespace ops
}  // namespace agi_monai
