// The skeleton of the product-generic persistent kernels (the LSTM FMA forward and the LSTM
// backward, host side lstm_persistent.cu; the GRU forward and backward, host side gru_cuda.cu).
// One cooperative launch runs a whole time loop; the grid meets at one barrier per step.
//
// Block j owns hidden units [j*U, j*U + U) (persistent_plan.h, plan_persistent_product_layer).
// Every step has the same shape: a product A W^T, where A ([rows, K], in global memory) was
// written by every block before the last grid barrier and W's rows for the block's N columns
// stay in shared memory for the whole loop, then the cell's pointwise work for the block's (row,
// unit) pairs, which needs nothing from other blocks. A Policy says what A, W, K and N are and
// does the pointwise work:
//   LSTM forward:  A = h_{t-1}  [B, H],  W = W_hh's rows of the units' 4 gates (N = 4U, K = H);
//   LSTM backward: A = dG_{t+1} [B, 4H], W = W_hh's columns of the units (N = U, K = 4H);
//   GRU forward:   A = h_{t-1}  [B, H],  W = W_hh's rows of the units' 3 gates (N = 3U, K = H);
//   GRU backward:  A = dG^h_{t+1} [B, 3H], W = W_hh's columns (N = U, K = 3H).
// Per step:
//   1. the policy loads each pair's pointwise inputs (they do not depend on the product, so the
//      loads are issued before it);
//   2. the product, into partial sums in shared memory: FP32/FP64 FMAs (4 x 4 register tiles per
//      warp, lanes over K, a shuffle reduction) or mma.sync (M = batch rows, N columns, K split
//      over the warps). Tensor-core operands: each lane loads 16 bytes of a row of A (from L2) and 16 bytes
//      of a row of W (shared memory): four lanes cover a 64-byte chunk of K, the K of two mma.sync
//      (m16n8k16 for bf16 / fp16, m16n8k8 for TF32). Within a chunk the K order is permuted (lane
//      t holds columns [t*C/4, t*C/4 + C/4) of A and W alike), which leaves the sum unchanged and
//      makes every operand one vector load, and no ldmatrix. When N spans one n tile, every block
//      reads each element of A once per step, straight from L2 into registers; with several n
//      tiles the plan stages A in shared memory first (cp.async.cg), once per step, so that the
//      n tiles' jobs share it;
//   3. the policy finishes each pair from the column sums;
//   4. grid.sync().
// Free of ATen, so that nvcc and the SIMT emulator compile the same source.
#pragma once

#include <cstdint>

#include "../persistent_plan.h"
#include "device_compat.cuh"
#include "mma.cuh"

namespace lstm_fused {

// How a persistent kernel computes its product: FMAs, or one of the tensor-core formats.
enum class PersistentProduct : int { kFma = 0, kBFloat16 = 1, kHalf = 2, kTF32 = 3 };

// The plan's partitioning of the product, as the kernels take it.
struct ProductShape {
  int units_per_block, m_rows, n_cols, n_tiles, chunks, k_split, row_stride;  // plan_persistent_product_layer
  bool stage_a;
};

inline ProductShape product_shape(const PersistentProductPlan& plan) {
  return {static_cast<int>(plan.units_per_block), static_cast<int>(plan.m_rows), static_cast<int>(plan.n_cols),
          static_cast<int>(plan.n_tiles),         static_cast<int>(plan.chunks), static_cast<int>(plan.k_split),
          static_cast<int>(plan.row_stride),      plan.stage_a};
}

// The FMA product's register tile (rows x columns per warp); persistent_plan.h stages A for FMAs
// when N spans more than one such tile.
constexpr int kFmaTile = static_cast<int>(kPersistentFmaTile);

// The plan keeps B * U <= kPersistentMaxPairsPerBlock: each thread finishes at most this many pairs.
constexpr int kProductPairsPerThread = static_cast<int>(kPersistentMaxPairsPerBlock / kPersistentProductThreads);

// Two mma.sync over one 64-byte chunk of K: a_lo / a_hi are this lane's 16 bytes of A rows g and
// g + 8, b its 16 bytes of W row (n) g. Words w0, w1 feed the first mma, w2, w3 the second.
template <PersistentProduct kProduct>
__device__ __forceinline__ void mma_chunk(float (&acc0)[4], float (&acc1)[4], const Words16& a_lo,
                                          const Words16& a_hi, const Words16& b) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float(&acc)[4] = half == 0 ? acc0 : acc1;
    const int w = 2 * half;
    if constexpr (kProduct == PersistentProduct::kTF32) {
      // m16n8k8: a0 (g, k), a1 (g+8, k), a2 (g, k+4), a3 (g+8, k+4); b0 (k, g), b1 (k+4, g).
      const uint32_t a[4] = {tc::to_tf32(word_float(a_lo.w[w])), tc::to_tf32(word_float(a_hi.w[w])),
                             tc::to_tf32(word_float(a_lo.w[w + 1])), tc::to_tf32(word_float(a_hi.w[w + 1]))};
      const uint32_t bb[2] = {tc::to_tf32(word_float(b.w[w])), tc::to_tf32(word_float(b.w[w + 1]))};
      tc::mma_m16n8k8_tf32(acc, a, bb, acc);
    } else {
      // m16n8k16: a0 (g, k 0-1), a1 (g+8, k 0-1), a2 (g, k 8-9), a3 (g+8, k 8-9); b0 (k 0-1, g), b1 (k 8-9, g).
      const uint32_t a[4] = {a_lo.w[w], a_hi.w[w], a_lo.w[w + 1], a_hi.w[w + 1]};
      const uint32_t bb[2] = {b.w[w], b.w[w + 1]};
      if constexpr (kProduct == PersistentProduct::kBFloat16) {
        tc::mma_m16n8k16_bf16(acc, a, bb, acc);
      } else {
        tc::mma_m16n8k16_f16(acc, a, bb, acc);
      }
    }
  }
}

