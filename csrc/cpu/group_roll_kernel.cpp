// CPU kernels of agi_monai::group_roll and its backward.
//
// Layout: one "row" is one output channel's C_in·K kernel entries (K = k^S), contiguous; output row
// (b, o) is the roll of weight row o for sample b, and every entry j of a row reads entries of its own
// K-entry slice only: j + d with |d| < K, at the 2^S taps of its kernel position (group_roll_math.h).
// The taps depend on (sample, group, kernel position) only, so each kernel below builds, once per
// sample, a per-position description of the taps and then streams over the rows or blocks of rows. Three kernels (and
// a fourth for tests):
//
// 1. Lane permutes (float32, AVX-512, K ≤ 32). A register of 16 output entries is a fixed blend of
//    permutations of one 32-entry source window: out = Σ_t coef_t · permute(window, index_t), one
//    two-source permute (vpermt2ps) and one multiply-add per tap and register. K ≤ 9 (2D 3×3):
//    registers tile the row densely and the window is [j − 8, j + 24); 9 < K ≤ 32 (3D 3×3×3, 2D 5×5):
//    one or two registers per slice, the window is the slice itself. The per-register (index, coef)
//    patterns are built once per sample ("lane plan"). Only the taps' own entries are ever blended.
// 2. Tiles (float64; float32 with K > 32 or without AVX-512; any K; any ISA through vector extensions).
//    A register holds one kernel entry of L consecutive output channels, so all its lanes share the
//    taps: a rolled entry is Σ_t coef_t · tile[index_t], scalar coefficients and a register picked by
//    index, no permutes. Rows are transposed into tiles (the weight once per block of output
//    channels, for all samples) and the results transposed back (8×8 register transposes for float32
//    on AVX2). Each lane reads its own taps' entries only.
// 3. Taps (float16, bfloat16): per element, the 2^S taps from a table, as defined. (The first CPU
//    implementation; AGI_MONAI_GROUP_ROLL_CPU=taps selects it for any dtype.)
// 4. Columns (AGI_MONAI_GROUP_ROLL_CPU=columns only): the CUDA backend's per-thread column code
//    (group_roll_math.h), run here so that CI, which has no GPU, tests those maths.
//
// The vector kernels are compiled for AVX-512, AVX2+FMA and the baseline ISA (function target
// attributes) and picked at run time; AGI_MONAI_GROUP_ROLL_CPU=auto|avx512|avx2|baseline|taps|columns
// overrides the choice (for tests and benchmarks). All paths agree to rounding (the sums are
// associated differently); NaN reaches exactly the entries whose taps read it, as in the definition
// (zero-weight taps included), and so does Inf, up to sums of Infs of both signs (order-dependent).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "../group_roll.h"
#include "../group_roll_math.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__GNUC__) || defined(__clang__)
#define AGI_ALWAYS_INLINE inline __attribute__((always_inline))
#define AGI_VECTOR_EXTENSIONS 1
#else
#define AGI_ALWAYS_INLINE inline
#define AGI_VECTOR_EXTENSIONS 0
#endif

#if AGI_VECTOR_EXTENSIONS && defined(__x86_64__)
#define AGI_X86_DISPATCH 1
#include <immintrin.h>
// 512-bit vectors wanted where the compiler vectorises by itself: GCC says so in the target string; Clang
// ignores the whole target attribute when it meets that option, and takes min_vector_width instead.
#if defined(__clang__)
#define AGI_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"), min_vector_width(512)))
#else
#define AGI_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")))
#endif
#define AGI_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define AGI_X86_DISPATCH 0
#endif

