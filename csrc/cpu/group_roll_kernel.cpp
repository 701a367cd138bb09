// CPU kernels of agi_monai::group_roll and its backward.
//
// The roll of a (sample, group) is the same for every (C_out, C_in) kernel slice of that group, so
// its taps (flat index and blend weight of each of the 2^S corners, per kernel position) are computed
// once per call into a table; the loops then stream over the kernel slices.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../group_roll.h"
#include "../group_roll_math.h"

namespace agi_monai {
namespace ops {

namespace {

using detail::AxisRoll;
using detail::kMaxAxes;
using detail::kMaxTaps;
using detail::RollShape;

// Taps of every (sample, group, kernel position): entry ((b * n + g) * K + k) * taps + t.
template <typename acc_t>
struct TapTable {
  int taps = 0;
  std::vector<int32_t> index;  // flat kernel index (kernels are small)
  std::vector<acc_t> weight;  // blend weight times the group's scale
};

template <typename acc_t, typename scalar_t>
TapTable<acc_t> tap_table(const scalar_t* offsets, const scalar_t* scales, const RollShape& s, bool transpose) {
  const int64_t K = s.kernel_numel();
  TapTable<acc_t> table;
  table.taps = 1 << s.spatial;
  const int64_t entries = s.batch * s.groups * K * table.taps;
  table.index.resize(entries);
  table.weight.resize(entries);
  for (int64_t bg = 0; bg < s.batch * s.groups; ++bg) {
    AxisRoll<acc_t> rolls[kMaxAxes];
    detail::load_axis_rolls<acc_t>(offsets, s, bg / s.groups, bg % s.groups, rolls);
    const acc_t scale = static_cast<acc_t>(scales[bg]);
    for (int64_t k = 0; k < K; ++k) {
      int64_t index[kMaxTaps];
      acc_t weight[kMaxTaps];
      acc_t d_weight[kMaxTaps][kMaxAxes];
      const int64_t x = k % s.kx, y = (k / s.kx) % s.ky, z = k / (s.kx * s.ky);
      detail::kernel_taps(rolls, z, y, x, transpose, index, weight, d_weight);
      const int64_t base = (bg * K + k) * table.taps;
      for (int t = 0; t < table.taps; ++t) {
        table.index[base + t] = static_cast<int32_t>(index[t]);
        table.weight[base + t] = scale * weight[t];
      }
    }
  }
  return table;
}

// out[b, o, c] = Σ_t weight · w[o, c][index]: one task per (sample, output channel), so that the
// output (B times the kernel's size) is written in one sequential stream.
template <typename scalar_t, int taps>
void forward_cpu(const scalar_t* w, const scalar_t* offsets, const scalar_t* scales, scalar_t* out, const RollShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = s.kernel_numel();
  const TapTable<acc_t> table = tap_table<acc_t>(offsets, scales, s, /*transpose=*/false);
  at::parallel_for(0, s.batch * s.out_channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bo = begin; bo < end; ++bo) {
      const int64_t b = bo / s.out_channels, o = bo % s.out_channels;
      scalar_t* out_row = out + bo * s.in_channels * K;
      const scalar_t* w_row = w + o * s.in_channels * K;
      for (int64_t g = 0; g < s.groups; ++g) {
        const int64_t base = (b * s.groups + g) * K * taps;
        const int32_t* index = table.index.data() + base;
        const acc_t* weight = table.weight.data() + base;
        for (int64_t c = g * s.channels_per_group; c < (g + 1) * s.channels_per_group; ++c) {
          const scalar_t* w_slice = w_row + c * K;
          scalar_t* out_slice = out_row + c * K;
          for (int64_t k = 0; k < K; ++k) {
            acc_t value = acc_t(0);
            for (int t = 0; t < taps; ++t) value += weight[k * taps + t] * static_cast<acc_t>(w_slice[index[k * taps + t]]);
            out_slice[k] = static_cast<scalar_t>(value);
          }
        }
      }
    }
  });
}

// grad_w[o, c, j] = Σ_b Σ_t weight · grad[b, o, c][destination]: the transposed roll.
template <typename scalar_t, int taps>
void grad_weight_cpu(const scalar_t* grad, const scalar_t* offsets, const scalar_t* scales, scalar_t* grad_w, const RollShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = s.kernel_numel();
  const TapTable<acc_t> table = tap_table<acc_t>(offsets, scales, s, /*transpose=*/true);
  at::parallel_for(0, s.out_channels, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(K);
    for (int64_t o = begin; o < end; ++o) {
      for (int64_t c = 0; c < s.in_channels; ++c) {
        const int64_t g = c / s.channels_per_group;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t b = 0; b < s.batch; ++b) {
          const int64_t base = (b * s.groups + g) * K * taps;
          const int32_t* index = table.index.data() + base;
          const acc_t* weight = table.weight.data() + base;
          const scalar_t* g_slice = grad + ((b * s.out_channels + o) * s.in_channels + c) * K;
          for (int64_t k = 0; k < K; ++k)
            for (int t = 0; t < taps; ++t) acc[k] += weight[k * taps + t] * static_cast<acc_t>(g_slice[index[k * taps + t]]);
        }
        scalar_t* gw_slice = grad_w + (o * s.in_channels + c) * K;
        for (int64_t k = 0; k < K; ++k) gw_slice[k] = static_cast<scalar_t>(acc[k]);
      }
    }
  });
}

