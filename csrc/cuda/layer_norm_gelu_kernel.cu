// CUDA kernels of agi_monai::layer_norm_gelu and its backward: one warp per row of C entries (lane l holds
// entries l, l + 32, ..., so a warp's loads are coalesced), warp-shuffle sums for the row statistics, and
// the per-element maths of layer_norm_gelu_math.h (also run by the CPU kernels that CI tests).
// The backward recomputes the statistics from x. Each lane accumulates the gamma/beta gradients of its own
// columns over the warp's rows, the warps of a block add theirs in shared memory, each block writes one
// partial row, and the partials are summed in a fixed order (deterministic for a given device).
// Two variants: for C <= 32 * kMaxCachedPerLane (AGI-Net's 64-512 channels) a row lives in registers
// (kPerLane entries a lane), read once from memory, with gelu' computed once an entry and the lane's
// gamma/beta sums in registers; wider rows are streamed (re-read from L1 in each pass).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../layer_norm_gelu.h"

namespace agi_monai {
namespace ops {

namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
// Shared memory a block may use without opting in (every architecture since sm_35).
constexpr int64_t kSharedBytes = 48 * 1024;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Mean and 1/sqrt(var + eps) of one row, two passes (the second read hits L1), every lane gets both.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void warp_row_moments(
    const scalar_t* __restrict__ x, int64_t channels, int lane, double eps, acc_t* mean, acc_t* rstd) {
  acc_t sum = 0;
  for (int64_t c = lane; c < channels; c += kWarp) sum += static_cast<acc_t>(x[c]);
  const acc_t m = warp_sum(sum) / static_cast<acc_t>(channels);
  acc_t squares = 0;
  for (int64_t c = lane; c < channels; c += kWarp) {
    const acc_t d = static_cast<acc_t>(x[c]) - m;
    squares += d * d;
  }
  *mean = m;
  *rstd = detail::rsqrt_of<acc_t>(warp_sum(squares) / static_cast<acc_t>(channels) + static_cast<acc_t>(eps));
}

// After a backward kernel's row loop: the block's row of partial, its warps' (2, C) gamma/beta sums added up.
template <typename acc_t>
__device__ __forceinline__ void write_block_partials(
    const acc_t* shared, acc_t* __restrict__ partial, int64_t warps, int64_t channels) {
  __syncthreads();
  for (int64_t i = threadIdx.x; i < 2 * channels; i += blockDim.x) {
    acc_t sum = 0;
    for (int64_t w = 0; w < warps; ++w) sum += shared[w * 2 * channels + i];
    partial[blockIdx.x * 2 * channels + i] = sum;
  }
}

template <typename scalar_t>
__global__ void layer_norm_gelu_forward_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ gamma, const scalar_t* __restrict__ beta,
    scalar_t* __restrict__ y, const int64_t rows, const int64_t channels, const double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = blockDim.x / kWarp;
  // The row loop is uniform within a warp, so every lane takes part in the shuffles.
  for (int64_t row = blockIdx.x * warps + threadIdx.x / kWarp; row < rows; row += gridDim.x * warps) {
    const scalar_t* xr = x + row * channels;
    acc_t mean, rstd;
    warp_row_moments<scalar_t, acc_t>(xr, channels, lane, eps, &mean, &rstd);
    for (int64_t c = lane; c < channels; c += kWarp) {
      const acc_t xhat = (static_cast<acc_t>(xr[c]) - mean) * rstd;
      y[row * channels + c] = static_cast<scalar_t>(
          detail::gelu<acc_t>(xhat * static_cast<acc_t>(gamma[c]) + static_cast<acc_t>(beta[c])));
    }
  }
}

// partial: (gridDim.x, 2, C) sums of dgamma and dbeta over the rows of each block.
template <typename scalar_t>
__global__ void layer_norm_gelu_backward_kernel(
    const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, const scalar_t* __restrict__ gamma,
    const scalar_t* __restrict__ beta, scalar_t* __restrict__ dx, at::opmath_type<scalar_t>* __restrict__ partial,
    const int64_t rows, const int64_t channels, const double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ unsigned char shared_bytes[];
  acc_t* shared = reinterpret_cast<acc_t*>(shared_bytes);  // (warps, 2, C)
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = blockDim.x / kWarp, warp = threadIdx.x / kWarp;
  for (int64_t i = threadIdx.x; i < warps * 2 * channels; i += blockDim.x) shared[i] = 0;
  __syncthreads();
  acc_t* d_gamma = shared + warp * 2 * channels;  // lane-owned columns c ≡ lane (mod 32): no races
  acc_t* d_beta = d_gamma + channels;
  for (int64_t row = blockIdx.x * warps + warp; row < rows; row += gridDim.x * warps) {
    const scalar_t* xr = x + row * channels;
    const scalar_t* dyr = dy + row * channels;
    acc_t mean, rstd;
    warp_row_moments<scalar_t, acc_t>(xr, channels, lane, eps, &mean, &rstd);
    acc_t sum_dxhat = 0, sum_dxhat_xhat = 0;
    for (int64_t c = lane; c < channels; c += kWarp) {
      const acc_t xhat = (static_cast<acc_t>(xr[c]) - mean) * rstd;
      const auto d = detail::norm_gelu_grad<acc_t>(
          static_cast<acc_t>(dyr[c]), xhat, static_cast<acc_t>(gamma[c]), static_cast<acc_t>(beta[c]));
      sum_dxhat += d.dxhat;
      sum_dxhat_xhat += d.dxhat * xhat;
      d_gamma[c] += d.dz * xhat;
      d_beta[c] += d.dz;
    }
    const acc_t mean_dxhat = warp_sum(sum_dxhat) / static_cast<acc_t>(channels);
    const acc_t mean_dxhat_xhat = warp_sum(sum_dxhat_xhat) / static_cast<acc_t>(channels);
    for (int64_t c = lane; c < channels; c += kWarp) {
      const acc_t xhat = (static_cast<acc_t>(xr[c]) - mean) * rstd;
      const auto d = detail::norm_gelu_grad<acc_t>(
          static_cast<acc_t>(dyr[c]), xhat, static_cast<acc_t>(gamma[c]), static_cast<acc_t>(beta[c]));
      dx[row * channels + c] =
          static_cast<scalar_t>(detail::norm_input_grad<acc_t>(d.dxhat, xhat, rstd, mean_dxhat, mean_dxhat_xhat));
    }
  }
  write_block_partials(shared, partial, warps, channels);
}

constexpr int kMaxCachedPerLane = 16;

// gamma and beta of the lane's entries lane, lane + 32, ... (zero past C).
template <typename scalar_t, typename acc_t, int kPerLane>
__device__ __forceinline__ void load_lane_parameters(
    const scalar_t* __restrict__ gamma, const scalar_t* __restrict__ beta, int64_t channels, int lane, acc_t* g,
    acc_t* b) {
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int64_t c = lane + j * kWarp;
    g[j] = c < channels ? static_cast<acc_t>(gamma[c]) : acc_t(0);
    b[j] = c < channels ? static_cast<acc_t>(beta[c]) : acc_t(0);
  }
}

