// CUDA kernels of agi_monai::group_roll and its backward.
//
// The roll of a (sample, group) is the same for all its kernel slices, so a first small kernel writes
// its taps (flat index and scaled blend weight of each corner, per kernel position) into a table that
// the streaming kernels read from cache. Offset and scale gradients go through the K×K correlation of
// grad_out with the kernel (one batched matmul), then the taps (group_roll_math.h).
//
// Only the c10 CUDA headers are included: the project's CUDA toolkit is minimal and
// ATen/cuda/CUDAContext.h pulls in cuSPARSE headers it lacks.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "../group_roll.h"
#include "../group_roll_math.h"

namespace agi_monai {
namespace ops {

namespace {

using detail::AxisRoll;
using detail::kMaxAxes;
using detail::kMaxTaps;
using detail::RollShape;

constexpr int kThreads = 256;

inline unsigned int blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  // Grid-stride loops cover the rest.
  return static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), int64_t(1) << 20));
}

// One thread per (sample, group, kernel position): entry ((b * n + g) * K + k) * taps + t.
template <typename scalar_t>
__global__ void build_taps_kernel(
    const scalar_t* __restrict__ offsets, const scalar_t* __restrict__ scales, int32_t* __restrict__ tap_index,
    at::opmath_type<scalar_t>* __restrict__ tap_weight, const RollShape s, const bool transpose) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = s.kernel_numel();
  const int64_t total = s.batch * s.groups * K;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t bg = e / K, k = e % K;
    AxisRoll<acc_t> rolls[kMaxAxes];
    detail::load_axis_rolls<acc_t>(offsets, s, bg / s.groups, bg % s.groups, rolls);
    int64_t index[kMaxTaps];
    acc_t weight[kMaxTaps];
    acc_t d_weight[kMaxTaps][kMaxAxes];
    const int64_t x = k % s.kx, y = (k / s.kx) % s.ky, z = k / (s.kx * s.ky);
    const int taps = detail::kernel_taps(rolls, z, y, x, transpose, index, weight, d_weight);
    const acc_t scale = static_cast<acc_t>(scales[bg]);
    for (int t = 0; t < taps; ++t) {
      tap_index[e * taps + t] = static_cast<int32_t>(index[t]);
      tap_weight[e * taps + t] = scale * weight[t];
    }
  }
}

// out[b, o, c, k] = Σ_t tap_weight · w[o, c, tap_index]; one thread per output element.
template <typename scalar_t, typename index_t, int taps>
__global__ void group_roll_forward_kernel(
    const scalar_t* __restrict__ w, const int32_t* __restrict__ tap_index,
    const at::opmath_type<scalar_t>* __restrict__ tap_weight, scalar_t* __restrict__ out, const RollShape s) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t K = static_cast<index_t>(s.kernel_numel());
  const index_t slices = static_cast<index_t>(s.out_channels * s.in_channels);
  const index_t in_channels = static_cast<index_t>(s.in_channels), groups = static_cast<index_t>(s.groups);
  const index_t per_group = static_cast<index_t>(s.channels_per_group);
  const index_t total = static_cast<index_t>(s.batch) * slices * K;
  for (index_t i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += blockDim.x * gridDim.x) {
    const index_t k = i % K, slice = i / K;
    const index_t oc = slice % slices, b = slice / slices;
    const index_t g = (oc % in_channels) / per_group;
    const index_t entry = ((b * groups + g) * K + k) * taps;
    const scalar_t* w_slice = w + oc * K;
    acc_t value = acc_t(0);
#pragma unroll
    for (int t = 0; t < taps; ++t) value += tap_weight[entry + t] * static_cast<acc_t>(w_slice[tap_index[entry + t]]);
    out[i] = static_cast<scalar_t>(value);
  }
}

