// CPU kernels of the LSTM layer ops (float32, float64).
//
// Forward: one GEMM projects the input of every step; then per step the recurrent GEMM
// accumulates h_{t-1} W_hh^T onto that step's gates (W_hh packed once per call, recurrent_gemm.h),
// and one vectorised pass adds the biases, does the activations and the cell update
// (cell_math.h) and leaves the activated gates in the reserve. Backward runs the mirror in
// reverse time; the weight, bias and input gradients are single large GEMMs / reductions after the
// loop (layer_loops.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../cell_math.h"
#include "../layer_loops.h"
#include "cpu_common.h"
#include "cpu_kernels.h"
#include "lstm_stationary.h"
#include "recurrent_gemm.h"
#include "small_step.h"

namespace lstm_fused {
namespace CPU_CAPABILITY {  // one copy per SIMD level: cpu_kernels.h
namespace {

using at::Tensor;

template <typename scalar_t>
void lstm_pointwise_forward(const LstmForwardStep<scalar_t, scalar_t>& step, int64_t H) {
  using Vec = at::vec::Vectorized<scalar_t>;
  at::parallel_for(0, step.rows, row_grain(4 * H), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      scalar_t* g = step.gates + b * 4 * H;
      for_each_vector<scalar_t>(H, [&](int64_t j, int n) {
        const int64_t k = b * H + j;
        Vec i = Vec::loadu(g + j, n), f = Vec::loadu(g + H + j, n);
        Vec gg = Vec::loadu(g + 2 * H + j, n), o = Vec::loadu(g + 3 * H + j, n);
        if (step.bias != nullptr) {
          i = i + Vec::loadu(step.bias + j, n);
          f = f + Vec::loadu(step.bias + H + j, n);
          gg = gg + Vec::loadu(step.bias + 2 * H + j, n);
          o = o + Vec::loadu(step.bias + 3 * H + j, n);
        }
        Vec c, h;
        lstm_cell_forward<Vec, CellActivations<scalar_t>>(i, f, gg, o, Vec::loadu(step.c_state + k, n), c, h);
        i.store(g + j, n);
        f.store(g + H + j, n);
        gg.store(g + 2 * H + j, n);
        o.store(g + 3 * H + j, n);
        c.store(step.c_state + k, n);
        c.store(step.cells + k, n);
        h.store(step.h_out + k, n);
        if (step.h_next != nullptr) h.store(step.h_next + k, n);
      });
    }
  });
}

template <typename scalar_t>
void lstm_pointwise_backward(const LstmBackwardStep<scalar_t, scalar_t>& step, const LayerSizes& s,
                             bool reverse) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const int64_t H = s.hidden_size, B = s.batch;
  at::parallel_for(0, step.rows, row_grain(4 * H), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* g = step.gates + b * 4 * H;
      scalar_t* dg = step.d_gates + b * 4 * H;
      const scalar_t* c_t = step.cells + (step.t * B + b) * H;
      const int64_t prev = previous_step(step.t, s.lengths[b], reverse);
      const scalar_t* c_prev = prev < 0 ? step.c0 + b * H : step.cells + (prev * B + b) * H;
      for_each_vector<scalar_t>(H, [&](int64_t j, int n) {
        const int64_t k = b * H + j;
        Vec i = Vec::loadu(g + j, n), f = Vec::loadu(g + H + j, n);
        Vec gg = Vec::loadu(g + 2 * H + j, n), o = Vec::loadu(g + 3 * H + j, n);
        Vec dh = Vec::loadu(step.d_cell_out + k, n);
        if (step.grad_y != nullptr) dh = dh + Vec::loadu(step.grad_y + k, n);
        Vec dc = Vec::loadu(step.dc_state + k, n);
        lstm_cell_backward<Vec, CellActivations<scalar_t>>(i, f, gg, o, Vec::loadu(c_prev + j, n),
                                                          Vec::loadu(c_t + j, n), dh, dc);
        i.store(dg + j, n);
        f.store(dg + H + j, n);
        gg.store(dg + 2 * H + j, n);
        o.store(dg + 3 * H + j, n);
        dc.store(step.dc_state + k, n);
      });
    }
  });
}