// 16 bytes of row `row` of A (K columns) from column k: one vector load where the rows allow it,
// element by element at the end of K, zeros past K or past the rows that take part.
template <typename scalar_t>
__device__ __forceinline__ Words16 load_a_words(const scalar_t* a_rows, int row, int rows, int k, int K,
                                                bool vector_rows) {
  constexpr int kPer = 16 / int(sizeof(scalar_t));
  Words16 out{{0u, 0u, 0u, 0u}};
  if (row >= rows) return out;
  const scalar_t* p = a_rows + int64_t(row) * K + k;
  if (vector_rows && k + kPer <= K) return load_uncached_16(p);
  scalar_t values[kPer];
#pragma unroll
  for (int e = 0; e < kPer; ++e) values[e] = k + e < K ? load_uncached(p + e) : scalar_t(0.0f);
  memcpy(&out, values, sizeof(out));
  return out;
}

// Copies A's first `rows` rows (K columns, through L2) into a_s ([m_rows][row_stride], whose
// columns past K stay zero from the kernel's start): 16-byte cp.async.cg where the rows allow it.
template <typename scalar_t>
__device__ __forceinline__ void stage_rows(scalar_t* a_s, const scalar_t* a_rows, int rows, int K, int stride) {
  if (K * int(sizeof(scalar_t)) % 16 == 0 && reinterpret_cast<uintptr_t>(a_rows) % 16 == 0) {
    const int chunks = K * int(sizeof(scalar_t)) / 16, per_chunk = 16 / int(sizeof(scalar_t));
    for (int idx = threadIdx.x; idx < rows * chunks; idx += blockDim.x) {
      const int b = idx / chunks, k = (idx % chunks) * per_chunk;
      tc::cp_async_16(a_s + b * stride + k, a_rows + int64_t(b) * K + k);
    }
    tc::cp_async_commit();
    tc::cp_async_wait<0>();
  } else {
    for (int idx = threadIdx.x; idx < rows * K; idx += blockDim.x) {
      const int b = idx / K, k = idx % K;
      a_s[b * stride + k] = load_uncached(a_rows + int64_t(b) * K + k);
    }
  }
  __syncthreads();
}