// warp_row_moments of a row held in registers (v: the lane's entries, zero past C).
template <typename acc_t, int kPerLane>
__device__ __forceinline__ void lane_row_moments(
    const acc_t* v, int64_t channels, int lane, double eps, acc_t* mean, acc_t* rstd) {
  acc_t sum = 0;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) sum += v[j];
  const acc_t m = warp_sum(sum) / static_cast<acc_t>(channels);
  acc_t squares = 0;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const acc_t d = lane + j * kWarp < channels ? v[j] - m : acc_t(0);
    squares += d * d;
  }
  *mean = m;
  *rstd = detail::rsqrt_of<acc_t>(warp_sum(squares) / static_cast<acc_t>(channels) + static_cast<acc_t>(eps));
}

// Row in registers: kPerLane entries a lane, entries past C read as zero and never written.
template <typename scalar_t, int kPerLane>
__global__ void layer_norm_gelu_forward_cached_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ gamma, const scalar_t* __restrict__ beta,
    scalar_t* __restrict__ y, const int64_t rows, const int64_t channels, const double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = blockDim.x / kWarp;
  acc_t g[kPerLane], b[kPerLane];
  load_lane_parameters<scalar_t, acc_t, kPerLane>(gamma, beta, channels, lane, g, b);
  for (int64_t row = blockIdx.x * warps + threadIdx.x / kWarp; row < rows; row += gridDim.x * warps) {
    const scalar_t* xr = x + row * channels;
    acc_t v[kPerLane];
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int64_t c = lane + j * kWarp;
      v[j] = c < channels ? static_cast<acc_t>(xr[c]) : acc_t(0);
    }
    acc_t mean, rstd;
    lane_row_moments<acc_t, kPerLane>(v, channels, lane, eps, &mean, &rstd);
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int64_t c = lane + j * kWarp;
      if (c < channels) y[row * channels + c] = static_cast<scalar_t>(detail::gelu<acc_t>((v[j] - mean) * rstd * g[j] + b[j]));
    }
  }
}

