// CPU kernels of agi_monai::layer_norm_gelu and its backward: plain loops over rows of C entries with
// the shared per-element maths (layer_norm_gelu_math.h), so that CI, which has no GPU, tests the maths the
// CUDA kernels run. AGI-Net uses the fused op on CUDA only: on CPU, ATen's vectorised LayerNorm and GELU
// are faster than these scalar loops (erf is not vectorised here), and their memory traffic matters less.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../layer_norm_gelu.h"

namespace agi_monai {
namespace ops {

namespace {

// Rows per block of the gamma/beta partial sums: the blocks, not the threads, fix the summation order,
// so the gradients do not depend on the number of threads.
constexpr int64_t kRowsPerBlock = 256;

template <typename scalar_t, typename acc_t>
void row_moments(const scalar_t* x, int64_t channels, double eps, acc_t* mean, acc_t* rstd) {
  acc_t sum = 0;
  for (int64_t c = 0; c < channels; ++c) sum += static_cast<acc_t>(x[c]);
  const acc_t m = sum / static_cast<acc_t>(channels);
  acc_t squares = 0;
  for (int64_t c = 0; c < channels; ++c) {
    const acc_t d = static_cast<acc_t>(x[c]) - m;
    squares += d * d;
  }
  *mean = m;
  *rstd = detail::rsqrt_of<acc_t>(squares / static_cast<acc_t>(channels) + static_cast<acc_t>(eps));
}

at::Tensor layer_norm_gelu_cpu(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  detail::check_layer_norm_gelu_inputs(input, weight, bias, eps);
  TORCH_CHECK(input.device().is_cpu(), "layer_norm_gelu (CPU kernel): input must be a CPU tensor, got ", input.device());
  const at::Tensor x = input.contiguous(), g = weight.contiguous(), b = bias.contiguous();
  at::Tensor out = at::empty_like(x);
  const int64_t channels = x.size(-1), rows = x.numel() / channels;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_gelu_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    scalar_t* yp = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* xr = xp + r * channels;
        acc_t mean, rstd;
        row_moments<scalar_t, acc_t>(xr, channels, eps, &mean, &rstd);
        for (int64_t c = 0; c < channels; ++c) {
          const acc_t xhat = (static_cast<acc_t>(xr[c]) - mean) * rstd;
          yp[r * channels + c] = static_cast<scalar_t>(
              detail::gelu<acc_t>(xhat * static_cast<acc_t>(gp[c]) + static_cast<acc_t>(bp[c])));
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_gelu_backward_cpu(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  detail::check_layer_norm_gelu_inputs(input, weight, bias, eps);
  detail::check_layer_norm_gelu_grad(grad, input);
  const at::Tensor dy = grad.contiguous(), x = input.contiguous(), g = weight.contiguous(), b = bias.contiguous();
  at::Tensor grad_input = at::empty_like(x);
  const int64_t channels = x.size(-1), rows = x.numel() / channels;
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  // (block, [dgamma, dbeta], C) partial sums, reduced over blocks below.
  at::Tensor partial = at::zeros({blocks, 2, channels}, x.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_gelu_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    scalar_t* dxp = grad_input.mutable_data_ptr<scalar_t>();
    acc_t* pp = partial.mutable_data_ptr<acc_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
      for (int64_t block = block_begin; block < block_end; ++block) {
        acc_t* d_gamma = pp + block * 2 * channels;
        acc_t* d_beta = d_gamma + channels;
        const int64_t row_end = std::min(rows, (block + 1) * kRowsPerBlock);
        for (int64_t r = block * kRowsPerBlock; r < row_end; ++r) {
          const scalar_t* xr = xp + r * channels;
          const scalar_t* dyr = dyp + r * channels;
          acc_t mean, rstd;
          row_moments<scalar_t, acc_t>(xr, channels, eps, &mean, &rstd);
          acc_t sum_dxhat = 0, sum_dxhat_xhat = 0;
          for (int64_t c = 0; c < channels; ++c) {
            const acc_t xhat = (static_cast<acc_t>(xr[c]) - mean) * rstd;
            const auto d = detail::norm_gelu_grad<acc_t>(
                static_cast<acc_t>(dyr[c]), xhat, static_cast<acc_t>(gp[c]), static_cast<acc_t>(bp[c]));
            sum_dxhat += d.dxhat;
            sum_dxhat_xhat += d.dxhat * xhat;
            d_gamma[c] += d.dz * xhat;
            d_beta[c] += d.dz;
          }
          const acc_t mean_dxhat = sum_dxhat / static_cast<acc_t>(channels);
          const acc_t mean_dxhat_xhat = sum_dxhat_xhat / static_cast<acc_t>(channels);
          for (int64_t c = 0; c < channels; ++c) {
            const acc_t xhat = (static_cast<acc_t>(xr[c]) - mean) * rstd;
            const auto d = detail::norm_gelu_grad<acc_t>(
                static_cast<acc_t>(dyr[c]), xhat, static_cast<acc_t>(gp[c]), static_cast<acc_t>(bp[c]));
            dxp[r * channels + c] =
                static_cast<scalar_t>(detail::norm_input_grad<acc_t>(d.dxhat, xhat, rstd, mean_dxhat, mean_dxhat_xhat));
          }
        }
      }
    });
  });
  auto [grad_weight, grad_bias] = detail::parameter_grads(partial, x.scalar_type());
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(agi_monai, CPU, m) {
  m.impl(TORCH_SELECTIVE_NAME("agi_monai::layer_norm_gelu"), TORCH_FN(layer_norm_gelu_cpu));
  m.impl(TORCH_SELECTIVE_NAME("agi_monai::_layer_norm_gelu_backward"), TORCH_FN(layer_norm_gelu_backward_cpu));
}

}  // namespace ops
}  // namespace agi_monai
