// Device code of the LSTM layer's per-step path (host side: lstm_cuda.cu). Free of ATen, so
// that nvcc and the SIMT emulator compile the same source.
#pragma once

#include <cstdint>

#include "../cell_math.h"
#include "device_compat.cuh"
#include "lstm_unit.cuh"
#include "recurrent_step.cuh"

namespace lstm_fused {

// One forward step over `rows` rows. Thread (row, unit) accumulates the four gate products of
// its hidden unit, adds them to the input projection already in `gates`, and updates its cell.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kStepThreads)
    lstm_forward_step_kernel(const scalar_t* __restrict__ h_prev,  // [rows, P]
                             const scalar_t* __restrict__ w_hh,    // [4H, P]
                             scalar_t* __restrict__ gates,         // [rows, 4H]
                             const scalar_t* __restrict__ bias,    // [4H] or null
                             acc_t* __restrict__ c_state,          // [rows, H]
                             scalar_t* __restrict__ cells,         // [rows, H]
                             scalar_t* __restrict__ h_out,         // [rows, H]
                             scalar_t* __restrict__ h_next,        // [rows, H] or null
                             int rows, int H, int P) {
  acc_t acc[4];
  block_recurrent_product<4>(h_prev, w_hh, rows, H, P, acc);
  const int row = blockIdx.y * kRowsPerBlock + threadIdx.x / kUnitsPerBlock;
  const int unit = blockIdx.x * kUnitsPerBlock + threadIdx.x % kUnitsPerBlock;
  if (row >= rows || unit >= H) return;
  const int64_t k = (int64_t)row * H + unit;
  lstm_finish_unit(acc, gates + (int64_t)row * 4 * H, bias, unit, H, c_state + k, cells + k, h_out + k,
                   h_next == nullptr ? nullptr : h_next + k);
}

// One forward step's pointwise work where cuBLAS has added h_{t-1} W_hh^T to the input projection
// in `gates` (the large-step path, recurrent_step.cuh): one thread per (row, unit).
template <typename scalar_t, typename acc_t>
__global__ void lstm_forward_pointwise_kernel(scalar_t* __restrict__ gates,        // [rows, 4H] both products in
                                              const scalar_t* __restrict__ bias,  // [4H] or null
                                              acc_t* __restrict__ c_state,        // [rows, H]
                                              scalar_t* __restrict__ cells,       // [rows, H]
                                              scalar_t* __restrict__ h_out,       // [rows, H]
                                              scalar_t* __restrict__ h_next,      // [rows, H] or null
                                              int rows, int H) {
  const int64_t index = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (index >= (int64_t)rows * H) return;
  const int row = static_cast<int>(index / H), unit = static_cast<int>(index % H);
  acc_t none[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
  lstm_finish_unit(none, gates + (int64_t)row * 4 * H, bias, unit, H, c_state + index, cells + index, h_out + index,
                   h_next == nullptr ? nullptr : h_next + index);
}

// One backward step's pointwise work over `rows` rows of time step t: one thread per (row, unit).
// lengths is null when every row has all T steps (no copy of lengths to the device then).
template <typename scalar_t, typename acc_t>
__global__ void lstm_backward_pointwise_kernel(const scalar_t* __restrict__ gates,       // [rows, 4H]
                                               scalar_t* __restrict__ d_gates,           // [rows, 4H]
                                               const scalar_t* __restrict__ cells,       // [T, B, H]
                                               const scalar_t* __restrict__ c0,          // [B, H]
                                               const scalar_t* __restrict__ d_cell_out,  // [rows, H]
                                               const scalar_t* __restrict__ grad_y,      // [rows, H] or null
                                               acc_t* __restrict__ dc_state,             // [rows, H]
                                               const int64_t* __restrict__ lengths,      // [B] or null
                                               int64_t t, int64_t T, int rows, int B, int H, bool reverse) {
  const int64_t index = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (index >= (int64_t)rows * H) return;
  const int row = static_cast<int>(index / H), unit = static_cast<int>(index % H);
  const scalar_t* g = gates + (int64_t)row * 4 * H;
  const int64_t prev = previous_step(t, lengths == nullptr ? T : lengths[row], reverse);
  const scalar_t c_prev = prev < 0 ? c0[index] : cells[(prev * B + row) * H + unit];
  acc_t i = static_cast<acc_t>(g[unit]), f = static_cast<acc_t>(g[H + unit]);
  acc_t gg = static_cast<acc_t>(g[2 * H + unit]), o = static_cast<acc_t>(g[3 * H + unit]);
  acc_t dc = dc_state[index];
  acc_t dh = static_cast<acc_t>(d_cell_out[index]);
  if (grad_y != nullptr) dh += static_cast<acc_t>(grad_y[index]);
  lstm_cell_backward<acc_t>(i, f, gg, o, static_cast<acc_t>(c_prev),
                            static_cast<acc_t>(cells[(t * B + row) * H + unit]), dh, dc);
  scalar_t* dg = d_gates + (int64_t)row * 4 * H;
  dg[unit] = static_cast<scalar_t>(i);
  dg[H + unit] = static_cast<scalar_t>(f);
  dg[2 * H + unit] = static_cast<scalar_t>(gg);
  dg[3 * H + unit] = static_cast<scalar_t>(o);
  dc_state[index] = dc;
}

}  // namespace lstm_fused
