// The host side of the layer ops, shared by every device: buffers, the input-projection GEMM,
// the time loop over active rows, and the weight/input-gradient GEMMs after the backward loop.
// What differs per device is the work of one step, passed in as a callable.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "layer_args.h"

namespace lstm_fused {

// One forward step's device work. Every tensor covers only the `rows` rows that advance at t.
struct LstmForwardStep {
  int64_t t = 0;
  int64_t rows = 0;
  at::Tensor h_prev;   // [rows, P]  recurrent input h_{t-1}
  at::Tensor gates;    // [rows, 4H] input projection x W_ih^T in, activated gates out
  at::Tensor bias;     // [4H] b_ih + b_hh, for the step to add; undefined without biases
  at::Tensor c_state;  // [rows, H]  c_{t-1} in, c_t out (in the cell dtype)
  at::Tensor cells;    // [rows, H]  receives c_t for the reserve
  at::Tensor h_out;    // [rows, H]  receives o * tanh(c_t)
  at::Tensor h_next;   // [rows, H]  receives it too, as the next step's h; undefined with projection
};

// One backward step's device work, over the `rows` rows that advance at t.
struct LstmBackwardStep {
  int64_t t = 0;
  int64_t rows = 0;
  at::Tensor gates;       // [rows, 4H] activated gates of step t
  at::Tensor d_gates;     // [rows, 4H] receives the pre-activation gradients
  at::Tensor cells;       // [T, B, H]  every step's cell state (row b's c_{t-1} is at its previous step)
  at::Tensor c0;          // [B, H]     the initial cell state
  at::Tensor d_cell_out;  // [rows, H]  gradient reaching o * tanh(c_t)
  at::Tensor dc_state;    // [rows, H]  gradient reaching c_t in, c_{t-1} out (in the cell dtype)
  at::Tensor dh_prev;     // [rows, P]  receives d_gates W_hh, the gradient reaching h_{t-1}
};

// With lengths, rows that do not advance are never written: those buffers start from zeros so
// that y is zero-padded and the gradient GEMMs meet no uninitialised memory.
inline at::Tensor layer_buffer(at::IntArrayRef shape, const at::TensorOptions& options, bool padded) {
  return padded ? at::zeros(shape, options) : at::empty(shape, options);
}

// h ping-pongs between two buffers so that a step may read h_{t-1} of every row while it writes
// h_t (a GPU kernel's blocks do both at once). Both start as h0: a row that has not yet advanced
// (reverse direction with lengths) reads h0 from either.
inline void init_hidden_buffers(at::Tensor (&h_buffers)[2], const at::Tensor& h0) {
  h_buffers[0] = h0.clone(at::MemoryFormat::Contiguous);
  h_buffers[1] = h0.clone(at::MemoryFormat::Contiguous);
}

// h_n from the ping-pong buffers. Row b last wrote buffer (its last step index + 1) % 2: T % 2
// in reverse (every row ends at t = 0), lengths[b] % 2 forward. Rows that never advanced hold h0
// in both.
inline at::Tensor final_hidden(const at::Tensor (&h_buffers)[2], const LayerSizes& s, bool reverse) {
  if (reverse) return h_buffers[s.seq_len % 2];
  at::Tensor odd = at::empty({s.batch, 1}, at::kBool);
  bool* is_odd = odd.data_ptr<bool>();
  int64_t odd_rows = 0;
  for (int64_t b = 0; b < s.batch; ++b) {
    is_odd[b] = s.lengths[b] % 2 == 1;
    odd_rows += is_odd[b];
  }
  if (odd_rows == 0) return h_buffers[0];
  if (odd_rows == s.batch) return h_buffers[1];
  return at::where(odd.to(h_buffers[0].device()), h_buffers[1], h_buffers[0]);
}

// cell_dtype: the dtype of the running cell state (float32 for half types, else x's dtype).
template <typename StepFn>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_lstm_layer_forward(
    const LayerSizes& s, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_hh, const c10::optional<at::Tensor>& w_hr, bool padded,
    bool reverse, at::ScalarType cell_dtype, StepFn&& step) {
  const int64_t T = s.seq_len, B = s.batch, H = s.hidden_size, P = s.output_size;
  at::Tensor reserve = layer_buffer({lstm_reserve_numel(s)}, x.options(), padded);
  const LstmReserve r = split_lstm_reserve(reserve, s);
  at::Tensor y = layer_buffer({T, B, P}, x.options(), padded);

  // The input projection of every step in one GEMM. The biases are added by each step's
  // pointwise pass, where they cost nothing, rather than broadcast into this [T*B, 4H] buffer
  // first (a whole extra pass over it).
  at::Tensor gates_2d = r.gates.view({T * B, 4 * H});
  at::mm_out(gates_2d, x.reshape({T * B, s.input_size}), w_ih.t());
  const at::Tensor bias = s.has_bias ? (*b_ih + *b_hh).contiguous() : at::Tensor();

  at::Tensor h_buffers[2];
  init_hidden_buffers(h_buffers, h0);
  at::Tensor c = c0.to(cell_dtype, /*non_blocking=*/false, /*copy=*/true).contiguous();
  for (int64_t step_index = 0; step_index < T; ++step_index) {
    const int64_t t = reverse ? T - 1 - step_index : step_index;
    const int64_t rows = s.active_rows[t];
    if (rows == 0) continue;
    at::Tensor h_next = h_buffers[(step_index + 1) % 2].narrow(0, 0, rows);
    LstmForwardStep fs;
    fs.t = t;
    fs.rows = rows;
    fs.h_prev = h_buffers[step_index % 2].narrow(0, 0, rows);
    fs.gates = r.gates[t].narrow(0, 0, rows);
    fs.bias = bias;
    fs.c_state = c.narrow(0, 0, rows);
    fs.cells = r.cells[t].narrow(0, 0, rows);
    fs.h_out = (s.has_proj ? r.proj_in : y)[t].narrow(0, 0, rows);
    if (!s.has_proj) fs.h_next = h_next;
    step(fs);
    if (s.has_proj) {
      at::Tensor y_t = y[t].narrow(0, 0, rows);
      at::mm_out(y_t, fs.h_out, w_hr->t());
      h_next.copy_(y_t);
    }
  }

  at::Tensor h_n = final_hidden(h_buffers, s, reverse);
  return {y, h_n, c.to(x.scalar_type()), reserve};
}

template <typename StepFn>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
run_lstm_layer_backward(const LayerSizes& s, const at::Tensor& grad_y, const at::Tensor& grad_h_n,
                        const at::Tensor& grad_c_n, const at::Tensor& x, const at::Tensor& h0,
                        const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                        const c10::optional<at::Tensor>& w_hr, const at::Tensor& y,
                        const at::Tensor& reserve, bool padded, bool reverse,
                        at::ScalarType cell_dtype, StepFn&& step) {
  const int64_t T = s.seq_len, B = s.batch, I = s.input_size, H = s.hidden_size, P = s.output_size;
  const LstmReserve r = split_lstm_reserve(reserve, s);
  at::Tensor d_gates = layer_buffer({T, B, 4 * H}, x.options(), padded);
  // With a projection, the total gradient reaching each step's h is kept for the dW_hr GEMM.
  at::Tensor d_h_steps = s.has_proj ? layer_buffer({T, B, P}, x.options(), padded) : at::Tensor();
  at::Tensor d_proj_in = s.has_proj ? at::empty({B, H}, x.options()) : at::Tensor();
  at::Tensor dh = grad_h_n.clone(at::MemoryFormat::Contiguous);
  at::Tensor dc = grad_c_n.to(cell_dtype, /*non_blocking=*/false, /*copy=*/true).contiguous();
  const at::Tensor c0_c = c0.contiguous();

  for (int64_t step_index = 0; step_index < T; ++step_index) {
    const int64_t t = reverse ? step_index : T - 1 - step_index;
    const int64_t rows = s.active_rows[t];
    if (rows == 0) continue;
    at::Tensor dh_t = dh.narrow(0, 0, rows);
    dh_t.add_(grad_y[t].narrow(0, 0, rows));
    LstmBackwardStep bs;
    bs.t = t;
    bs.rows = rows;
    bs.d_cell_out = dh_t;
    if (s.has_proj) {
      d_h_steps[t].narrow(0, 0, rows).copy_(dh_t);
      bs.d_cell_out = d_proj_in.narrow(0, 0, rows);
      at::mm_out(bs.d_cell_out, dh_t, *w_hr);
    }
    bs.gates = r.gates[t].narrow(0, 0, rows);
    bs.d_gates = d_gates[t].narrow(0, 0, rows);
    bs.cells = r.cells;
    bs.c0 = c0_c;
    bs.dc_state = dc.narrow(0, 0, rows);
    bs.dh_prev = dh_t;
    step(bs);
  }

  const at::Tensor d_gates_2d = d_gates.view({T * B, 4 * H});
  at::Tensor grad_x = at::mm(d_gates_2d, w_ih).view({T, B, I});
  at::Tensor grad_w_ih = at::mm(d_gates_2d.t(), x.reshape({T * B, I}));
  at::Tensor grad_bias = d_gates_2d.sum(0);
  const at::Tensor h_prev = gather_previous_hidden(y, h0, s, reverse);
  at::Tensor grad_w_hh = at::mm(d_gates_2d.t(), h_prev.view({T * B, P}));
  at::Tensor grad_w_hr = s.has_proj
                             ? at::mm(d_h_steps.view({T * B, P}).t(), r.proj_in.view({T * B, H}))
                             : at::empty({0}, x.options());
  return {grad_x, dh, dc.to(x.scalar_type()), grad_w_ih, grad_w_hh, grad_bias, grad_w_hr};
}

// One GRU forward step's device work, over the `rows` rows that advance at t.
struct GruForwardStep {
  int64_t t = 0;
  int64_t rows = 0;
  at::Tensor h_prev;         // [rows, H]  h_{t-1}
  at::Tensor gates;          // [rows, 3H] input projection x W_ih^T in, activated r, z, n out
  at::Tensor input_bias;     // [3H] b_ih, for the step to add; undefined without biases
  at::Tensor hidden_bias;    // [3H] b_hh, likewise
  at::Tensor hidden_n_proj;  // [rows, H]  receives h_{t-1} W_hn^T + b_hn (reserve)
  at::Tensor h_out;          // [rows, H]  receives h_t (the layer output y[t])
  at::Tensor h_next;         // [rows, H]  receives h_t too, as the next step's h
};

// One GRU backward step's device work, over the `rows` rows that advance at t.
struct GruBackwardStep {
  int64_t t = 0;
  int64_t rows = 0;
  at::Tensor gates;           // [rows, 3H] activated r, z, n
  at::Tensor hidden_n_proj;   // [rows, H]  h_{t-1} W_hn^T + b_hn
  at::Tensor h_prev;          // [rows, H]  h_{t-1}
  at::Tensor dh;              // [rows, H]  gradient reaching h_t in; the whole gradient reaching
                              //            h_{t-1} out: z*dh (pointwise) + d_hidden_gates W_hh
  at::Tensor d_input_gates;   // [rows, 3H] receives the gradients of x W_ih^T + b_ih
  at::Tensor d_hidden_gates;  // [rows, 3H] receives the gradients of h W_hh^T + b_hh
};

template <typename StepFn>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_gru_layer_forward(
    const LayerSizes& s, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
    const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh, bool padded, bool reverse,
    StepFn&& step) {
  const int64_t T = s.seq_len, B = s.batch, H = s.hidden_size;
  at::Tensor reserve = layer_buffer({gru_reserve_numel(s)}, x.options(), padded);
  const GruReserve r = split_gru_reserve(reserve, s);
  at::Tensor y = layer_buffer({T, B, H}, x.options(), padded);

  // The input projection of every step in one GEMM; the steps add the biases (b_hn must stay
  // apart anyway: it sits inside r * (.)).
  at::Tensor gates_2d = r.gates.view({T * B, 3 * H});
  at::mm_out(gates_2d, x.reshape({T * B, s.input_size}), w_ih.t());
  const at::Tensor input_bias = s.has_bias ? b_ih->contiguous() : at::Tensor();
  const at::Tensor hidden_bias = s.has_bias ? b_hh->contiguous() : at::Tensor();

  at::Tensor h_buffers[2];
  init_hidden_buffers(h_buffers, h0);
  for (int64_t step_index = 0; step_index < T; ++step_index) {
    const int64_t t = reverse ? T - 1 - step_index : step_index;
    const int64_t rows = s.active_rows[t];
    if (rows == 0) continue;
    GruForwardStep fs;
    fs.t = t;
    fs.rows = rows;
    fs.h_prev = h_buffers[step_index % 2].narrow(0, 0, rows);
    fs.gates = r.gates[t].narrow(0, 0, rows);
    fs.input_bias = input_bias;
    fs.hidden_bias = hidden_bias;
    fs.hidden_n_proj = r.hidden_n_proj[t].narrow(0, 0, rows);
    fs.h_out = y[t].narrow(0, 0, rows);
    fs.h_next = h_buffers[(step_index + 1) % 2].narrow(0, 0, rows);
    step(fs);
  }
  return {y, final_hidden(h_buffers, s, reverse), reserve};
}

template <typename StepFn>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
run_gru_layer_backward(const LayerSizes& s, const at::Tensor& grad_y, const at::Tensor& grad_h_n,
                       const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                       const at::Tensor& w_hh, const at::Tensor& y, const at::Tensor& reserve,
                       bool padded, bool reverse, StepFn&& step) {
  const int64_t T = s.seq_len, B = s.batch, I = s.input_size, H = s.hidden_size;
  const GruReserve r = split_gru_reserve(reserve, s);
  at::Tensor d_input_gates = layer_buffer({T, B, 3 * H}, x.options(), padded);
  at::Tensor d_hidden_gates = layer_buffer({T, B, 3 * H}, x.options(), padded);
  const at::Tensor h_prev = gather_previous_hidden(y, h0, s, reverse);
  at::Tensor dh = grad_h_n.clone(at::MemoryFormat::Contiguous);

  for (int64_t step_index = 0; step_index < T; ++step_index) {
    const int64_t t = reverse ? step_index : T - 1 - step_index;
    const int64_t rows = s.active_rows[t];
    if (rows == 0) continue;
    GruBackwardStep bs;
    bs.t = t;
    bs.rows = rows;
    bs.dh = dh.narrow(0, 0, rows);
    bs.dh.add_(grad_y[t].narrow(0, 0, rows));
    bs.gates = r.gates[t].narrow(0, 0, rows);
    bs.hidden_n_proj = r.hidden_n_proj[t].narrow(0, 0, rows);
    bs.h_prev = h_prev[t].narrow(0, 0, rows);
    bs.d_input_gates = d_input_gates[t].narrow(0, 0, rows);
    bs.d_hidden_gates = d_hidden_gates[t].narrow(0, 0, rows);
    step(bs);
  }

  const at::Tensor d_input_2d = d_input_gates.view({T * B, 3 * H});
  const at::Tensor d_hidden_2d = d_hidden_gates.view({T * B, 3 * H});
  at::Tensor grad_x = at::mm(d_input_2d, w_ih).view({T, B, I});
  at::Tensor grad_w_ih = at::mm(d_input_2d.t(), x.reshape({T * B, I}));
  at::Tensor grad_w_hh = at::mm(d_hidden_2d.t(), h_prev.view({T * B, H}));
  return {grad_x, dh, grad_w_ih, grad_w_hh, d_input_2d.sum(0), d_hidden_2d.sum(0)};
}

}  // namespace lstm_fused
