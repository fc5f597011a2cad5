// CPU kernels of the LSTM layer ops (float32, float64).
//
// Forward: one GEMM projects the input of every step (biases folded in); then per step the
// recurrent GEMM accumulates h_{t-1} W_hh^T onto that step's gates, and one vectorised pass does
// the activations and the cell update (cell_math.h) and leaves the activated gates in the
// reserve. Backward runs the mirror in reverse time; the weight, bias and input gradients are
// single large GEMMs / reductions after the loop.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>

#include "../cell_math.h"
#include "../lstm_layer_args.h"

namespace lstm_fused {
namespace {

using at::Tensor;

template <typename scalar_t>
struct VecActivations {
  using Vec = at::vec::Vectorized<scalar_t>;
  static Vec sigmoid(const Vec& x) { return Vec(scalar_t(1)) / (Vec(scalar_t(1)) + x.neg().exp()); }
  static Vec tanh(const Vec& x) { return x.tanh(); }
};

// Rows per parallel task: enough elements per task that the pool's overhead stays small.
int64_t row_grain(int64_t hidden_size) {
  return std::max<int64_t>(1, 8192 / std::max<int64_t>(1, hidden_size));
}

// The fused pointwise step over the first `rows` rows of one time step.
// gates [rows,4H] pre-activations in, activated gates out; c_state [rows,H] c_{t-1} in, c_t out;
// cells_out [rows,H] receives c_t (reserve); h_out [rows,H] receives o*tanh(c_t); h_state, when
// not null, receives it too (the recurrent input of the next step when there is no projection).
template <typename scalar_t>
void lstm_pointwise_forward(scalar_t* gates, scalar_t* c_state, scalar_t* cells_out, scalar_t* h_out,
                            scalar_t* h_state, int64_t rows, int64_t H) {
  using Vec = at::vec::Vectorized<scalar_t>;
  at::parallel_for(0, rows, row_grain(4 * H), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      scalar_t* g = gates + b * 4 * H;
      for (int64_t j = 0; j < H; j += Vec::size()) {
        const int n = static_cast<int>(std::min<int64_t>(Vec::size(), H - j));
        const int64_t k = b * H + j;
        Vec i = Vec::loadu(g + j, n), f = Vec::loadu(g + H + j, n);
        Vec gg = Vec::loadu(g + 2 * H + j, n), o = Vec::loadu(g + 3 * H + j, n);
        const Vec c_prev = Vec::loadu(c_state + k, n);
        Vec c, h;
        lstm_cell_forward<Vec, VecActivations<scalar_t>>(i, f, gg, o, c_prev, c, h);
        i.store(g + j, n);
        f.store(g + H + j, n);
        gg.store(g + 2 * H + j, n);
        o.store(g + 3 * H + j, n);
        c.store(c_state + k, n);
        c.store(cells_out + k, n);
        h.store(h_out + k, n);
        if (h_state != nullptr) h.store(h_state + k, n);
      }
    }
  });
}

