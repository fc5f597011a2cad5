// Device code of the GRU layer's per-step path (host side: gru_cuda.cu). Free of ATen, so that
// nvcc and the SIMT emulator compile the same source.
#pragma once

#include <cstdint>

#include "../cell_math.h"
#include "device_compat.cuh"
#include "recurrent_step.cuh"

namespace lstm_fused {

// The end of a GRU step for one (row, hidden unit), shared by the per-step kernels: the hidden
// projections `hidden` (h_{t-1} W_hh^T of the unit's r, z, n) plus b_hh, the input projections
// in gates_row plus b_ih, the cell (cell_math.h), and the activated gates, the hidden n
// projection (the reserve), the output and the next h written.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void gru_finish_unit(acc_t (&hidden)[3], scalar_t* __restrict__ gates_row,
                                                const scalar_t* __restrict__ b_ih, const scalar_t* __restrict__ b_hh,
                                                int unit, int H, scalar_t h_prev, scalar_t* __restrict__ hidden_n_proj,
                                                scalar_t* __restrict__ h_out, scalar_t* __restrict__ h_next) {
  acc_t input[3];
#pragma unroll
  for (int gate = 0; gate < 3; ++gate) {
    input[gate] = static_cast<acc_t>(gates_row[gate * H + unit]);
    if (b_hh != nullptr) {
      hidden[gate] += static_cast<acc_t>(b_hh[gate * H + unit]);
      input[gate] += static_cast<acc_t>(b_ih[gate * H + unit]);
    }
  }
  acc_t h;
  gru_cell_forward<acc_t>(input[0], input[1], input[2], hidden[0], hidden[1], hidden[2], static_cast<acc_t>(h_prev),
                          h);
#pragma unroll
  for (int gate = 0; gate < 3; ++gate) gates_row[gate * H + unit] = static_cast<scalar_t>(input[gate]);
  *hidden_n_proj = static_cast<scalar_t>(hidden[2]);
  *h_out = static_cast<scalar_t>(h);
  *h_next = static_cast<scalar_t>(h);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kStepThreads)
    gru_forward_step_kernel(const scalar_t* __restrict__ h_prev,  // [rows, H]
                            const scalar_t* __restrict__ w_hh,    // [3H, H]
                            const scalar_t* __restrict__ b_ih,    // [3H] or null
                            const scalar_t* __restrict__ b_hh,    // [3H] or null (with b_ih)
                            scalar_t* __restrict__ gates,         // [rows, 3H]
                            scalar_t* __restrict__ hidden_n_proj, // [rows, H]
                            scalar_t* __restrict__ h_out,         // [rows, H]
                            scalar_t* __restrict__ h_next,        // [rows, H]
                            int rows, int H) {
  acc_t acc[3];
  block_recurrent_product<3>(h_prev, w_hh, rows, H, H, acc);
  const int row = blockIdx.y * kRowsPerBlock + threadIdx.x / kUnitsPerBlock;
  const int unit = blockIdx.x * kUnitsPerBlock + threadIdx.x % kUnitsPerBlock;
  if (row >= rows || unit >= H) return;
  const int64_t k = (int64_t)row * H + unit;
  gru_finish_unit(acc, gates + (int64_t)row * 3 * H, b_ih, b_hh, unit, H, h_prev[k], hidden_n_proj + k, h_out + k,
                  h_next + k);
}

// One forward step's pointwise work where cuBLAS has computed h_{t-1} W_hh^T into hidden_proj
// (the large-step path, recurrent_step.cuh): one thread per (row, unit).
template <typename scalar_t, typename acc_t>
__global__ void gru_forward_pointwise_kernel(const scalar_t* __restrict__ h_prev,       // [rows, H]
                                             const scalar_t* __restrict__ hidden_proj,  // [rows, 3H]
                                             const scalar_t* __restrict__ b_ih,         // [3H] or null
                                             const scalar_t* __restrict__ b_hh,         // [3H] or null (with b_ih)
                                             scalar_t* __restrict__ gates,              // [rows, 3H]
                                             scalar_t* __restrict__ hidden_n_proj,      // [rows, H]
                                             scalar_t* __restrict__ h_out,              // [rows, H]
                                             scalar_t* __restrict__ h_next,             // [rows, H]
                                             int rows, int H) {
  const int64_t index = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (index >= (int64_t)rows * H) return;
  const int row = static_cast<int>(index / H), unit = static_cast<int>(index % H);
  const scalar_t* hp = hidden_proj + (int64_t)row * 3 * H;
  acc_t hidden[3];
#pragma unroll
  for (int gate = 0; gate < 3; ++gate) hidden[gate] = static_cast<acc_t>(hp[gate * H + unit]);
  gru_finish_unit(hidden, gates + (int64_t)row * 3 * H, b_ih, b_hh, unit, H, h_prev[index], hidden_n_proj + index,
                  h_out + index, h_next + index);
}

// One thread per (row, unit): see GruBackwardStep for the tensors.
template <typename scalar_t, typename acc_t>
__global__ void gru_backward_pointwise_kernel(const scalar_t* __restrict__ gates,          // [rows, 3H]
                                              const scalar_t* __restrict__ hidden_n_proj,  // [rows, H]
                                              const scalar_t* __restrict__ h_prev,         // [rows, H]
                                              const scalar_t* __restrict__ grad_y,         // [rows, H]
                                              scalar_t* __restrict__ dh,                   // [rows, H]
                                              scalar_t* __restrict__ d_input_gates,        // [rows, 3H]
                                              scalar_t* __restrict__ d_hidden_gates,       // [rows, 3H]
                                              int rows, int H) {
  const int64_t index = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (index >= (int64_t)rows * H) return;
  const int64_t row = index / H, unit = index % H;
  const scalar_t* g = gates + row * 3 * H;
  acc_t r = static_cast<acc_t>(g[unit]), z = static_cast<acc_t>(g[H + unit]);
  acc_t n = static_cast<acc_t>(g[2 * H + unit]);
  acc_t d_hn, dh_prev;
  gru_cell_backward<acc_t>(r, z, n, static_cast<acc_t>(hidden_n_proj[index]), static_cast<acc_t>(h_prev[index]),
                           static_cast<acc_t>(dh[index]) + static_cast<acc_t>(grad_y[index]), d_hn, dh_prev);
  scalar_t* di = d_input_gates + row * 3 * H;
  scalar_t* dhid = d_hidden_gates + row * 3 * H;
  di[unit] = dhid[unit] = static_cast<scalar_t>(r);
  di[H + unit] = dhid[H + unit] = static_cast<scalar_t>(z);
  di[2 * H + unit] = static_cast<scalar_t>(n);
  dhid[2 * H + unit] = static_cast<scalar_t>(d_hn);
  dh[index] = static_cast<scalar_t>(dh_prev);
}

}  // namespace lstm_fused