template <typename scalar_t, int kPerLane>
__global__ void layer_norm_gelu_backward_cached_kernel(
    const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, const scalar_t* __restrict__ gamma,
    const scalar_t* __restrict__ beta, scalar_t* __restrict__ dx, at::opmath_type<scalar_t>* __restrict__ partial,
    const int64_t rows, const int64_t channels, const double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ unsigned char shared_bytes[];
  acc_t* shared = reinterpret_cast<acc_t*>(shared_bytes);  // (warps, 2, C)
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = blockDim.x / kWarp, warp = threadIdx.x / kWarp;
  acc_t g[kPerLane], b[kPerLane], d_gamma[kPerLane], d_beta[kPerLane];
  load_lane_parameters<scalar_t, acc_t, kPerLane>(gamma, beta, channels, lane, g, b);
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) d_gamma[j] = d_beta[j] = 0;
  for (int64_t row = blockIdx.x * warps + warp; row < rows; row += gridDim.x * warps) {
    const scalar_t* xr = x + row * channels;
    const scalar_t* dyr = dy + row * channels;
    acc_t xhat[kPerLane], dxhat[kPerLane];
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int64_t c = lane + j * kWarp;
      xhat[j] = c < channels ? static_cast<acc_t>(xr[c]) : acc_t(0);  // x until the loop below
      dxhat[j] = c < channels ? static_cast<acc_t>(dyr[c]) : acc_t(0);  // dy until the loop below
    }
    acc_t mean, rstd;
    lane_row_moments<acc_t, kPerLane>(xhat, channels, lane, eps, &mean, &rstd);
    acc_t sum_dxhat = 0, sum_dxhat_xhat = 0;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      // Entries past C have dy = 0, hence dz = dxhat = 0: they add nothing to the sums.
      xhat[j] = (xhat[j] - mean) * rstd;
      const auto d = detail::norm_gelu_grad<acc_t>(dxhat[j], xhat[j], g[j], b[j]);
      dxhat[j] = d.dxhat;
      sum_dxhat += d.dxhat;
      sum_dxhat_xhat += d.dxhat * xhat[j];
      d_gamma[j] += d.dz * xhat[j];
      d_beta[j] += d.dz;
    }
    const acc_t mean_dxhat = warp_sum(sum_dxhat) / static_cast<acc_t>(channels);
    const acc_t mean_dxhat_xhat = warp_sum(sum_dxhat_xhat) / static_cast<acc_t>(channels);
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int64_t c = lane + j * kWarp;
      if (c < channels)
        dx[row * channels + c] =
            static_cast<scalar_t>(detail::norm_input_grad<acc_t>(dxhat[j], xhat[j], rstd, mean_dxhat, mean_dxhat_xhat));
    }
  }
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int64_t c = lane + j * kWarp;
    if (c < channels) {
      shared[warp * 2 * channels + c] = d_gamma[j];
      shared[warp * 2 * channels + channels + c] = d_beta[j];
    }
  }
  write_block_partials(shared, partial, warps, channels);
}

// Calls body(std::integral_constant<int, kPerLane>) with the smallest power of two kPerLane >= ceil(C / 32) where
// C <= 32 * kMaxCachedPerLane (wider rows keep the streaming kernels). (A generic lambda, not a templated one:
// torch < 2.13 builds extensions as C++17.)
template <typename Body>
void with_cached_width(int64_t channels, Body&& body) {
  if (channels <= kWarp) body(std::integral_constant<int, 1>{});
  else if (channels <= 2 * kWarp) body(std::integral_constant<int, 2>{});
  else if (channels <= 4 * kWarp) body(std::integral_constant<int, 4>{});
  else if (channels <= 8 * kWarp) body(std::integral_constant<int, 8>{});
  else if (channels <= kMaxCachedPerLane * kWarp) body(std::integral_constant<int, kMaxCachedPerLane>{});
}

