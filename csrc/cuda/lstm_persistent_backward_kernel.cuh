// The persistent LSTM backward kernel (host side: lstm_persistent.cu): the product-generic
// skeleton (persistent_recurrent.cuh) with this policy. One launch runs the whole backward time
// loop of a layer and direction; the weight, bias and input gradients are large GEMMs after it
// (layer_loops.h), from the gate gradients of every step that it writes.
//
// Block j owns hidden units [j*U, j*U + U). The gradient reaching h_{t-1} is dG_t W_hh (K = 4H):
// the block's columns of it need W_hh's columns of its units (N = U) and every row's dG_t, which
// all blocks wrote before the last grid barrier. Loop index i runs the product of step t_{i-1}
// (processing order: backwards in time for a forward direction), which gives the gradient
// reaching h_{t_i}, then the pointwise backward of step t_i: grad_y added, the cell's backward
// (cell_math.h) gives dG_t for the unit's four gates and carries dc. Index T runs the last
// product alone: the gradient of h0.
// Free of ATen, so that nvcc and the SIMT emulator compile the same source.
#pragma once

#include <cstdint>

#include "../cell_math.h"
#include "persistent_recurrent.cuh"

namespace lstm_fused {

template <typename scalar_t, typename acc_t>
struct LstmBackwardPolicy {
  struct Args {
    const scalar_t* w_hh;        // [4H, H]
    const scalar_t* gates;       // [T, B, 4H] the forward's activated gates (reserve)
    const scalar_t* cells;       // [T, B, H] every step's cell state (reserve)
    const scalar_t* c0;          // [B, H]
    const scalar_t* grad_y;      // [T, B, H]
    scalar_t* d_gates;           // [T, B, 4H] receives every step's pre-activation gradients
    acc_t* dh_state;             // [B, H] grad_h_n in; what reached h and has not yet gone through a step
    acc_t* dc_state;             // [B, H] grad_c_n in; the gradient of c0 out
    scalar_t* grad_h0;           // [B, H] receives the gradient of h0
    const int64_t* active_rows;  // [T] rows that take part in step t (a prefix); null: all B
    const int64_t* lengths;      // [B] each row's length; null: every row has T steps
    int T, B, H;
    bool reverse;
    ProductShape shape;
  };
  struct Inputs {
    acc_t v[7];  // i, f, g, o, c_t, c_{t-1}, grad_y
  };

  __device__ static int k_size(const Args& a) { return 4 * a.H; }
  __device__ static int iterations(const Args& a) { return a.T + 1; }
  __device__ static scalar_t weight(const Args& a, int n, int k, int u0, int units) {
    return column_weight(a.w_hh, a.H, n, k, u0, units);
  }
  __device__ static ProductStep<scalar_t> step(const Args& a, int i) {
    const int t_prev = i == 0 ? 0 : (a.reverse ? i - 1 : a.T - i);
    return backward_loop_step(a.active_rows, a.T, a.B, a.reverse, i, a.d_gates + int64_t(t_prev) * a.B * 4 * a.H);
  }
  __device__ static void load(const Args& a, const ProductStep<scalar_t>& st, int b, int unit, Inputs& in) {
    const int H = a.H;
    const scalar_t* g_row = a.gates + (int64_t(st.t) * a.B + b) * 4 * H;
#pragma unroll
    for (int gate = 0; gate < 4; ++gate) in.v[gate] = static_cast<acc_t>(g_row[gate * H + unit]);
    in.v[4] = static_cast<acc_t>(a.cells[(int64_t(st.t) * a.B + b) * H + unit]);
    const int64_t prev = previous_step(st.t, a.lengths == nullptr ? a.T : a.lengths[b], a.reverse);
    in.v[5] = static_cast<acc_t>(prev < 0 ? a.c0[int64_t(b) * H + unit] : a.cells[(prev * a.B + b) * H + unit]);
    in.v[6] = static_cast<acc_t>(a.grad_y[(int64_t(st.t) * a.B + b) * H + unit]);
  }
  template <typename Sums>
  __device__ static void finish(const Args& a, const ProductStep<scalar_t>& st, int, int b, int u, int unit,
                                const Inputs& in, const Sums& sums) {
    const int H = a.H;
    const int64_t k = int64_t(b) * H + unit;
    acc_t dh = received_gradient(a.dh_state, k, st, b, u, sums);
    if (b < st.rows) {
      acc_t gi = in.v[0], gf = in.v[1], gg = in.v[2], go = in.v[3], dc = a.dc_state[k];
      lstm_cell_backward<acc_t>(gi, gf, gg, go, in.v[5], in.v[4], dh + in.v[6], dc);
      scalar_t* dg_row = a.d_gates + (int64_t(st.t) * a.B + b) * 4 * H;
      dg_row[unit] = static_cast<scalar_t>(gi);
      dg_row[H + unit] = static_cast<scalar_t>(gf);
      dg_row[2 * H + unit] = static_cast<scalar_t>(gg);
      dg_row[3 * H + unit] = static_cast<scalar_t>(go);
      a.dc_state[k] = dc;
      dh = acc_t(0);  // the step used it: the rest reaches h_{t-1} through dG_t W_hh only
    }
    a.dh_state[k] = dh;
  }
  // h0's gradient: what reached it, for every row (a row's last product may have been any step's).
  __device__ static void end(const Args& a, int b, int unit) {
    const int64_t k = int64_t(b) * a.H + unit;
    a.grad_h0[k] = static_cast<scalar_t>(a.dh_state[k]);
  }
};

template <typename scalar_t, typename acc_t>
using PersistentLstmBackwardArgs = typename LstmBackwardPolicy<scalar_t, acc_t>::Args;

template <typename scalar_t, typename acc_t, PersistentProduct kProduct>
__global__ void __launch_bounds__(kPersistentProductThreads)
    lstm_persistent_backward_kernel(const PersistentLstmBackwardArgs<scalar_t, acc_t> a) {
  persistent_recurrent_body<LstmBackwardPolicy<scalar_t, acc_t>, scalar_t, acc_t, kProduct>(a);
}

}  // namespace lstm_fused
