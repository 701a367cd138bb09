// Per-element maths of the group-wise fractional circular roll, shared by the CPU and CUDA kernels.
//
// A real offset o along an axis of size k splits into an integer shift s = floor(o) (reduced mod k,
// since the roll is circular) and a fraction t = o - floor(o). The fractional roll is the blend
//   (1 - t) * roll(w, s) + t * roll(w, s + 1),      roll(w, s)[j] = w[(j - s) mod k]   (torch.roll),
// and the 2D/3D roll is the product of these blends over the axes (bilinear / trilinear corners).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define AGI_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define AGI_HOST_DEVICE inline
#endif

namespace agi_monai {
namespace ops {
namespace detail {

// At most three rolled axes: index 0 = x (last kernel axis), 1 = y, 2 = z (depth).
constexpr int kMaxAxes = 3;

template <typename acc_t>
struct AxisRoll {
  int64_t size;   // kernel extent along this axis
  int64_t shift;  // floor(offset) mod size, in [0, size)
  acc_t frac;     // offset - floor(offset), in [0, 1)
  int corners;    // 2 for a rolled axis, 1 for an axis that is not rolled (2D kernels have no z)
};

template <typename acc_t>
AGI_HOST_DEVICE acc_t floor_of(acc_t v) {
  // std::floor and CUDA's floor are both overloaded for float and double.
  return floor(v);
}

template <typename acc_t>
AGI_HOST_DEVICE AxisRoll<acc_t> make_axis_roll(acc_t offset, int64_t size, bool rolled) {
  AxisRoll<acc_t> r;
  r.size = size;
  r.corners = rolled ? 2 : 1;
  if (!rolled) {
    r.shift = 0;
    r.frac = acc_t(0);
    return r;
  }
  if (!((offset - offset) == acc_t(0))) {
    // NaN or Inf (the entry points reject them; this keeps the index arithmetic defined regardless).
    r.shift = 0;
    r.frac = offset - offset;  // NaN: the result is NaN rather than an out-of-range read
    return r;
  }
  const acc_t whole = floor_of(offset);
  r.frac = offset - whole;
  // Reduce the shift in floating point first so that very large offsets cannot overflow int64.
  const acc_t k = static_cast<acc_t>(size);
  acc_t reduced = whole - k * floor_of(whole / k);
  int64_t s = static_cast<int64_t>(reduced);
  // Guard the rounding edge cases of the floating-point modulo.
  s = ((s % size) + size) % size;
  r.shift = s;
  return r;
}

// Blend weight of corner c (0: floor, 1: floor + 1) along one axis, and its derivative w.r.t. the offset.
template <typename acc_t>
AGI_HOST_DEVICE acc_t corner_weight(const AxisRoll<acc_t>& r, int c) {
  if (r.corners == 1) return acc_t(1);
  return c == 0 ? acc_t(1) - r.frac : r.frac;
}

template <typename acc_t>
AGI_HOST_DEVICE acc_t corner_weight_grad(int c) {
  return c == 0 ? acc_t(-1) : acc_t(1);
}

// Source index read by output index j when rolling by (shift + c): (j - shift - c) mod size.
template <typename acc_t>
AGI_HOST_DEVICE int64_t source_index(const AxisRoll<acc_t>& r, int64_t j, int c) {
  return (j - r.shift - c + 2 * r.size) % r.size;
}

// Output index that reads source index j when rolling by (shift + c): (j + shift + c) mod size.
template <typename acc_t>
AGI_HOST_DEVICE int64_t destination_index(const AxisRoll<acc_t>& r, int64_t j, int c) {
  return (j + r.shift + c) % r.size;
}

// Shape bookkeeping of one call: weight (C_out, C_in, kz, ky, kx) with kz = 1 for 2D kernels.
struct RollShape {
  int64_t batch;
  int64_t groups;
  int64_t spatial;  // S: number of rolled axes, 2 or 3
  int64_t out_channels;
  int64_t in_channels;
  int64_t channels_per_group;
  int64_t kz, ky, kx;
  AGI_HOST_DEVICE int64_t kernel_numel() const { return kz * ky * kx; }
  AGI_HOST_DEVICE int64_t weight_numel() const { return out_channels * in_channels * kernel_numel(); }
};

// The three axis rolls of sample b, group g (offsets laid out (B, n, S), x first).
template <typename acc_t, typename scalar_t>
AGI_HOST_DEVICE void load_axis_rolls(
    const scalar_t* offsets, const RollShape& shape, int64_t b, int64_t g, AxisRoll<acc_t> rolls[kMaxAxes]) {
  const scalar_t* o = offsets + (b * shape.groups + g) * shape.spatial;
  const int64_t sizes[kMaxAxes] = {shape.kx, shape.ky, shape.kz};
  for (int a = 0; a < kMaxAxes; ++a) {
    const bool rolled = a < shape.spatial;
    rolls[a] = make_axis_roll<acc_t>(rolled ? static_cast<acc_t>(o[a]) : acc_t(0), sizes[a], rolled);
  }
}

// At most 2^3 corners: the integer rolls that the fractional roll blends.
constexpr int kMaxTaps = 8;

// The taps of kernel position (z, y, x) for one (sample, group): the flat kernel index each corner
// reads (forward: the source (j - s - c) mod k; transpose: the destination (j + s + c) mod k), its
// blend weight, and the weight's derivative w.r.t. each axis offset. Returns the number of taps (2^S).
template <typename acc_t>
AGI_HOST_DEVICE int kernel_taps(
    const AxisRoll<acc_t> rolls[kMaxAxes], int64_t z, int64_t y, int64_t x, bool transpose,
    int64_t index[kMaxTaps], acc_t weight[kMaxTaps], acc_t d_weight[kMaxTaps][kMaxAxes]) {
  const AxisRoll<acc_t>& rx = rolls[0];
  const AxisRoll<acc_t>& ry = rolls[1];
  const AxisRoll<acc_t>& rz = rolls[2];
  int t = 0;
  for (int cz = 0; cz < rz.corners; ++cz) {
    const acc_t wz = corner_weight(rz, cz);
    const int64_t iz = transpose ? destination_index(rz, z, cz) : source_index(rz, z, cz);
    for (int cy = 0; cy < ry.corners; ++cy) {
      const acc_t wy = corner_weight(ry, cy);
      const int64_t iy = transpose ? destination_index(ry, y, cy) : source_index(ry, y, cy);
      for (int cx = 0; cx < rx.corners; ++cx) {
        const acc_t wx = corner_weight(rx, cx);
        const int64_t ix = transpose ? destination_index(rx, x, cx) : source_index(rx, x, cx);
        index[t] = (iz * ry.size + iy) * rx.size + ix;
        weight[t] = wz * wy * wx;
        d_weight[t][0] = wz * wy * corner_weight_grad<acc_t>(cx);
        d_weight[t][1] = wz * corner_weight_grad<acc_t>(cy) * wx;
        d_weight[t][2] = corner_weight_grad<acc_t>(cz) * wy * wx;
        ++t;
      }
    }
  }
  return t;
}

// Scale and offset gradients of one (sample, group) from the K×K correlation
// M[k][j] = Σ_{o, c in group} grad_out[b, o, c, k] · w[o, c, j]: the rolled value at k is
// Σ_t weight_t · w[index_t], so d_scale = Σ_k Σ_t weight_t · M[k][index_t] and
// d_offset[a] = Σ_k Σ_t d_weight_t,a · M[k][index_t] (to be multiplied by the group's scale).
template <typename acc_t>
AGI_HOST_DEVICE void routing_grad_from_correlation(
    const acc_t* correlation, const AxisRoll<acc_t> rolls[kMaxAxes], const RollShape& s, acc_t* d_scale,
    acc_t d_offset[kMaxAxes]) {
  const int64_t K = s.kernel_numel();
  *d_scale = acc_t(0);
  d_offset[0] = d_offset[1] = d_offset[2] = acc_t(0);
  for (int64_t k = 0; k < K; ++k) {
    int64_t index[kMaxTaps];
    acc_t weight[kMaxTaps];
    acc_t d_weight[kMaxTaps][kMaxAxes];
    const int64_t x = k % s.kx, y = (k / s.kx) % s.ky, z = k / (s.kx * s.ky);
    const int taps = kernel_taps(rolls, z, y, x, /*transpose=*/false, index, weight, d_weight);
    for (int t = 0; t < taps; ++t) {
      const acc_t m = correlation[k * K + index[t]];
      *d_scale += weight[t] * m;
      for (int a = 0; a < kMaxAxes; ++a) d_offset[a] += d_weight[t][a] * m;
    }
  }
}

}  // namespace detail
}  // namespace ops
}  // namespace agi_monai
