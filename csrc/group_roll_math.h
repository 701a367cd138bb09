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
  // Reduce the shift in floating point first so that very large offsets cannot overflow int64. fmod is
  // exact (IEEE 754; C and CUDA alike); whole - k * floor(whole / k) rounded the quotient and the product,
  // and gave wrong shifts for |offset| beyond 2^24 in float32.
  int64_t s = static_cast<int64_t>(fmod(whole, static_cast<acc_t>(size)));  // in (-size, size)
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

// The taps of kernel position k (flat) of sample b = bg / n, group g = bg % n.
template <typename acc_t, typename scalar_t>
AGI_HOST_DEVICE int position_taps(
    const scalar_t* offsets, const RollShape& s, int64_t bg, int64_t k, bool transpose, int64_t index[kMaxTaps],
    acc_t weight[kMaxTaps], acc_t d_weight[kMaxTaps][kMaxAxes]) {
  AxisRoll<acc_t> rolls[kMaxAxes];
  load_axis_rolls<acc_t>(offsets, s, bg / s.groups, bg % s.groups, rolls);
  const int64_t x = k % s.kx, y = (k / s.kx) % s.ky, z = k / (s.kx * s.ky);
  return kernel_taps(rolls, z, y, x, transpose, index, weight, d_weight);
}

// ---------------------------------------------------------------------------------------------------
// Column kernels: the per-thread work of the CUDA "columns" kernels, also run by the CPU's scalar
// "columns" path so that the CPU tests check these maths and index computations on every machine.
//
// A column is one (sample b, group g, entry r) with r in [0, C_in/n · K), the entries of group g in a
// kernel row (input channels g·C_in/n … (g+1)·C_in/n − 1, K kernel positions each). Across the output
// channels o it is out[b, o, g·C_in/n·K + r] and w[o, g·C_in/n·K + r − k + index_t] with k = r mod K:
// its taps are the same for every o, so they are computed once and the column walks o with a stride of
// one kernel row (C_in·K). Columns are numbered (b·n + g)·(C_in/n·K) + r; there are B·C_in·K of them.
// ---------------------------------------------------------------------------------------------------

AGI_HOST_DEVICE int64_t column_count(const RollShape& s) { return s.batch * s.in_channels * s.kernel_numel(); }

// One column's place and taps, in arrays indexed only by unrolled loops (which the CUDA compiler keeps
// in registers): `read` is relative to the column's own entry, `weight` the unscaled blend weight and
// `d_weight` its derivative w.r.t. each axis offset.
template <int taps, typename acc_t, typename index_t>
struct ColumnTaps {
  static constexpr int axes = taps == 4 ? 2 : 3;
  index_t bg;          // b · n + g
  index_t w_entry;     // offset of the column in weight row 0: g · C_in/n · K + r
  index_t out_entry;   // offset of the column in output row (b, 0)
  index_t row;         // entries per row (C_in · K): the stride from one output channel to the next
  index_t read[taps];
  acc_t weight[taps];
  acc_t d_weight[taps][axes];
};

template <int taps, typename acc_t, typename scalar_t, typename index_t>
AGI_HOST_DEVICE ColumnTaps<taps, acc_t, index_t> column_taps(const scalar_t* offsets, const RollShape& s, index_t column) {
  ColumnTaps<taps, acc_t, index_t> c;
  const index_t K = static_cast<index_t>(s.kernel_numel());
  const index_t span = static_cast<index_t>(s.channels_per_group) * K;
  const index_t r = column % span, k = r % K;
  c.bg = column / span;
  c.row = static_cast<index_t>(s.in_channels) * K;
  c.w_entry = (c.bg % static_cast<index_t>(s.groups)) * span + r;
  c.out_entry = (c.bg / static_cast<index_t>(s.groups)) * static_cast<index_t>(s.out_channels) * c.row + c.w_entry;
  int64_t index[kMaxTaps];
  acc_t weight[kMaxTaps];
  acc_t d_weight[kMaxTaps][kMaxAxes];
  position_taps<acc_t>(offsets, s, c.bg, k, /*transpose=*/false, index, weight, d_weight);
#pragma unroll
  for (int t = 0; t < taps; ++t) {
    c.read[t] = static_cast<index_t>(index[t]) - k;
    c.weight[t] = weight[t];
#pragma unroll
    for (int a = 0; a < c.axes; ++a) c.d_weight[t][a] = d_weight[t][a];
  }
  return c;
}

