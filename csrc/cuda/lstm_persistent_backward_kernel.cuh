// Device code of the persistent LSTM backward kernel (host side: lstm_persistent.cu). One
// cooperative launch runs the whole backward time loop of a layer and direction; the grid meets
// at one barrier per step. What it leaves to large GEMMs after the loop (layer_loops.h): the
// weight, bias and input gradients, from the gate gradients of every step that it writes.
//
// Block j owns hidden units [j*U, j*U + U) (persistent_plan.h, plan_persistent_backward_layer).
// The gradient reaching h_{t-1} is dG_t W_hh (K = 4H): the block's columns of it need W_hh's
// columns of its units, which stay in shared memory for every step, and every row's dG_t, which
// all blocks wrote before the last grid barrier. Per step (processing order: backwards in time
// for a forward direction):
//   1. the pointwise inputs of this thread's (row, unit) pairs are loaded: the activated gates,
//      c_t and c_{t-1} (the reserve), grad_y; they do not depend on the product;
//   2. the product of the previous step's dG with the W slice: FMAs (a warp per (row, unit)
//      pair, lanes over K, a shuffle reduction) or mma.sync (M = batch rows, N = the units,
//      K = 4H split over the warps), into partial sums in shared memory;
//   3. every thread finishes its pairs: the recurrent gradient is the sum of the partials, plus
//      grad_y; the cell's backward (cell_math.h) gives dG_t for the unit's four gates, written to
//      global memory for the next step's product and the GEMMs, and carries dc;
//   4. grid.sync().
// A last product after the loop gives the gradient of h0.
//
// Tensor-core operands: each lane loads 16 bytes of a row of A (dG, from global memory through
// L2) and 16 bytes of a row of B (the W slice, shared memory): four lanes cover a 64-byte chunk
// of K, the K of two mma.sync (m16n8k16 for bf16 / fp16, m16n8k8 for TF32). Within a
// chunk the K order is permuted (lane t holds physical columns [t*C/4, t*C/4 + C/4) of A and B
// alike), which leaves the sum unchanged and makes every operand one vector load: no ldmatrix
// and no staging of dG, which each block reads exactly once per step when N fits one n tile.
// Free of ATen, so that nvcc and the SIMT emulator compile the same source.
#pragma once

#include <cstdint>

#include "../cell_math.h"
#include "../persistent_plan.h"
#include "device_compat.cuh"
#include "mma.cuh"

namespace lstm_fused {

// How the kernel computes dG_t W_hh: FMAs, or one of the tensor-core formats.
enum class BackwardProduct : int { kFma = 0, kBFloat16 = 1, kHalf = 2, kTF32 = 3 };

// The plan keeps B * U <= kPersistentMaxPairsPerBlock: each thread finishes at most this many pairs.
constexpr int kBackwardPairsPerThread = static_cast<int>(kPersistentMaxPairsPerBlock / kPersistentBackwardThreads);

template <typename scalar_t, typename acc_t>
struct PersistentLstmBackwardArgs {
  const scalar_t* w_hh;        // [4H, H]
  const scalar_t* gates;       // [T, B, 4H] the forward's activated gates (reserve)
  const scalar_t* cells;       // [T, B, H] every step's cell state (reserve)
  const scalar_t* c0;          // [B, H]
  const scalar_t* grad_y;      // [T, B, H]
  scalar_t* d_gates;           // [T, B, 4H] receives every step's pre-activation gradients
  acc_t* dh_state;             // [B, H] grad_h_n in; the gradient reaching h from later steps
  acc_t* dc_state;             // [B, H] grad_c_n in; the gradient of c0 out
  scalar_t* grad_h0;           // [B, H] receives the gradient of h0
  const int64_t* active_rows;  // [T] rows that take part in step t (a prefix); null: all B
  const int64_t* lengths;      // [B] each row's length; null: every row has T steps
  int T, B, H, units_per_block;
  int m_rows, n_cols, n_tiles, chunks, k_split, row_stride;  // plan_persistent_backward_layer
  bool reverse;
};

// Two mma.sync over one 64-byte chunk of K: a_lo / a_hi are this lane's 16 bytes of A rows g and
// g + 8, b its 16 bytes of B row (n) g. Words w0, w1 feed the first mma, w2, w3 the second.
template <BackwardProduct kProduct>
__device__ __forceinline__ void mma_chunk(float (&acc0)[4], float (&acc1)[4], const Words16& a_lo,
                                          const Words16& a_hi, const Words16& b) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float(&acc)[4] = half == 0 ? acc0 : acc1;
    const int w = 2 * half;
    if constexpr (kProduct == BackwardProduct::kTF32) {
      // m16n8k8: a0 (g, k), a1 (g+8, k), a2 (g, k+4), a3 (g+8, k+4); b0 (k, g), b1 (k+4, g).
      const uint32_t a[4] = {tc::to_tf32(word_float(a_lo.w[w])), tc::to_tf32(word_float(a_hi.w[w])),
                             tc::to_tf32(word_float(a_lo.w[w + 1])), tc::to_tf32(word_float(a_hi.w[w + 1]))};
      const uint32_t bb[2] = {tc::to_tf32(word_float(b.w[w])), tc::to_tf32(word_float(b.w[w + 1]))};
      tc::mma_m16n8k8_tf32(acc, a, bb, acc);
    } else {
      // m16n8k16: a0 (g, k 0-1), a1 (g+8, k 0-1), a2 (g, k 8-9), a3 (g+8, k 8-9); b0 (k 0-1, g), b1 (k 8-9, g).
      const uint32_t a[4] = {a_lo.w[w], a_hi.w[w], a_lo.w[w + 1], a_hi.w[w + 1]};
      const uint32_t bb[2] = {b.w[w], b.w[w + 1]};
      if constexpr (kProduct == BackwardProduct::kBFloat16) {
        tc::mma_m16n8k16_bf16(acc, a, bb, acc);
      } else {
        tc::mma_m16n8k16_f16(acc, a, bb, acc);
      }
    }
  }
}