// grad_w[o, c, k] = Σ_b Σ_t tap_weight · grad[b, o, c, tap_index] (transposed taps); one thread per weight element.
template <typename scalar_t, typename index_t, int taps>
__global__ void group_roll_grad_weight_kernel(
    const scalar_t* __restrict__ grad, const int32_t* __restrict__ tap_index,
    const at::opmath_type<scalar_t>* __restrict__ tap_weight, scalar_t* __restrict__ grad_w, const RollShape s) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t K = static_cast<index_t>(s.kernel_numel());
  const index_t slices = static_cast<index_t>(s.out_channels * s.in_channels);
  const index_t in_channels = static_cast<index_t>(s.in_channels), groups = static_cast<index_t>(s.groups);
  const index_t per_group = static_cast<index_t>(s.channels_per_group), batch = static_cast<index_t>(s.batch);
  const index_t total = slices * K;
  for (index_t i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += blockDim.x * gridDim.x) {
    const index_t k = i % K, oc = i / K;
    const index_t g = (oc % in_channels) / per_group;
    acc_t acc = acc_t(0);
    for (index_t b = 0; b < batch; ++b) {
      const index_t entry = ((b * groups + g) * K + k) * taps;
      const scalar_t* g_slice = grad + (b * slices + oc) * K;
#pragma unroll
      for (int t = 0; t < taps; ++t) acc += tap_weight[entry + t] * static_cast<acc_t>(g_slice[tap_index[entry + t]]);
    }
    grad_w[i] = static_cast<scalar_t>(acc);
  }
}

// One thread per (sample, group): scale and offset gradients from its K×K correlation (layout (B, n, K, K)).
template <typename scalar_t>
__global__ void group_roll_grad_routing_kernel(
    const at::opmath_type<scalar_t>* __restrict__ correlation, const scalar_t* __restrict__ offsets,
    const scalar_t* __restrict__ scales, scalar_t* __restrict__ grad_offsets, scalar_t* __restrict__ grad_scales,
    const RollShape s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = s.kernel_numel();
  for (int64_t bg = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; bg < s.batch * s.groups;
       bg += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    AxisRoll<acc_t> rolls[kMaxAxes];
    detail::load_axis_rolls<acc_t>(offsets, s, bg / s.groups, bg % s.groups, rolls);
    acc_t d_scale;
    acc_t d_offset[kMaxAxes];
    detail::routing_grad_from_correlation<acc_t>(correlation + bg * K * K, rolls, s, &d_scale, d_offset);
    const acc_t scale = static_cast<acc_t>(scales[bg]);
    grad_scales[bg] = static_cast<scalar_t>(d_scale);
    for (int64_t a = 0; a < s.spatial; ++a) grad_offsets[bg * s.spatial + a] = static_cast<scalar_t>(scale * d_offset[a]);
  }
}

struct Taps {
  at::Tensor index;
  at::Tensor weight;
};

template <typename scalar_t>
Taps build_taps(const at::Tensor& offsets, const at::Tensor& scales, const RollShape& s, bool transpose, cudaStream_t stream) {
  const int64_t entries = s.batch * s.groups * s.kernel_numel();
  const int64_t taps = int64_t(1) << s.spatial;
  Taps t{at::empty({entries * taps}, offsets.options().dtype(at::kInt)),
         at::empty({entries * taps}, offsets.options().dtype(at::toOpMathType(offsets.scalar_type())))};
  build_taps_kernel<scalar_t><<<blocks_for(entries), kThreads, 0, stream>>>(
      offsets.const_data_ptr<scalar_t>(), scales.const_data_ptr<scalar_t>(), t.index.mutable_data_ptr<int32_t>(),
      t.weight.mutable_data_ptr<at::opmath_type<scalar_t>>(), s, transpose);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return t;
}

// Runs the given lambda with `index_t` (int32_t when 32-bit indices suffice, else int64_t) and
// `num_taps` (4 in 2D, 8 in 3D) defined, like AT_DISPATCH_* does for scalar_t (C++17-compatible).
#define AGI_DISPATCH_INDEX_AND_TAPS(NUMEL, SPATIAL, ...)                        \
  [&] {                                                                         \
    const bool small_index = (NUMEL) < std::numeric_limits<int32_t>::max();     \
    if ((SPATIAL) == 2) {                                                       \
      constexpr int num_taps = 4;                                               \
      if (small_index) {                                                        \
        using index_t = int32_t;                                                \
        __VA_ARGS__();                                                          \
      } else {                                                                  \
        using index_t = int64_t;                                                \
        __VA_ARGS__();                                                          \
      }                                                                         \
    } else {                                                                    \
      constexpr int num_taps = 8;                                               \
      if (small_index) {                                                        \
        using index_t = int32_t;                                                \
        __VA_ARGS__();                                                          \
      } else {                                                                  \
        using index_t = int64_t;                                                \
        __VA_ARGS__();                                                          \
      }                                                                         \
    }                                                                           \
  }()