// out[b, o, column entry] for o in [o_begin, o_end): the scaled blend of the taps.
template <int taps, typename acc_t, typename scalar_t, typename index_t>
AGI_HOST_DEVICE void forward_column(
    const scalar_t* w, const scalar_t* offsets, const scalar_t* scales, scalar_t* out, const RollShape& s,
    index_t column, index_t o_begin, index_t o_end) {
  const ColumnTaps<taps, acc_t, index_t> c = column_taps<taps, acc_t>(offsets, s, column);
  const acc_t scale = static_cast<acc_t>(scales[c.bg]);
  acc_t coef[taps];
#pragma unroll
  for (int t = 0; t < taps; ++t) coef[t] = scale * c.weight[t];
  const scalar_t* w_entry = w + o_begin * c.row + c.w_entry;
  scalar_t* out_entry = out + o_begin * c.row + c.out_entry;
  for (index_t o = o_begin; o < o_end; ++o, w_entry += c.row, out_entry += c.row) {
    acc_t value = acc_t(0);
#pragma unroll
    for (int t = 0; t < taps; ++t) value += coef[t] * static_cast<acc_t>(w_entry[c.read[t]]);
    *out_entry = static_cast<scalar_t>(value);
  }
}

// The column's share of its (sample, group)'s routing gradients, for o in [o_begin, o_end):
// partial[0] = Σ_o grad · (unscaled blend), partial[1 + a] = Σ_o grad · ∂blend/∂offset_a. Summed over
// the group's columns, they give d_scale = partial[0] and d_offset_a = scale · partial[1 + a]
// (store_routing_grads).
template <int taps, typename acc_t, typename scalar_t, typename index_t>
AGI_HOST_DEVICE void routing_grad_column(
    const scalar_t* grad, const scalar_t* w, const scalar_t* offsets, const RollShape& s, index_t column,
    index_t o_begin, index_t o_end, acc_t partial[1 + kMaxAxes]) {
  const ColumnTaps<taps, acc_t, index_t> c = column_taps<taps, acc_t>(offsets, s, column);
  constexpr int axes = ColumnTaps<taps, acc_t, index_t>::axes;
  const scalar_t* w_entry = w + o_begin * c.row + c.w_entry;
  const scalar_t* grad_entry = grad + o_begin * c.row + c.out_entry;
  acc_t sum[1 + axes];
#pragma unroll
  for (int a = 0; a <= axes; ++a) sum[a] = acc_t(0);
  for (index_t o = o_begin; o < o_end; ++o, w_entry += c.row, grad_entry += c.row) {
    const acc_t gv = static_cast<acc_t>(*grad_entry);
    acc_t blend = acc_t(0);
    acc_t d_blend[axes];
#pragma unroll
    for (int a = 0; a < axes; ++a) d_blend[a] = acc_t(0);
#pragma unroll
    for (int t = 0; t < taps; ++t) {
      const acc_t wv = static_cast<acc_t>(w_entry[c.read[t]]);
      blend += c.weight[t] * wv;
#pragma unroll
      for (int a = 0; a < axes; ++a) d_blend[a] += c.d_weight[t][a] * wv;
    }
    sum[0] += gv * blend;
#pragma unroll
    for (int a = 0; a < axes; ++a) sum[1 + a] += gv * d_blend[a];
  }
#pragma unroll
  for (int a = 0; a <= axes; ++a) partial[a] = sum[a];
}

// Stores the routing gradients of (sample, group) bg (every kernel's last step): grad_scales[bg] = d_scale,
// grad_offsets[bg, a] = scale · d_offset[a] (the blend's derivative w.r.t. the offset, times the group's scale).
template <typename acc_t, typename scalar_t>
AGI_HOST_DEVICE void store_routing_grads(
    acc_t d_scale, const acc_t* d_offset, const scalar_t* scales, const RollShape& s, int64_t bg, scalar_t* grad_offsets,
    scalar_t* grad_scales) {
  const acc_t scale = static_cast<acc_t>(scales[bg]);
  grad_scales[bg] = static_cast<scalar_t>(d_scale);
  for (int64_t a = 0; a < s.spatial; ++a) grad_offsets[bg * s.spatial + a] = static_cast<scalar_t>(scale * d_offset[a]);
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
