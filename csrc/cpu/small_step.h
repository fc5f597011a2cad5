// One step of a cell at a small batch (an LSTMCell / GRUCell call of a decoder), without a GEMM.
//
// At B <= 16 a cell call's products are matrix-vector work: two calls of MKL's sgemm_ cost
// several microseconds of fixed overhead each (their thread team included) for ~1 us of
// arithmetic at H=64, and the products went to a gates buffer that the pointwise pass then read
// back. Here each hidden unit's gate rows are dotted with the batch rows straight from the
// weights as they are (row-major [gates * H, K], no packing: a call packs nothing it cannot use
// again), a block of units at a time, and the cell update runs on that block while its
// pre-activations are still in registers and L1. The blocks are split over the threads only where
// the weights are large enough to need both cores' caches (each thread then reads the same rows on
// every call, and keeps them in its own L2) or the products long enough to pay for a parallel
// region. The step's backward (the end of this file) is one pass over each weight likewise.
// Measurements: benchmarks/results/cpu-2026-12-02-cells.md.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>

#include "../cell_math.h"
#include "cpu_common.h"

namespace lstm_fused {
namespace CPU_CAPABILITY {  // one copy per SIMD level: cpu_kernels.h
namespace small_step {

// The largest batch this path takes: above it a step is GEMM-sized work, which MKL's sgemm does at
// a higher rate than these tiles (B=32 was not measured with them).
constexpr int64_t kMaxBatch = 16;
// Whether a step of this size takes this path: every batch up to kMaxBatch with AVX-512. With
// AVX2's 16 registers (8 accumulators a tile) the products run at ~58 GFLOP/s on one core where
// MKL's sgemm reaches ~100 at B=8 H=256: there (forced AVX2 on the Xeon, paired: LSTMCell B=8
// H=256 1.36x before, 1.16x with this path) only steps up to 1M MACs (B=8 H=64, B=1 H=256) come.
inline bool takes(int64_t batch, int64_t rows, int64_t k_total) {
  if (batch > kMaxBatch) return false;
#if defined(CPU_CAPABILITY_AVX512)
  return true;
#else
  return batch * rows * k_total <= (int64_t(1) << 20);
#endif
}

// Hidden units per block: the pointwise pass's unit of work, and of the split over threads.
constexpr int64_t kUnits = 16;
// Gate row sets per unit: the LSTM's i, f, g, o; the GRU's r, z, n (input side), n (hidden side).
constexpr int kSets = 4;

// One product feeding a set of gate rows: the rows of unit u start at w + u * k, the batch rows
// of the vector operand at v + b * k.
template <typename scalar_t>
struct Product {
  const scalar_t* w = nullptr;
  const scalar_t* v = nullptr;
  int64_t k = 0;
};

// acc[r][b] += w[r] . v[b] over k elements, for R weight rows ldw apart and NB vectors ldv apart.
template <typename scalar_t, int R, int NB>
inline void add_dots(const scalar_t* w, int64_t ldw, const scalar_t* v, int64_t ldv, int64_t k,
                     at::vec::Vectorized<scalar_t> (&acc)[R][NB]) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t width = Vec::size();
  auto chunk = [&](int64_t at, int n) {
    Vec wv[R];
    for (int r = 0; r < R; ++r) wv[r] = n == width ? Vec::loadu(w + r * ldw + at) : Vec::loadu(w + r * ldw + at, n);
    for (int b = 0; b < NB; ++b) {
      const Vec vv = n == width ? Vec::loadu(v + b * ldv + at) : Vec::loadu(v + b * ldv + at, n);
      for (int r = 0; r < R; ++r) acc[r][b] = at::vec::fmadd(wv[r], vv, acc[r][b]);
    }
  };
  int64_t at = 0;
  for (; at + width <= k; at += width) chunk(at, static_cast<int>(width));
  if (at < k) chunk(at, static_cast<int>(k - at));  // partial loads fill the rest with zeros
}

#if defined(CPU_CAPABILITY_AVX512)
// The lane sums of eight vectors, in one vector: a transposing tree of unpacks, lane shuffles and
// adds (24 instructions, where eight separate reductions take about 80).
inline __m256 lane_sums8(const __m512* a) {
  auto pairs = [](__m512 x, __m512 y) { return _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y)); };
  auto quads = [](__m512 x, __m512 y) {
    const __m512d p = _mm512_castps_pd(x), q = _mm512_castps_pd(y);
    return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(p, q)), _mm512_castpd_ps(_mm512_unpackhi_pd(p, q)));
  };
  // Each 128-bit lane l of t0 holds vectors 0-3's sums over their lane l; t1 the same for 4-7.
  const __m512 t0 = quads(pairs(a[0], a[1]), pairs(a[2], a[3]));
  const __m512 t1 = quads(pairs(a[4], a[5]), pairs(a[6], a[7]));
  const __m512 w = _mm512_add_ps(_mm512_shuffle_f32x4(t0, t1, _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_f32x4(t0, t1, _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 r = _mm512_add_ps(_mm512_shuffle_f32x4(w, w, _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_f32x4(w, w, _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_castps512_ps256(r);
}
#elif defined(CPU_CAPABILITY_AVX2)
inline __m256 lane_sums8(const __m256* a) {
  auto pairs = [](__m256 x, __m256 y) { return _mm256_add_ps(_mm256_unpacklo_ps(x, y), _mm256_unpackhi_ps(x, y)); };
  auto quads = [](__m256 x, __m256 y) {
    const __m256d p = _mm256_castps_pd(x), q = _mm256_castps_pd(y);
    return _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(p, q)), _mm256_castpd_ps(_mm256_unpackhi_pd(p, q)));
  };
  const __m256 t0 = quads(pairs(a[0], a[1]), pairs(a[2], a[3]));
  const __m256 t1 = quads(pairs(a[4], a[5]), pairs(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}
#endif

// sums[i] = the sum of acc[i]'s lanes.
template <typename scalar_t, int N>
inline void lane_sums(const at::vec::Vectorized<scalar_t>* acc, scalar_t* sums) {
  using Vec = at::vec::Vectorized<scalar_t>;
  if constexpr (N > 8) {
    lane_sums<scalar_t, 8>(acc, sums);
    lane_sums<scalar_t, N - 8>(acc + 8, sums + 8);
    return;
  }
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, float> && N > 1 && N <= 8) {
#if defined(CPU_CAPABILITY_AVX512)
    __m512 v[8];
#else
    __m256 v[8];
#endif
    for (int i = 0; i < 8; ++i) v[i] = i < N ? acc[i] : Vec(0.0f);
    alignas(32) float all[8];
    _mm256_store_ps(all, lane_sums8(v));
    for (int i = 0; i < N; ++i) sums[i] = all[i];
    return;
  }
#endif
  for (int i = 0; i < N; ++i) sums[i] = at::vec::vec_reduce_all<scalar_t>([](Vec x, Vec y) { return x + y; }, acc[i]);
}

// pre[b * kSets * kUnits + set * kUnits + (u - u0)] = the set's products for units [u, u + R) and
// batch rows [b0, b0 + NB).
template <typename scalar_t, int R, int NB>
inline void dot_tile(const Product<scalar_t>* products, int count, int set, int64_t u, int64_t u0, int64_t b0,
                     scalar_t* pre) {
  using Vec = at::vec::Vectorized<scalar_t>;
  Vec acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = Vec(scalar_t(0));
  for (int p = 0; p < count; ++p) {
    const Product<scalar_t>& product = products[p];
    add_dots<scalar_t, R, NB>(product.w + u * product.k, product.k, product.v + b0 * product.k, product.k,
                              product.k, acc);
  }
  scalar_t sums[R * NB];
  lane_sums<scalar_t, R * NB>(&acc[0][0], sums);
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) pre[(b0 + b) * kSets * kUnits + set * kUnits + (u - u0 + r)] = sums[r * NB + b];
}

// Accumulators per tile: AVX-512 has 32 registers, AVX2 16.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kAccumulators = 16;
#else
constexpr int kAccumulators = 8;
#endif

// Batch rows in tiles of up to four, beside kAccumulators / NB weight rows.
template <typename scalar_t, int NB>
inline void dot_units(const Product<scalar_t>* products, int count, int set, int64_t u0, int64_t units, int64_t b0,
                      scalar_t* pre) {
  constexpr int R = NB == 3 ? kAccumulators / 4 : kAccumulators / NB;
  int64_t u = u0;
  for (; u + R <= u0 + units; u += R) dot_tile<scalar_t, R, NB>(products, count, set, u, u0, b0, pre);
  for (; u < u0 + units; ++u) dot_tile<scalar_t, 1, NB>(products, count, set, u, u0, b0, pre);
}

// The pre-activations of units [u0, u0 + units) for every batch row, set by set. sets[s] lists
// the products of set s (count[s] of them).
template <typename scalar_t>
inline void block_products(const Product<scalar_t> (&sets)[kSets][2], const int (&count)[kSets], int64_t batch,
                           int64_t u0, int64_t units, scalar_t* pre) {
  for (int set = 0; set < kSets; ++set) {
    for (int64_t b0 = 0; b0 < batch; b0 += 4) {
      switch (std::min<int64_t>(4, batch - b0)) {
        case 1: dot_units<scalar_t, 1>(sets[set], count[set], set, u0, units, b0, pre); break;
        case 2: dot_units<scalar_t, 2>(sets[set], count[set], set, u0, units, b0, pre); break;
        case 3: dot_units<scalar_t, 3>(sets[set], count[set], set, u0, units, b0, pre); break;
        default: dot_units<scalar_t, 4>(sets[set], count[set], set, u0, units, b0, pre); break;
      }
    }
  }
}

// Whether a step of this size splits its blocks over the threads: the weights (read once per
// call) no longer fit one core's L2 beside everything else, or the products are long enough for a
// parallel region's cost (~1-2 us on two cores) to be a small part (from 128k MACs: B=8 H=64
// inference 1.85 -> 1.95x torch.nn, paired; at 1M MACs it was 1.85x).
template <typename scalar_t>
inline bool split_over_threads(int64_t batch, int64_t rows, int64_t k_total) {
  const int64_t weight_bytes = rows * k_total * static_cast<int64_t>(sizeof(scalar_t));
  return weight_bytes >= (int64_t(1) << 20) || batch * rows * k_total >= (int64_t(1) << 17);
}

// Runs fn(u0, units, pre) for every block of hidden units, with pre a [kMaxBatch][kSets][kUnits]
// scratch of the calling thread.
template <typename scalar_t, typename Fn>
inline void for_each_block(int64_t hidden, bool parallel, Fn&& fn) {
  const int64_t blocks = (hidden + kUnits - 1) / kUnits;
  at::parallel_for(0, blocks, parallel ? 1 : std::max<int64_t>(1, blocks), [&](int64_t begin, int64_t end) {
    alignas(64) scalar_t pre[kMaxBatch * kSets * kUnits];
    for (int64_t block = begin; block < end; ++block) {
      const int64_t u0 = block * kUnits;
      fn(u0, std::min(kUnits, hidden - u0), pre);
    }
  });
}

// The outputs of an LSTM cell step. gates / cells (the reserve's two parts) are null without one.
template <typename scalar_t>
struct LstmStepOut {
  scalar_t* h = nullptr;       // y's one step [B, H]
  scalar_t* h_n = nullptr;     // [B, H]
  scalar_t* c_n = nullptr;     // [B, H]
  scalar_t* gates = nullptr;   // activated gates [B, 4H]
  scalar_t* cells = nullptr;   // c_t [B, H]
};

// x [B, I], h0 / c0 [B, H] contiguous; w_ih [4H, I], w_hh [4H, H] row-major; biases may be null.
template <typename scalar_t>
void lstm_step(int64_t B, int64_t I, int64_t H, const scalar_t* x, const scalar_t* h0, const scalar_t* c0,
               const scalar_t* w_ih, const scalar_t* w_hh, const scalar_t* b_ih, const scalar_t* b_hh,
               const LstmStepOut<scalar_t>& out) {
  using Vec = at::vec::Vectorized<scalar_t>;
  Product<scalar_t> sets[kSets][2];
  int count[kSets];
  for (int g = 0; g < kSets; ++g) {
    sets[g][0] = {w_ih + g * H * I, x, I};
    sets[g][1] = {w_hh + g * H * H, h0, H};
    count[g] = 2;
  }
  const bool parallel = split_over_threads<scalar_t>(B, 4 * H, I + H);
  for_each_block<scalar_t>(H, parallel, [&](int64_t u0, int64_t units, scalar_t* pre) {
    block_products<scalar_t>(sets, count, B, u0, units, pre);
    for (int64_t b = 0; b < B; ++b) {
      const scalar_t* p = pre + b * kSets * kUnits;
      for_each_vector<scalar_t>(units, [&](int64_t j, int n) {
        const int64_t u = u0 + j, k = b * H + u;
        Vec gate[4];
        for (int g = 0; g < 4; ++g) {
          gate[g] = Vec::loadu(p + g * kUnits + j, n);
          if (b_ih != nullptr) gate[g] = gate[g] + Vec::loadu(b_ih + g * H + u, n) + Vec::loadu(b_hh + g * H + u, n);
        }
        Vec c, h;
        lstm_cell_forward<Vec, CellActivations<scalar_t>>(gate[0], gate[1], gate[2], gate[3], Vec::loadu(c0 + k, n),
                                                          c, h);
        h.store(out.h + k, n);
        h.store(out.h_n + k, n);
        c.store(out.c_n + k, n);
        if (out.gates != nullptr) {
          for (int g = 0; g < 4; ++g) gate[g].store(out.gates + b * 4 * H + g * H + u, n);
          c.store(out.cells + k, n);
        }
      });
    }
  });
}

// The outputs of a GRU cell step; gates / hidden_n (the reserve's two parts) are null without one.
template <typename scalar_t>
struct GruStepOut {
  scalar_t* h = nullptr;         // y's one step [B, H]
  scalar_t* h_n = nullptr;       // [B, H]
  scalar_t* gates = nullptr;     // activated r, z, n [B, 3H]
  scalar_t* hidden_n = nullptr;  // h W_hn^T + b_hn [B, H]
};

// As lstm_step, for nn.GRU's cell: w_ih [3H, I], w_hh [3H, H]. r and z take both products in one
// sum; n keeps its input and hidden sides apart (r multiplies only the hidden one).
template <typename scalar_t>
void gru_step(int64_t B, int64_t I, int64_t H, const scalar_t* x, const scalar_t* h0, const scalar_t* w_ih,
              const scalar_t* w_hh, const scalar_t* b_ih, const scalar_t* b_hh, const GruStepOut<scalar_t>& out) {
  using Vec = at::vec::Vectorized<scalar_t>;
  Product<scalar_t> sets[kSets][2];
  int count[kSets] = {2, 2, 1, 1};
  for (int g = 0; g < 2; ++g) {
    sets[g][0] = {w_ih + g * H * I, x, I};
    sets[g][1] = {w_hh + g * H * H, h0, H};
  }
  sets[2][0] = {w_ih + 2 * H * I, x, I};
  sets[3][0] = {w_hh + 2 * H * H, h0, H};
  const bool parallel = split_over_threads<scalar_t>(B, 3 * H, I + H);
  for_each_block<scalar_t>(H, parallel, [&](int64_t u0, int64_t units, scalar_t* pre) {
    block_products<scalar_t>(sets, count, B, u0, units, pre);
    const Vec zero(scalar_t(0));
    for (int64_t b = 0; b < B; ++b) {
      const scalar_t* p = pre + b * kSets * kUnits;
      for_each_vector<scalar_t>(units, [&](int64_t j, int n) {
        const int64_t u = u0 + j, k = b * H + u;
        Vec r = Vec::loadu(p + j, n), z = Vec::loadu(p + kUnits + j, n);
        Vec nn = Vec::loadu(p + 2 * kUnits + j, n), hn = Vec::loadu(p + 3 * kUnits + j, n);
        Vec hr = zero, hz = zero;  // r and z hold both sides already
        if (b_ih != nullptr) {
          r = r + Vec::loadu(b_ih + u, n) + Vec::loadu(b_hh + u, n);
          z = z + Vec::loadu(b_ih + H + u, n) + Vec::loadu(b_hh + H + u, n);
          nn = nn + Vec::loadu(b_ih + 2 * H + u, n);
          hn = hn + Vec::loadu(b_hh + 2 * H + u, n);
        }
        Vec h;
        gru_cell_forward<Vec, CellActivations<scalar_t>>(r, z, nn, hr, hz, hn, Vec::loadu(h0 + k, n), h);
        h.store(out.h + k, n);
        h.store(out.h_n + k, n);
        if (out.gates != nullptr) {
          r.store(out.gates + b * 3 * H + u, n);
          z.store(out.gates + b * 3 * H + H + u, n);
          nn.store(out.gates + b * 3 * H + 2 * H + u, n);
          hn.store(out.hidden_n + k, n);
        }
      });
    }
  });
}

// --- Backward of one step ------------------------------------------------------------------
//
// A cell step's backward at a small batch is matrix-vector work too: after the pointwise
// backward, each weight W [rows, K] with its gate gradients dg [B, rows] and the vector it
// multiplied v [B, K] gives grad_v = dg W (a sum over W's rows: columns of W scaled and added, no
// lane sums), grad_W = dg^T v (each row a scaled sum of the B vectors) and grad_b = dg's column
// sums: one pass over W and one write of grad_W, where the general backward ran four GEMMs and
// copied both weight gradients out of a combined one.

template <typename scalar_t>
struct BackwardProduct {
  const scalar_t* dg = nullptr;  // [B, rows]
  const scalar_t* w = nullptr;   // [rows, k]
  const scalar_t* v = nullptr;   // [B, k]
  int64_t rows = 0, k = 0;
  scalar_t* grad_v = nullptr;    // [B, k]: dg W, added to what it holds if accumulate_v; or null
  bool accumulate_v = false;
  scalar_t* grad_w = nullptr;    // [rows, k]: dg^T v, or null
  scalar_t* grad_b = nullptr;    // [rows]: the column sums of dg, or null
};

// grad_w and grad_b, a block of rows at a time.
template <typename scalar_t>
void weight_gradient(int64_t B, const BackwardProduct<scalar_t>& p, bool parallel) {
  using Vec = at::vec::Vectorized<scalar_t>;
  if (p.grad_w == nullptr && p.grad_b == nullptr) return;
  constexpr int64_t kRowBlock = 64, width = Vec::size();
  constexpr int kChains = 4;
  constexpr int64_t kSpan = kChains * width;
  const int64_t blocks = (p.rows + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, blocks, parallel ? 1 : std::max<int64_t>(1, blocks), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin * kRowBlock; r < std::min(p.rows, end * kRowBlock); ++r) {
      if (p.grad_b != nullptr) {
        scalar_t sum = 0;
        for (int64_t b = 0; b < B; ++b) sum += p.dg[b * p.rows + r];
        p.grad_b[r] = sum;
      }
      if (p.grad_w == nullptr) continue;
      // Four vectors of the row at a time: four independent sums over the batch, not one chain.
      for (int64_t j = 0; j < p.k; j += kSpan) {
        const int64_t columns = std::min(kSpan, p.k - j);
        Vec acc[kChains];
        for (int c = 0; c < kChains; ++c) acc[c] = Vec(scalar_t(0));
        if (columns == kSpan) {
          for (int64_t b = 0; b < B; ++b) {
            const Vec scale(p.dg[b * p.rows + r]);
            const scalar_t* v = p.v + b * p.k + j;
            for (int c = 0; c < kChains; ++c) acc[c] = at::vec::fmadd(scale, Vec::loadu(v + c * width), acc[c]);
          }
          for (int c = 0; c < kChains; ++c) acc[c].store(p.grad_w + r * p.k + j + c * width);
          continue;
        }
        for (int64_t b = 0; b < B; ++b) {
          const Vec scale(p.dg[b * p.rows + r]);
          for (int c = 0; c * width < columns; ++c) {
            const int n = static_cast<int>(std::min<int64_t>(width, columns - c * width));
            acc[c] = at::vec::fmadd(scale, Vec::loadu(p.v + b * p.k + j + c * width, n), acc[c]);
          }
        }
        for (int c = 0; c * width < columns; ++c)
          acc[c].store(p.grad_w + r * p.k + j + c * width, static_cast<int>(std::min<int64_t>(width, columns - c * width)));
      }
    }
  });
}

// grad_v = dg W (+ grad_v) for batch rows [b0, b0 + NB) and columns [j, j + KV vectors), over all
// of W's rows.
template <typename scalar_t, int NB, int KV>
inline void vector_gradient_tile(const BackwardProduct<scalar_t>& p, int64_t b0, int64_t j, int64_t columns) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t width = Vec::size();
  auto count = [&](int kv) { return static_cast<int>(std::clamp<int64_t>(columns - kv * width, 0, width)); };
  Vec acc[NB][KV];
  for (int b = 0; b < NB; ++b)
    for (int kv = 0; kv < KV; ++kv)
      acc[b][kv] = p.accumulate_v && count(kv) > 0 ? Vec::loadu(p.grad_v + (b0 + b) * p.k + j + kv * width, count(kv))
                                                   : Vec(scalar_t(0));
  const bool full = columns == KV * width;
  for (int64_t r = 0; r < p.rows; ++r) {
    Vec wv[KV];
    for (int kv = 0; kv < KV; ++kv)
      wv[kv] = full ? Vec::loadu(p.w + r * p.k + j + kv * width) : Vec::loadu(p.w + r * p.k + j + kv * width, count(kv));
    for (int b = 0; b < NB; ++b) {
      const Vec scale(p.dg[(b0 + b) * p.rows + r]);
      for (int kv = 0; kv < KV; ++kv) acc[b][kv] = at::vec::fmadd(wv[kv], scale, acc[b][kv]);
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int kv = 0; kv < KV; ++kv)
      if (count(kv) > 0) acc[b][kv].store(p.grad_v + (b0 + b) * p.k + j + kv * width, count(kv));
}

template <typename scalar_t>
void vector_gradient(int64_t B, const BackwardProduct<scalar_t>& p, bool parallel) {
  if (p.grad_v == nullptr) return;
  constexpr int KV = 2;
  const int64_t span = KV * at::vec::Vectorized<scalar_t>::size();
  const int64_t blocks = (p.k + span - 1) / span;
  at::parallel_for(0, blocks, parallel ? 1 : std::max<int64_t>(1, blocks), [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t j = block * span, columns = std::min(span, p.k - j);
      for (int64_t b0 = 0; b0 < B; b0 += 4) {
        switch (std::min<int64_t>(4, B - b0)) {
          case 1: vector_gradient_tile<scalar_t, 1, KV>(p, b0, j, columns); break;
          case 2: vector_gradient_tile<scalar_t, 2, KV>(p, b0, j, columns); break;
          case 3: vector_gradient_tile<scalar_t, 3, KV>(p, b0, j, columns); break;
          default: vector_gradient_tile<scalar_t, 4, KV>(p, b0, j, columns); break;
        }
      }
    }
  });
}

