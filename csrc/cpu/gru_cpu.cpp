// CPU kernels of the GRU layer ops (float32, float64): per step the recurrent GEMM into a scratch
// row block (W_hh packed once per call), then one vectorised pass (cell_math.h) for the biases,
// the gates and the new state; backward in reverse time with the weight and input gradients as
// GEMMs after the loop (layer_loops.h). Inference takes the weight-stationary loop of
// gru_stationary.h where its team needs no barrier (small and mid-sized steps).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "../cell_math.h"
#include "../layer_loops.h"
#include "cpu_common.h"
#include "cpu_kernels.h"
#include "gru_stationary.h"
#include "recurrent_gemm.h"
#include "small_step.h"

namespace lstm_fused {
namespace CPU_CAPABILITY {  // one copy per SIMD level: cpu_kernels.h
namespace {

using at::Tensor;

// hidden_proj [rows, 3H]: h_{t-1} W_hh^T for this step.
template <typename scalar_t>
void gru_pointwise_forward(const GruForwardStep<scalar_t>& step, const scalar_t* hidden_proj, int64_t H) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const scalar_t* b_ih = step.input_bias;
  const scalar_t* b_hh = step.hidden_bias;
  at::parallel_for(0, step.rows, row_grain(3 * H), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      scalar_t* g = step.gates + b * 3 * H;
      const scalar_t* hp = hidden_proj + b * 3 * H;
      for_each_vector<scalar_t>(H, [&](int64_t j, int n) {
        const int64_t k = b * H + j;
        Vec r = Vec::loadu(g + j, n), z = Vec::loadu(g + H + j, n), nn = Vec::loadu(g + 2 * H + j, n);
        Vec hr = Vec::loadu(hp + j, n), hz = Vec::loadu(hp + H + j, n), hn = Vec::loadu(hp + 2 * H + j, n);
        add_gru_biases(b_ih, b_hh, j, H, n, r, z, nn, hr, hz, hn);
        Vec h;
        gru_cell_forward<Vec, CellActivations<scalar_t>>(r, z, nn, hr, hz, hn, Vec::loadu(step.h_prev + k, n), h);
        r.store(g + j, n);
        z.store(g + H + j, n);
        nn.store(g + 2 * H + j, n);
        hn.store(step.hidden_n_proj + k, n);
        h.store(step.h_out + k, n);
        h.store(step.h_next + k, n);
      });
    }
  });
}

template <typename scalar_t>
void gru_pointwise_backward(const GruBackwardStep<scalar_t>& step, int64_t H) {
  using Vec = at::vec::Vectorized<scalar_t>;
  at::parallel_for(0, step.rows, row_grain(3 * H), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* g = step.gates + b * 3 * H;
      scalar_t* di = step.d_input_gates + b * 3 * H;
      scalar_t* dhid = step.d_hidden_gates + b * 3 * H;
      for_each_vector<scalar_t>(H, [&](int64_t j, int n) {
        const int64_t k = b * H + j;
        Vec r = Vec::loadu(g + j, n), z = Vec::loadu(g + H + j, n), nn = Vec::loadu(g + 2 * H + j, n);
        const Vec dh = Vec::loadu(step.dh + k, n) + Vec::loadu(step.grad_y + k, n);
        Vec d_hn, dh_prev;
        gru_cell_backward<Vec, CellActivations<scalar_t>>(r, z, nn, Vec::loadu(step.hidden_n_proj + k, n),
                                                         Vec::loadu(step.h_prev + k, n), dh, d_hn, dh_prev);
        r.store(di + j, n);
        z.store(di + H + j, n);
        nn.store(di + 2 * H + j, n);
        r.store(dhid + j, n);
        z.store(dhid + H + j, n);
        d_hn.store(dhid + 2 * H + j, n);
        dh_prev.store(step.dh + k, n);
      });
    }
  });
}

