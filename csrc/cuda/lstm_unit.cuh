// The end of an LSTM step for one (row, hidden unit), shared by the per-step and the persistent
// kernels: add the input projection and the biases to the four recurrent sums, run the cell
// (cell_math.h), and write the activated gates, the cell state and the output.
#pragma once

#include <cstdint>

#include "../cell_math.h"

namespace lstm_fused {

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void lstm_finish_unit(acc_t (&acc)[4], scalar_t* __restrict__ gates_row,
                                                 const scalar_t* __restrict__ bias, int unit, int H,
                                                 acc_t* __restrict__ c_state, scalar_t* __restrict__ cells,
                                                 scalar_t* __restrict__ h_out, scalar_t* __restrict__ h_next) {
  if (bias != nullptr) {
#pragma unroll
    for (int gate = 0; gate < 4; ++gate) acc[gate] += static_cast<acc_t>(bias[gate * H + unit]);
  }
  acc_t i = acc[0] + static_cast<acc_t>(gates_row[unit]);
  acc_t f = acc[1] + static_cast<acc_t>(gates_row[H + unit]);
  acc_t g = acc[2] + static_cast<acc_t>(gates_row[2 * H + unit]);
  acc_t o = acc[3] + static_cast<acc_t>(gates_row[3 * H + unit]);
  acc_t c, h;
  lstm_cell_forward<acc_t>(i, f, g, o, *c_state, c, h);
  gates_row[unit] = static_cast<scalar_t>(i);
  gates_row[H + unit] = static_cast<scalar_t>(f);
  gates_row[2 * H + unit] = static_cast<scalar_t>(g);
  gates_row[3 * H + unit] = static_cast<scalar_t>(o);
  *c_state = c;
  *cells = static_cast<scalar_t>(c);
  *h_out = static_cast<scalar_t>(h);
  if (h_next != nullptr) *h_next = static_cast<scalar_t>(h);
}

}  // namespace lstm_fused