// Each product's two passes are two parallel regions, where the forward's step is one: threads
// only where the weight is large (each pass then reads or writes 1 MB or more).
template <typename scalar_t>
void backward_product(int64_t B, const BackwardProduct<scalar_t>& p) {
  const bool parallel = p.rows * p.k * static_cast<int64_t>(sizeof(scalar_t)) >= (int64_t(1) << 20);
  weight_gradient(B, p, parallel);
  vector_gradient(B, p, parallel);
}

// Where a cell step's backward writes its gradients; a null one is not wanted. h0 holds, on
// entry, the part of h0's gradient that does not pass through W_hh (zeros for the LSTM).
template <typename scalar_t>
struct StepGradients {
  scalar_t* x = nullptr;     // [B, I]
  scalar_t* h0 = nullptr;    // [B, H]
  scalar_t* w_ih = nullptr;  // [rows, I]
  scalar_t* w_hh = nullptr;  // [rows, H]
  scalar_t* b_ih = nullptr;  // [rows]
  scalar_t* b_hh = nullptr;  // [rows]
};

// The two products of a cell step's backward, after its pointwise backward: W_ih [rows, I] with x
// and the input side's gate gradients dg_input [B, rows], W_hh [rows, H] with h0 and the hidden
// side's dg_hidden (the same pointer for the LSTM).
template <typename scalar_t>
void step_backward_products(int64_t B, int64_t rows, int64_t I, int64_t H, const scalar_t* dg_input,
                            const scalar_t* dg_hidden, const scalar_t* w_ih, const scalar_t* w_hh, const scalar_t* x,
                            const scalar_t* h0, const StepGradients<scalar_t>& grad) {
  BackwardProduct<scalar_t> input, hidden;
  input.dg = dg_input;
  input.w = w_ih;
  input.v = x;
  input.k = I;
  input.grad_v = grad.x;
  input.grad_w = grad.w_ih;
  input.grad_b = grad.b_ih;
  hidden.dg = dg_hidden;
  hidden.w = w_hh;
  hidden.v = h0;
  hidden.k = H;
  hidden.grad_v = grad.h0;
  hidden.accumulate_v = true;
  hidden.grad_w = grad.w_hh;
  hidden.grad_b = grad.b_hh;
  input.rows = hidden.rows = rows;
  backward_product(B, input);
  backward_product(B, hidden);
}

}  // namespace small_step
}  // namespace CPU_CAPABILITY
}  // namespace lstm_fused