// part[ks][b][n] (k_split slabs of [m_rows][N]) = the sum over slab ks's K range of
// A[b, k] W_s[n, k], for b < rows (A's other rows count as zero). All threads of the block call it.
// a_s: where the plan stages A (shape.stage_a), else null.
template <typename scalar_t, typename acc_t, PersistentProduct kProduct>
__device__ __forceinline__ void persistent_product(acc_t* part, const scalar_t* a_rows, int rows, int K,
                                                   const scalar_t* w_s, scalar_t* a_s, const ProductShape& shape) {
  const int N = shape.n_cols, stride = shape.row_stride;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = kPersistentProductThreads / 32;
  if (a_s != nullptr) stage_rows(a_s, a_rows, rows, K, stride);
  if constexpr (kProduct == PersistentProduct::kFma) {
    // Register tiles of kFmaTile x kFmaTile (rows x columns) per warp, lanes over K (consecutive
    // lanes, consecutive k: conflict-free shared reads, coalesced global ones): each k costs 8
    // loads for 16 FMAs. A from shared memory where the plan staged it (several column tiles),
    // else from L2.
    // Jobs: (tile, K range); the plan splits K where the tiles alone leave warps idle.
    const int row_tiles = (rows + kFmaTile - 1) / kFmaTile, col_tiles = (N + kFmaTile - 1) / kFmaTile;
    const int tiles = row_tiles * col_tiles;
    for (int job = warp; job < tiles * shape.k_split; job += warps) {
      const int tile = job % tiles, ks = job / tiles;
      const int r0 = (tile / col_tiles) * kFmaTile, c0 = (tile % col_tiles) * kFmaTile;
      const int k_begin = ks * K / shape.k_split, k_end = (ks + 1) * K / shape.k_split;
      acc_t acc[kFmaTile][kFmaTile];
#pragma unroll
      for (int r = 0; r < kFmaTile; ++r) {
#pragma unroll
        for (int c = 0; c < kFmaTile; ++c) acc[r][c] = acc_t(0);
      }
      for (int k = k_begin + lane; k < k_end; k += 32) {
        acc_t av[kFmaTile], wv[kFmaTile];
#pragma unroll
        for (int r = 0; r < kFmaTile; ++r) {
          const int b = r0 + r;
          const scalar_t value = b >= rows          ? scalar_t(0.0f)
                                 : a_s != nullptr ? a_s[int64_t(b) * stride + k]
                                                  : load_uncached(a_rows + int64_t(b) * K + k);
          av[r] = static_cast<acc_t>(value);
        }
#pragma unroll
        for (int c = 0; c < kFmaTile; ++c) {
          wv[c] = c0 + c < N ? static_cast<acc_t>(w_s[int64_t(c0 + c) * stride + k]) : acc_t(0);
        }
#pragma unroll
        for (int r = 0; r < kFmaTile; ++r) {
#pragma unroll
          for (int c = 0; c < kFmaTile; ++c) acc[r][c] += av[r] * wv[c];
        }
      }
#pragma unroll
      for (int r = 0; r < kFmaTile; ++r) {
#pragma unroll
        for (int c = 0; c < kFmaTile; ++c) {
#pragma unroll
          for (int offset = 16; offset > 0; offset /= 2) {
            acc[r][c] += __shfl_down_sync(0xffffffffu, acc[r][c], offset);
          }
        }
      }
      if (lane == 0) {
#pragma unroll
        for (int r = 0; r < kFmaTile; ++r) {
#pragma unroll
          for (int c = 0; c < kFmaTile; ++c) {
            if (r0 + r < rows && c0 + c < N) {
              part[(int64_t(ks) * shape.m_rows + r0 + r) * N + c0 + c] = acc[r][c];
            }
          }
        }
      }
    }
  } else {
    constexpr int kChunk = 64 / int(sizeof(scalar_t));  // columns per chunk
    const bool vector_rows = K * int(sizeof(scalar_t)) % 16 == 0 && reinterpret_cast<uintptr_t>(a_rows) % 16 == 0;
    const int g = lane >> 2, tq = lane & 3;
    const int jobs = shape.n_tiles * shape.k_split, m_tiles = shape.m_rows / 16;
    for (int job = warp; job < jobs; job += warps) {
      const int nt = job % shape.n_tiles, ks = job / shape.n_tiles;
      const int c_begin = ks * shape.chunks / shape.k_split, c_end = (ks + 1) * shape.chunks / shape.k_split;
      const scalar_t* w_row = w_s + int64_t(nt * 8 + g) * stride + tq * (kChunk / 4);
      for (int mt = 0; mt < m_tiles; ++mt) {
        if (mt * 16 >= rows) break;  // warp-uniform: no row of this tile takes part
        float acc0[4] = {0.0f, 0.0f, 0.0f, 0.0f}, acc1[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int c = c_begin; c < c_end; ++c) {
          const int k = c * kChunk + tq * (kChunk / 4);
          Words16 a_lo, a_hi;
          if (a_s != nullptr) {  // staged rows past `rows` hold older data: zeros instead
            const Words16 zero{{0u, 0u, 0u, 0u}};
            const int r = mt * 16 + g;
            a_lo = r < rows ? *reinterpret_cast<const Words16*>(a_s + r * stride + k) : zero;
            a_hi = r + 8 < rows ? *reinterpret_cast<const Words16*>(a_s + (r + 8) * stride + k) : zero;
          } else {
            a_lo = load_a_words(a_rows, mt * 16 + g, rows, k, K, vector_rows);
            a_hi = load_a_words(a_rows, mt * 16 + g + 8, rows, k, K, vector_rows);
          }
          const Words16 b = *reinterpret_cast<const Words16*>(w_row + c * kChunk);
          mma_chunk<kProduct>(acc0, acc1, a_lo, a_hi, b);
        }
        // c_i is at row g + 8 * (i >> 1), column 2 tq + (i & 1) of the 16 x 8 tile.
        acc_t* slab = part + (int64_t(ks) * shape.m_rows + mt * 16) * N + nt * 8;
#pragma unroll
        for (int e = 0; e < 4; ++e) slab[(g + 8 * (e >> 1)) * N + 2 * tq + (e & 1)] = acc0[e] + acc1[e];
      }
    }
  }
}

