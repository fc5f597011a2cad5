// What the CPU kernels share: the dtype check, the SIMD activation policy for cell_math.h, and
// the parallel grain.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

#include "../layer_args.h"

namespace lstm_fused {

inline void check_cpu_dtype(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "lstm_fused: the CPU kernels support float32 and float64, got ", x.scalar_type());
}

// sigmoid and tanh on at::vec::Vectorized lanes (SLEEF's 1-ulp exp and tanh underneath).
template <typename scalar_t>
struct VecActivations {
  using Vec = at::vec::Vectorized<scalar_t>;
  static Vec sigmoid(const Vec& x) { return Vec(scalar_t(1)) / (Vec(scalar_t(1)) + x.neg().exp()); }
  static Vec tanh(const Vec& x) { return x.tanh(); }
};

#if defined(CPU_CAPABILITY_AVX512)
// Faster float32 sigmoid and tanh for AVX-512 builds: SLEEF's 1-ulp tanh was a fifth of the LSTM
// forward's time at B=32 H=128. Both go through one exp and one reciprocal:
//   sigmoid(x) = 1 / (1 + exp(-x)),   tanh(x) = 2 sigmoid(2x) - 1.
// exp: the argument is clamped to [-30, 30] (sigmoid(-30) = 9e-14, so the clamp changes nothing
// a float can see), split as n ln2 + r with |r| <= ln2/2 (ln2 in two parts), exp(r) by its Taylor
// series to r^7 (truncation error < 1e-8 relative), times 2^n with vscalefps. The reciprocal is
// vrcp14ps refined by one Newton step (relative error ~1e-8). The absolute error of both
// functions is a few 1e-8; tanh near 0 loses relative accuracy (2 sigmoid - 1 cancels), which
// an LSTM cannot see, since its gates and cell states are summed with O(1) values.
// NaN propagates: max/min take the NaN when it is their second operand.
struct FastFloatActivations {
  using Vec = at::vec::Vectorized<float>;
  static __m512 exp_clamped(__m512 x) {
    x = _mm512_min_ps(_mm512_set1_ps(30.0f), _mm512_max_ps(_mm512_set1_ps(-30.0f), x));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2, high bits
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.4286068203094172e-06f), r);     // ln2 - high bits
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
  }
  // 1 / (1 + e) for e >= 0.
  static __m512 one_over_one_plus(__m512 e) {
    const __m512 d = _mm512_add_ps(e, _mm512_set1_ps(1.0f));
    const __m512 y = _mm512_rcp14_ps(d);
    return _mm512_fmadd_ps(_mm512_fnmadd_ps(d, y, _mm512_set1_ps(1.0f)), y, y);
  }
  static Vec sigmoid(const Vec& x) {
    return Vec(one_over_one_plus(exp_clamped(_mm512_sub_ps(_mm512_setzero_ps(), x))));
  }
  static Vec tanh(const Vec& x) {
    const __m512 s = one_over_one_plus(exp_clamped(_mm512_mul_ps(x, _mm512_set1_ps(-2.0f))));
    return Vec(_mm512_fmsub_ps(s, _mm512_set1_ps(2.0f), _mm512_set1_ps(1.0f)));
  }
};