// One step in which every row advances, without projection: an LSTMCell call
// (is_single_full_step). At a small batch small_step.h's products run straight from the weights
// into the cell update; otherwise both products go into the gates buffer and one pointwise pass
// writes h into y and h_n and c into c_n (and, for training, into the reserve, whose gates part is
// the gates buffer).
template <typename scalar_t>
std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_single_step(const LayerSizes& s, const Tensor& x, const Tensor& h0,
                                                            const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
                                                            const c10::optional<Tensor>& b_ih,
                                                            const c10::optional<Tensor>& b_hh, bool keep_reserve) {
  const int64_t B = s.batch, H = s.hidden_size;
  const auto options = x.options();
  const bool small = small_step::takes(B, 4 * H, s.input_size + H);
  Tensor y = at::empty({1, B, H}, options), h_n = at::empty({B, H}, options), c_n = at::empty({B, H}, options);
  const Tensor x_c = x.contiguous(), h0_c = h0.contiguous(), c0_c = c0.contiguous();
  const Tensor b1 = s.has_bias ? b_ih->contiguous() : Tensor(), b2 = s.has_bias ? b_hh->contiguous() : Tensor();
  if (small) {
    Tensor reserve = keep_reserve ? at::empty({lstm_reserve_numel(s)}, options) : Tensor();
    const Tensor w1 = w_ih.contiguous(), w2 = w_hh.contiguous();
    small_step::LstmStepOut<scalar_t> out;
    out.h = y.data_ptr<scalar_t>();
    out.h_n = h_n.data_ptr<scalar_t>();
    out.c_n = c_n.data_ptr<scalar_t>();
    if (keep_reserve) {
      out.gates = reserve.data_ptr<scalar_t>();
      out.cells = out.gates + B * 4 * H;
    }
    small_step::lstm_step<scalar_t>(B, s.input_size, H, x_c.data_ptr<scalar_t>(), h0_c.data_ptr<scalar_t>(),
                                    c0_c.data_ptr<scalar_t>(), w1.data_ptr<scalar_t>(), w2.data_ptr<scalar_t>(),
                                    s.has_bias ? b1.data_ptr<scalar_t>() : nullptr,
                                    s.has_bias ? b2.data_ptr<scalar_t>() : nullptr, out);
    return {y, h_n, c_n, reserve};
  }
  // Without a reserve its gates part is scratch for the products.
  Tensor reserve = at::empty({keep_reserve ? lstm_reserve_numel(s) : B * 4 * H}, options);
  scalar_t* gates = reserve.data_ptr<scalar_t>();
  RecurrentGemm(w_ih, /*transposed=*/true, B, 1).run(x_c.data_ptr<scalar_t>(), B, gates, /*accumulate=*/false);
  RecurrentGemm(w_hh, /*transposed=*/true, B, 1).run(h0_c.data_ptr<scalar_t>(), B, gates, /*accumulate=*/true);
  std::vector<scalar_t> bias;
  if (s.has_bias) {
    const scalar_t *p1 = b1.data_ptr<scalar_t>(), *p2 = b2.data_ptr<scalar_t>();
    bias.resize(4 * H);
    for (int64_t j = 0; j < 4 * H; ++j) bias[j] = p1[j] + p2[j];
  }
  scalar_t* c_state = c_n.data_ptr<scalar_t>();
  std::copy_n(c0_c.data_ptr<scalar_t>(), B * H, c_state);
  LstmForwardStep<scalar_t, scalar_t> step;
  step.rows = B;
  step.h_prev = h0_c.data_ptr<scalar_t>();
  step.gates = gates;
  step.bias = s.has_bias ? bias.data() : nullptr;
  step.c_state = c_state;
  step.cells = keep_reserve ? gates + B * 4 * H : c_state;
  step.h_out = y.data_ptr<scalar_t>();
  step.h_next = h_n.data_ptr<scalar_t>();
  lstm_pointwise_forward<scalar_t>(step, H);
  return {y, h_n, c_n, keep_reserve ? reserve : Tensor()};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_layer_forward_cpu(
    const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const c10::optional<Tensor>& b_ih, const c10::optional<Tensor>& b_hh,
    const c10::optional<Tensor>& w_hr, const c10::optional<Tensor>& lengths, bool reverse) {
  const LayerSizes s = check_lstm_layer_forward_args(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths);
  check_cpu_dtype(x);
  at::AutoDispatchBelowADInplaceOrView guard;
  if (is_single_full_step(s)) {
    return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_layer_forward_cpu", [&] {
      return lstm_single_step<scalar_t>(s, x, h0, c0, w_ih, w_hh, b_ih, b_hh, /*keep_reserve=*/true);
    });
  }
  if (stationary::enabled(s)) {
    return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_layer_forward_cpu", [&] {
      const bool fuse_input = stationary::fuse_input_projection(s, /*training=*/true);
      auto f = begin_lstm_forward<scalar_t>(s, x, h0, c0, w_ih, b_ih, b_hh, lengths.has_value(),
                                            /*project_input=*/!fuse_input);
      stationary::lstm_forward<scalar_t>(s, reverse, f, x, w_ih, w_hh, fuse_input);
      return f.outputs(s, reverse, x.scalar_type());
    });
  }
  const RecurrentGemm recurrent(w_hh, /*transposed=*/true, s.batch, s.seq_len);
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_layer_forward_cpu", [&] {
    return run_lstm_layer_forward<scalar_t, scalar_t>(
        s, x, h0, c0, w_ih, b_ih, b_hh, w_hr, lengths.has_value(), reverse,
        [&](const LstmForwardStep<scalar_t, scalar_t>& step) {
          recurrent.run(step.h_prev, step.rows, step.gates, /*accumulate=*/true);
          lstm_pointwise_forward<scalar_t>(step, s.hidden_size);
        });
  });
}