// A GRUCell call (is_single_full_step): at a small batch small_step.h's products and cell update
// in one pass; otherwise both products straight into their buffers and one pointwise pass. The
// reserve (kept for training) is [gates | h W_hn^T + b_hn] of the one step.
template <typename scalar_t>
std::tuple<Tensor, Tensor, Tensor> gru_single_step(const LayerSizes& s, const Tensor& x, const Tensor& h0,
                                                   const Tensor& w_ih, const Tensor& w_hh,
                                                   const c10::optional<Tensor>& b_ih,
                                                   const c10::optional<Tensor>& b_hh, bool keep_reserve) {
  const int64_t B = s.batch, H = s.hidden_size;
  const auto options = x.options();
  const bool small = small_step::takes(B, 3 * H, s.input_size + H);
  Tensor y = at::empty({1, B, H}, options), h_n = at::empty({B, H}, options);
  const Tensor x_c = x.contiguous(), h0_c = h0.contiguous();
  const Tensor input_bias = s.has_bias ? b_ih->contiguous() : Tensor();
  const Tensor hidden_bias = s.has_bias ? b_hh->contiguous() : Tensor();
  if (small) {
    Tensor reserve = keep_reserve ? at::empty({gru_reserve_numel(s)}, options) : Tensor();
    const Tensor w1 = w_ih.contiguous(), w2 = w_hh.contiguous();
    small_step::GruStepOut<scalar_t> out;
    out.h = y.data_ptr<scalar_t>();
    out.h_n = h_n.data_ptr<scalar_t>();
    if (keep_reserve) {
      out.gates = reserve.data_ptr<scalar_t>();
      out.hidden_n = out.gates + B * 3 * H;
    }
    small_step::gru_step<scalar_t>(B, s.input_size, H, x_c.data_ptr<scalar_t>(), h0_c.data_ptr<scalar_t>(),
                                   w1.data_ptr<scalar_t>(), w2.data_ptr<scalar_t>(),
                                   s.has_bias ? input_bias.data_ptr<scalar_t>() : nullptr,
                                   s.has_bias ? hidden_bias.data_ptr<scalar_t>() : nullptr, out);
    return {y, h_n, reserve};
  }
  Tensor reserve = at::empty({gru_reserve_numel(s)}, options);
  Tensor hidden_proj = at::empty({B, 3 * H}, options);
  scalar_t* gates = reserve.data_ptr<scalar_t>();
  scalar_t* hidden_proj_ptr = hidden_proj.data_ptr<scalar_t>();
  RecurrentGemm(w_ih, /*transposed=*/true, B, 1).run(x_c.data_ptr<scalar_t>(), B, gates, /*accumulate=*/false);
  RecurrentGemm(w_hh, /*transposed=*/true, B, 1).run(h0_c.data_ptr<scalar_t>(), B, hidden_proj_ptr, false);
  GruForwardStep<scalar_t> step;
  step.rows = B;
  step.h_prev = h0_c.data_ptr<scalar_t>();
  step.gates = gates;
  step.input_bias = s.has_bias ? input_bias.data_ptr<scalar_t>() : nullptr;
  step.hidden_bias = s.has_bias ? hidden_bias.data_ptr<scalar_t>() : nullptr;
  step.hidden_n_proj = gates + B * 3 * H;
  step.h_out = y.data_ptr<scalar_t>();
  step.h_next = h_n.data_ptr<scalar_t>();
  gru_pointwise_forward<scalar_t>(step, hidden_proj_ptr, H);
  return {y, h_n, keep_reserve ? reserve : Tensor()};
}

std::tuple<Tensor, Tensor, Tensor> gru_layer_forward_cpu(const Tensor& x, const Tensor& h0, const Tensor& w_ih,
                                                         const Tensor& w_hh, const c10::optional<Tensor>& b_ih,
                                                         const c10::optional<Tensor>& b_hh,
                                                         const c10::optional<Tensor>& lengths, bool reverse) {
  const LayerSizes s = check_gru_layer_forward_args(x, h0, w_ih, w_hh, b_ih, b_hh, lengths);
  check_cpu_dtype(x);
  at::AutoDispatchBelowADInplaceOrView guard;
  if (is_single_full_step(s)) {
    return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gru_layer_forward_cpu", [&] {
      return gru_single_step<scalar_t>(s, x, h0, w_ih, w_hh, b_ih, b_hh, /*keep_reserve=*/true);
    });
  }
  const RecurrentGemm recurrent(w_hh, /*transposed=*/true, s.batch, s.seq_len);
  Tensor hidden_proj = at::empty({s.batch, 3 * s.hidden_size}, x.options());
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gru_layer_forward_cpu", [&] {
    scalar_t* hidden_proj_ptr = hidden_proj.data_ptr<scalar_t>();
    return run_gru_layer_forward<scalar_t>(
        s, x, h0, w_ih, b_ih, b_hh, lengths.has_value(), reverse, [&](const GruForwardStep<scalar_t>& step) {
          recurrent.run(step.h_prev, step.rows, hidden_proj_ptr, /*accumulate=*/false);
          gru_pointwise_forward<scalar_t>(step, hidden_proj_ptr, s.hidden_size);
        });
  });
}