namespace agi_monai {
namespace ops {

namespace {

using detail::AxisRoll;
using detail::kMaxAxes;
using detail::kMaxTaps;
using detail::RollShape;

// ---------------------------------------------------------------------------------------------------
// Which CPU code path runs.
// ---------------------------------------------------------------------------------------------------

// Ordered by what a CPU must support; columns and taps are scalar code that every CPU runs.
enum class CpuPath { kColumns = -1, kTaps = 0, kBaseline = 1, kAvx2 = 2, kAvx512 = 3 };

const char* path_name(CpuPath path) {
  switch (path) {
    case CpuPath::kColumns: return "columns";
    case CpuPath::kTaps: return "taps";
    case CpuPath::kBaseline: return "baseline";
    case CpuPath::kAvx2: return "avx2";
    case CpuPath::kAvx512: return "avx512";
  }
  return "?";
}

CpuPath best_cpu_path() {
#if AGI_X86_DISPATCH
  static const CpuPath best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma")) {
      return CpuPath::kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuPath::kAvx2;
    return CpuPath::kBaseline;
  }();
  return best;
#elif AGI_VECTOR_EXTENSIONS
  return CpuPath::kBaseline;
#else
  return CpuPath::kTaps;
#endif
}

// The best path of this CPU, or the one AGI_MONAI_GROUP_ROLL_CPU names (read at every call, so that
// tests and benchmarks can switch paths within one process).
CpuPath selected_cpu_path() {
  const char* env = std::getenv("AGI_MONAI_GROUP_ROLL_CPU");
  const CpuPath best = best_cpu_path();
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0) return best;
  for (CpuPath path : {CpuPath::kColumns, CpuPath::kTaps, CpuPath::kBaseline, CpuPath::kAvx2, CpuPath::kAvx512}) {
    if (std::strcmp(env, path_name(path)) == 0) {
      TORCH_CHECK(
          static_cast<int>(path) <= static_cast<int>(best), "group_roll: AGI_MONAI_GROUP_ROLL_CPU=", env,
          " is not supported by this CPU or build (the best it supports is ", path_name(best), ")");
      return path;
    }
  }
  TORCH_CHECK(
      false, "group_roll: AGI_MONAI_GROUP_ROLL_CPU must be one of auto, avx512, avx2, baseline, taps, columns; got '", env,
      "'");
  return best;
}

// ---------------------------------------------------------------------------------------------------
// Taps of one sample.
// ---------------------------------------------------------------------------------------------------

// Entry ((g · K + k) · taps + t): the flat kernel index that tap t of position k reads (forward) or
// writes (transpose), its blend weight and, per axis, the weight's derivative w.r.t. the offset.
template <typename T>
struct SampleTaps {
  int taps = 0;
  std::vector<int32_t> index;
  std::vector<T> weight;
  std::vector<T> d_weight;  // [entry][axis]
};

// The same taps as detail::kernel_taps, in the same order and with the same products, but with the
// circular index arithmetic (integer modulo) done once per axis position instead of per tap.
template <typename T>
void sample_taps(const T* offsets, const RollShape& s, int64_t b, bool transpose, SampleTaps<T>& out) {
  const int64_t K = s.kernel_numel();
  out.taps = 1 << s.spatial;
  const int64_t entries = s.groups * K * out.taps;
  out.index.resize(entries);
  out.weight.resize(entries);
  out.d_weight.resize(entries * kMaxAxes);
  const int64_t sizes[kMaxAxes] = {s.kx, s.ky, s.kz};
  std::vector<int32_t> axis_index[kMaxAxes];  // [position · 2 + corner]
  for (int a = 0; a < kMaxAxes; ++a) axis_index[a].resize(2 * sizes[a]);
  int64_t e = 0;
  for (int64_t g = 0; g < s.groups; ++g) {
    AxisRoll<T> rolls[kMaxAxes];
    detail::load_axis_rolls<T>(offsets, s, b, g, rolls);
    for (int a = 0; a < kMaxAxes; ++a) {
      for (int64_t j = 0; j < sizes[a]; ++j) {
        for (int c = 0; c < rolls[a].corners; ++c) {
          axis_index[a][2 * j + c] = static_cast<int32_t>(
              transpose ? detail::destination_index(rolls[a], j, c) : detail::source_index(rolls[a], j, c));
        }
      }
    }
    const AxisRoll<T>& rx = rolls[0];
    const AxisRoll<T>& ry = rolls[1];
    const AxisRoll<T>& rz = rolls[2];
    for (int64_t z = 0; z < s.kz; ++z) {
      for (int64_t y = 0; y < s.ky; ++y) {
        for (int64_t x = 0; x < s.kx; ++x) {
          for (int cz = 0; cz < rz.corners; ++cz) {
            const T wz = detail::corner_weight(rz, cz);
            const int64_t iz = axis_index[2][2 * z + cz];
            for (int cy = 0; cy < ry.corners; ++cy) {
              const T wy = detail::corner_weight(ry, cy);
              const int64_t iy = axis_index[1][2 * y + cy];
              for (int cx = 0; cx < rx.corners; ++cx, ++e) {
                const T wx = detail::corner_weight(rx, cx);
                out.index[e] = static_cast<int32_t>((iz * s.ky + iy) * s.kx + axis_index[0][2 * x + cx]);
                out.weight[e] = wz * wy * wx;
                out.d_weight[e * kMaxAxes + 0] = wz * wy * detail::corner_weight_grad<T>(cx);
                out.d_weight[e * kMaxAxes + 1] = wz * detail::corner_weight_grad<T>(cy) * wx;
                out.d_weight[e * kMaxAxes + 2] = detail::corner_weight_grad<T>(cz) * wy * wx;
              }
            }
          }
        }
      }
    }
  }
}

// The routing gradients of sample b from its tap correlations M[e], e = (g · K + k) · taps + t, held as `parts`
// partial sums `part_stride` apart (added in order, so the result does not depend on the thread count):
// d_scale = Σ weight · M, d_offset = scale · Σ ∂weight/∂offset · M over each group's entries.
template <typename T>
void store_routing_grads_of_sample(
    const T* partials, int64_t parts, int64_t part_stride, const SampleTaps<T>& st, const T* scales,
    const RollShape& s, int64_t b, T* grad_offsets, T* grad_scales) {
  const int64_t span = s.kernel_numel() * st.taps;
  for (int64_t g = 0; g < s.groups; ++g) {
    T d_scale = T(0);
    T d_offset[kMaxAxes] = {T(0), T(0), T(0)};
    for (int64_t e = g * span; e < (g + 1) * span; ++e) {
      T m = T(0);
      for (int64_t part = 0; part < parts; ++part) m += partials[part * part_stride + e];
      d_scale += st.weight[e] * m;
      for (int a = 0; a < kMaxAxes; ++a) d_offset[a] += st.d_weight[e * kMaxAxes + a] * m;
    }
    detail::store_routing_grads<T>(d_scale, d_offset, scales, s, b * s.groups + g, grad_offsets, grad_scales);
  }
}

// ---------------------------------------------------------------------------------------------------
// Dispatch of the vectorised jobs.
// ---------------------------------------------------------------------------------------------------

// Bytes of one vector register on `path` (the baseline: SSE2, or whatever 16-byte vectors the ISA has).
constexpr int register_bytes(CpuPath path) {
  return path == CpuPath::kAvx512 ? 64 : path == CpuPath::kAvx2 ? 32 : 16;
}

// A job's `run<RegisterBytes>(begin, end)` is compiled once per instruction set: these wrappers carry
// the target attribute and the job's always-inline body is compiled inside them.
#if AGI_X86_DISPATCH
template <typename Job>
AGI_TARGET_AVX512 void run_avx512(const Job& job, int64_t begin, int64_t end) {
  job.template run<register_bytes(CpuPath::kAvx512)>(begin, end);
}
template <typename Job>
AGI_TARGET_AVX2 void run_avx2(const Job& job, int64_t begin, int64_t end) {
  job.template run<register_bytes(CpuPath::kAvx2)>(begin, end);
}
#endif
template <typename Job>
void run_baseline(const Job& job, int64_t begin, int64_t end) {
  job.template run<register_bytes(CpuPath::kBaseline)>(begin, end);
}

// Lanes of one register of T in the jobs that parallel_run runs on `path`.
template <typename T>
int64_t lanes_on(CpuPath path) {
  return std::max<int64_t>(1, register_bytes(path) / static_cast<int64_t>(sizeof(T)));
}

template <typename Job>
void parallel_run(const Job& job, CpuPath path, int64_t size, int64_t grain) {
  void (*body)(const Job&, int64_t, int64_t) = run_baseline<Job>;
#if AGI_X86_DISPATCH
  if (path == CpuPath::kAvx512) body = run_avx512<Job>;
  if (path == CpuPath::kAvx2) body = run_avx2<Job>;
#endif
  at::parallel_for(0, size, std::max<int64_t>(grain, 1), [&](int64_t begin, int64_t end) { body(job, begin, end); });
}

#if AGI_VECTOR_EXTENSIONS
// ---------------------------------------------------------------------------------------------------
// Registers (vector extensions).
// ---------------------------------------------------------------------------------------------------

// Registers as GCC/Clang vector extensions: `Pack<T, Lanes>` is one register of Lanes values (the
// plain scalar for one lane); loads and stores are unaligned. Used only inside the always-inline job
// bodies, which the wrappers above compile for one instruction set each (so the vector ABI of these
// helpers never matters: -Wpsabi would warn about it for the wider packs).
#pragma GCC diagnostic ignored "-Wpsabi"
template <typename T, int Lanes>
struct PackOf {
  typedef T type __attribute__((vector_size(Lanes * sizeof(T))));
};
template <typename T>
struct PackOf<T, 1> {
  using type = T;
};
template <typename T, int Lanes>
using Pack = typename PackOf<T, Lanes>::type;

template <int Lanes, typename T>
AGI_ALWAYS_INLINE Pack<T, Lanes> load_pack(const T* p) {
  Pack<T, Lanes> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <int Lanes, typename T>
AGI_ALWAYS_INLINE void store_pack(T* p, const Pack<T, Lanes>& v) {
  std::memcpy(p, &v, sizeof(v));
}

// Lanes of one register of T for a target whose registers have RegisterBytes bytes.
template <int RegisterBytes, typename T>
constexpr int lanes() {
  return RegisterBytes / static_cast<int>(sizeof(T)) > 0 ? RegisterBytes / static_cast<int>(sizeof(T)) : 1;
}
#endif  // AGI_VECTOR_EXTENSIONS

#if AGI_X86_DISPATCH
// ---------------------------------------------------------------------------------------------------
// Lane-permute kernels (float32, AVX-512, K ≤ 32).
// ---------------------------------------------------------------------------------------------------

constexpr int kLanes = 16;              // floats per AVX-512 register
constexpr int64_t kMaxLaneKernel = 32;  // K that a two-register window still holds

bool lane_kernels_apply(const RollShape& s) {
  return s.kernel_numel() <= kMaxLaneKernel;
}

// One register of output: entries [out, out + 16) of a row (lanes beyond `mask` unused), blended from
// the 32-entry window [window, window + 32) of the source row with pattern `pattern`.
struct LaneUnit {
  int32_t out;
  int32_t window;
  int32_t pattern;
  uint32_t mask;
};

// Where the units are and what each lane of each pattern is; the same for every sample. Dense (K ≤ 9):
// unit u covers row entries [16u, 16u + 16) from the window [16u − 8, 16u + 24), one pattern per unit.
// Per slice (9 < K ≤ 32): units [c·K, c·K + 16) and [c·K + 16, c·K + K) of every input channel c read
// the window [c·K, c·K + 32) (the slice); their patterns are shared by the slices of a group.
struct LaneLayout {
  std::vector<LaneUnit> units;  // cover the row in order
  int64_t patterns = 0;
  std::vector<int32_t> position;  // [p · 16 + l]: g · K + k of the lane (group, kernel position), or -1
  std::vector<int32_t> slice;     // [p · 16 + l]: where the lane's slice starts, relative to the window
};

void build_lane_layout(const RollShape& s, LaneLayout& layout) {
  const int64_t K = s.kernel_numel();
  const int64_t row = s.in_channels * K;
  layout.units.clear();
  if (K <= 9) {
    layout.patterns = (row + kLanes - 1) / kLanes;
    layout.position.assign(layout.patterns * kLanes, -1);
    layout.slice.assign(layout.patterns * kLanes, 0);
    for (int64_t p = 0; p < layout.patterns; ++p) {
      const int64_t out = p * kLanes;
      const int valid = static_cast<int>(std::min<int64_t>(kLanes, row - out));
      layout.units.push_back({static_cast<int32_t>(out), static_cast<int32_t>(out - 8), static_cast<int32_t>(p),
                              (1u << valid) - 1u});
    }
    // Walk the row with counters (no division per entry): entry `at` is position k of input channel c.
    int64_t c = 0, k = 0, g = 0, c_in_group = 0;
    for (int64_t at = 0; at < row; ++at) {
      layout.position[at] = static_cast<int32_t>(g * K + k);
      layout.slice[at] = static_cast<int32_t>(c * K - (at / kLanes * kLanes - 8));
      if (++k == K) {
        k = 0;
        ++c;
        if (++c_in_group == s.channels_per_group) {
          c_in_group = 0;
          ++g;
        }
      }
    }
  } else {
    const int64_t halves = K > kLanes ? 2 : 1;
    layout.patterns = s.groups * halves;
    layout.position.assign(layout.patterns * kLanes, -1);
    layout.slice.assign(layout.patterns * kLanes, 0);
    for (int64_t g = 0; g < s.groups; ++g) {
      for (int64_t h = 0; h < halves; ++h) {
        for (int64_t l = 0; l < kLanes && h * kLanes + l < K; ++l)
          layout.position[(g * halves + h) * kLanes + l] = static_cast<int32_t>(g * K + h * kLanes + l);
      }
    }
    for (int64_t c = 0; c < s.in_channels; ++c) {
      const int64_t g = c / s.channels_per_group;
      for (int64_t h = 0; h < halves; ++h) {
        const int valid = static_cast<int>(std::min<int64_t>(kLanes, K - h * kLanes));
        layout.units.push_back({static_cast<int32_t>(c * K + h * kLanes), static_cast<int32_t>(c * K),
                                static_cast<int32_t>(g * halves + h), (1u << valid) - 1u});
      }
    }
  }
}

// One sample's patterns: per pattern p and tap t, 16 lanes of index (into the window) and coef (the
// scaled blend weight), at [(p · taps + t) · 16 + l]. Unused lanes: index 0, coef 0.
struct LanePlan {
  int taps = 0;
  std::vector<int32_t> index;
  std::vector<float> coef;
  SampleTaps<float> sample;  // the taps it was built from (forward or transposed)
  std::vector<float> scaled_weight;  // scratch: the taps' weights times their group's scale
};

// Per lane and tap, a gather from the sample's taps (16 lanes per instruction; unused lanes get 0).
template <int Taps>
AGI_TARGET_AVX512 void build_lane_plan(
    const float* offsets, const float* scales, const RollShape& s, const LaneLayout& layout, int64_t b,
    bool transpose, LanePlan& plan) {
  const int64_t K = s.kernel_numel();
  sample_taps<float>(offsets, s, b, transpose, plan.sample);
  const SampleTaps<float>& st = plan.sample;
  plan.scaled_weight.resize(s.groups * K * Taps);
  for (int64_t e = 0; e < s.groups * K * Taps; ++e) plan.scaled_weight[e] = scales[b * s.groups + e / (K * Taps)] * st.weight[e];
  plan.taps = Taps;
  plan.index.resize(layout.patterns * Taps * kLanes);
  plan.coef.resize(layout.patterns * Taps * kLanes);
  const __m512i taps = _mm512_set1_epi32(Taps);
  for (int64_t p = 0; p < layout.patterns; ++p) {
    const __m512i position = _mm512_loadu_si512(layout.position.data() + p * kLanes);
    const __m512i slice = _mm512_loadu_si512(layout.slice.data() + p * kLanes);
    const __mmask16 used = _mm512_cmpge_epi32_mask(position, _mm512_setzero_si512());
    const __m512i first = _mm512_mullo_epi32(position, taps);
    for (int t = 0; t < Taps; ++t) {
      const __m512i entry = _mm512_add_epi32(first, _mm512_set1_epi32(t));
      const __m512i index = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), used, entry, st.index.data(), 4);
      const __m512 coef = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), used, entry, plan.scaled_weight.data(), 4);
      _mm512_storeu_si512(plan.index.data() + (p * Taps + t) * kLanes, _mm512_maskz_add_epi32(used, index, slice));
      _mm512_storeu_ps(plan.coef.data() + (p * Taps + t) * kLanes, coef);
    }
  }
}

