// CPU kernels of agi_monai::group_roll and its backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../group_roll.h"
#include "../group_roll_math.h"

#include <vector>

namespace agi_monai {
namespace ops {

namespace {

using detail::AxisRoll;
using detail::kMaxAxes;
using detail::RollShape;

// The axis rolls of every (sample, group), computed once per call: rolls[(b * n + g) * kMaxAxes + axis].
template <typename acc_t, typename scalar_t>
std::vector<AxisRoll<acc_t>> roll_table(const scalar_t* offsets, const RollShape& s) {
  std::vector<AxisRoll<acc_t>> rolls(s.batch * s.groups * kMaxAxes);
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t g = 0; g < s.groups; ++g)
      detail::load_axis_rolls<acc_t>(offsets, s, b, g, rolls.data() + (b * s.groups + g) * kMaxAxes);
  return rolls;
}

template <typename scalar_t>
void forward_cpu(const scalar_t* w, const scalar_t* offsets, const scalar_t* scales, scalar_t* out, const RollShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = s.kernel_numel();
  // One task per (sample, output channel); each writes its own C_in x K block.
  const std::vector<AxisRoll<acc_t>> table = roll_table<acc_t>(offsets, s);
  at::parallel_for(0, s.batch * s.out_channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bo = begin; bo < end; ++bo) {
      const int64_t b = bo / s.out_channels;
      const int64_t o = bo % s.out_channels;
      for (int64_t c = 0; c < s.in_channels; ++c) {
        const int64_t g = c / s.channels_per_group;
        const int64_t key = b * s.groups + g;
        const AxisRoll<acc_t>* rolls = table.data() + key * kMaxAxes;
        const acc_t scale = static_cast<acc_t>(scales[key]);
        const scalar_t* w_slice = w + (o * s.in_channels + c) * K;
        scalar_t* out_slice = out + ((b * s.out_channels + o) * s.in_channels + c) * K;
        for (int64_t z = 0; z < s.kz; ++z)
          for (int64_t y = 0; y < s.ky; ++y)
            for (int64_t x = 0; x < s.kx; ++x)
              out_slice[(z * s.ky + y) * s.kx + x] =
                  static_cast<scalar_t>(scale * detail::rolled_value<acc_t>(w_slice, rolls, z, y, x, nullptr));
      }
    }
  });
}

template <typename scalar_t>
void backward_cpu(
    const scalar_t* grad, const scalar_t* w, const scalar_t* offsets, const scalar_t* scales, scalar_t* grad_w,
    scalar_t* grad_offsets, scalar_t* grad_scales, const RollShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = s.kernel_numel();
  const int64_t out_stride_b = s.out_channels * s.in_channels * K;
  const std::vector<AxisRoll<acc_t>> table = roll_table<acc_t>(offsets, s);

  // grad_weight: the transposed roll, summed over the batch. One task per weight slice (o, c).
  at::parallel_for(0, s.out_channels * s.in_channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t oc = begin; oc < end; ++oc) {
      const int64_t g = (oc % s.in_channels) / s.channels_per_group;
      scalar_t* gw_slice = grad_w + oc * K;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t x = k % s.kx, y = (k / s.kx) % s.ky, z = k / (s.kx * s.ky);
        acc_t acc = acc_t(0);
        for (int64_t b = 0; b < s.batch; ++b) {
          const AxisRoll<acc_t>* rolls = table.data() + (b * s.groups + g) * kMaxAxes;
          const acc_t scale = static_cast<acc_t>(scales[b * s.groups + g]);
          acc += scale * detail::unrolled_grad<acc_t>(grad + b * out_stride_b + oc * K, rolls, z, y, x);
        }
        gw_slice[k] = static_cast<scalar_t>(acc);
      }
    }
  });

  // grad_offsets and grad_scales: one reduction per (sample, group) over C_out x C_in/n x K.
  at::parallel_for(0, s.batch * s.groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / s.groups, g = bg % s.groups;
      const AxisRoll<acc_t>* rolls = table.data() + bg * kMaxAxes;
      const acc_t scale = static_cast<acc_t>(scales[bg]);
      acc_t d_scale = acc_t(0);
      acc_t d_offset[kMaxAxes] = {acc_t(0), acc_t(0), acc_t(0)};
      for (int64_t o = 0; o < s.out_channels; ++o) {
        for (int64_t c = g * s.channels_per_group; c < (g + 1) * s.channels_per_group; ++c) {
          const int64_t oc = o * s.in_channels + c;
          const scalar_t* w_slice = w + oc * K;
          const scalar_t* g_slice = grad + b * out_stride_b + oc * K;
          for (int64_t k = 0; k < K; ++k) {
            const int64_t x = k % s.kx, y = (k / s.kx) % s.ky, z = k / (s.kx * s.ky);
            acc_t d_value[kMaxAxes];
            const acc_t value = detail::rolled_value<acc_t>(w_slice, rolls, z, y, x, d_value);
            const acc_t go = static_cast<acc_t>(g_slice[k]);
            d_scale += go * value;
            for (int a = 0; a < kMaxAxes; ++a) d_offset[a] += go * d_value[a];
          }
        }
      }
      grad_scales[bg] = static_cast<scalar_t>(d_scale);
      for (int64_t a = 0; a < s.spatial; ++a) grad_offsets[bg * s.spatial + a] = static_cast<scalar_t>(scale * d_offset[a]);
    }
  });
}

at::Tensor group_roll_cpu(const at::Tensor& weight, const at::Tensor& offsets, const at::Tensor& scales) {
  detail::check_group_roll_inputs(weight, offsets, scales);
  TORCH_CHECK(weight.device().is_cpu(), "group_roll (CPU kernel): weight must be a CPU tensor, got ", weight.device());
  const RollShape s = detail::roll_shape(weight, offsets);
  const at::Tensor w = weight.contiguous(), o = offsets.contiguous(), sc = scales.contiguous();
  at::Tensor out = at::empty(detail::output_sizes(weight, s.batch), weight.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "group_roll_cpu", [&] {
    forward_cpu<scalar_t>(
        w.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(), sc.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), s);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_roll_backward_cpu(
    const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& offsets, const at::Tensor& scales) {
  detail::check_group_roll_inputs(weight, offsets, scales);
  detail::check_group_roll_grad(grad, weight, offsets);
  const RollShape s = detail::roll_shape(weight, offsets);
  const at::Tensor gr = grad.contiguous(), w = weight.contiguous(), o = offsets.contiguous(), sc = scales.contiguous();
  at::Tensor grad_w = at::zeros_like(w);
  at::Tensor grad_o = at::zeros_like(o);
  at::Tensor grad_s = at::zeros_like(sc);
  if (grad.numel() == 0) return {grad_w, grad_o, grad_s};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "group_roll_backward_cpu", [&] {
    backward_cpu<scalar_t>(
        gr.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(),
        sc.const_data_ptr<scalar_t>(), grad_w.mutable_data_ptr<scalar_t>(), grad_o.mutable_data_ptr<scalar_t>(),
        grad_s.mutable_data_ptr<scalar_t>(), s);
  });
  return {grad_w, grad_o, grad_s};
}

}  // namespace

TORCH_LIBRARY_IMPL(agi_monai, CPU, m) {
  m.impl(TORCH_SELECTIVE_NAME("agi_monai::group_roll"), TORCH_FN(group_roll_cpu));
  m.impl(TORCH_SELECTIVE_NAME("agi_monai::_group_roll_backward"), TORCH_FN(group_roll_backward_cpu));
}

}  // namespace ops
}  // namespace agi_monai
