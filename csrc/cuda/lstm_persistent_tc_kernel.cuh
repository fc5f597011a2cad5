// Device code of the tensor-core persistent LSTM forward kernel (host side: lstm_persistent.cu).
// One cooperative launch runs the whole sequence; the grid meets at one barrier per step.
//
// Block j owns hidden units [j*U, j*U + U) across the four gates: N = 4U columns of the step's
// product G = h_{t-1} W_hh^T (M = batch rows, K = H), whose W_hh rows stay in shared memory for
// every step. Per step:
//   1. the step's input projection and biases for the block's units are loaded (they do not
//      depend on h_{t-1}, so this overlaps the wait for it);
//   2. h_{t-1} (written by every block last step) is staged into shared memory once, through L2;
//   3. the 8 warps split the (n tile, K range) jobs and run mma.sync over the m tiles of the batch:
//      bf16 / fp16 m16n8k16, or TF32 m16n8k8 for float32, with float32 accumulation; A fragments
//      (h) and B fragments (W) come from shared memory by ldmatrix (16-bit types) or by lane
//      loads (TF32); each warp writes its partial sums to shared memory;
//   4. every thread finishes its (row, unit) pairs: sums the K-range partials and the input
//      projection, runs the cell (cell_math.h) and publishes h_t;
//   5. grid.sync().
// Free of ATen, so that nvcc and the SIMT emulator compile the same source.
#pragma once

#include <cstdint>

#include "../persistent_plan.h"
#include "device_compat.cuh"
#include "lstm_persistent_kernel.cuh"
#include "../cell_math.h"
#include "mma.cuh"

namespace lstm_fused {

enum class TensorCoreFormat : int { kBFloat16 = 0, kHalf = 1, kTF32 = 2 };

// The FMA kernel's arguments (lstm_persistent_kernel.cuh, float32 running state) and the plan.
template <typename scalar_t>
struct PersistentLstmTcArgs : PersistentLstmArgs<scalar_t, float> {
  int m_tiles, n_tiles, k_tiles, k_split, row_stride;  // persistent_plan.h, plan_persistent_tc_layer
};

// D += A (16x16 of h, rows g / g+8) x B (16x8 of W^T) for one 16-wide K slice at column k0.
template <TensorCoreFormat kFormat, typename scalar_t>
__device__ __forceinline__ void mma_k16(float (&acc)[4], const scalar_t* h_tile, const scalar_t* w_tile,
                                        int row_stride, int k0, int lane) {
  if constexpr (kFormat == TensorCoreFormat::kTF32) {
    // m16n8k8 twice. A: a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4); B: b0 (k=t, n=g), b1 (k=t+4, n=g).
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int k = k0 + 8 * half + t;
      const uint32_t a[4] = {tc::to_tf32(h_tile[g * row_stride + k]), tc::to_tf32(h_tile[(g + 8) * row_stride + k]),
                             tc::to_tf32(h_tile[g * row_stride + k + 4]),
                             tc::to_tf32(h_tile[(g + 8) * row_stride + k + 4])};
      const uint32_t b[2] = {tc::to_tf32(w_tile[g * row_stride + k]), tc::to_tf32(w_tile[g * row_stride + k + 4])};
      tc::mma_m16n8k8_tf32(acc, a, b, acc);
    }
  } else {
    // A by one ldmatrix.x4: lanes 8j..8j+7 address matrix j, in the order (rows 0-7, k 0-7),
    // (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15), which is a0..a7's order.
    // B by ldmatrix.x2 of W's rows (n) over k 0-7 and k 8-15: row n = g, elements k = 2t, 2t+1.
    const int r = lane & 7, j = lane >> 3;
    uint32_t a[4], b[2];
    tc::ldmatrix_x4(a, h_tile + (r + 8 * (j & 1)) * row_stride + k0 + 8 * (j >> 1));
    tc::ldmatrix_x2(b, w_tile + r * row_stride + k0 + 8 * (j & 1));
    if constexpr (kFormat == TensorCoreFormat::kBFloat16) {
      tc::mma_m16n8k16_bf16(acc, a, b, acc);
    } else {
      tc::mma_m16n8k16_f16(acc, a, b, acc);
    }
  }
}

// The plan keeps B * U <= kPersistentMaxPairsPerBlock, so each thread finishes at most this many pairs.
constexpr int kPairsPerThread = static_cast<int>(kPersistentMaxPairsPerBlock / kPersistentTcThreads);