// The source window [at, at + 32) of `data` (numel entries); entries outside the tensor read as 0
// (only the first and last rows have such windows, and no tap reads them).
AGI_TARGET_AVX512 inline void load_window(const float* data, int64_t at, int64_t numel, __m512& lo, __m512& hi) {
  if (at >= 0 && at + 2 * kLanes <= numel) {
    lo = _mm512_loadu_ps(data + at);
    hi = _mm512_loadu_ps(data + at + kLanes);
    return;
  }
  alignas(64) float window[2 * kLanes];
  for (int l = 0; l < 2 * kLanes; ++l) window[l] = (at + l >= 0 && at + l < numel) ? data[at + l] : 0.0f;
  lo = _mm512_load_ps(window);
  hi = _mm512_load_ps(window + kLanes);
}

// One unit's pattern in registers: index_t and coef_t of its taps.
template <int Taps>
struct UnitPattern {
  __m512i index[Taps];
  __m512 coef[Taps];
};

template <int Taps>
AGI_TARGET_AVX512 inline void load_pattern(const LanePlan& plan, int32_t pattern, UnitPattern<Taps>& up) {
  const int32_t* index = plan.index.data() + pattern * Taps * kLanes;
  const float* coef = plan.coef.data() + pattern * Taps * kLanes;
  for (int t = 0; t < Taps; ++t) {
    up.index[t] = _mm512_loadu_si512(index + t * kLanes);
    up.coef[t] = _mm512_loadu_ps(coef + t * kLanes);
  }
}