std::tuple<Tensor, Tensor, Tensor> lstm_layer_inference_cpu(
    const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const c10::optional<Tensor>& b_ih, const c10::optional<Tensor>& b_hh,
    const c10::optional<Tensor>& w_hr, const c10::optional<Tensor>& lengths, bool reverse) {
  const LayerSizes s = check_lstm_layer_forward_args(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths);
  check_cpu_dtype(x);
  if (s.has_proj) {
    auto [y, h_n, c_n, reserve] = lstm_layer_forward_cpu(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse);
    return {y, h_n, c_n};
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  if (is_single_full_step(s)) {
    return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_layer_inference_cpu", [&] {
      auto [y, h_n, c_n, none] = lstm_single_step<scalar_t>(s, x, h0, c0, w_ih, w_hh, b_ih, b_hh, false);
      return std::make_tuple(y, h_n, c_n);
    });
  }
  if (stationary::enabled(s)) {
    return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_layer_inference_cpu", [&] {
      return stationary::lstm_inference<scalar_t>(s, reverse, x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths.has_value());
    });
  }
  // The per-step loop, with the input projected a segment at a time and no reserve kept.
  const int64_t T = s.seq_len, B = s.batch, H = s.hidden_size;
  const RecurrentGemm recurrent(w_hh, /*transposed=*/true, B, s.seq_len);
  Tensor y = layer_buffer({T, B, H}, x.options(), lengths.has_value());
  Tensor h_buffers[2];
  init_hidden_buffers(h_buffers, h0);
  Tensor c = c0.contiguous().clone();
  const Tensor bias = s.has_bias ? (*b_ih + *b_hh).contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_layer_inference_cpu", [&] {
    scalar_t* h_ptr[2] = {h_buffers[0].data_ptr<scalar_t>(), h_buffers[1].data_ptr<scalar_t>()};
    LstmForwardStep<scalar_t, scalar_t> fs;
    fs.bias = s.has_bias ? bias.data_ptr<scalar_t>() : nullptr;
    fs.c_state = c.data_ptr<scalar_t>();
    fs.cells = fs.c_state;  // no reserve to fill: the pointwise pass's copy of c_t lands on itself
    for_each_projected_segment(s, x, w_ih, reverse, [&](int64_t first, int64_t end, int64_t t_low, const Tensor& proj) {
      scalar_t* projection = proj.data_ptr<scalar_t>();
      for_each_active_step(s, reverse, [&](int64_t index, int64_t t, int64_t rows) {
        fs.t = t;
        fs.rows = rows;
        fs.h_prev = h_ptr[index % 2];
        fs.gates = projection + (t - t_low) * B * 4 * H;
        fs.h_out = y.data_ptr<scalar_t>() + t * B * H;
        fs.h_next = h_ptr[(index + 1) % 2];
        recurrent.run(fs.h_prev, fs.rows, fs.gates, /*accumulate=*/true);
        lstm_pointwise_forward<scalar_t>(fs, H);
      }, first, end);
    });
  });
  return {y, final_hidden(h_buffers, s, reverse), c};
}

