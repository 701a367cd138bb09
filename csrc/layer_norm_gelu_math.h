// Per-element maths of agi_monai::layer_norm_gelu, shared by the CPU and CUDA kernels.
//
// One row is the C entries of one position's channels (a channels-last feature map seen as (rows, C)):
//   xhat = (x - mean) * rstd,  rstd = 1 / sqrt(var + eps)   (biased variance, as torch.nn.LayerNorm)
//   u = xhat * gamma + beta,   y = gelu(u) = u * Phi(u)      (exact erf form, as torch.nn.GELU())
// Backward, with dz = dy * gelu'(u) and dxhat = dz * gamma:
//   dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  dgamma = sum_rows dz * xhat,
//   dbeta = sum_rows dz.
// The statistics are recomputed in the backward from x (no saved mean/rstd, no saved u).
#pragma once

#include <cmath>
#include <type_traits>

#ifndef AGI_HOST_DEVICE
#if defined(__CUDACC__)
#define AGI_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define AGI_HOST_DEVICE inline
#endif
#endif

namespace agi_monai {
namespace ops {
namespace detail {

template <typename acc_t>
AGI_HOST_DEVICE acc_t erf_of(acc_t v) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return erff(v);
  } else {
    return erf(v);
  }
}

template <typename acc_t>
AGI_HOST_DEVICE acc_t exp_of(acc_t v) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return expf(v);
  } else {
    return exp(v);
  }
}

template <typename acc_t>
AGI_HOST_DEVICE acc_t rsqrt_of(acc_t v) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return 1.0f / sqrtf(v);
  } else {
    return 1.0 / sqrt(v);
  }
}

// Phi(u), the standard normal CDF.
template <typename acc_t>
AGI_HOST_DEVICE acc_t normal_cdf(acc_t u) {
  return acc_t(0.5) * (acc_t(1) + erf_of<acc_t>(u * acc_t(0.70710678118654752440)));
}

template <typename acc_t>
AGI_HOST_DEVICE acc_t gelu(acc_t u) {
  return u * normal_cdf<acc_t>(u);
}

// d/du [u * Phi(u)] = Phi(u) + u * phi(u).
template <typename acc_t>
AGI_HOST_DEVICE acc_t gelu_derivative(acc_t u) {
  const acc_t pdf = exp_of<acc_t>(acc_t(-0.5) * u * u) * acc_t(0.39894228040143267794);
  return normal_cdf<acc_t>(u) + u * pdf;
}

// The two per-row sums of the backward, per entry: dz (the GELU's input gradient) and dxhat.
template <typename acc_t>
struct NormGeluGrad {
  acc_t dz;
  acc_t dxhat;
};

template <typename acc_t>
AGI_HOST_DEVICE NormGeluGrad<acc_t> norm_gelu_grad(acc_t dy, acc_t xhat, acc_t gamma, acc_t beta) {
  const acc_t dz = dy * gelu_derivative<acc_t>(xhat * gamma + beta);
  return {dz, dz * gamma};
}

// dx of one entry from the row's means of dxhat and dxhat * xhat.
template <typename acc_t>
AGI_HOST_DEVICE acc_t norm_input_grad(acc_t dxhat, acc_t xhat, acc_t rstd, acc_t mean_dxhat, acc_t mean_dxhat_xhat) {
  return rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat);
}

}  // namespace detail
}  // namespace ops
}  // namespace agi_monai