// Σ_t coef_t · permute(window, index_t).
template <int Taps>
AGI_TARGET_AVX512 inline __m512 blend(const UnitPattern<Taps>& up, __m512 lo, __m512 hi) {
  __m512 acc = _mm512_mul_ps(up.coef[0], _mm512_permutex2var_ps(lo, up.index[0], hi));
  for (int t = 1; t < Taps; ++t) acc = _mm512_fmadd_ps(up.coef[t], _mm512_permutex2var_ps(lo, up.index[t], hi), acc);
  return acc;
}

AGI_TARGET_AVX512 inline void store_unit(float* dst, uint32_t mask, __m512 v) {
  if (mask == 0xFFFFu) {
    _mm512_storeu_ps(dst, v);
  } else {
    _mm512_mask_storeu_ps(dst, static_cast<__mmask16>(mask), v);
  }
}

// Rows are processed in small blocks of output channels and, within a block, unit by unit: a unit's
// pattern stays in registers while it is applied to each row of the block, two rows at a time
// (independent chains). 8 rows: measured best on AVX-512 (Zen 4) for 64–512 channels; fewer rows reload
// the patterns too often, more spread the stores over too many streams.
constexpr int64_t kLaneRowsPerBlock = 8;

// out[b, o] for the tasks (sample, block of output channels) in [begin, end).
template <int Taps>
AGI_TARGET_AVX512 void lane_forward_tasks(
    const float* w, const float* offsets, const float* scales, float* out, const RollShape& s,
    const LaneLayout& layout, int64_t begin, int64_t end) {
  const int64_t row = s.in_channels * s.kernel_numel();
  const int64_t numel = s.out_channels * row;
  const int64_t blocks = (s.out_channels + kLaneRowsPerBlock - 1) / kLaneRowsPerBlock;
  LanePlan plan;
  int64_t plan_sample = -1;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / blocks;
    const int64_t o_begin = (task % blocks) * kLaneRowsPerBlock;
    const int64_t o_end = std::min(o_begin + kLaneRowsPerBlock, s.out_channels);
    if (b != plan_sample) {
      build_lane_plan<Taps>(offsets, scales, s, layout, b, /*transpose=*/false, plan);
      plan_sample = b;
    }
    for (const LaneUnit& u : layout.units) {
      UnitPattern<Taps> up;
      load_pattern(plan, u.pattern, up);
      int64_t o = o_begin;
      for (; o + 1 < o_end; o += 2) {
        __m512 lo0, hi0, lo1, hi1;
        load_window(w, o * row + u.window, numel, lo0, hi0);
        load_window(w, (o + 1) * row + u.window, numel, lo1, hi1);
        const __m512 v0 = blend(up, lo0, hi0), v1 = blend(up, lo1, hi1);
        float* dst = out + (b * s.out_channels + o) * row + u.out;
        store_unit(dst, u.mask, v0);
        store_unit(dst + row, u.mask, v1);
      }
      if (o < o_end) {
        __m512 lo, hi;
        load_window(w, o * row + u.window, numel, lo, hi);
        store_unit(out + (b * s.out_channels + o) * row + u.out, u.mask, blend(up, lo, hi));
      }
    }
  }
}

// grad_w[o] = Σ_b transposed roll of grad[b, o] for the blocks of output channels in [begin, end);
// the block's grad_w rows accumulate over the samples in cache.
template <int Taps>
AGI_TARGET_AVX512 void lane_grad_weight_blocks(
    const float* grad, float* grad_w, const std::vector<LanePlan>& plans, const RollShape& s,
    const LaneLayout& layout, int64_t begin, int64_t end) {
  const int64_t row = s.in_channels * s.kernel_numel();
  const int64_t numel = s.batch * s.out_channels * row;
  for (int64_t block = begin; block < end; ++block) {
    const int64_t o_begin = block * kLaneRowsPerBlock;
    const int64_t o_end = std::min(o_begin + kLaneRowsPerBlock, s.out_channels);
    for (int64_t b = 0; b < s.batch; ++b) {
      for (const LaneUnit& u : layout.units) {
        UnitPattern<Taps> up;
        load_pattern(plans[b], u.pattern, up);
        const __mmask16 mask = static_cast<__mmask16>(u.mask);
        auto accumulate = [&](int64_t o, __m512 v) AGI_TARGET_AVX512 {
          float* dst = grad_w + o * row + u.out;
          if (b > 0) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, dst));
          store_unit(dst, u.mask, v);
        };
        int64_t o = o_begin;
        for (; o + 1 < o_end; o += 2) {
          __m512 lo0, hi0, lo1, hi1;
          load_window(grad, (b * s.out_channels + o) * row + u.window, numel, lo0, hi0);
          load_window(grad, (b * s.out_channels + o + 1) * row + u.window, numel, lo1, hi1);
          const __m512 v0 = blend(up, lo0, hi0), v1 = blend(up, lo1, hi1);
          accumulate(o, v0);
          accumulate(o + 1, v1);
        }
        if (o < o_end) {
          __m512 lo, hi;
          load_window(grad, (b * s.out_channels + o) * row + u.window, numel, lo, hi);
          accumulate(o, blend(up, lo, hi));
        }
      }
    }
  }
}

