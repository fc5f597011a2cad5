// Device code of the persistent LSTM forward kernel (host side: lstm_persistent.cu), first
// version: one cooperative launch runs the whole sequence. Each block owns a slice of hidden
// units across the four gates and keeps those rows of W_hh in shared memory for every step; per
// step, each warp computes one (row, unit) pair at a time (lanes split the recurrent dimension,
// a shuffle reduction joins them), finishes the cell (lstm_unit.cuh), writes h_t to a ping-pong
// buffer in global memory, and the grid meets at one barrier. No tensor cores yet: FP32 FMAs
// (FP64 for float64). Free of ATen, so that nvcc and the SIMT emulator compile the same source.
#pragma once

#include <cstdint>

#include "../persistent_plan.h"
#include "device_compat.cuh"
#include "lstm_unit.cuh"

namespace lstm_fused {

template <typename scalar_t, typename acc_t>
struct PersistentLstmArgs {
  const scalar_t* w_hh;        // [4H, H]
  const scalar_t* bias;        // [4H] b_ih + b_hh, or null
  scalar_t* gates;             // [T, B, 4H] input projection in, activated gates out
  acc_t* c_state;              // [B, H]
  scalar_t* cells;             // [T, B, H]
  scalar_t* y;                 // [T, B, H]
  scalar_t* h_even;            // [B, H] ping-pong pair, both h0 at the start (init_hidden_buffers):
  scalar_t* h_odd;             //        even steps read h_even and write h_odd, odd steps the reverse
  const int64_t* active_rows;  // [T] rows that advance at each t (a prefix of the batch); null: all B
  int T, B, H, units_per_block;
  bool reverse;
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kPersistentThreads)
    lstm_persistent_forward_kernel(const PersistentLstmArgs<scalar_t, acc_t> a) {
  LSTM_FUSED_DYNAMIC_SHARED(shared_raw);
  // Row (gate * U + u) holds W_hh row (gate * H + u0 + u): lanes read consecutive k, no conflicts.
  scalar_t* w_slice = reinterpret_cast<scalar_t*>(shared_raw);
  const int U = a.units_per_block, H = a.H, B = a.B;
  const int u0 = blockIdx.x * U;
  const int units = max(0, min(U, H - u0));
  for (int64_t idx = threadIdx.x; idx < int64_t(4) * U * H; idx += blockDim.x) {
    const int row = static_cast<int>(idx / H), k = static_cast<int>(idx % H);
    const int gate = row / U, u = row % U;
    w_slice[idx] = u < units ? a.w_hh[int64_t(gate * H + u0 + u) * H + k] : scalar_t(0);
  }
  __syncthreads();

  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int step = 0; step < a.T; ++step) {
    const int t = a.reverse ? a.T - 1 - step : step;
    const int rows = a.active_rows == nullptr ? B : static_cast<int>(a.active_rows[t]);
    // Named members, not an array indexed at run time: that would move the parameters to the stack.
    const scalar_t* h_prev = step % 2 == 0 ? a.h_even : a.h_odd;
    scalar_t* h_next = step % 2 == 0 ? a.h_odd : a.h_even;
    for (int pair = warp; pair < rows * units; pair += warps) {
      const int b = pair / units, u = pair % units;
      acc_t acc[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
      const scalar_t* h_row = h_prev + int64_t(b) * H;
      for (int k = lane; k < H; k += 32) {
        const acc_t h = static_cast<acc_t>(load_uncached(h_row + k));
#pragma unroll
        for (int gate = 0; gate < 4; ++gate) acc[gate] += h * static_cast<acc_t>(w_slice[(gate * U + u) * H + k]);
      }
#pragma unroll
      for (int gate = 0; gate < 4; ++gate) {
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) acc[gate] += __shfl_down_sync(0xffffffffu, acc[gate], offset);
      }
      if (lane == 0) {
        const int unit = u0 + u;
        const int64_t k = int64_t(b) * H + unit;
        const int64_t tk = int64_t(t) * B * H + k;
        lstm_finish_unit(acc, a.gates + (int64_t(t) * B + b) * 4 * H, a.bias, unit, H, a.c_state + k, a.cells + tk,
                         a.y + tk, h_next + k);
      }
    }
    grid.sync();  // every h_t is written before any block reads it as h_{t-1}
  }
}

}  // namespace lstm_fused
