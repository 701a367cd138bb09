// CUDA kernels of agi_monai::group_roll and its backward. Two implementations, picked per call by
// AGI_MONAI_GROUP_ROLL_CUDA=auto|taps|columns (auto: columns, measured faster in AGI-Net's train step on an
// H100, 2026-11-24: docs/benchmarks.md):
//
// taps (first version): the roll of a (sample, group) is the same for all its kernel
//   slices, so a first small kernel writes its taps (flat index and scaled blend weight of each corner,
//   per kernel position) into a table that the streaming kernels read from cache; one thread per output
//   element. Offset and scale gradients go through the K×K correlation of grad_out with the kernel (a
//   permuted copy of grad_out and one batched matmul), then the taps (group_roll_math.h).
// columns: one thread per column (sample, group, entry of the group's kernel slices; group_roll_math.h)
//   and block of output channels: the taps are computed once per thread and the thread walks its output
//   channels with pointer increments (no per-element index division, no table for the forward). The
//   routing gradients are per-thread partial sums over the same columns, reduced per (sample, group) by
//   one warp each in a fixed order (deterministic): no copy of grad_out, no matmul, no zero fills.
//   The per-thread code is group_roll_math.h's, which the CPU tests run (AGI_MONAI_GROUP_ROLL_CPU=columns).
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

#include <cstdlib>
#include <cstring>
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
constexpr int64_t kMaxBlocks = int64_t(1) << 20;
// The most threads one launch has: the step of a grid-stride loop.
constexpr int64_t kMaxGridThreads = kMaxBlocks * kThreads;

inline unsigned int blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  // Grid-stride loops cover the rest.
  return static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), kMaxBlocks));
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
    int64_t index[kMaxTaps];
    acc_t weight[kMaxTaps];
    acc_t d_weight[kMaxTaps][kMaxAxes];
    const int taps = detail::position_taps<acc_t>(offsets, s, bg, k, transpose, index, weight, d_weight);
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
    detail::store_routing_grads<acc_t>(d_scale, d_offset, scales, s, bg, grad_offsets, grad_scales);
  }
}

// Columns × blocks of output channels: blockIdx.y is the block [o_begin, o_end) of output channels.
struct ColumnGrid {
  dim3 blocks;
  int64_t columns;
  int64_t channels_per_block;  // output channels per blockIdx.y
};

// Enough blocks to fill the device (1024 blocks of 256 threads: ~8 per SM on an H100's 132 SMs) with the
// columns alone where there are many, else by splitting the output channels into blocks.
constexpr int64_t kTargetBlocks = 1024;

ColumnGrid column_grid(const RollShape& s) {
  ColumnGrid grid;
  grid.columns = detail::column_count(s);
  const unsigned int column_blocks = blocks_for(grid.columns);
  const int64_t splits = std::min<int64_t>(
      std::max<int64_t>((kTargetBlocks + column_blocks - 1) / column_blocks, 1), std::min<int64_t>(s.out_channels, 65535));
  grid.channels_per_block = (s.out_channels + splits - 1) / splits;
  const int64_t channel_blocks = (s.out_channels + grid.channels_per_block - 1) / grid.channels_per_block;
  grid.blocks = dim3(column_blocks, static_cast<unsigned int>(channel_blocks));
  return grid;
}

template <typename scalar_t, typename index_t, int taps>
__global__ void group_roll_forward_columns_kernel(
    const scalar_t* __restrict__ w, const scalar_t* __restrict__ offsets, const scalar_t* __restrict__ scales,
    scalar_t* __restrict__ out, const RollShape s, const index_t columns, const index_t channels_per_block) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t o_begin = static_cast<index_t>(blockIdx.y) * channels_per_block;
  const index_t o_end = min(o_begin + channels_per_block, static_cast<index_t>(s.out_channels));
  for (index_t column = blockIdx.x * blockDim.x + threadIdx.x; column < columns; column += blockDim.x * gridDim.x)
    detail::forward_column<taps, acc_t>(w, offsets, scales, out, s, column, o_begin, o_end);
}