// The forward without a reserve: the input projection a segment of steps at a time into one
// reused buffer (for_each_projected_segment); the activated gates and h W_hn^T + b_hn go to
// scratch.
std::tuple<Tensor, Tensor> gru_layer_inference_cpu(const Tensor& x, const Tensor& h0, const Tensor& w_ih,
                                                   const Tensor& w_hh, const c10::optional<Tensor>& b_ih,
                                                   const c10::optional<Tensor>& b_hh,
                                                   const c10::optional<Tensor>& lengths, bool reverse) {
  const LayerSizes s = check_gru_layer_forward_args(x, h0, w_ih, w_hh, b_ih, b_hh, lengths);
  check_cpu_dtype(x);
  at::AutoDispatchBelowADInplaceOrView guard;
  if (is_single_full_step(s)) {
    return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gru_layer_inference_cpu", [&] {
      auto [y, h_n, none] = gru_single_step<scalar_t>(s, x, h0, w_ih, w_hh, b_ih, b_hh, /*keep_reserve=*/false);
      return std::make_tuple(y, h_n);
    });
  }
  c10::optional<std::tuple<Tensor, Tensor>> by_stationary_loop;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gru_layer_inference_cpu", [&] {
    const stationary::TeamPlan plan = stationary::gru_plan<scalar_t>(s);
    if (stationary::gru_enabled(s, plan)) {
      by_stationary_loop =
          stationary::gru_inference<scalar_t>(s, plan, reverse, x, h0, w_ih, w_hh, b_ih, b_hh, lengths.has_value());
    }
  });
  if (by_stationary_loop) return *by_stationary_loop;
  const int64_t T = s.seq_len, B = s.batch, H = s.hidden_size;
  const RecurrentGemm recurrent(w_hh, /*transposed=*/true, B, s.seq_len);
  Tensor y = layer_buffer({T, B, H}, x.options(), lengths.has_value());
  Tensor h_buffers[2];
  init_hidden_buffers(h_buffers, h0);
  const Tensor input_bias = s.has_bias ? b_ih->contiguous() : Tensor();
  const Tensor hidden_bias = s.has_bias ? b_hh->contiguous() : Tensor();
  Tensor hidden_proj = at::empty({B, 3 * H}, x.options());
  Tensor hidden_n_proj = at::empty({B, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gru_layer_inference_cpu", [&] {
    scalar_t* h_ptr[2] = {h_buffers[0].data_ptr<scalar_t>(), h_buffers[1].data_ptr<scalar_t>()};
    scalar_t* hidden_proj_ptr = hidden_proj.data_ptr<scalar_t>();
    GruForwardStep<scalar_t> fs;
    fs.input_bias = s.has_bias ? input_bias.data_ptr<scalar_t>() : nullptr;
    fs.hidden_bias = s.has_bias ? hidden_bias.data_ptr<scalar_t>() : nullptr;
    fs.hidden_n_proj = hidden_n_proj.data_ptr<scalar_t>();
    for_each_projected_segment(s, x, w_ih, reverse, [&](int64_t first, int64_t end, int64_t t_low, const Tensor& proj) {
      scalar_t* projection = proj.data_ptr<scalar_t>();
      for_each_active_step(s, reverse, [&](int64_t index, int64_t t, int64_t rows) {
        fs.t = t;
        fs.rows = rows;
        fs.h_prev = h_ptr[index % 2];
        fs.gates = projection + (t - t_low) * B * 3 * H;
        fs.h_out = y.data_ptr<scalar_t>() + t * B * H;
        fs.h_next = h_ptr[(index + 1) % 2];
        recurrent.run(fs.h_prev, fs.rows, hidden_proj_ptr, /*accumulate=*/false);
        gru_pointwise_forward<scalar_t>(fs, hidden_proj_ptr, H);
      }, first, end);
    });
  });
  return {y, final_hidden(h_buffers, s, reverse)};
}