// Routing gradients, task = (sample, block of units): per unit and tap, A_t = Σ_o grad[b, o, unit] ·
// permute(w[o] window, index_t) (each lane's tap source), added lane by lane into the task's
// tap correlations M[g · K + k][t] (the lane's group and kernel position). The caller combines them:
// d_scale = Σ weight · M, d_offset = scale · Σ ∂weight/∂offset · M (deterministic task order).
template <int Taps>
AGI_TARGET_AVX512 void lane_grad_routing_tasks(
    const float* grad, const float* w, const std::vector<LanePlan>& plans, const RollShape& s,
    const LaneLayout& layout, int64_t units_per_task, int64_t tasks_per_sample, float* correlations, int64_t begin,
    int64_t end) {
  const int64_t row = s.in_channels * s.kernel_numel();
  const int64_t w_numel = s.out_channels * row;
  const int64_t units = static_cast<int64_t>(layout.units.size());
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / tasks_per_sample;
    const LanePlan& plan = plans[b];
    const int64_t u_begin = (task % tasks_per_sample) * units_per_task;
    const int64_t u_end = std::min(u_begin + units_per_task, units);
    float* M = correlations + task * s.groups * s.kernel_numel() * Taps;
    for (int64_t ui = u_begin; ui < u_end; ++ui) {
      const LaneUnit& u = layout.units[ui];
      const int32_t* index = plan.index.data() + u.pattern * Taps * kLanes;
      __m512i idx[Taps];
      __m512 A[Taps];
      for (int t = 0; t < Taps; ++t) {
        idx[t] = _mm512_loadu_si512(index + t * kLanes);
        A[t] = _mm512_setzero_ps();
      }
      const __mmask16 mask = static_cast<__mmask16>(u.mask);
      for (int64_t o = 0; o < s.out_channels; ++o) {
        __m512 lo, hi;
        load_window(w, o * row + u.window, w_numel, lo, hi);
        const __m512 g = _mm512_maskz_loadu_ps(mask, grad + (b * s.out_channels + o) * row + u.out);
        for (int t = 0; t < Taps; ++t) A[t] = _mm512_fmadd_ps(g, _mm512_permutex2var_ps(lo, idx[t], hi), A[t]);
      }
      alignas(64) float lanes_of[Taps][kLanes];
      for (int t = 0; t < Taps; ++t) _mm512_store_ps(lanes_of[t], A[t]);
      for (int l = 0; l < kLanes; ++l) {
        const int32_t position = layout.position[u.pattern * kLanes + l];
        if (((u.mask >> l) & 1u) == 0 || position < 0) continue;
        for (int t = 0; t < Taps; ++t) M[position * Taps + t] += lanes_of[t][l];
      }
    }
  }
}

template <int Taps>
void lane_forward(const float* w, const float* offsets, const float* scales, float* out, const RollShape& s) {
  LaneLayout layout;
  build_lane_layout(s, layout);
  const int64_t blocks = (s.out_channels + kLaneRowsPerBlock - 1) / kLaneRowsPerBlock;
  const int64_t row = s.in_channels * s.kernel_numel();
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / (row * kLaneRowsPerBlock));
  at::parallel_for(0, s.batch * blocks, grain, [&](int64_t begin, int64_t end) {
    lane_forward_tasks<Taps>(w, offsets, scales, out, s, layout, begin, end);
  });
}

template <int Taps>
void lane_backward(
    const float* grad, const float* w, const float* offsets, const float* scales, float* grad_w, float* grad_offsets,
    float* grad_scales, const RollShape& s) {
  const int64_t K = s.kernel_numel();
  const int64_t threads = std::max<int64_t>(at::get_num_threads(), 1);
  LaneLayout layout;
  build_lane_layout(s, layout);
  std::vector<LanePlan> plans(s.batch), transposed_plans(s.batch);
  at::parallel_for(0, s.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      build_lane_plan<Taps>(offsets, scales, s, layout, b, /*transpose=*/false, plans[b]);
      build_lane_plan<Taps>(offsets, scales, s, layout, b, /*transpose=*/true, transposed_plans[b]);
    }
  });
  // Routing gradients: a few tasks per thread, each sample's units split evenly.
  const int64_t units = static_cast<int64_t>(layout.units.size());
  const int64_t tasks_per_sample =
      std::min<int64_t>(units, std::max<int64_t>(1, (4 * threads + s.batch - 1) / s.batch));
  const int64_t units_per_task = (units + tasks_per_sample - 1) / tasks_per_sample;
  const int64_t entries = s.groups * K * Taps;
  std::vector<float> correlations(s.batch * tasks_per_sample * entries, 0.0f);
  at::parallel_for(0, s.batch * tasks_per_sample, 1, [&](int64_t begin, int64_t end) {
    lane_grad_routing_tasks<Taps>(grad, w, plans, s, layout, units_per_task, tasks_per_sample, correlations.data(),
                                  begin, end);
  });
  for (int64_t b = 0; b < s.batch; ++b) {
    store_routing_grads_of_sample<float>(correlations.data() + b * tasks_per_sample * entries, tasks_per_sample,
                                         entries, plans[b].sample, scales, s, b, grad_offsets, grad_scales);
  }
  const int64_t blocks = (s.out_channels + kLaneRowsPerBlock - 1) / kLaneRowsPerBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    lane_grad_weight_blocks<Taps>(grad, grad_w, transposed_plans, s, layout, begin, end);
  });
}
#endif  // AGI_X86_DISPATCH

// ---------------------------------------------------------------------------------------------------
// Tap kernels (any dtype): float16 / bfloat16, AGI_MONAI_GROUP_ROLL_CPU=taps.
// ---------------------------------------------------------------------------------------------------

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
    const acc_t scale = static_cast<acc_t>(scales[bg]);
    for (int64_t k = 0; k < K; ++k) {
      int64_t index[kMaxTaps];
      acc_t weight[kMaxTaps];
      acc_t d_weight[kMaxTaps][kMaxAxes];
      detail::position_taps<acc_t>(offsets, s, bg, k, transpose, index, weight, d_weight);
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
void forward_taps(const scalar_t* w, const scalar_t* offsets, const scalar_t* scales, scalar_t* out, const RollShape& s) {
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
void grad_weight_taps(const scalar_t* grad, const scalar_t* offsets, const scalar_t* scales, scalar_t* grad_w, const RollShape& s) {
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
void grad_routing_correlation(
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
      detail::store_routing_grads<acc_t>(d_scale, d_offset, scales, s, bg, grad_offsets, grad_scales);
    }
  });
}

