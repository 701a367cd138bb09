// CUDA kernels of agi_monai::group_roll and its backward.
//
// Only the c10 CUDA headers are included: the project's CUDA toolkit is minimal and
// ATen/cuda/CUDAContext.h pulls in cuSPARSE headers it lacks (see docs/TOOLCHAIN notes).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../group_roll.h"
#include "../group_roll_math.h"

namespace agi_monai {
namespace ops {

namespace {

using detail::AxisRoll;
using detail::kMaxAxes;
using detail::RollShape;

constexpr int kThreads = 256;

inline int blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  // Grid-stride loops cover the rest; 65535 * 8 keeps the grid well inside the x-dimension limit.
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535 * 8));
}

template <typename scalar_t>
__global__ void group_roll_forward_kernel(
    const scalar_t* __restrict__ w, const scalar_t* __restrict__ offsets, const scalar_t* __restrict__ scales,
    scalar_t* __restrict__ out, const RollShape s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = s.kernel_numel();
  const int64_t total = s.batch * s.weight_numel();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t k = i % K;
    const int64_t oc = (i / K) % (s.out_channels * s.in_channels);
    const int64_t b = i / s.weight_numel();
    const int64_t g = (oc % s.in_channels) / s.channels_per_group;
    AxisRoll<acc_t> rolls[kMaxAxes];
    detail::load_axis_rolls<acc_t>(offsets, s, b, g, rolls);
    const int64_t x = k % s.kx, y = (k / s.kx) % s.ky, z = k / (s.kx * s.ky);
    const acc_t value = detail::rolled_value<acc_t>(w + oc * K, rolls, z, y, x, nullptr);
    out[i] = static_cast<scalar_t>(static_cast<acc_t>(scales[b * s.groups + g]) * value);
  }
}

template <typename scalar_t>
__global__ void group_roll_grad_weight_kernel(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ offsets, const scalar_t* __restrict__ scales,
    scalar_t* __restrict__ grad_w, const RollShape s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = s.kernel_numel();
  const int64_t total = s.weight_numel();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t k = i % K;
    const int64_t oc = i / K;
    const int64_t g = (oc % s.in_channels) / s.channels_per_group;
    const int64_t x = k % s.kx, y = (k / s.kx) % s.ky, z = k / (s.kx * s.ky);
    acc_t acc = acc_t(0);
    for (int64_t b = 0; b < s.batch; ++b) {
      AxisRoll<acc_t> rolls[kMaxAxes];
      detail::load_axis_rolls<acc_t>(offsets, s, b, g, rolls);
      const acc_t scale = static_cast<acc_t>(scales[b * s.groups + g]);
      acc += scale * detail::unrolled_grad<acc_t>(grad + b * total + oc * K, rolls, z, y, x);
    }
    grad_w[i] = static_cast<scalar_t>(acc);
  }
}

// One (sample, group) per blockIdx.y; blockIdx.x strides over that group's C_out x C_in/n x K
// elements. Each block reduces in shared memory and adds its partial sums atomically into
// accumulators of the op-math type (float for half/bfloat16/float, double for double).
template <typename scalar_t>
__global__ void group_roll_grad_routing_kernel(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ w, const scalar_t* __restrict__ offsets,
    at::opmath_type<scalar_t>* __restrict__ d_scale, at::opmath_type<scalar_t>* __restrict__ d_offset,
    const RollShape s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t bg = blockIdx.y;
  const int64_t b = bg / s.groups, g = bg % s.groups;
  const int64_t K = s.kernel_numel();
  const int64_t per_group = s.out_channels * s.channels_per_group * K;
  AxisRoll<acc_t> rolls[kMaxAxes];
  detail::load_axis_rolls<acc_t>(offsets, s, b, g, rolls);

  acc_t sums[1 + kMaxAxes] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < per_group;
       j += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t k = j % K;
    const int64_t c = g * s.channels_per_group + (j / K) % s.channels_per_group;
    const int64_t o = j / (K * s.channels_per_group);
    const int64_t oc = o * s.in_channels + c;
    const int64_t x = k % s.kx, y = (k / s.kx) % s.ky, z = k / (s.kx * s.ky);
    acc_t d_value[kMaxAxes];
    const acc_t value = detail::rolled_value<acc_t>(w + oc * K, rolls, z, y, x, d_value);
    const acc_t go = static_cast<acc_t>(grad[b * s.weight_numel() + oc * K + k]);
    sums[0] += go * value;
    for (int a = 0; a < kMaxAxes; ++a) sums[1 + a] += go * d_value[a];
  }

  __shared__ acc_t shared[1 + kMaxAxes][kThreads];
  for (int q = 0; q < 1 + kMaxAxes; ++q) shared[q][threadIdx.x] = sums[q];
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      for (int q = 0; q < 1 + kMaxAxes; ++q) shared[q][threadIdx.x] += shared[q][threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    atomicAdd(d_scale + bg, shared[0][0]);
    for (int64_t a = 0; a < s.spatial; ++a) atomicAdd(d_offset + bg * s.spatial + a, shared[1 + a][0]);
  }
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "group_roll_cuda", [&] {
    group_roll_forward_kernel<scalar_t><<<blocks_for(out.numel()), kThreads, 0, stream>>>(
        w.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(), sc.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  const at::ScalarType acc_type = at::toOpMathType(weight.scalar_type());
  at::Tensor d_offset = at::zeros(o.sizes(), o.options().dtype(acc_type));
  at::Tensor d_scale = at::zeros(sc.sizes(), sc.options().dtype(acc_type));
  if (grad.numel() == 0) return {grad_w, d_offset.to(offsets.scalar_type()), d_scale.to(scales.scalar_type())};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "group_roll_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    group_roll_grad_weight_kernel<scalar_t><<<blocks_for(w.numel()), kThreads, 0, stream>>>(
        gr.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(), sc.const_data_ptr<scalar_t>(),
        grad_w.mutable_data_ptr<scalar_t>(), s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t per_group = s.out_channels * s.channels_per_group * s.kernel_numel();
    // Enough blocks per (sample, group) to fill the GPU, few enough to keep the atomics cheap.
    const int blocks_x = static_cast<int>(std::min<int64_t>((per_group + kThreads - 1) / kThreads, 64));
    TORCH_CHECK(
        s.batch * s.groups <= 65535, "group_roll (CUDA kernel): B * n must be at most 65535, got B = ", s.batch,
        ", n = ", s.groups);
    const dim3 grid(std::max(blocks_x, 1), static_cast<unsigned int>(s.batch * s.groups));
    group_roll_grad_routing_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        gr.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(),
        d_scale.mutable_data_ptr<acc_t>(), d_offset.mutable_data_ptr<acc_t>(), s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // d_offset holds sum(grad * d rolled / d offset); the chain rule multiplies by the group's scale.
  at::Tensor grad_o = (d_offset * sc.to(acc_type).unsqueeze(-1)).to(offsets.scalar_type());
  return {grad_w, grad_o, d_scale.to(scales.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(agi_monai, CUDA, m) {
  m.impl(TORCH_SELECTIVE_NAME("agi_monai::group_roll"), TORCH_FN(group_roll_cuda));
  m.impl(TORCH_SELECTIVE_NAME("agi_monai::_group_roll_backward"), TORCH_FN(group_roll_backward_cuda));
}

}  // namespace ops
}  // namespace agi_monai