// The column sums of the product for the pointwise work: sum over the K slabs.
template <typename acc_t>
struct ProductSums {
  const acc_t* part;
  int m_rows, n_cols, k_split;
  __device__ __forceinline__ acc_t operator()(int b, int n) const {
    acc_t sum = acc_t(0);
    for (int ks = 0; ks < k_split; ++ks) sum += part[(ks * m_rows + b) * n_cols + n];
    return sum;
  }
};

// What a policy's step() says of loop index i.
template <typename scalar_t>
struct ProductStep {
  int t;                  // the time step whose pointwise work runs at i (-1: none)
  int rows;               // rows of its pointwise work
  int product_rows;       // rows of A in this index's product (0: no product)
  const scalar_t* a;      // A, [product_rows, K] rows of K
};

// Helpers the policies share.
__device__ __forceinline__ int persistent_rows_at(const int64_t* active_rows, int B, int t) {
  return active_rows == nullptr ? B : static_cast<int>(active_rows[t]);
}

// A forward loop: index i runs step t_i (backwards in time for a reverse direction), whose
// product reads h_{t-1} from the ping-pong buffer of i's parity (both hold h0 at the start).
template <typename scalar_t>
__device__ __forceinline__ ProductStep<scalar_t> forward_loop_step(const int64_t* active_rows, int T, int B,
                                                                   bool reverse, const scalar_t* h_even,
                                                                   const scalar_t* h_odd, int i) {
  ProductStep<scalar_t> st;
  st.t = reverse ? T - 1 - i : i;
  st.rows = persistent_rows_at(active_rows, B, st.t);
  st.product_rows = st.rows;
  st.a = i % 2 == 0 ? h_even : h_odd;
  return st;
}

// A backward loop: index i runs the product of step t_{i-1} (its gradient reaches h_{t_i}), whose
// A is a_prev, then the pointwise work of step t_i (processing order: backwards in time for a
// forward direction); index T runs the last product alone (the gradient of h0).
template <typename scalar_t>
__device__ __forceinline__ ProductStep<scalar_t> backward_loop_step(const int64_t* active_rows, int T, int B,
                                                                    bool reverse, int i, const scalar_t* a_prev) {
  const auto time_of = [&](int index) { return reverse ? index : T - 1 - index; };
  ProductStep<scalar_t> st;
  st.t = i < T ? time_of(i) : -1;
  st.rows = st.t < 0 ? 0 : persistent_rows_at(active_rows, B, st.t);
  st.product_rows = i == 0 ? 0 : persistent_rows_at(active_rows, B, time_of(i - 1));
  st.a = i == 0 ? nullptr : a_prev;
  return st;
}

// W slice row n = gate * U + u of a forward product: W_hh row gate * H + u0 + u (zero past the units).
template <typename scalar_t>
__device__ __forceinline__ scalar_t gate_rows_weight(const scalar_t* w_hh, int gates, int H, int U, int n, int k,
                                                     int u0, int units) {
  const int gate = n / U, u = n % U;
  return gate < gates && u < units ? w_hh[int64_t(gate * H + u0 + u) * H + k] : scalar_t(0.0f);
}

// W slice row n of a backward product: W_hh's column u0 + n at row k (zero past the units).
template <typename scalar_t>
__device__ __forceinline__ scalar_t column_weight(const scalar_t* w_hh, int H, int n, int k, int u0, int units) {
  return n < units ? w_hh[int64_t(k) * H + u0 + n] : scalar_t(0.0f);
}

