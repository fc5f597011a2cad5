// The persistent GRU kernels, forward and backward (host side: gru_cuda.cu): the product-generic
// skeleton (persistent_recurrent.cuh) with these two policies. One launch runs a whole time loop
// of a layer and direction.
//
// Forward. Block j owns hidden units [j*U, j*U + U) across the three gates: N = 3U columns of
// h_{t-1} W_hh^T (K = H), whose W_hh rows stay in shared memory. Per step: the input projection
// (one GEMM before the loop), both biases and h_{t-1} of the unit are loaded; the product runs;
// each pair's cell (cell_math.h) keeps the hidden n projection apart (r scales it), writes the
// activated gates and that projection (the reserve), y and h_t to a ping-pong buffer; grid.sync.
//
// Backward. The gradient reaching h_{t-1} is z * dh (pointwise) plus dG^h_t W_hh, where dG^h =
// (d_r, d_z, r * d_n) are the gradients of h W_hh^T + b_hh (K = 3H, N = U: W_hh's columns of
// the units). Each step writes its dG^h to one of two [B, 3H] buffers, which the next step's
// product reads from every block (the other buffer takes the step after, while slower blocks may
// still read this one: a barrier separates the write of a buffer from its next write), and the
// input-side gradients (d_r, d_z, d_n) to [T, B, 3H] for the GEMMs after the loop.
// Free of ATen, so that nvcc and the SIMT emulator compile the same source.
#pragma once

#include <cstdint>

#include "../cell_math.h"
#include "persistent_recurrent.cuh"

namespace lstm_fused {

template <typename scalar_t, typename acc_t>
struct GruForwardPolicy {
  struct Args {
    const scalar_t* w_hh;        // [3H, H]
    const scalar_t* b_ih;        // [3H] or null
    const scalar_t* b_hh;        // [3H] or null (null exactly when b_ih is)
    scalar_t* gates;             // [T, B, 3H] input projection in, activated r, z, n out
    scalar_t* hidden_n_proj;     // [T, B, H] receives h_{t-1} W_hn^T + b_hn
    scalar_t* y;                 // [T, B, H]
    scalar_t* h_even;            // [B, H] ping-pong pair, both h0 at the start: even steps read
    scalar_t* h_odd;             //        h_even and write h_odd, odd steps the reverse
    const int64_t* active_rows;  // [T] or null: all B
    int T, B, H;
    bool reverse;
    ProductShape shape;
  };
  struct Inputs {
    acc_t v[7];  // r, z, n input sides (with b_ih), b_hr, b_hz, b_hn, h_{t-1}
  };

  __device__ static int k_size(const Args& a) { return a.H; }
  __device__ static int iterations(const Args& a) { return a.T; }
  __device__ static scalar_t weight(const Args& a, int n, int k, int u0, int units) {
    return gate_rows_weight(a.w_hh, 3, a.H, a.shape.units_per_block, n, k, u0, units);
  }
  __device__ static ProductStep<scalar_t> step(const Args& a, int i) {
    return forward_loop_step<scalar_t>(a.active_rows, a.T, a.B, a.reverse, a.h_even, a.h_odd, i);
  }
  __device__ static void load(const Args& a, const ProductStep<scalar_t>& st, int b, int unit, Inputs& in) {
    const int H = a.H;
    const scalar_t* g_row = a.gates + (int64_t(st.t) * a.B + b) * 3 * H;
#pragma unroll
    for (int gate = 0; gate < 3; ++gate) {
      const bool bias = a.b_ih != nullptr;
      in.v[gate] = static_cast<acc_t>(g_row[gate * H + unit]) + (bias ? static_cast<acc_t>(a.b_ih[gate * H + unit]) : acc_t(0));
      in.v[3 + gate] = bias ? static_cast<acc_t>(a.b_hh[gate * H + unit]) : acc_t(0);
    }
    // This thread wrote it last step (or it is h0): no other block's write to wait for.
    in.v[6] = static_cast<acc_t>(st.a[int64_t(b) * H + unit]);
  }
  template <typename Sums>
  __device__ static void finish(const Args& a, const ProductStep<scalar_t>& st, int i, int b, int u, int unit,
                                const Inputs& in, const Sums& sums) {
    if (b >= st.rows) return;
    const int H = a.H, U = a.shape.units_per_block;
    acc_t r = in.v[0], z = in.v[1], n = in.v[2], h;
    const acc_t hn = sums(b, 2 * U + u) + in.v[5];
    gru_cell_forward<acc_t>(r, z, n, sums(b, u) + in.v[3], sums(b, U + u) + in.v[4], hn, in.v[6], h);
    scalar_t* g_row = a.gates + (int64_t(st.t) * a.B + b) * 3 * H;
    g_row[unit] = static_cast<scalar_t>(r);
    g_row[H + unit] = static_cast<scalar_t>(z);
    g_row[2 * H + unit] = static_cast<scalar_t>(n);
    const int64_t k = int64_t(b) * H + unit, tk = int64_t(st.t) * a.B * H + k;
    a.hidden_n_proj[tk] = static_cast<scalar_t>(hn);
    a.y[tk] = static_cast<scalar_t>(h);
    (i % 2 == 0 ? a.h_odd : a.h_even)[k] = static_cast<scalar_t>(h);
  }
  __device__ static void end(const Args&, int, int) {}
};

template <typename scalar_t, typename acc_t>
struct GruBackwardPolicy {
  struct Args {
    const scalar_t* w_hh;           // [3H, H]
    const scalar_t* gates;          // [T, B, 3H] the forward's activated r, z, n (reserve)
    const scalar_t* hidden_n_proj;  // [T, B, H] (reserve)
    const scalar_t* y;              // [T, B, H] the forward's output: h_{t-1} of later steps
    const scalar_t* h0;             // [B, H]
    const scalar_t* grad_y;         // [T, B, H]
    scalar_t* d_input_gates;        // [T, B, 3H] receives the gradients of x W_ih^T + b_ih
    scalar_t* d_hidden_even;        // [B, 3H] the gradients of h W_hh^T + b_hh of even loop indices,
    scalar_t* d_hidden_odd;         // [B, 3H] and of odd ones
    acc_t* dh_state;                // [B, H] grad_h_n in; what reached h and has not yet gone through a step
    scalar_t* grad_h0;              // [B, H] receives the gradient of h0
    const int64_t* active_rows;     // [T] or null: all B
    const int64_t* lengths;         // [B] or null: every row has T steps
    int T, B, H;
    bool reverse;
    ProductShape shape;
  };
  struct Inputs {
    acc_t v[6];  // r, z, n, hn, h_{t-1}, grad_y
  };

