// Device code of the persistent LSTM forward kernels (host side: lstm_persistent.cu): the
// arguments both take (PersistentLstmArgs, which the tensor-core kernel extends), and the FMA
// forward, a policy of the product-generic skeleton. Free of ATen, so that nvcc and the SIMT
// emulator compile the same source.
#pragma once

#include <cstdint>

#include "../persistent_plan.h"
#include "device_compat.cuh"
#include "lstm_unit.cuh"
#include "persistent_recurrent.cuh"

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

// The FMA persistent forward: the product-generic skeleton (persistent_recurrent.cuh) with this
// policy. Block j owns hidden units [j*U, j*U + U) across the four gates: N = 4U columns of
// h_{t-1} W_hh^T (K = H), whose W_hh rows stay in shared memory; per step the input projection
// and biases of each pair are loaded first, the product runs on register-tiled FMAs (h_{t-1}
// staged in shared memory once per step when N spans several tiles), each pair's cell
// (cell_math.h) writes the gates, c, y and h_t (ping-pong), and the grid meets at one barrier.
// (The tensor-core forward, lstm_persistent_tc_kernel.cuh, is its own kernel: ldmatrix operands.)
template <typename scalar_t, typename acc_t>
struct LstmForwardPolicy {
  // The arguments both forward kernels take (units_per_block unused: the shape has it).
  struct Args : PersistentLstmArgs<scalar_t, acc_t> {
    ProductShape shape;
  };
  struct Inputs {
    acc_t v[4];  // the input projection plus the bias, per gate
  };

  __device__ static int k_size(const Args& a) { return a.H; }
  __device__ static int iterations(const Args& a) { return a.T; }
  __device__ static scalar_t weight(const Args& a, int n, int k, int u0, int units) {
    return gate_rows_weight(a.w_hh, 4, a.H, a.shape.units_per_block, n, k, u0, units);
  }
  __device__ static ProductStep<scalar_t> step(const Args& a, int i) {
    return forward_loop_step<scalar_t>(a.active_rows, a.T, a.B, a.reverse, a.h_even, a.h_odd, i);
  }
  __device__ static void load(const Args& a, const ProductStep<scalar_t>& st, int b, int unit, Inputs& in) {
    const scalar_t* g_row = a.gates + (int64_t(st.t) * a.B + b) * 4 * a.H;
#pragma unroll
    for (int gate = 0; gate < 4; ++gate) {
      in.v[gate] = static_cast<acc_t>(g_row[gate * a.H + unit]) +
                   (a.bias != nullptr ? static_cast<acc_t>(a.bias[gate * a.H + unit]) : acc_t(0));
    }
  }
  template <typename Sums>
  __device__ static void finish(const Args& a, const ProductStep<scalar_t>& st, int i, int b, int u, int unit,
                                const Inputs& in, const Sums& sums) {
    if (b >= st.rows) return;
    const int H = a.H, U = a.shape.units_per_block;
    acc_t pre[4];
#pragma unroll
    for (int gate = 0; gate < 4; ++gate) pre[gate] = sums(b, gate * U + u) + in.v[gate];
    const int64_t k = int64_t(b) * H + unit, tk = int64_t(st.t) * a.B * H + k;
    acc_t c, h;
    lstm_cell_forward<acc_t>(pre[0], pre[1], pre[2], pre[3], a.c_state[k], c, h);
    scalar_t* g_row = a.gates + (int64_t(st.t) * a.B + b) * 4 * H;
#pragma unroll
    for (int gate = 0; gate < 4; ++gate) g_row[gate * H + unit] = static_cast<scalar_t>(pre[gate]);
    a.c_state[k] = c;
    a.cells[tk] = static_cast<scalar_t>(c);
    a.y[tk] = static_cast<scalar_t>(h);
    (i % 2 == 0 ? a.h_odd : a.h_even)[k] = static_cast<scalar_t>(h);
  }
  __device__ static void end(const Args&, int, int) {}
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kPersistentProductThreads)
    lstm_persistent_forward_kernel(const typename LstmForwardPolicy<scalar_t, acc_t>::Args a) {
  persistent_recurrent_body<LstmForwardPolicy<scalar_t, acc_t>, scalar_t, acc_t, PersistentProduct::kFma>(a);
}

}  // namespace lstm_fused