// The fused pointwise backward over the first `rows` rows of time step t.
// gates [rows,4H] activated gates; d_gates [rows,4H] receives the pre-activation gradients;
// cells [T,B,H] and c0 [B,H] give c_t and c_{t-1}; dh [rows,H] the gradient reaching o*tanh(c_t);
// dc_state [rows,H] the gradient reaching c_t in, the one reaching c_{t-1} out.
template <typename scalar_t>
void lstm_pointwise_backward(const scalar_t* gates, scalar_t* d_gates, const scalar_t* cells,
                             const scalar_t* c0, const scalar_t* dh, scalar_t* dc_state, int64_t t,
                             int64_t rows, const LstmLayerSizes& s, bool reverse) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const int64_t H = s.hidden_size, B = s.batch;
  at::parallel_for(0, rows, row_grain(4 * H), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* g = gates + b * 4 * H;
      scalar_t* dg = d_gates + b * 4 * H;
      const scalar_t* c_t = cells + (t * B + b) * H;
      const int64_t prev = s.previous_step(t, b, reverse);
      const scalar_t* c_prev_row = prev < 0 ? c0 + b * H : cells + (prev * B + b) * H;
      for (int64_t j = 0; j < H; j += Vec::size()) {
        const int n = static_cast<int>(std::min<int64_t>(Vec::size(), H - j));
        const int64_t k = b * H + j;
        Vec i = Vec::loadu(g + j, n), f = Vec::loadu(g + H + j, n);
        Vec gg = Vec::loadu(g + 2 * H + j, n), o = Vec::loadu(g + 3 * H + j, n);
        Vec dc = Vec::loadu(dc_state + k, n);
        lstm_cell_backward<Vec, VecActivations<scalar_t>>(
            i, f, gg, o, Vec::loadu(c_prev_row + j, n), Vec::loadu(c_t + j, n), Vec::loadu(dh + k, n), dc);
        i.store(dg + j, n);
        f.store(dg + H + j, n);
        gg.store(dg + 2 * H + j, n);
        o.store(dg + 3 * H + j, n);
        dc.store(dc_state + k, n);
      }
    }
  });
}