#if AGI_VECTOR_EXTENSIONS
// ---------------------------------------------------------------------------------------------------
// Tile kernels (float32 / float64, any K; vector extensions, compiled per instruction set).
// ---------------------------------------------------------------------------------------------------
//
// A register holds one kernel entry of L consecutive output channels: lane l of tile[c · K + k] is
// data[o + l, c, k]. All lanes of a tile register share the input channel, hence the group and the
// taps, so a rolled entry is Σ_t coef_t · tile[c · K + index_t]: scalar coefficients and a register
// picked by index, no permutes, and each lane reads its own taps' entries only (NaN and Inf propagate
// exactly as defined). The price is transposing L rows into a tile and results back out; the forward
// transposes each block of weight rows once for all the samples it serves.

// Scratch registers: n packs, zero-initialised, on a 64-byte boundary. (Not std::vector<Pack>: inside
// templates GCC reports alignof(Pack) as 16 while its code assumes the pack's full width, so neither
// the allocator nor alignof can be trusted.)
template <typename V>
class PackBuffer {
 public:
  explicit PackBuffer(int64_t n) : raw_(n * sizeof(V) + 64, 0) {
    void* at = raw_.data();
    size_t space = raw_.size();
    data_ = static_cast<V*>(std::align(64, n * sizeof(V), at, space));
  }
  V* data() { return data_; }
  V& operator[](int64_t i) { return data_[i]; }
  const V& operator[](int64_t i) const { return data_[i]; }

 private:
  std::vector<unsigned char> raw_;
  V* data_;
};

// tile[i][l] = data[l · row + i] for the `count` (≤ L) rows at data; lanes from count on are 0.
template <int L, typename T>
AGI_ALWAYS_INLINE void load_tile(const T* data, int64_t row, int64_t count, Pack<T, L>* tile) {
  T* lanes_of = reinterpret_cast<T*>(tile);
  if (count == L) {
    for (int64_t i = 0; i < row; ++i) {
      for (int l = 0; l < L; ++l) lanes_of[i * L + l] = data[l * row + i];
    }
    return;
  }
  for (int64_t i = 0; i < row; ++i) {
    for (int l = 0; l < L; ++l) lanes_of[i * L + l] = l < count ? data[l * row + i] : T(0);
  }
}

// Lanes (i0 … i7) of the 16 lanes of a then b (two-source shuffle with constant indices).
#if defined(__clang__)
#define AGI_SHUFFLE8(a, b, i0, i1, i2, i3, i4, i5, i6, i7) __builtin_shufflevector(a, b, i0, i1, i2, i3, i4, i5, i6, i7)
#else
#define AGI_SHUFFLE8(a, b, i0, i1, i2, i3, i4, i5, i6, i7) \
  __builtin_shuffle(a, b, Pack<int32_t, 8>{i0, i1, i2, i3, i4, i5, i6, i7})
#endif

