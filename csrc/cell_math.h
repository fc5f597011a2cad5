// The per-element math of one LSTM step, forward and backward.
//
// This header is the single source of truth for that math: the CPU kernels instantiate it with
// at::vec::Vectorized lanes, the CUDA kernels with scalars in registers. It must stay free of
// ATen and of anything that only one compiler understands.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LSTM_FUSED_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LSTM_FUSED_HOST_DEVICE inline
#endif

namespace lstm_fused {

// Activations on plain float / double, usable on host and device. The CPU kernels pass their own
// policy with the same two static functions for SIMD vectors.
struct ScalarActivations {
  LSTM_FUSED_HOST_DEVICE static float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
  LSTM_FUSED_HOST_DEVICE static double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }
  LSTM_FUSED_HOST_DEVICE static float tanh(float x) { return tanhf(x); }
  LSTM_FUSED_HOST_DEVICE static double tanh(double x) { return ::tanh(x); }
};

// One LSTM cell element, forward.
// In:  i, f, g, o hold the pre-activations a = x W_ih^T + b_ih + h W_hh^T + b_hh (gate order of
//      nn.LSTM), c_prev the previous cell state.
// Out: i, f, g, o hold the activated gates (what backward needs, kept in the reserve),
//      c the new cell state, h = o * tanh(c) (before any projection).
template <typename V, typename Act = ScalarActivations>
LSTM_FUSED_HOST_DEVICE void lstm_cell_forward(V& i, V& f, V& g, V& o, const V& c_prev, V& c, V& h) {
  i = Act::sigmoid(i);
  f = Act::sigmoid(f);
  g = Act::tanh(g);
  o = Act::sigmoid(o);
  c = f * c_prev + i * g;
  h = o * Act::tanh(c);
}

// One LSTM cell element, backward.
// In:  i, f, g, o the activated gates of the step, c_prev and c its cell states, dh the gradient
//      reaching h (before projection), dc the gradient reaching c from later steps.
// Out: i, f, g, o hold the gradients of the pre-activations (the same for both biases, and the
//      rows of the weight-gradient GEMMs); dc holds the gradient reaching c_prev.
// tanh(c) is recomputed rather than stored: one transcendental per element is cheaper than
// another T*B*H tensor of reserve traffic.
template <typename V, typename Act = ScalarActivations>
LSTM_FUSED_HOST_DEVICE void lstm_cell_backward(V& i, V& f, V& g, V& o, const V& c_prev, const V& c,
                                               const V& dh, V& dc) {
  const V one = V(1.0f);
  const V tanh_c = Act::tanh(c);
  const V dc_total = dc + dh * o * (one - tanh_c * tanh_c);
  const V d_o = dh * tanh_c * o * (one - o);
  const V d_i = dc_total * g * i * (one - i);
  const V d_f = dc_total * c_prev * f * (one - f);
  const V d_g = dc_total * i * (one - g * g);
  dc = dc_total * f;
  i = d_i;
  f = d_f;
  g = d_g;
  o = d_o;
}

// One GRU cell element, forward (nn.GRU's formulation, gate order r, z, n).
// In:  r, z, n hold the input projections x W_ih^T + b_ih of each gate; hr, hz, hn the hidden
//      projections h W_hh^T + b_hh; h_prev the previous hidden state.
// Out: r, z, n hold the activated gates (kept in the reserve with hn); h the new hidden state.
template <typename V, typename Act = ScalarActivations>
LSTM_FUSED_HOST_DEVICE void gru_cell_forward(V& r, V& z, V& n, const V& hr, const V& hz, const V& hn,
                                             const V& h_prev, V& h) {
  r = Act::sigmoid(r + hr);
  z = Act::sigmoid(z + hz);
  n = Act::tanh(n + r * hn);
  h = (V(1.0f) - z) * n + z * h_prev;
}

// One GRU cell element, backward.
// In:  r, z, n the activated gates, hn the hidden projection of n, h_prev, dh the gradient
//      reaching h_t.
// Out: r, z, n hold the gradients of the input-side pre-activations (x W_ih^T + b_ih); d_hn the
//      gradient of hn (the hidden side's n part; its r and z parts equal the input side's);
//      dh_prev the part of the gradient reaching h_{t-1} that does not pass through W_hh.
template <typename V, typename Act = ScalarActivations>
LSTM_FUSED_HOST_DEVICE void gru_cell_backward(V& r, V& z, V& n, const V& hn, const V& h_prev, const V& dh,
                                              V& d_hn, V& dh_prev) {
  const V one = V(1.0f);
  const V d_n_pre = dh * (one - z) * (one - n * n);
  const V d_z_pre = dh * (h_prev - n) * z * (one - z);
  const V d_r_pre = d_n_pre * hn * r * (one - r);
  d_hn = d_n_pre * r;
  dh_prev = dh * z;
  r = d_r_pre;
  z = d_z_pre;
  n = d_n_pre;
}

// The time step that precedes step t for a row of the given length, in the order the layer
// processes them, or -1 when t is the row's first step (its state then comes from h0/c0).
// A reverse row starts at its own last step, length - 1.
LSTM_FUSED_HOST_DEVICE long long previous_step(long long t, long long length, bool reverse) {
  if (reverse) return t + 1 < length ? t + 1 : -1;
  return t - 1;
}

}  // namespace lstm_fused
