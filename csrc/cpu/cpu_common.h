// What the CPU kernels share: the dtype check, the SIMD activation policy for cell_math.h, and
// the parallel grain.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

#include "../layer_args.h"

// Compiled once per SIMD level by setup.py, which defines CPU_CAPABILITY (DEFAULT, AVX2, AVX512)
// and the matching CPU_CAPABILITY_<level>, as ATen does for at::vec.
#ifndef CPU_CAPABILITY
#error "csrc/cpu kernels are compiled per SIMD level: setup.py defines CPU_CAPABILITY"
#endif

namespace lstm_fused {
namespace CPU_CAPABILITY {  // one copy per SIMD level: cpu_kernels.h

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

// Faster float32 sigmoid and tanh for the AVX-512 and AVX2 builds: SLEEF's 1-ulp tanh was a fifth
// of the LSTM forward's time at B=32 H=128 (AVX-512) and 8% of an inference at B=64 H=256 (AVX2).
// Both go through one exponential and one reciprocal:
//   sigmoid(x) = 1 / (1 + exp(-x)),   tanh(x) = -expm1(-2x) / (2 + expm1(-2x)).
// Both keep their *relative* error at a few float ulps over the whole range: sigmoid has no
// cancellation, and tanh through expm1 none either, where the earlier 2 sigmoid(2x) - 1 lost
// every digit of a small tanh (an absolute error of ~6e-8 that does not shrink with the value:
// an LSTM whose activations were ~1e-6 came out ~3% off).
// exp: the argument is clamped to [-87, 87] (2^n stays a normal float, and sigmoid(-87) = 1.6e-38:
// a clamp at 30 had made a saturated gate pass a derivative of 9e-14, which a huge input can
// scale back into a visible weight gradient), split as n ln2 + r with |r| <= ln2/2 (ln2 in two
// parts), exp(r) - 1 by its Taylor series to r^7 (truncation error < 1e-8 relative), then
// exp = 2^n (1 + q) and expm1 = 2^n q + (2^n - 1), exact at n = 0 and free of cancellation
// elsewhere. The reciprocal is refined from the hardware estimate by Newton steps to about float
// precision.
// NaN propagates: max/min take the NaN when it is their second operand, and the polynomial of a
// NaN is NaN whatever 2^n comes out as.
// The math is written once over `Ops`, the few instructions that differ per SIMD level.
template <typename Ops>
struct PolynomialActivations {
  using V = typename Ops::V;
  using Vec = at::vec::Vectorized<float>;
  // x = n ln2 + r after the clamp, and p with exp(r) - 1 = r p (the Taylor series to r^7).
  static V reduce(V x, V& n, V& r) {
    x = Ops::min(Ops::set1(87.0f), Ops::max(Ops::set1(-87.0f), x));
    n = Ops::round_nearest(Ops::mul(x, Ops::set1(1.44269504088896341f)));
    r = Ops::fnmadd(n, Ops::set1(0.693145751953125f), x);       // ln2, high bits
    r = Ops::fnmadd(n, Ops::set1(1.4286068203094172e-06f), r);  // ln2 - high bits
    V p = Ops::set1(1.0f / 5040.0f);
    for (const float coefficient : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f}) {
      p = Ops::fmadd(p, r, Ops::set1(coefficient));
    }
    return p;
  }
  static V exp_clamped(V x) {  // 2^n (1 + r p)
    V n, r;
    const V p = reduce(x, n, r);
    return Ops::times_power_of_two(Ops::fmadd(p, r, Ops::set1(1.0f)), n);
  }
  static V expm1_clamped(V x) {  // 2^n (r p) + (2^n - 1)
    V n, r;
    const V p = reduce(x, n, r);
    const V two_to_n = Ops::times_power_of_two(Ops::set1(1.0f), n);
    return Ops::add(Ops::times_power_of_two(Ops::mul(p, r), n), Ops::sub(two_to_n, Ops::set1(1.0f)));
  }
  // 1 / d for d >= 1.
  static V reciprocal(V d) {
    const V one = Ops::set1(1.0f);
    V y = Ops::reciprocal_estimate(d);
    for (int step = 0; step < Ops::kNewtonSteps; ++step) y = Ops::fmadd(Ops::fnmadd(d, y, one), y, y);
    return y;
  }
  static Vec sigmoid(const Vec& x) {
    return Vec(reciprocal(Ops::add(exp_clamped(Ops::sub(Ops::set1(0.0f), x)), Ops::set1(1.0f))));
  }
  // tanh(x) = -m / (2 + m) with m = expm1(-2x), for either sign: for x < 0, m is positive (up to
  // e^87 after the clamp) and nothing cancels either. (tanh(-0) comes out +0.)
  static Vec tanh(const Vec& x) {
    const V m = expm1_clamped(Ops::mul(x, Ops::set1(-2.0f)));
    return Vec(Ops::fnmadd(m, reciprocal(Ops::add(m, Ops::set1(2.0f))), Ops::set1(0.0f)));
  }
};

#if defined(CPU_CAPABILITY_AVX512)
struct Avx512Ops {
  using V = __m512;
  static constexpr int kNewtonSteps = 1;  // vrcp14ps: 14 bits
  static V set1(float a) { return _mm512_set1_ps(a); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V fnmadd(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }
  static V fmsub(V a, V b, V c) { return _mm512_fmsub_ps(a, b, c); }
  static V round_nearest(V a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V times_power_of_two(V p, V n) { return _mm512_scalef_ps(p, n); }
  static V reciprocal_estimate(V d) { return _mm512_rcp14_ps(d); }
};
using FastFloatActivations = PolynomialActivations<Avx512Ops>;
#elif defined(CPU_CAPABILITY_AVX2)
struct Avx2Ops {
  using V = __m256;
  static constexpr int kNewtonSteps = 2;  // vrcpps: 12 bits
  static V set1(float a) { return _mm256_set1_ps(a); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V fnmadd(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
  static V fmsub(V a, V b, V c) { return _mm256_fmsub_ps(a, b, c); }
  static V round_nearest(V a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // No vscalefps: 2^n from its exponent bits (n is an integer in [-126, 126], so 2^n is normal).
  static V times_power_of_two(V p, V n) {
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  }
  static V reciprocal_estimate(V d) { return _mm256_rcp_ps(d); }
};
using FastFloatActivations = PolynomialActivations<Avx2Ops>;
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

}  // namespace CPU_CAPABILITY
}  // namespace lstm_fused