// Scale and offset gradients: per (sample, group) the K×K correlation of grad_out with the kernel
// slices of the group (one pass over them), then the taps (group_roll_math.h).
template <typename scalar_t>
void grad_routing_cpu(
    const scalar_t* grad, const scalar_t* w, const scalar_t* offsets, const scalar_t* scales, scalar_t* grad_offsets,
    scalar_t* grad_scales, const RollShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = s.kernel_numel();
  at::parallel_for(0, s.batch * s.groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> correlation(K * K);
    std::vector<acc_t> w_slice(K);
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / s.groups, g = bg % s.groups;
      std::fill(correlation.begin(), correlation.end(), acc_t(0));
      for (int64_t o = 0; o < s.out_channels; ++o) {
        for (int64_t c = g * s.channels_per_group; c < (g + 1) * s.channels_per_group; ++c) {
          const int64_t oc = o * s.in_channels + c;
          const scalar_t* g_slice = grad + (b * s.out_channels * s.in_channels + oc) * K;
          for (int64_t j = 0; j < K; ++j) w_slice[j] = static_cast<acc_t>(w[oc * K + j]);
          for (int64_t k = 0; k < K; ++k) {
            const acc_t gk = static_cast<acc_t>(g_slice[k]);
            acc_t* row = correlation.data() + k * K;
            for (int64_t j = 0; j < K; ++j) row[j] += gk * w_slice[j];
          }
        }
      }
      AxisRoll<acc_t> rolls[kMaxAxes];
      detail::load_axis_rolls<acc_t>(offsets, s, b, g, rolls);
      acc_t d_scale;
      acc_t d_offset[kMaxAxes];
      detail::routing_grad_from_correlation<acc_t>(correlation.data(), rolls, s, &d_scale, d_offset);
      const acc_t scale = static_cast<acc_t>(scales[bg]);
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
    const auto run = s.spatial == 2 ? forward_cpu<scalar_t, 4> : forward_cpu<scalar_t, 8>;
    run(w.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(), sc.const_data_ptr<scalar_t>(),
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
    const auto grad_weight = s.spatial == 2 ? grad_weight_cpu<scalar_t, 4> : grad_weight_cpu<scalar_t, 8>;
    grad_weight(
        gr.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(), sc.const_data_ptr<scalar_t>(),
        grad_w.mutable_data_ptr<scalar_t>(), s);
    grad_routing_cpu<scalar_t>(
        gr.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(),
        sc.const_data_ptr<scalar_t>(), grad_o.mutable_data_ptr<scalar_t>(), grad_s.mutable_data_ptr<scalar_t>(), s);
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