// Enough blocks to fill the device (a few per SM); grid-stride loops cover the remaining rows.
unsigned int row_blocks(int64_t rows, int64_t warps, int blocks_per_sm) {
  int device = 0, sms = 1;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t needed = (rows + warps - 1) / warps;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(needed, int64_t(sms) * blocks_per_sm)));
}

at::Tensor layer_norm_gelu_cuda(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  detail::check_layer_norm_gelu_inputs(input, weight, bias, eps);
  TORCH_CHECK(input.is_cuda(), "layer_norm_gelu (CUDA kernel): input must be a CUDA tensor, got ", input.device());
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::Tensor x = input.contiguous(), g = weight.contiguous(), b = bias.contiguous();
  at::Tensor out = at::empty_like(x);
  const int64_t channels = x.size(-1), rows = x.numel() / channels;
  if (rows == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const unsigned int blocks = row_blocks(rows, kWarpsPerBlock, 8);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_gelu_cuda", [&] {
    auto kernel = &layer_norm_gelu_forward_kernel<scalar_t>;
    with_cached_width(channels, [&](auto per_lane) {
      kernel = &layer_norm_gelu_forward_cached_kernel<scalar_t, decltype(per_lane)::value>;
    });
    kernel<<<blocks, kWarpsPerBlock * kWarp, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), rows, channels, eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_gelu_backward_cuda(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  detail::check_layer_norm_gelu_inputs(input, weight, bias, eps);
  detail::check_layer_norm_gelu_grad(grad, input);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::Tensor dy = grad.contiguous(), x = input.contiguous(), g = weight.contiguous(), b = bias.contiguous();
  at::Tensor grad_input = at::empty_like(x);
  const int64_t channels = x.size(-1), rows = x.numel() / channels;
  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  const int64_t row_bytes = 2 * channels * static_cast<int64_t>(c10::elementSize(acc_type));
  const int64_t warps = std::min<int64_t>(kWarpsPerBlock, kSharedBytes / row_bytes);
  TORCH_CHECK(
      warps >= 1, "layer_norm_gelu (CUDA kernel): C = ", channels, " is too large for the backward's shared memory (at most ",
      kSharedBytes / (2 * c10::elementSize(acc_type)), " entries for ", x.scalar_type(), ")");
  const unsigned int blocks = rows == 0 ? 1 : row_blocks(rows, warps, 4);
  // Every block writes its whole partial row; with no rows the sums are zero.
  const std::vector<int64_t> partial_sizes{static_cast<int64_t>(blocks), 2, channels};
  at::Tensor partial = rows == 0 ? at::zeros(partial_sizes, x.options().dtype(acc_type))
                                 : at::empty(partial_sizes, x.options().dtype(acc_type));
  if (rows > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_gelu_backward_cuda", [&] {
      auto kernel = &layer_norm_gelu_backward_kernel<scalar_t>;
      with_cached_width(channels, [&](auto per_lane) {
        kernel = &layer_norm_gelu_backward_cached_kernel<scalar_t, decltype(per_lane)::value>;
      });
      kernel<<<blocks, warps * kWarp, warps * row_bytes, stream>>>(
          dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
          b.const_data_ptr<scalar_t>(), grad_input.mutable_data_ptr<scalar_t>(),
          partial.mutable_data_ptr<at::opmath_type<scalar_t>>(), rows, channels, eps);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  auto [grad_weight, grad_bias] = detail::parameter_grads(partial, x.scalar_type());
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(agi_monai, CUDA, m) {
  m.impl(TORCH_SELECTIVE_NAME("agi_monai::layer_norm_gelu"), TORCH_FN(layer_norm_gelu_cuda));
  m.impl(TORCH_SELECTIVE_NAME("agi_monai::_layer_norm_gelu_backward"), TORCH_FN(layer_norm_gelu_backward_cuda));
}

}  // namespace ops
}  // namespace agi_monai
