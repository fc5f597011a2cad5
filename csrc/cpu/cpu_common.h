// What the CPU kernels share: the dtype check, the SIMD activation policy for cell_math.h, and
// the parallel grain.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

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

// Rows per parallel task for a pointwise pass touching `row_elements` values per row: enough
// work per task that the thread pool's overhead stays small.
inline int64_t row_grain(int64_t row_elements) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_elements));
}

// Processes [0, n) in SIMD-width chunks; the last chunk may be partial (its width is passed).
template <typename scalar_t, typename Fn>
inline void for_each_vector(int64_t n, Fn&& fn) {
  constexpr int64_t width = at::vec::Vectorized<scalar_t>::size();
  for (int64_t j = 0; j < n; j += width) fn(j, static_cast<int>(std::min<int64_t>(width, n - j)));
}

}  // namespace lstm_fused