// 16 bytes of row `row` of dG (K columns) from column k: one vector load where the row allows it,
// element by element at the end of K, zeros past K or past the rows that take part.
template <typename scalar_t>
__device__ __forceinline__ Words16 load_a_words(const scalar_t* d_rows, int row, int rows, int k, int K,
                                                bool vector_rows) {
  constexpr int kPer = 16 / int(sizeof(scalar_t));
  Words16 out{{0u, 0u, 0u, 0u}};
  if (row >= rows) return out;
  const scalar_t* p = d_rows + int64_t(row) * K + k;
  if (vector_rows && k + kPer <= K) return load_uncached_16(p);
  scalar_t values[kPer];
#pragma unroll
  for (int e = 0; e < kPer; ++e) values[e] = k + e < K ? load_uncached(p + e) : scalar_t(0.0f);
  memcpy(&out, values, sizeof(out));
  return out;
}

template <typename scalar_t, typename acc_t, BackwardProduct kProduct>
__global__ void __launch_bounds__(kPersistentBackwardThreads)
    lstm_persistent_backward_kernel(const PersistentLstmBackwardArgs<scalar_t, acc_t> a) {
  LSTM_FUSED_DYNAMIC_SHARED(shared_raw);
  const int U = a.units_per_block, H = a.H, B = a.B, K = 4 * H, N = a.n_cols, stride = a.row_stride;
  // [N][stride] W slice: row u holds W_hh's column u0 + u over its 4H rows (zero past the units and K).
  scalar_t* w_s = reinterpret_cast<scalar_t*>(shared_raw);
  // [k_split][m_rows][N] partial sums of the product.
  acc_t* part = reinterpret_cast<acc_t*>(w_s + int64_t(N) * stride);

  const int u0 = blockIdx.x * U;
  const int units = max(0, min(U, H - u0));
  // n fastest: the global reads of a W_hh row are consecutive (once per launch).
  for (int64_t idx = threadIdx.x; idx < int64_t(N) * stride; idx += blockDim.x) {
    const int j = static_cast<int>(idx / N), n = static_cast<int>(idx % N);
    w_s[int64_t(n) * stride + j] = n < units && j < K ? a.w_hh[int64_t(j) * H + u0 + n] : scalar_t(0.0f);
  }
  __syncthreads();

  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = kPersistentBackwardThreads / 32;
  const bool vector_rows = K * int(sizeof(scalar_t)) % 16 == 0 && reinterpret_cast<uintptr_t>(a.d_gates) % 16 == 0;
  const auto rows_at = [&](int t) { return a.active_rows == nullptr ? B : static_cast<int>(a.active_rows[t]); };

  // Index i runs the pointwise work of step t_i (i < T) after the product of step t_{i-1} (i > 0),
  // which gives the gradient reaching h_{t_i}: the product of the last step (i == T) gives h0's.
  for (int i = 0; i <= a.T; ++i) {
    const int t = i == a.T ? -1 : (a.reverse ? i : a.T - 1 - i);
    const int t_prev = i == 0 ? -1 : (a.reverse ? i - 1 : a.T - i);
    const int rows = t < 0 ? 0 : rows_at(t);
    const int rows_prev = t_prev < 0 ? 0 : rows_at(t_prev);

    // 1. This thread's pointwise inputs: issued before the product, which they do not need.
    acc_t in[kBackwardPairsPerThread][7];  // i, f, g, o, c_t, c_{t-1}, grad_y
#pragma unroll
    for (int p = 0; p < kBackwardPairsPerThread; ++p) {
      const int pair = threadIdx.x + p * kPersistentBackwardThreads;
      if (pair >= rows * units) continue;
      const int b = pair / units, unit = u0 + pair % units;
      const scalar_t* g_row = a.gates + (int64_t(t) * B + b) * K;
#pragma unroll
      for (int gate = 0; gate < 4; ++gate) in[p][gate] = static_cast<acc_t>(g_row[gate * H + unit]);
      in[p][4] = static_cast<acc_t>(a.cells[(int64_t(t) * B + b) * H + unit]);
      const int64_t prev = previous_step(t, a.lengths == nullptr ? a.T : a.lengths[b], a.reverse);
      in[p][5] = static_cast<acc_t>(prev < 0 ? a.c0[int64_t(b) * H + unit] : a.cells[(prev * B + b) * H + unit]);
      in[p][6] = static_cast<acc_t>(a.grad_y[(int64_t(t) * B + b) * H + unit]);
    }

    // 2. part = dG_{t_prev} x W slice, over the rows that took part in step t_prev.
    if (rows_prev > 0) {
      const scalar_t* d_rows = a.d_gates + int64_t(t_prev) * B * K;
      if constexpr (kProduct == BackwardProduct::kFma) {
        for (int pair = warp; pair < rows_prev * units; pair += warps) {
          const int b = pair / units, u = pair % units;
          const scalar_t* d_row = d_rows + int64_t(b) * K;
          const scalar_t* w_row = w_s + int64_t(u) * stride;
          acc_t acc = acc_t(0);
          for (int k = lane; k < K; k += 32) acc += static_cast<acc_t>(load_uncached(d_row + k)) * static_cast<acc_t>(w_row[k]);
#pragma unroll
          for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_down_sync(0xffffffffu, acc, offset);
          if (lane == 0) part[b * N + u] = acc;
        }
      } else {
        constexpr int kChunk = 64 / int(sizeof(scalar_t));  // columns per chunk
        const int g = lane >> 2, tq = lane & 3;
        const int jobs = a.n_tiles * a.k_split, m_tiles = a.m_rows / 16;
        for (int job = warp; job < jobs; job += warps) {
          const int nt = job % a.n_tiles, ks = job / a.n_tiles;
          const int c_begin = ks * a.chunks / a.k_split, c_end = (ks + 1) * a.chunks / a.k_split;
          const scalar_t* w_row = w_s + int64_t(nt * 8 + g) * stride + tq * (kChunk / 4);
          for (int mt = 0; mt < m_tiles; ++mt) {
            float acc0[4] = {0.0f, 0.0f, 0.0f, 0.0f}, acc1[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int c = c_begin; c < c_end; ++c) {
              const int k = c * kChunk + tq * (kChunk / 4);
              const Words16 a_lo = load_a_words(d_rows, mt * 16 + g, rows_prev, k, K, vector_rows);
              const Words16 a_hi = load_a_words(d_rows, mt * 16 + g + 8, rows_prev, k, K, vector_rows);
              const Words16 b = *reinterpret_cast<const Words16*>(w_row + c * kChunk);
              mma_chunk<kProduct>(acc0, acc1, a_lo, a_hi, b);
            }
            // c_i is at row g + 8 * (i >> 1), column 2 tq + (i & 1) of the 16 x 8 tile.
            acc_t* slab = part + (int64_t(ks) * a.m_rows + mt * 16) * N + nt * 8;
#pragma unroll
            for (int e = 0; e < 4; ++e) slab[(g + 8 * (e >> 1)) * N + 2 * tq + (e & 1)] = acc0[e] + acc1[e];
          }
        }
      }
      __syncthreads();
    }

    // 3. The pointwise backward of this thread's pairs at step t.
    const int busy = max(rows, rows_prev) * units;
#pragma unroll
    for (int p = 0; p < kBackwardPairsPerThread; ++p) {
      const int pair = threadIdx.x + p * kPersistentBackwardThreads;
      if (pair >= busy) continue;
      const int b = pair / units, u = pair % units, unit = u0 + u;
      const int64_t k = int64_t(b) * H + unit;
      acc_t dh = a.dh_state[k];
      if (b < rows_prev) {
        dh = acc_t(0);
        for (int ks = 0; ks < a.k_split; ++ks) dh += part[(ks * a.m_rows + b) * N + u];
        a.dh_state[k] = dh;
      }
      if (b < rows) {
        acc_t gi = in[p][0], gf = in[p][1], gg = in[p][2], go = in[p][3], dc = a.dc_state[k];
        lstm_cell_backward<acc_t>(gi, gf, gg, go, in[p][5], in[p][4], dh + in[p][6], dc);
        scalar_t* dg_row = a.d_gates + (int64_t(t) * B + b) * K;
        dg_row[unit] = static_cast<scalar_t>(gi);
        dg_row[H + unit] = static_cast<scalar_t>(gf);
        dg_row[2 * H + unit] = static_cast<scalar_t>(gg);
        dg_row[3 * H + unit] = static_cast<scalar_t>(go);
        a.dc_state[k] = dc;
      }
    }
    if (i < a.T) grid.sync();  // every dG_t is written before any block's product reads it
  }

  // h0's gradient: what reached it, for every row (a row's last product may have been any step's).
#pragma unroll
  for (int p = 0; p < kBackwardPairsPerThread; ++p) {
    const int pair = threadIdx.x + p * kPersistentBackwardThreads;
    if (pair >= B * units) continue;
    const int64_t k = int64_t(pair / units) * H + u0 + pair % units;
    a.grad_h0[k] = static_cast<scalar_t>(a.dh_state[k]);
  }
}

}  // namespace lstm_fused