at::Tensor group_roll_cuda(const at::Tensor& weight, const at::Tensor& offsets, const at::Tensor& scales) {
  detail::check_group_roll_inputs(weight, offsets, scales);
  TORCH_CHECK(weight.is_cuda(), "group_roll (CUDA kernel): weight must be a CUDA tensor, got ", weight.device());
  const c10::cuda::CUDAGuard device_guard(weight.device());
  const RollShape s = detail::roll_shape(weight, offsets);
  const at::Tensor w = weight.contiguous(), o = offsets.contiguous(), sc = scales.contiguous();
  at::Tensor out = at::empty(detail::output_sizes(weight, s.batch), weight.options());
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "group_roll_cuda", [&] {
    const Taps taps = build_taps<scalar_t>(o, sc, s, /*transpose=*/false, stream);
    AGI_DISPATCH_INDEX_AND_TAPS(out.numel(), s.spatial, [&] {
      group_roll_forward_kernel<scalar_t, index_t, num_taps><<<blocks_for(out.numel()), kThreads, 0, stream>>>(
          w.const_data_ptr<scalar_t>(), taps.index.const_data_ptr<int32_t>(),
          taps.weight.const_data_ptr<at::opmath_type<scalar_t>>(), out.mutable_data_ptr<scalar_t>(), s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_roll_backward_cuda(
    const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& offsets, const at::Tensor& scales) {
  detail::check_group_roll_inputs(weight, offsets, scales);
  detail::check_group_roll_grad(grad, weight, offsets);
  const c10::cuda::CUDAGuard device_guard(weight.device());
  const RollShape s = detail::roll_shape(weight, offsets);
  const at::Tensor gr = grad.contiguous(), w = weight.contiguous(), o = offsets.contiguous(), sc = scales.contiguous();
  at::Tensor grad_w = at::zeros_like(w);
  at::Tensor grad_o = at::zeros_like(o);
  at::Tensor grad_s = at::zeros_like(sc);
  if (grad.numel() == 0) return {grad_w, grad_o, grad_s};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::ScalarType acc_type = at::toOpMathType(weight.scalar_type());
  // K×K correlation per (sample, group): M[b, g, k, j] = Σ_{o, c in g} grad[b, o, c, k] · w[o, c, j],
  // as one batched matmul over groups with (sample, k) as rows and (o, c) as the contracted axis.
  const int64_t K = s.kernel_numel(), L = s.out_channels * s.channels_per_group;
  const at::Tensor grad_rows = gr.view({s.batch, s.out_channels, s.groups, s.channels_per_group, K})
                                   .permute({2, 0, 4, 1, 3})
                                   .to(acc_type)
                                   .reshape({s.groups, s.batch * K, L});
  const at::Tensor w_cols = w.view({s.out_channels, s.groups, s.channels_per_group, K})
                                .permute({1, 0, 2, 3})
                                .to(acc_type)
                                .reshape({s.groups, L, K});
  const at::Tensor correlation =
      at::bmm(grad_rows, w_cols).view({s.groups, s.batch, K, K}).permute({1, 0, 2, 3}).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "group_roll_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Taps taps = build_taps<scalar_t>(o, sc, s, /*transpose=*/true, stream);
    AGI_DISPATCH_INDEX_AND_TAPS(w.numel(), s.spatial, [&] {
      group_roll_grad_weight_kernel<scalar_t, index_t, num_taps><<<blocks_for(w.numel()), kThreads, 0, stream>>>(
          gr.const_data_ptr<scalar_t>(), taps.index.const_data_ptr<int32_t>(), taps.weight.const_data_ptr<acc_t>(),
          grad_w.mutable_data_ptr<scalar_t>(), s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    group_roll_grad_routing_kernel<scalar_t><<<blocks_for(s.batch * s.groups), kThreads, 0, stream>>>(
        correlation.const_data_ptr<acc_t>(), o.const_data_ptr<scalar_t>(), sc.const_data_ptr<scalar_t>(),
        grad_o.mutable_data_ptr<scalar_t>(), grad_s.mutable_data_ptr<scalar_t>(), s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_w, grad_o, grad_s};
}

}  // namespace

TORCH_LIBRARY_IMPL(agi_monai, CUDA, m) {
  m.impl(TORCH_SELECTIVE_NAME("agi_monai::group_roll"), TORCH_FN(group_roll_cuda));
  m.impl(TORCH_SELECTIVE_NAME("agi_monai::_group_roll_backward"), TORCH_FN(group_roll_backward_cuda));
}

}  // namespace ops
}  // namespace agi_monai