// partials[(blockIdx.y · columns + column) · (1 + S) + a]: the column's routing-gradient partials over
// the output channels of block blockIdx.y.
template <typename scalar_t, typename index_t, int taps>
__global__ void group_roll_grad_routing_columns_kernel(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ w, const scalar_t* __restrict__ offsets,
    at::opmath_type<scalar_t>* __restrict__ partials, const RollShape s, const index_t columns,
    const index_t channels_per_block) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int values = taps == 4 ? 3 : 4;  // 1 + S
  const index_t o_begin = static_cast<index_t>(blockIdx.y) * channels_per_block;
  const index_t o_end = min(o_begin + channels_per_block, static_cast<index_t>(s.out_channels));
  for (index_t column = blockIdx.x * blockDim.x + threadIdx.x; column < columns; column += blockDim.x * gridDim.x) {
    acc_t partial[1 + kMaxAxes];
    detail::routing_grad_column<taps, acc_t>(grad, w, offsets, s, column, o_begin, o_end, partial);
    acc_t* slot = partials + (static_cast<int64_t>(blockIdx.y) * columns + column) * values;
#pragma unroll
    for (int a = 0; a < values; ++a) slot[a] = partial[a];
  }
}

// One warp per (sample, group): lane l sums the partials l, l + 32, … of its columns × channel blocks,
// then a butterfly over the lanes; the same order at every call.
template <typename scalar_t, int taps>
__global__ void group_roll_grad_routing_reduce_kernel(
    const at::opmath_type<scalar_t>* __restrict__ partials, const scalar_t* __restrict__ scales,
    scalar_t* __restrict__ grad_offsets, scalar_t* __restrict__ grad_scales, const RollShape s, const int64_t columns,
    const int64_t channel_blocks) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int values = taps == 4 ? 3 : 4;
  constexpr int kWarp = 32;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  const int64_t span = s.channels_per_group * s.kernel_numel();
  for (int64_t bg = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp; bg < s.batch * s.groups;
       bg += warps) {
    acc_t sum[1 + kMaxAxes] = {};
    for (int64_t i = lane; i < channel_blocks * span; i += kWarp) {
      const int64_t block = i / span, column = bg * span + i % span;
      const acc_t* slot = partials + (block * columns + column) * values;
#pragma unroll
      for (int a = 0; a < values; ++a) sum[a] += slot[a];
    }
#pragma unroll
    for (int a = 0; a < values; ++a) {
      for (int mask = kWarp / 2; mask > 0; mask /= 2) sum[a] += __shfl_xor_sync(0xffffffffu, sum[a], mask);
    }
    if (lane == 0) detail::store_routing_grads<acc_t>(sum[0], sum + 1, scales, s, bg, grad_offsets, grad_scales);
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
// NUMEL is the largest tensor the kernel indexes; 32 bits suffice when a grid-stride loop's last step past
// it still fits (else the counter wraps negative and passes the `< total` test).
#define AGI_DISPATCH_INDEX_AND_TAPS(NUMEL, SPATIAL, ...)                                     \
  [&] {                                                                                      \
    const bool small_index = (NUMEL) + kMaxGridThreads < std::numeric_limits<int32_t>::max(); \
    if ((SPATIAL) == 2) {                                                                    \
      constexpr int num_taps = 4;                                                            \
      if (small_index) {                                                                     \
        using index_t = int32_t;                                                             \
        __VA_ARGS__();                                                                       \
      } else {                                                                               \
        using index_t = int64_t;                                                             \
        __VA_ARGS__();                                                                       \
      }                                                                                      \
    } else {                                                                                 \
      constexpr int num_taps = 8;                                                            \
      if (small_index) {                                                                     \
        using index_t = int32_t;                                                             \
        __VA_ARGS__();                                                                       \
      } else {                                                                               \
        using index_t = int64_t;                                                             \
        __VA_ARGS__();                                                                       \
      }                                                                                      \
    }                                                                                        \
  }()

// grad_w = Σ_b transposed roll of grad (both implementations).
template <typename scalar_t>
void grad_weight_taps(const at::Tensor& gr, const at::Tensor& o, const at::Tensor& sc, at::Tensor& grad_w,
                      const RollShape& s, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const Taps taps = build_taps<scalar_t>(o, sc, s, /*transpose=*/true, stream);
  // indexed by grad, B times larger than grad_w
  AGI_DISPATCH_INDEX_AND_TAPS(gr.numel(), s.spatial, [&] {
    group_roll_grad_weight_kernel<scalar_t, index_t, num_taps><<<blocks_for(grad_w.numel()), kThreads, 0, stream>>>(
        gr.const_data_ptr<scalar_t>(), taps.index.const_data_ptr<int32_t>(), taps.weight.const_data_ptr<acc_t>(),
        grad_w.mutable_data_ptr<scalar_t>(), s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// AGI_MONAI_GROUP_ROLL_CUDA (read at every call, so that tests and benchmarks can switch within one process).
bool columns_selected() {
  const char* env = std::getenv("AGI_MONAI_GROUP_ROLL_CUDA");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0 || std::strcmp(env, "columns") == 0) return true;
  TORCH_CHECK(
      std::strcmp(env, "taps") == 0, "group_roll: AGI_MONAI_GROUP_ROLL_CUDA must be one of auto, taps, columns; got '",
      env, "'");
  return false;
}

template <typename scalar_t>
void forward_columns(const at::Tensor& w, const at::Tensor& o, const at::Tensor& sc, at::Tensor& out, const RollShape& s,
                     cudaStream_t stream) {
  const ColumnGrid grid = column_grid(s);
  AGI_DISPATCH_INDEX_AND_TAPS(out.numel(), s.spatial, [&] {
    group_roll_forward_columns_kernel<scalar_t, index_t, num_taps><<<grid.blocks, kThreads, 0, stream>>>(
        w.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(), sc.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), s, static_cast<index_t>(grid.columns),
        static_cast<index_t>(grid.channels_per_block));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename scalar_t>
void grad_routing_columns(const at::Tensor& gr, const at::Tensor& w, const at::Tensor& o, const at::Tensor& sc,
                          at::Tensor& grad_o, at::Tensor& grad_s, const RollShape& s, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const ColumnGrid grid = column_grid(s);
  const at::Tensor partials = at::empty(
      {static_cast<int64_t>(grid.blocks.y) * grid.columns * (1 + s.spatial)},
      gr.options().dtype(at::toOpMathType(gr.scalar_type())));
  AGI_DISPATCH_INDEX_AND_TAPS(gr.numel(), s.spatial, [&] {
    group_roll_grad_routing_columns_kernel<scalar_t, index_t, num_taps><<<grid.blocks, kThreads, 0, stream>>>(
        gr.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(),
        partials.mutable_data_ptr<acc_t>(), s, static_cast<index_t>(grid.columns),
        static_cast<index_t>(grid.channels_per_block));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    constexpr int kWarpsPerBlock = kThreads / 32;
    const int64_t reduce_blocks = std::min<int64_t>((s.batch * s.groups + kWarpsPerBlock - 1) / kWarpsPerBlock, kMaxBlocks);
    group_roll_grad_routing_reduce_kernel<scalar_t, num_taps><<<reduce_blocks, kThreads, 0, stream>>>(
        partials.const_data_ptr<acc_t>(), sc.const_data_ptr<scalar_t>(), grad_o.mutable_data_ptr<scalar_t>(),
        grad_s.mutable_data_ptr<scalar_t>(), s, grid.columns, static_cast<int64_t>(grid.blocks.y));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor group_roll_cuda(const at::Tensor& weight, const at::Tensor& offsets, const at::Tensor& scales) {
  detail::check_group_roll_inputs(weight, offsets, scales);
  TORCH_CHECK(weight.is_cuda(), "group_roll (CUDA kernel): weight must be a CUDA tensor, got ", weight.device());
  const c10::cuda::CUDAGuard device_guard(weight.device());
  const RollShape s = detail::roll_shape(weight, offsets);
  const at::Tensor w = weight.contiguous(), o = offsets.contiguous(), sc = scales.contiguous();
  at::Tensor out = at::empty(detail::output_sizes(weight, s.batch), weight.options());
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (columns_selected()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "group_roll_cuda", [&] {
      forward_columns<scalar_t>(w, o, sc, out, s, stream);
    });
    return out;
  }
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
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (grad.numel() > 0 && columns_selected()) {
    // Every element of the three gradients is written (grad_w by the tap kernel, as below).
    at::Tensor grad_w = at::empty_like(w), grad_o = at::empty_like(o), grad_s = at::empty_like(sc);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "group_roll_backward_cuda", [&] {
      grad_routing_columns<scalar_t>(gr, w, o, sc, grad_o, grad_s, s, stream);
      grad_weight_taps<scalar_t>(gr, o, sc, grad_w, s, stream);
    });
    return {grad_w, grad_o, grad_s};
  }
  at::Tensor grad_w = at::zeros_like(w);
  at::Tensor grad_o = at::zeros_like(o);
  at::Tensor grad_s = at::zeros_like(sc);
  if (grad.numel() == 0) return {grad_w, grad_o, grad_s};
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
    grad_weight_taps<scalar_t>(gr, o, sc, grad_w, s, stream);
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