  __device__ static int k_size(const Args& a) { return 3 * a.H; }
  __device__ static int iterations(const Args& a) { return a.T + 1; }
  __device__ static scalar_t weight(const Args& a, int n, int k, int u0, int units) {
    return column_weight(a.w_hh, a.H, n, k, u0, units);
  }
  __device__ static scalar_t* d_hidden(const Args& a, int i) { return i % 2 == 0 ? a.d_hidden_even : a.d_hidden_odd; }
  __device__ static ProductStep<scalar_t> step(const Args& a, int i) {
    return backward_loop_step<scalar_t>(a.active_rows, a.T, a.B, a.reverse, i, i == 0 ? nullptr : d_hidden(a, i - 1));
  }
  __device__ static void load(const Args& a, const ProductStep<scalar_t>& st, int b, int unit, Inputs& in) {
    const int H = a.H;
    const int64_t tk = (int64_t(st.t) * a.B + b) * H + unit;
    const scalar_t* g_row = a.gates + (int64_t(st.t) * a.B + b) * 3 * H;
#pragma unroll
    for (int gate = 0; gate < 3; ++gate) in.v[gate] = static_cast<acc_t>(g_row[gate * H + unit]);
    in.v[3] = static_cast<acc_t>(a.hidden_n_proj[tk]);
    const int64_t prev = previous_step(st.t, a.lengths == nullptr ? a.T : a.lengths[b], a.reverse);
    in.v[4] = static_cast<acc_t>(prev < 0 ? a.h0[int64_t(b) * H + unit] : a.y[(prev * a.B + b) * H + unit]);
    in.v[5] = static_cast<acc_t>(a.grad_y[tk]);
  }
  template <typename Sums>
  __device__ static void finish(const Args& a, const ProductStep<scalar_t>& st, int i, int b, int u, int unit,
                                const Inputs& in, const Sums& sums) {
    const int H = a.H;
    const int64_t k = int64_t(b) * H + unit;
    acc_t dh = received_gradient(a.dh_state, k, st, b, u, sums);
    if (b < st.rows) {
      acc_t r = in.v[0], z = in.v[1], n = in.v[2], d_hn, dh_direct;
      gru_cell_backward<acc_t>(r, z, n, in.v[3], in.v[4], dh + in.v[5], d_hn, dh_direct);
      scalar_t* di = a.d_input_gates + (int64_t(st.t) * a.B + b) * 3 * H;
      scalar_t* dg = d_hidden(a, i) + int64_t(b) * 3 * H;
      di[unit] = dg[unit] = static_cast<scalar_t>(r);
      di[H + unit] = dg[H + unit] = static_cast<scalar_t>(z);
      di[2 * H + unit] = static_cast<scalar_t>(n);
      dg[2 * H + unit] = static_cast<scalar_t>(d_hn);
      dh = dh_direct;  // z * dh; the rest reaches h_{t-1} through dG^h_t W_hh, in the next product
    }
    a.dh_state[k] = dh;
  }
  __device__ static void end(const Args& a, int b, int unit) {
    const int64_t k = int64_t(b) * a.H + unit;
    a.grad_h0[k] = static_cast<scalar_t>(a.dh_state[k]);
  }
};

template <typename scalar_t, typename acc_t, PersistentProduct kProduct>
__global__ void __launch_bounds__(kPersistentProductThreads)
    gru_persistent_forward_kernel(const typename GruForwardPolicy<scalar_t, acc_t>::Args a) {
  persistent_recurrent_body<GruForwardPolicy<scalar_t, acc_t>, scalar_t, acc_t, kProduct>(a);
}

template <typename scalar_t, typename acc_t, PersistentProduct kProduct>
__global__ void __launch_bounds__(kPersistentProductThreads)
    gru_persistent_backward_kernel(const typename GruBackwardPolicy<scalar_t, acc_t>::Args a) {
  persistent_recurrent_body<GruBackwardPolicy<scalar_t, acc_t>, scalar_t, acc_t, kProduct>(a);
}

}  // namespace lstm_fused