// A backward pair's gradient reaching h_t: what it carried (dh_state) plus, if the row took part
// in the product's step, its column sum.
template <typename acc_t, typename scalar_t, typename Sums>
__device__ __forceinline__ acc_t received_gradient(const acc_t* dh_state, int64_t k, const ProductStep<scalar_t>& st,
                                                   int b, int u, const Sums& sums) {
  acc_t dh = dh_state[k];
  if (b < st.product_rows) dh += sums(b, u);
  return dh;
}

// The body of a kernel (each policy's __global__ kernel calls it, under its own name).
// Policy (see the LSTM backward and GRU policies): Args (the kernel argument, with `shape`, B
// and H), k_size(args) -> K, iterations(args), weight(args, n, k, u0, units) -> W_s[n][k] for
// k < K, step(args, i) -> ProductStep, Inputs and load(args, step, b, unit, inputs), finish(args,
// step, i, b, u, unit, inputs, sums), end(args, b, unit) once per pair after the loop.
template <typename Policy, typename scalar_t, typename acc_t, PersistentProduct kProduct>
__device__ __forceinline__ void persistent_recurrent_body(const typename Policy::Args& a) {
  LSTM_FUSED_DYNAMIC_SHARED(shared_raw);
  const ProductShape& shape = a.shape;
  const int U = shape.units_per_block, N = shape.n_cols, stride = shape.row_stride, K = Policy::k_size(a);
  // [N][stride] W slice (zero past the units and K), [k_split][m_rows][N] partial sums, and where
  // the plan says so [m_rows][stride] staged A (zero past K).
  // Each region starts 16-byte aligned (persistent_plan.h's layout).
  scalar_t* w_s = reinterpret_cast<scalar_t*>(shared_raw);
  const int64_t part_offset = persistent_weight_bytes(N, stride, sizeof(scalar_t));
  acc_t* part = reinterpret_cast<acc_t*>(shared_raw + part_offset);
  scalar_t* a_s = shape.stage_a ? reinterpret_cast<scalar_t*>(
                                      shared_raw + part_offset +
                                      persistent_partial_bytes(shape.k_split, shape.m_rows, N, sizeof(acc_t)))
                                : nullptr;
  if (a_s != nullptr) {
    for (int64_t idx = threadIdx.x; idx < int64_t(shape.m_rows) * stride; idx += blockDim.x) a_s[idx] = scalar_t(0.0f);
  }
  const int u0 = blockIdx.x * U;
  const int units = max(0, min(U, a.H - u0));
  // Once per launch. k slowest, n fastest: coalesced global reads for the backward kernels'
  // column slices (the forward's row slices read strided, once).
  for (int64_t idx = threadIdx.x; idx < int64_t(N) * stride; idx += blockDim.x) {
    const int k = static_cast<int>(idx / N), n = static_cast<int>(idx % N);
    w_s[int64_t(n) * stride + k] = k < K ? Policy::weight(a, n, k, u0, units) : scalar_t(0.0f);
  }
  __syncthreads();

  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  const ProductSums<acc_t> sums{part, shape.m_rows, N, shape.k_split};
  const int iterations = Policy::iterations(a);
  for (int i = 0; i < iterations; ++i) {
    const ProductStep<scalar_t> st = Policy::step(a, i);
    // 1. This thread's pointwise inputs: issued before the product, which they do not need.
    typename Policy::Inputs in[kProductPairsPerThread];
#pragma unroll
    for (int p = 0; p < kProductPairsPerThread; ++p) {
      const int pair = threadIdx.x + p * kPersistentProductThreads;
      if (pair < st.rows * units) Policy::load(a, st, pair / units, u0 + pair % units, in[p]);
    }
    // 2. The product.
    if (st.product_rows > 0) {
      persistent_product<scalar_t, acc_t, kProduct>(part, st.a, st.product_rows, K, w_s, a_s, shape);
      __syncthreads();
    }
    // 3. The pointwise work of this thread's pairs.
    const int busy = max(st.rows, st.product_rows) * units;
#pragma unroll
    for (int p = 0; p < kProductPairsPerThread; ++p) {
      const int pair = threadIdx.x + p * kPersistentProductThreads;
      if (pair < busy) Policy::finish(a, st, i, pair / units, pair % units, u0 + pair % units, in[p], sums);
    }
    if (i + 1 < iterations) grid.sync();  // what this step published is written before any block reads it
  }
#pragma unroll
  for (int p = 0; p < kProductPairsPerThread; ++p) {
    const int pair = threadIdx.x + p * kPersistentProductThreads;
    if (pair < a.B * units) Policy::end(a, pair / units, u0 + pair % units);
  }
}

}  // namespace lstm_fused