#elif defined(CPU_CAPABILITY_AVX2)
// The same functions for AVX2 builds (8 lanes), where SLEEF's tanh was 8% of an LSTM inference
// at B=64 H=256. Two differences: 2^n is built from its exponent bits (no vscalefps; n is an
// integer in [-44, 44], so 2^n is a normal float), and the reciprocal starts from vrcpps's 12 bits,
// so it takes two Newton steps to reach float precision. A NaN argument gives a NaN (its 2^n is
// garbage, but p is NaN).
struct FastFloatActivations {
  using Vec = at::vec::Vectorized<float>;
  static __m256 exp_clamped(__m256 x) {
    x = _mm256_min_ps(_mm256_set1_ps(30.0f), _mm256_max_ps(_mm256_set1_ps(-30.0f), x));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.4286068203094172e-06f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(exponent));
  }
  // 1 / (1 + e) for e >= 0.
  static __m256 one_over_one_plus(__m256 e) {
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 d = _mm256_add_ps(e, one);
    __m256 y = _mm256_rcp_ps(d);
    y = _mm256_fmadd_ps(_mm256_fnmadd_ps(d, y, one), y, y);
    return _mm256_fmadd_ps(_mm256_fnmadd_ps(d, y, one), y, y);
  }
  static Vec sigmoid(const Vec& x) {
    return Vec(one_over_one_plus(exp_clamped(_mm256_sub_ps(_mm256_setzero_ps(), x))));
  }
  static Vec tanh(const Vec& x) {
    const __m256 s = one_over_one_plus(exp_clamped(_mm256_mul_ps(x, _mm256_set1_ps(-2.0f))));
    return Vec(_mm256_fmsub_ps(s, _mm256_set1_ps(2.0f), _mm256_set1_ps(1.0f)));
  }
};
#endif

// The activations the CPU cell kernels use for each dtype: the fast float32 ones where the
// build's SIMD level has them.
template <typename scalar_t>
struct CellActivationsFor {
  using type = VecActivations<scalar_t>;
};
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
template <>
struct CellActivationsFor<float> {
  using type = FastFloatActivations;
};
#endif
template <typename scalar_t>
using CellActivations = typename CellActivationsFor<scalar_t>::type;

// Rows per parallel task for a pointwise pass touching `row_elements` values per row: enough
// work per task that the thread pool's overhead stays small.
inline int64_t row_grain(int64_t row_elements) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_elements));
}

// The inference kernels (no reserve) project the input a segment of steps at a time into one
// reused buffer of about 4 MB (measured against 1, 16 and 64 MB: benchmarks/NOTES.md), so that it
// is still in cache when the steps read it and no [T, B, gates * H] buffer of fresh pages is
// written and read back. Calls fn(first_index, end_index, t_low, projection) per segment of
// processing indices, whose time steps are [t_low, t_low + count) in either direction;
// `projection` holds x_t W_ih^T of step t at rows (t - t_low) * B.
template <typename Fn>
inline void for_each_projected_segment(const LayerSizes& s, const at::Tensor& x, const at::Tensor& w_ih,
                                       bool reverse, Fn&& fn) {
  constexpr int64_t kSegmentBytes = int64_t(4) << 20;
  const int64_t T = s.seq_len, B = s.batch, G = w_ih.size(0);
  const int64_t step_bytes = std::max<int64_t>(1, B * G * static_cast<int64_t>(x.element_size()));
  const int64_t segment = std::max<int64_t>(1, std::min<int64_t>(T, kSegmentBytes / step_bytes));
  at::Tensor scratch = at::empty({segment * B, G}, x.options());
  const at::Tensor w_ih_t = w_ih.t();
  for (int64_t first = 0; first < T; first += segment) {
    const int64_t count = std::min<int64_t>(segment, T - first);
    const int64_t t_low = reverse ? T - first - count : first;
    at::Tensor projection = scratch.narrow(0, 0, count * B);
    at::mm_out(projection, x.narrow(0, t_low, count).reshape({count * B, s.input_size}), w_ih_t);
    fn(first, first + count, t_low, projection);
  }
}

// One step in which every row advances, without projection: a cell's call (LSTMCell, GRUCell).
// The kernels take a path of their own for it: the general loop's fixed costs (ping-pong hidden
// buffers, the bias sum and input projection through ATen ops, the final-state selection) were
// two thirds of a small cell's time.
inline bool is_single_full_step(const LayerSizes& s) {
  return s.seq_len == 1 && !s.has_proj && s.active_rows[0] == s.batch;
}

// Processes [0, n) in SIMD-width chunks; the last chunk may be partial (its width is passed).
template <typename scalar_t, typename Fn>
inline void for_each_vector(int64_t n, Fn&& fn) {
  constexpr int64_t width = at::vec::Vectorized<scalar_t>::size();
  for (int64_t j = 0; j < n; j += width) fn(j, static_cast<int>(std::min<int64_t>(width, n - j)));
}

}  // namespace lstm_fused
