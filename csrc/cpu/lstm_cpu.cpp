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
#include <torch/library.h>

#include "../cell_math.h"
#include "../layer_loops.h"
#include "cpu_common.h"
#include "recurrent_gemm.h"

namespace lstm_fused {
namespace {

using at::Tensor;

// The fused pointwise step over the rows of one time step (see LstmForwardStep).
template <typename scalar_t>
void lstm_pointwise_forward(scalar_t* gates, const scalar_t* bias, scalar_t* c_state, scalar_t* cells_out,
                            scalar_t* h_out, scalar_t* h_state, int64_t rows, int64_t H) {
  using Vec = at::vec::Vectorized<scalar_t>;
  at::parallel_for(0, rows, row_grain(4 * H), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      scalar_t* g = gates + b * 4 * H;
      for_each_vector<scalar_t>(H, [&](int64_t j, int n) {
        const int64_t k = b * H + j;
        Vec i = Vec::loadu(g + j, n), f = Vec::loadu(g + H + j, n);
        Vec gg = Vec::loadu(g + 2 * H + j, n), o = Vec::loadu(g + 3 * H + j, n);
        if (bias != nullptr) {
          i = i + Vec::loadu(bias + j, n);
          f = f + Vec::loadu(bias + H + j, n);
          gg = gg + Vec::loadu(bias + 2 * H + j, n);
          o = o + Vec::loadu(bias + 3 * H + j, n);
        }
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
      });
    }
  });
}

// The fused pointwise backward over the rows of time step t (see LstmBackwardStep).
template <typename scalar_t>
void lstm_pointwise_backward(const scalar_t* gates, scalar_t* d_gates, const scalar_t* cells,
                             const scalar_t* c0, const scalar_t* dh, scalar_t* dc_state, int64_t t,
                             int64_t rows, const LayerSizes& s, bool reverse) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const int64_t H = s.hidden_size, B = s.batch;
  at::parallel_for(0, rows, row_grain(4 * H), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* g = gates + b * 4 * H;
      scalar_t* dg = d_gates + b * 4 * H;
      const scalar_t* c_t = cells + (t * B + b) * H;
      const int64_t prev = previous_step(t, s.lengths[b], reverse);
      const scalar_t* c_prev_row = prev < 0 ? c0 + b * H : cells + (prev * B + b) * H;
      for_each_vector<scalar_t>(H, [&](int64_t j, int n) {
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
      });
    }
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_layer_forward_cpu(
    const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const c10::optional<Tensor>& b_ih, const c10::optional<Tensor>& b_hh,
    const c10::optional<Tensor>& w_hr, const c10::optional<Tensor>& lengths, bool reverse) {
  const LayerSizes s = check_lstm_layer_forward_args(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths);
  check_cpu_dtype(x);
  at::AutoDispatchBelowADInplaceOrView guard;
  const RecurrentGemm recurrent(w_hh, /*transposed=*/true, s.batch);
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_layer_forward_cpu", [&] {
    return run_lstm_layer_forward(
        s, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths.has_value(), reverse, x.scalar_type(),
        [&](LstmForwardStep& step) {
          recurrent.run(step.h_prev, step.gates, /*accumulate=*/true);
          lstm_pointwise_forward<scalar_t>(
              step.gates.data_ptr<scalar_t>(), step.bias.defined() ? step.bias.data_ptr<scalar_t>() : nullptr,
              step.c_state.data_ptr<scalar_t>(),
              step.cells.data_ptr<scalar_t>(), step.h_out.data_ptr<scalar_t>(),
              step.h_next.defined() ? step.h_next.data_ptr<scalar_t>() : nullptr, step.rows,
              s.hidden_size);
        });
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_backward_cpu(
    const Tensor& grad_y, const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& x,
    const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const c10::optional<Tensor>& w_hr, const Tensor& y, const Tensor& reserve,
    const c10::optional<Tensor>& lengths, bool reverse) {
  const LayerSizes s = check_lstm_layer_backward_args(grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih,
                                                          w_hh, w_hr, y, reserve, lengths);
  check_cpu_dtype(x);
  at::AutoDispatchBelowADInplaceOrView guard;
  const RecurrentGemm recurrent(w_hh, /*transposed=*/false, s.batch);
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_layer_backward_cpu", [&] {
    return run_lstm_layer_backward(
        s, grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, w_hr, y, reserve, lengths.has_value(),
        reverse, x.scalar_type(), [&](LstmBackwardStep& step) {
          lstm_pointwise_backward<scalar_t>(
              step.gates.data_ptr<scalar_t>(), step.d_gates.data_ptr<scalar_t>(),
              step.cells.data_ptr<scalar_t>(), step.c0.data_ptr<scalar_t>(),
              step.d_cell_out.data_ptr<scalar_t>(), step.dc_state.data_ptr<scalar_t>(), step.t,
              step.rows, s, reverse);
          recurrent.run(step.d_gates, step.dh_prev, /*accumulate=*/false);
        });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lstm_fused, CPU, m) {
  m.impl("lstm_layer_forward", &lstm_layer_forward_cpu);
  m.impl("lstm_layer_backward", &lstm_layer_backward_cpu);
}

}  // namespace lstm_fused