// The backward of gru_single_step at a small batch (small_step.h), as the LSTM's.
template <typename scalar_t>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_single_step_backward(
    const LayerSizes& s, const Tensor& grad_y, const Tensor& grad_h_n, const Tensor& x, const Tensor& h0,
    const Tensor& w_ih, const Tensor& w_hh, const Tensor& reserve, const WantedGradients& wanted) {
  const int64_t B = s.batch, H = s.hidden_size, I = s.input_size;
  const auto options = x.options();
  const Tensor gy = grad_y.contiguous();
  const Tensor x_c = x.contiguous(), h0_c = h0.contiguous(), r = reserve.contiguous();
  const Tensor w1 = w_ih.contiguous(), w2 = w_hh.contiguous();
  Tensor d_gates = at::empty({2, B, 3 * H}, options);  // the input side's, the hidden side's
  Tensor grad_x = wanted.x ? at::empty({1, B, I}, options) : unwanted(x);
  Tensor grad_h0 = grad_h_n.clone(at::MemoryFormat::Contiguous);  // dh in, h0's gradient out
  Tensor grad_w_ih = wanted.weights ? at::empty({3 * H, I}, options) : unwanted(x);
  Tensor grad_w_hh = wanted.weights ? at::empty({3 * H, H}, options) : unwanted(x);
  Tensor grad_b_ih = wanted.weights ? at::empty({3 * H}, options) : unwanted(x);
  Tensor grad_b_hh = wanted.weights ? at::empty({3 * H}, options) : unwanted(x);
  GruBackwardStep<scalar_t> step;
  step.rows = B;
  step.gates = r.data_ptr<scalar_t>();
  step.hidden_n_proj = step.gates + B * 3 * H;
  step.h_prev = h0_c.data_ptr<scalar_t>();
  step.grad_y = gy.data_ptr<scalar_t>();
  step.dh = grad_h0.data_ptr<scalar_t>();
  step.d_input_gates = d_gates.data_ptr<scalar_t>();
  step.d_hidden_gates = step.d_input_gates + B * 3 * H;
  gru_pointwise_backward<scalar_t>(step, H);
  small_step::StepGradients<scalar_t> grad;
  grad.x = wanted.x ? grad_x.data_ptr<scalar_t>() : nullptr;
  grad.h0 = grad_h0.data_ptr<scalar_t>();  // z * dh from the pointwise pass; W_hh's part is added
  if (wanted.weights) {
    grad.w_ih = grad_w_ih.data_ptr<scalar_t>();
    grad.w_hh = grad_w_hh.data_ptr<scalar_t>();
    grad.b_ih = grad_b_ih.data_ptr<scalar_t>();
    grad.b_hh = grad_b_hh.data_ptr<scalar_t>();
  }
  small_step::step_backward_products<scalar_t>(B, 3 * H, I, H, step.d_input_gates, step.d_hidden_gates,
                                               w1.data_ptr<scalar_t>(), w2.data_ptr<scalar_t>(),
                                               x_c.data_ptr<scalar_t>(), h0_c.data_ptr<scalar_t>(), grad);
  return {grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_layer_backward_cpu(
    const Tensor& grad_y, const Tensor& grad_h_n, const Tensor& x, const Tensor& h0, const Tensor& w_ih,
    const Tensor& w_hh, const Tensor& y, const Tensor& reserve, const c10::optional<Tensor>& lengths,
    bool reverse, bool need_grad_x, bool need_grad_weights) {
  const WantedGradients wanted{need_grad_x, need_grad_weights};
  const LayerSizes s = check_gru_layer_backward_args(grad_y, grad_h_n, x, h0, w_ih, w_hh, y, reserve, lengths);
  check_cpu_dtype(x);
  at::AutoDispatchBelowADInplaceOrView guard;
  if (is_single_full_step(s) && small_step::takes(s.batch, 3 * s.hidden_size, s.input_size + s.hidden_size)) {
    return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gru_layer_backward_cpu", [&] {
      return gru_single_step_backward<scalar_t>(s, grad_y, grad_h_n, x, h0, w_ih, w_hh, reserve, wanted);
    });
  }
  const RecurrentGemm recurrent(w_hh, /*transposed=*/false, s.batch, s.seq_len);
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gru_layer_backward_cpu", [&] {
    return run_gru_layer_backward<scalar_t>(
        s, grad_y, grad_h_n, x, h0, w_ih, y, reserve, lengths.has_value(), reverse, wanted,
        [&](const GruBackwardStep<scalar_t>& step) {
          gru_pointwise_backward<scalar_t>(step, s.hidden_size);
          recurrent.run(step.d_hidden_gates, step.rows, step.dh, /*accumulate=*/true);
        });
  });
}

}  // namespace

void add_gru_kernels(CpuKernels& kernels) {
  kernels.gru_layer_forward = &gru_layer_forward_cpu;
  kernels.gru_layer_backward = &gru_layer_backward_cpu;
  kernels.gru_layer_inference = &gru_layer_inference_cpu;
}

}  // namespace CPU_CAPABILITY

}  // namespace lstm_fused