// rows[l] = (columns[0][l], …, columns[7][l]): an 8×8 transpose of float registers in 24 shuffles
// (unpack pairs, then quads, then 128-bit halves), each of which the compiler emits as one instruction.
AGI_ALWAYS_INLINE void transpose8x8(const Pack<float, 8>* columns, Pack<float, 8>* rows) {
  Pack<float, 8> pairs[8], quads[8];
  for (int i = 0; i < 8; i += 2) {
    pairs[i] = AGI_SHUFFLE8(columns[i], columns[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    pairs[i + 1] = AGI_SHUFFLE8(columns[i], columns[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {
    for (int h = 0; h < 2; ++h) {
      quads[i + 2 * h] = AGI_SHUFFLE8(pairs[i + h], pairs[i + h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      quads[i + 2 * h + 1] = AGI_SHUFFLE8(pairs[i + h], pairs[i + h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  }
  for (int l = 0; l < 4; ++l) {
    rows[l] = AGI_SHUFFLE8(quads[l], quads[l + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    rows[l + 4] = AGI_SHUFFLE8(quads[l], quads[l + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

// data[l · row + i] = columns[i][l] for i < n and the first `count` lanes. Eight float lanes (AVX2):
// eight columns at a time through registers (element-wise, this store was 70 % of the forward).
template <int L, typename T>
AGI_ALWAYS_INLINE void store_tile(const Pack<T, L>* columns, int64_t n, T* data, int64_t row, int64_t count) {
  int64_t i = 0;
  if constexpr (L == 8 && std::is_same_v<T, float>) {
    for (; i + 8 <= n; i += 8) {
      Pack<float, 8> rows[8];
      transpose8x8(columns + i, rows);
      for (int64_t l = 0; l < count; ++l) store_pack<8>(data + l * row + i, rows[l]);
    }
  }
  const T* lanes_of = reinterpret_cast<const T*>(columns);
  for (int64_t l = 0; l < count; ++l) {
    for (int64_t j = i; j < n; ++j) data[l * row + j] = lanes_of[j * L + l];
  }
}

// Input channels rolled before their results are stored (transposed), together: 32 · K entries, a
// multiple of 8, so that the stores run through whole 8×8 transposes across the slices' boundaries.
constexpr int64_t kTileChannels = 32;

// out[b, o + l] for tasks (block of L output channels, chunk of samples): the block's weight tile is
// loaded once per task (consecutive tasks of one thread share it), then rolled per sample and channel.
template <typename T, int Taps>
struct TileForwardJob {
  const T* w;
  T* out;
  RollShape s;
  const TapTable<T>* taps;  // forward taps of every sample
  int64_t chunks;            // tasks per block: task = block · chunks + chunk of samples_per_task samples
  int64_t samples_per_task;

  template <int RegisterBytes>
  AGI_ALWAYS_INLINE void run(int64_t begin, int64_t end) const {
    constexpr int L = lanes<RegisterBytes, T>();
    using V = Pack<T, L>;
    const int64_t K = s.kernel_numel();
    const int64_t row = s.in_channels * K;
    PackBuffer<V> tile(row), rolled(kTileChannels * K);
    int64_t tile_block = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t block = task / chunks;
      const int64_t o = block * L;
      const int64_t count = std::min<int64_t>(L, s.out_channels - o);
      if (block != tile_block) {
        load_tile<L>(w + o * row, row, count, tile.data());
        tile_block = block;
      }
      const int64_t b_begin = (task % chunks) * samples_per_task;
      const int64_t b_end = std::min(b_begin + samples_per_task, s.batch);
      for (int64_t b = b_begin; b < b_end; ++b) {
        for (int64_t c_begin = 0; c_begin < s.in_channels; c_begin += kTileChannels) {
          const int64_t c_end = std::min(c_begin + kTileChannels, s.in_channels);
          for (int64_t c = c_begin; c < c_end; ++c) {
            const int64_t first = (b * s.groups + c / s.channels_per_group) * K * Taps;
            const int32_t* index = taps->index.data() + first;
            const T* coef = taps->weight.data() + first;
            const V* src = tile.data() + c * K;
            V* dst = rolled.data() + (c - c_begin) * K;
            for (int64_t k = 0; k < K; ++k) {
              V acc = coef[k * Taps] * src[index[k * Taps]];
              for (int t = 1; t < Taps; ++t) acc += coef[k * Taps + t] * src[index[k * Taps + t]];
              dst[k] = acc;
            }
          }
          store_tile<L>(rolled.data(), (c_end - c_begin) * K, out + (b * s.out_channels + o) * row + c_begin * K, row,
                        count);
        }
      }
    }
  }
};

// Weight gradient and routing correlations of blocks of L output channels, one pass over grad: per
// sample, the block's grad rows are transposed into a tile, then
//   grad_w tile[c·K + j] += Σ_t coef'_t · grad tile[c·K + index'_t]      (transposed taps), and
//   M[b, g, k, t] = Σ over the block's rows and the group's channels of grad[c·K + k] · w[c·K + index_t],
// the block's share of the routing correlations (the caller sums the blocks in order and combines them
// with the taps' weights: d_scale = Σ weight · M, d_offset = scale · Σ ∂weight/∂offset · M).
template <typename T, int Taps>
struct TileBackwardJob {
  const T* grad;
  const T* w;
  T* grad_w;
  RollShape s;
  const TapTable<T>* taps;        // forward taps (their index: the source the routing gradient reads)
  const TapTable<T>* transposed;  // transposed taps
  T* correlations;                // [block][((b · n + g) · K + k) · Taps + t]

  template <int RegisterBytes>
  AGI_ALWAYS_INLINE void run(int64_t begin, int64_t end) const {
    constexpr int L = lanes<RegisterBytes, T>();
    using V = Pack<T, L>;
    const int64_t K = s.kernel_numel();
    const int64_t row = s.in_channels * K;
    const int64_t entries = s.batch * s.groups * K * Taps;
    PackBuffer<V> w_tile(row), grad_tile(row), grad_w_tile(row);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t o = block * L;
      const int64_t count = std::min<int64_t>(L, s.out_channels - o);
      load_tile<L>(w + o * row, row, count, w_tile.data());
      std::fill(grad_w_tile.data(), grad_w_tile.data() + row, V{});
      T* M = correlations + block * entries;
      for (int64_t b = 0; b < s.batch; ++b) {
        load_tile<L>(grad + (b * s.out_channels + o) * row, row, count, grad_tile.data());
        for (int64_t g = 0; g < s.groups; ++g) {
          const int64_t first = (b * s.groups + g) * K * Taps;
          const int64_t c_begin = g * s.channels_per_group, c_end = c_begin + s.channels_per_group;
          const int32_t* index = taps->index.data() + first;
          for (int64_t k = 0; k < K; ++k) {
            for (int t = 0; t < Taps; ++t) {
              V m{};
              for (int64_t c = c_begin; c < c_end; ++c) m += grad_tile[c * K + k] * w_tile[c * K + index[k * Taps + t]];
              T sum = T(0);
              for (int l = 0; l < L; ++l) sum += m[l];
              M[first + k * Taps + t] = sum;
            }
          }
          const int32_t* t_index = transposed->index.data() + first;
          const T* t_coef = transposed->weight.data() + first;
          for (int64_t c = c_begin; c < c_end; ++c) {
            const V* src = grad_tile.data() + c * K;
            V* acc = grad_w_tile.data() + c * K;
            for (int64_t j = 0; j < K; ++j) {
              for (int t = 0; t < Taps; ++t) acc[j] += t_coef[j * Taps + t] * src[t_index[j * Taps + t]];
            }
          }
        }
      }
      store_tile<L>(grad_w_tile.data(), row, grad_w + o * row, row, count);
    }
  }
};

template <typename T, int Taps>
void tile_forward(const T* w, const T* offsets, const T* scales, T* out, const RollShape& s, CpuPath path) {
  const TapTable<T> taps = tap_table<T>(offsets, scales, s, /*transpose=*/false);
  const int64_t L = lanes_on<T>(path);
  const int64_t blocks = (s.out_channels + L - 1) / L;
  // Enough tasks for every thread; each transposes its block's weights once.
  const int64_t threads = std::max<int64_t>(at::get_num_threads(), 1);
  const int64_t wanted = std::min<int64_t>(s.batch, std::max<int64_t>(1, (4 * threads + blocks - 1) / blocks));
  const int64_t samples_per_task = (s.batch + wanted - 1) / wanted;
  const int64_t chunks = (s.batch + samples_per_task - 1) / samples_per_task;  // ≤ wanted: no empty chunk
  parallel_run(TileForwardJob<T, Taps>{w, out, s, &taps, chunks, samples_per_task}, path, blocks * chunks, 1);
}

template <typename T, int Taps>
void tile_backward(
    const T* grad, const T* w, const T* offsets, const T* scales, T* grad_w, T* grad_offsets, T* grad_scales,
    const RollShape& s, CpuPath path) {
  const int64_t K = s.kernel_numel();
  const TapTable<T> taps = tap_table<T>(offsets, scales, s, /*transpose=*/false);
  const TapTable<T> transposed = tap_table<T>(offsets, scales, s, /*transpose=*/true);
  const int64_t L = lanes_on<T>(path);
  const int64_t blocks = (s.out_channels + L - 1) / L;
  const int64_t entries = s.batch * s.groups * K * Taps;
  std::vector<T> correlations(blocks * entries);
  parallel_run(TileBackwardJob<T, Taps>{grad, w, grad_w, s, &taps, &transposed, correlations.data()}, path, blocks, 1);
  at::parallel_for(0, s.batch, 1, [&](int64_t begin, int64_t end) {
    SampleTaps<T> st;
    for (int64_t b = begin; b < end; ++b) {
      sample_taps<T>(offsets, s, b, /*transpose=*/false, st);
      store_routing_grads_of_sample<T>(correlations.data() + b * s.groups * K * Taps, blocks, entries, st, scales, s, b,
                                       grad_offsets, grad_scales);
    }
  });
}
#endif  // AGI_VECTOR_EXTENSIONS

// ---------------------------------------------------------------------------------------------------
// Column kernels (any dtype), AGI_MONAI_GROUP_ROLL_CPU=columns: the CUDA backend's per-thread code
// (group_roll_math.h) run by CPU threads, so that every machine tests its maths. The weight gradient
// is the tap kernel's, as on CUDA.
// ---------------------------------------------------------------------------------------------------

template <typename scalar_t, int taps>
void forward_columns(const scalar_t* w, const scalar_t* offsets, const scalar_t* scales, scalar_t* out, const RollShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, detail::column_count(s), 64, [&](int64_t begin, int64_t end) {
    for (int64_t column = begin; column < end; ++column)
      detail::forward_column<taps, acc_t>(w, offsets, scales, out, s, column, int64_t(0), s.out_channels);
  });
}

// Per (sample, group): its columns' partials summed in column order (as the CUDA kernel's lanes do,
// in another association).
template <typename scalar_t, int taps>
void grad_routing_columns(
    const scalar_t* grad, const scalar_t* w, const scalar_t* offsets, const scalar_t* scales, scalar_t* grad_offsets,
    scalar_t* grad_scales, const RollShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t span = s.channels_per_group * s.kernel_numel();
  at::parallel_for(0, s.batch * s.groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bg = begin; bg < end; ++bg) {
      acc_t summed[1 + kMaxAxes] = {};
      for (int64_t r = 0; r < span; ++r) {
        acc_t partial[1 + kMaxAxes] = {};
        detail::routing_grad_column<taps, acc_t>(grad, w, offsets, s, bg * span + r, int64_t(0), s.out_channels, partial);
        for (int a = 0; a <= s.spatial; ++a) summed[a] += partial[a];
      }
      detail::store_routing_grads<acc_t>(summed[0], summed + 1, scales, s, bg, grad_offsets, grad_scales);
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// Entry points.
// ---------------------------------------------------------------------------------------------------

template <typename scalar_t>
constexpr bool has_vector_kernels() {
  return AGI_VECTOR_EXTENSIONS && (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>);
}

template <typename scalar_t>
void forward(const scalar_t* w, const scalar_t* offsets, const scalar_t* scales, scalar_t* out, const RollShape& s,
             CpuPath path) {
  if (path == CpuPath::kColumns) {
    (s.spatial == 2 ? forward_columns<scalar_t, 4> : forward_columns<scalar_t, 8>)(w, offsets, scales, out, s);
    return;
  }
#if AGI_X86_DISPATCH
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (path == CpuPath::kAvx512 && lane_kernels_apply(s)) {
      (s.spatial == 2 ? lane_forward<4> : lane_forward<8>)(w, offsets, scales, out, s);
      return;
    }
  }
#endif
#if AGI_VECTOR_EXTENSIONS
  if constexpr (has_vector_kernels<scalar_t>()) {
    if (path != CpuPath::kTaps) {
      (s.spatial == 2 ? tile_forward<scalar_t, 4> : tile_forward<scalar_t, 8>)(w, offsets, scales, out, s, path);
      return;
    }
  }
#endif
  (s.spatial == 2 ? forward_taps<scalar_t, 4> : forward_taps<scalar_t, 8>)(w, offsets, scales, out, s);
}

template <typename scalar_t>
void backward(const scalar_t* grad, const scalar_t* w, const scalar_t* offsets, const scalar_t* scales,
              scalar_t* grad_w, scalar_t* grad_offsets, scalar_t* grad_scales, const RollShape& s, CpuPath path) {
  const auto grad_weight_by_taps = s.spatial == 2 ? grad_weight_taps<scalar_t, 4> : grad_weight_taps<scalar_t, 8>;
  if (path == CpuPath::kColumns) {
    grad_weight_by_taps(grad, offsets, scales, grad_w, s);
    (s.spatial == 2 ? grad_routing_columns<scalar_t, 4> : grad_routing_columns<scalar_t, 8>)(
        grad, w, offsets, scales, grad_offsets, grad_scales, s);
    return;
  }
#if AGI_X86_DISPATCH
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (path == CpuPath::kAvx512 && lane_kernels_apply(s)) {
      (s.spatial == 2 ? lane_backward<4> : lane_backward<8>)(grad, w, offsets, scales, grad_w, grad_offsets,
                                                            grad_scales, s);
      return;
    }
  }
#endif
#if AGI_VECTOR_EXTENSIONS
  if constexpr (has_vector_kernels<scalar_t>()) {
    if (path != CpuPath::kTaps) {
      (s.spatial == 2 ? tile_backward<scalar_t, 4> : tile_backward<scalar_t, 8>)(grad, w, offsets, scales, grad_w,
                                                                                grad_offsets, grad_scales, s, path);
      return;
    }
  }
#endif
  grad_weight_by_taps(grad, offsets, scales, grad_w, s);
  grad_routing_correlation<scalar_t>(grad, w, offsets, scales, grad_offsets, grad_scales, s);
}

// The output (B times the kernel) is written once, right after it is allocated: for large ones, ask
// Linux for transparent huge pages, so that first-touch page faults (one per 4 KiB page, with the
// kernel's per-page bookkeeping) do not dominate: they were ~60 % of the forward at 512→512, B = 16
// (151 MB) before. PyTorch's THP_MEM_ALLOC_ENABLE=1 does the same for every allocation. Only a hint:
// where THP is off ("never") or unsupported, nothing changes.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const uintptr_t start = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (start + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (start + t.nbytes()) & ~(kHugePage - 1);
  if (t.nbytes() >= 4 * kHugePage && end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

at::Tensor group_roll_cpu(const at::Tensor& weight, const at::Tensor& offsets, const at::Tensor& scales) {
  detail::check_group_roll_inputs(weight, offsets, scales);
  TORCH_CHECK(weight.device().is_cpu(), "group_roll (CPU kernel): weight must be a CPU tensor, got ", weight.device());
  const RollShape s = detail::roll_shape(weight, offsets);
  const at::Tensor w = weight.contiguous(), o = offsets.contiguous(), sc = scales.contiguous();
  at::Tensor out = at::empty(detail::output_sizes(weight, s.batch), weight.options());
  if (out.numel() == 0) return out;
  const CpuPath path = selected_cpu_path();
  if (path != CpuPath::kTaps) advise_huge_pages(out);  // (taps: exactly the first version, for comparisons)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "group_roll_cpu", [&] {
    forward<scalar_t>(w.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(), sc.const_data_ptr<scalar_t>(),
                      out.mutable_data_ptr<scalar_t>(), s, path);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_roll_backward_cpu(
    const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& offsets, const at::Tensor& scales) {
  detail::check_group_roll_inputs(weight, offsets, scales);
  detail::check_group_roll_grad(grad, weight, offsets);
  const RollShape s = detail::roll_shape(weight, offsets);
  const at::Tensor gr = grad.contiguous(), w = weight.contiguous(), o = offsets.contiguous(), sc = scales.contiguous();
  // Every kernel writes all of grad_w; the routing gradients are written per (sample, group).
  at::Tensor grad_w = grad.numel() == 0 ? at::zeros_like(w) : at::empty_like(w);
  at::Tensor grad_o = at::zeros_like(o);
  at::Tensor grad_s = at::zeros_like(sc);
  if (grad.numel() == 0) return {grad_w, grad_o, grad_s};
  const CpuPath path = selected_cpu_path();
  if (path != CpuPath::kTaps) advise_huge_pages(grad_w);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "group_roll_backward_cpu", [&] {
    backward<scalar_t>(
        gr.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(),
        sc.const_data_ptr<scalar_t>(), grad_w.mutable_data_ptr<scalar_t>(), grad_o.mutable_data_ptr<scalar_t>(),
        grad_s.mutable_data_ptr<scalar_t>(), s, path);
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