void check_cpu_dtype(const Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "lstm_fused: the CPU kernels support float32 and float64, got ", x.scalar_type());
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_layer_forward_cpu(
    const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const c10::optional<Tensor>& b_ih, const c10::optional<Tensor>& b_hh,
    const c10::optional<Tensor>& w_hr, const c10::optional<Tensor>& lengths, bool reverse) {
  const LstmLayerSizes s = check_lstm_layer_forward_args(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths);
  check_cpu_dtype(x);
  at::AutoDispatchBelowADInplaceOrView guard;
  const int64_t T = s.seq_len, B = s.batch, H = s.hidden_size, P = s.output_size;
  // With lengths, rows that do not advance are never written: start from zeros so that y is
  // zero-padded and the weight-gradient GEMMs meet no uninitialised memory.
  const bool padded = lengths.has_value();
  const auto make = [&](at::IntArrayRef shape) {
    return padded ? at::zeros(shape, x.options()) : at::empty(shape, x.options());
  };
  Tensor reserve = make({s.reserve_numel()});
  const LstmReserve r = split_lstm_reserve(reserve, s);
  Tensor y = make({T, B, P});

  Tensor gates_2d = r.gates.view({T * B, 4 * H});
  const Tensor x_2d = x.reshape({T * B, s.input_size});
  if (s.has_bias) {
    at::addmm_out(gates_2d, *b_ih + *b_hh, x_2d, w_ih.t());
  } else {
    at::mm_out(gates_2d, x_2d, w_ih.t());
  }

  Tensor h = h0.clone(at::MemoryFormat::Contiguous);
  Tensor c = c0.clone(at::MemoryFormat::Contiguous);
  const Tensor w_hh_t = w_hh.t();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_layer_forward_cpu", [&] {
    for (int64_t step = 0; step < T; ++step) {
      const int64_t t = reverse ? T - 1 - step : step;
      const int64_t rows = s.active_rows[t];
      if (rows == 0) continue;
      Tensor gates_t = r.gates[t].narrow(0, 0, rows);
      gates_t.addmm_(h.narrow(0, 0, rows), w_hh_t);
      scalar_t* h_out = (s.has_proj ? r.proj_in : y)[t].data_ptr<scalar_t>();
      lstm_pointwise_forward<scalar_t>(gates_t.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(),
                                       r.cells[t].data_ptr<scalar_t>(), h_out,
                                       s.has_proj ? nullptr : h.data_ptr<scalar_t>(), rows, H);
      if (s.has_proj) {
        Tensor y_t = y[t].narrow(0, 0, rows);
        at::mm_out(y_t, r.proj_in[t].narrow(0, 0, rows), w_hr->t());
        h.narrow(0, 0, rows).copy_(y_t);
      }
    }
  });
  return {y, h, c, reserve};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_backward_cpu(
    const Tensor& grad_y, const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& x,
    const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const c10::optional<Tensor>& w_hr, const Tensor& y, const Tensor& reserve,
    const c10::optional<Tensor>& lengths, bool reverse) {
  const LstmLayerSizes s = check_lstm_layer_backward_args(grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih,
                                                          w_hh, w_hr, y, reserve, lengths);
  check_cpu_dtype(x);
  at::AutoDispatchBelowADInplaceOrView guard;
  const int64_t T = s.seq_len, B = s.batch, I = s.input_size, H = s.hidden_size, P = s.output_size;
  const bool padded = lengths.has_value();
  const auto make = [&](at::IntArrayRef shape) {
    return padded ? at::zeros(shape, x.options()) : at::empty(shape, x.options());
  };
  const LstmReserve r = split_lstm_reserve(reserve, s);
  Tensor d_gates = make({T, B, 4 * H});
  // With a projection, the total gradient reaching each step's h is kept for the dW_hr GEMM.
  Tensor d_h_steps = s.has_proj ? make({T, B, P}) : Tensor();
  Tensor d_proj_in = s.has_proj ? at::empty({B, H}, x.options()) : Tensor();
  Tensor dh = grad_h_n.clone(at::MemoryFormat::Contiguous);
  Tensor dc = grad_c_n.clone(at::MemoryFormat::Contiguous);
  const Tensor c0_c = c0.contiguous();

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_layer_backward_cpu", [&] {
    for (int64_t step = 0; step < T; ++step) {
      const int64_t t = reverse ? step : T - 1 - step;
      const int64_t rows = s.active_rows[t];
      if (rows == 0) continue;
      Tensor dh_t = dh.narrow(0, 0, rows);
      dh_t.add_(grad_y[t].narrow(0, 0, rows));
      const scalar_t* d_cell_out = dh_t.data_ptr<scalar_t>();
      if (s.has_proj) {
        d_h_steps[t].narrow(0, 0, rows).copy_(dh_t);
        Tensor d_proj_in_t = d_proj_in.narrow(0, 0, rows);
        at::mm_out(d_proj_in_t, dh_t, *w_hr);
        d_cell_out = d_proj_in_t.data_ptr<scalar_t>();
      }
      Tensor d_gates_t = d_gates[t].narrow(0, 0, rows);
      lstm_pointwise_backward<scalar_t>(r.gates[t].data_ptr<scalar_t>(), d_gates_t.data_ptr<scalar_t>(),
                                        r.cells.data_ptr<scalar_t>(), c0_c.data_ptr<scalar_t>(),
                                        d_cell_out, dc.data_ptr<scalar_t>(), t, rows, s, reverse);
      at::mm_out(dh_t, d_gates_t, w_hh);
    }
  });

  const Tensor d_gates_2d = d_gates.view({T * B, 4 * H});
  Tensor grad_x = at::mm(d_gates_2d, w_ih).view({T, B, I});
  Tensor grad_w_ih = at::mm(d_gates_2d.t(), x.reshape({T * B, I}));
  Tensor grad_bias = d_gates_2d.sum(0);
  const Tensor h_prev = gather_previous_hidden(y, h0, s, reverse);
  Tensor grad_w_hh = at::mm(d_gates_2d.t(), h_prev.view({T * B, P}));
  Tensor grad_w_hr = s.has_proj ? at::mm(d_h_steps.view({T * B, P}).t(), r.proj_in.view({T * B, H}))
                                : at::empty({0}, x.options());
  return {grad_x, dh, dc, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr};
}

}  // namespace

TORCH_LIBRARY_IMPL(lstm_fused, CPU, m) {
  m.impl("lstm_layer_forward", &lstm_layer_forward_cpu);
  m.impl("lstm_layer_backward", &lstm_layer_backward_cpu);
}

}  // namespace lstm_fused