template <typename scalar_t, TensorCoreFormat kFormat>
__global__ void __launch_bounds__(kPersistentTcThreads)
    lstm_persistent_tc_forward_kernel(const PersistentLstmTcArgs<scalar_t> a) {
  LSTM_FUSED_DYNAMIC_SHARED(shared_raw);
  const int U = a.units_per_block, H = a.H, B = a.B, N = 4 * U, stride = a.row_stride;
  const int m_rows = 16 * a.m_tiles;
  // [N][stride] W_hh slice: row gate * U + u holds W_hh row gate * H + u0 + u (zero past H or the units).
  scalar_t* w_s = reinterpret_cast<scalar_t*>(shared_raw);
  // [m_rows][stride] h_{t-1}; rows past B and columns past H stay zero.
  scalar_t* h_s = w_s + N * stride;
  // [k_split][m_rows][N] partial sums of the product, one slab per K range.
  float* part = reinterpret_cast<float*>(h_s + m_rows * stride);

  const int u0 = blockIdx.x * U;
  const int units = max(0, min(U, H - u0));
  for (int idx = threadIdx.x; idx < N * stride; idx += blockDim.x) {
    const int n = idx / stride, k = idx % stride, gate = n / U, u = n % U;
    w_s[idx] = u < units && k < H ? a.w_hh[int64_t(gate * H + u0 + u) * H + k] : scalar_t(0.0f);
  }
  for (int idx = threadIdx.x; idx < m_rows * stride; idx += blockDim.x) h_s[idx] = scalar_t(0.0f);
  __syncthreads();

  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int jobs = a.n_tiles * a.k_split;
  for (int step = 0; step < a.T; ++step) {
    const int t = a.reverse ? a.T - 1 - step : step;
    const int rows = a.active_rows == nullptr ? B : static_cast<int>(a.active_rows[t]);
    const scalar_t* h_prev = step % 2 == 0 ? a.h_even : a.h_odd;
    scalar_t* h_next = step % 2 == 0 ? a.h_odd : a.h_even;

    // 1. The input projection and bias of this thread's (row, unit) pairs do not depend on h:
    // their loads are issued first and land while the block waits for h_{t-1}.
    float pre[kPairsPerThread][4];
#pragma unroll
    for (int i = 0; i < kPairsPerThread; ++i) {
      const int pair = threadIdx.x + i * kPersistentTcThreads;
      if (pair < rows * units) {
        const int b = pair / units, unit = u0 + pair % units;
        const scalar_t* g_row = a.gates + (int64_t(t) * B + b) * 4 * H;
#pragma unroll
        for (int gate = 0; gate < 4; ++gate) {
          pre[i][gate] = static_cast<float>(g_row[gate * H + unit]) +
                         (a.bias != nullptr ? static_cast<float>(a.bias[gate * H + unit]) : 0.0f);
        }
      }
    }

    // 2. Stage the rows that advance (other rows' sums are computed but never used). Other SMs
    // wrote h_{t-1}: it is read through L2 (L1 is not coherent across SMs), by 16-byte cp.async.cg
    // where the rows allow it.
    stage_rows(h_s, h_prev, rows, H, stride);

    // 3. The product on tensor cores: job = (n tile, K range); each warp keeps its B operand
    // columns for all m tiles.
    for (int job = warp; job < jobs; job += kPersistentTcThreads / 32) {
      const int nt = job % a.n_tiles, ks = job / a.n_tiles;
      const int kt_begin = ks * a.k_tiles / a.k_split, kt_end = (ks + 1) * a.k_tiles / a.k_split;
      for (int mt = 0; mt < a.m_tiles; ++mt) {
        // Two accumulators taking alternate K slices halve the chain of dependent mma.sync.
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f}, acc_odd[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        const scalar_t* h_tile = h_s + mt * 16 * stride;
        const scalar_t* w_tile = w_s + nt * 8 * stride;
        int kt = kt_begin;
        for (; kt + 1 < kt_end; kt += 2) {
          mma_k16<kFormat>(acc, h_tile, w_tile, stride, kt * 16, lane);
          mma_k16<kFormat>(acc_odd, h_tile, w_tile, stride, kt * 16 + 16, lane);
        }
        if (kt < kt_end) mma_k16<kFormat>(acc, h_tile, w_tile, stride, kt * 16, lane);
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[i] += acc_odd[i];
        // c_i is at row g + 8 * (i >> 1), column 2t + (i & 1) of the 16 x 8 tile.
        float* slab = part + (ks * m_rows + mt * 16) * N + nt * 8;
        const int g = lane >> 2, tq = lane & 3;
#pragma unroll
        for (int i = 0; i < 4; ++i) slab[(g + 8 * (i >> 1)) * N + 2 * tq + (i & 1)] = acc[i];
      }
    }
    __syncthreads();

    // 4. The cell, spread over every thread of the block.
#pragma unroll
    for (int i = 0; i < kPairsPerThread; ++i) {
      const int pair = threadIdx.x + i * kPersistentTcThreads;
      if (pair >= rows * units) continue;
      const int b = pair / units, u = pair % units, unit = u0 + u;
      float pre_gate[4];
#pragma unroll
      for (int gate = 0; gate < 4; ++gate) {
        float sum = pre[i][gate];
        for (int ks = 0; ks < a.k_split; ++ks) sum += part[(ks * m_rows + b) * N + gate * U + u];
        pre_gate[gate] = sum;
      }
      float c;
      float h;
      lstm_cell_forward<float>(pre_gate[0], pre_gate[1], pre_gate[2], pre_gate[3], a.c_state[int64_t(b) * H + unit],
                               c, h);
      scalar_t* g_row = a.gates + (int64_t(t) * B + b) * 4 * H;
#pragma unroll
      for (int gate = 0; gate < 4; ++gate) g_row[gate * H + unit] = static_cast<scalar_t>(pre_gate[gate]);
      const int64_t k = int64_t(b) * H + unit;
      const int64_t tk = int64_t(t) * B * H + k;
      a.c_state[k] = c;
      a.cells[tk] = static_cast<scalar_t>(c);
      a.y[tk] = static_cast<scalar_t>(h);
      h_next[k] = static_cast<scalar_t>(h);
    }
    grid.sync();  // every h_t is written before any block stages it as h_{t-1}
  }
}

}  // namespace lstm_fused