// The backward of lstm_single_step at a small batch (small_step.h): the per-step loop's pointwise
// backward, then one pass over each weight for its gradient, its input's and (W_ih) the bias's.
template <typename scalar_t>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_single_step_backward(
    const LayerSizes& s, const Tensor& grad_y, const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& x,
    const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh, const Tensor& reserve,
    const WantedGradients& wanted) {
  const int64_t B = s.batch, H = s.hidden_size, I = s.input_size;
  const auto options = x.options();
  const Tensor gy = grad_y.contiguous(), gh = grad_h_n.contiguous();
  const Tensor x_c = x.contiguous(), h0_c = h0.contiguous(), c0_c = c0.contiguous(), r = reserve.contiguous();
  const Tensor w1 = w_ih.contiguous(), w2 = w_hh.contiguous();
  Tensor d_gates = at::empty({B, 4 * H}, options);
  Tensor grad_x = wanted.x ? at::empty({1, B, I}, options) : unwanted(x);
  Tensor grad_h0 = at::zeros({B, H}, options);
  Tensor grad_c0 = grad_c_n.clone(at::MemoryFormat::Contiguous);  // dc in, c0's gradient out
  Tensor grad_w_ih = wanted.weights ? at::empty({4 * H, I}, options) : unwanted(x);
  Tensor grad_w_hh = wanted.weights ? at::empty({4 * H, H}, options) : unwanted(x);
  Tensor grad_bias = wanted.weights ? at::empty({4 * H}, options) : unwanted(x);
  LstmBackwardStep<scalar_t, scalar_t> step;
  step.rows = B;
  step.gates = r.data_ptr<scalar_t>();
  step.cells = step.gates + B * 4 * H;
  step.c0 = c0_c.data_ptr<scalar_t>();
  step.d_gates = d_gates.data_ptr<scalar_t>();
  step.d_cell_out = gh.data_ptr<scalar_t>();
  step.grad_y = gy.data_ptr<scalar_t>();
  step.dc_state = grad_c0.data_ptr<scalar_t>();
  lstm_pointwise_backward<scalar_t>(step, s, /*reverse=*/false);
  small_step::StepGradients<scalar_t> grad;
  grad.x = wanted.x ? grad_x.data_ptr<scalar_t>() : nullptr;
  grad.h0 = grad_h0.data_ptr<scalar_t>();
  if (wanted.weights) {
    grad.w_ih = grad_w_ih.data_ptr<scalar_t>();
    grad.w_hh = grad_w_hh.data_ptr<scalar_t>();
    grad.b_ih = grad_bias.data_ptr<scalar_t>();
  }
  small_step::step_backward_products<scalar_t>(B, 4 * H, I, H, step.d_gates, step.d_gates, w1.data_ptr<scalar_t>(),
                                               w2.data_ptr<scalar_t>(), x_c.data_ptr<scalar_t>(),
                                               h0_c.data_ptr<scalar_t>(), grad);
  return {grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, unwanted(x)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_backward_cpu(
    const Tensor& grad_y, const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& x,
    const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const c10::optional<Tensor>& w_hr, const Tensor& y, const Tensor& reserve,
    const c10::optional<Tensor>& lengths, bool reverse, bool need_grad_x, bool need_grad_weights) {
  const WantedGradients wanted{need_grad_x, need_grad_weights};
  const LayerSizes s = check_lstm_layer_backward_args(grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh,
                                                      w_hr, y, reserve, lengths);
  check_cpu_dtype(x);
  at::AutoDispatchBelowADInplaceOrView guard;
  if (is_single_full_step(s) && small_step::takes(s.batch, 4 * s.hidden_size, s.input_size + s.hidden_size)) {
    return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_layer_backward_cpu", [&] {
      return lstm_single_step_backward<scalar_t>(s, grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, reserve,
                                                 wanted);
    });
  }
  if (stationary::enabled(s)) {
    return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_layer_backward_cpu", [&] {
      auto g = begin_lstm_backward<scalar_t>(s, grad_y, grad_h_n, grad_c_n, x, c0, reserve, lengths.has_value());
      stationary::lstm_backward<scalar_t>(s, reverse, g, w_hh);
      return g.gradients(s, x, h0, w_ih, y, reverse, wanted);
    });
  }
  const RecurrentGemm recurrent(w_hh, /*transposed=*/false, s.batch, s.seq_len);
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_layer_backward_cpu", [&] {
    return run_lstm_layer_backward<scalar_t, scalar_t>(
        s, grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hr, y, reserve, lengths.has_value(), reverse, wanted,
        [&](const LstmBackwardStep<scalar_t, scalar_t>& step) {
          lstm_pointwise_backward<scalar_t>(step, s, reverse);
          recurrent.run(step.d_gates, step.rows, step.dh_prev, /*accumulate=*/false);
        });
  });
}

}  // namespace

void add_lstm_kernels(CpuKernels& kernels) {
  kernels.lstm_layer_forward = &lstm_layer_forward_cpu;
  kernels.lstm_layer_backward = &lstm_layer_backward_cpu;
  kernels.lstm_layer_inference = &lstm_layer_inference_cpu;
}

}  // namespace CPU_CAPABILITY

}  // namespace lstm_fused
