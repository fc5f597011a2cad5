// CUDA kernels of the GRU layer ops (float32, float64, float16, bfloat16; float32 math for the
// half types). Forward, per step, one kernel: the recurrent product h_{t-1} W_hh^T for the
// block's hidden units across the three gates (recurrent_step.cuh), b_hh, and the gate and state
// update. Backward, per step: one pointwise kernel, then cuBLAS for dG_h W_hh.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../layer_loops.h"
#include "gpu_runtime.h"
#include "gru_kernels.cuh"

namespace lstm_fused {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor> gru_layer_forward_cuda(const Tensor& x, const Tensor& h0, const Tensor& w_ih,
                                                          const Tensor& w_hh, const c10::optional<Tensor>& b_ih,
                                                          const c10::optional<Tensor>& b_hh,
                                                          const c10::optional<Tensor>& lengths, bool reverse) {
  const LayerSizes s = check_gru_layer_forward_args(x, h0, w_ih, w_hh, b_ih, b_hh, lengths);
  const gpu::DeviceGuard device_guard(x.device());
  at::AutoDispatchBelowADInplaceOrView guard;
  const Tensor w_hh_c = w_hh.contiguous();
  const int H = static_cast<int>(s.hidden_size);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gru_layer_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    return run_gru_layer_forward<scalar_t>(
        s, x, h0, w_ih, b_ih, b_hh, lengths.has_value(), reverse, [&](const GruForwardStep<scalar_t>& step) {
          gpu::launch("gru_forward_step_kernel", &gru_forward_step_kernel<scalar_t, acc_t>, step_grid(H, step.rows),
                      kStepThreads, 0, step.h_prev, w_hh_c.data_ptr<scalar_t>(), step.input_bias,
                      step.hidden_bias, step.gates, step.hidden_n_proj, step.h_out, step.h_next,
                      static_cast<int>(step.rows), H);
        });
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_layer_backward_cuda(
    const Tensor& grad_y, const Tensor& grad_h_n, const Tensor& x, const Tensor& h0, const Tensor& w_ih,
    const Tensor& w_hh, const Tensor& y, const Tensor& reserve, const c10::optional<Tensor>& lengths,
    bool reverse, bool need_grad_x, bool need_grad_weights) {
  const WantedGradients wanted{need_grad_x, need_grad_weights};
  const LayerSizes s = check_gru_layer_backward_args(grad_y, grad_h_n, x, h0, w_ih, w_hh, y, reserve, lengths);
  const gpu::DeviceGuard device_guard(x.device());
  at::AutoDispatchBelowADInplaceOrView guard;
  const int H = static_cast<int>(s.hidden_size);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gru_layer_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    return run_gru_layer_backward<scalar_t>(
        s, grad_y, grad_h_n, x, h0, w_ih, y, reserve, lengths.has_value(), reverse, wanted,
        [&](const GruBackwardStep<scalar_t>& step) {
          gpu::launch("gru_backward_pointwise_kernel", &gru_backward_pointwise_kernel<scalar_t, acc_t>,
                      pointwise_blocks(step.rows * H), kPointwiseThreads, 0, step.gates, step.hidden_n_proj,
                      step.h_prev, step.grad_y, step.dh, step.d_input_gates, step.d_hidden_gates,
                      static_cast<int>(step.rows), H);
          Tensor dh = at::from_blob(step.dh, {step.rows, s.hidden_size}, x.options());
          const Tensor d_hidden = at::from_blob(step.d_hidden_gates, {step.rows, 3 * s.hidden_size}, x.options());
          dh.addmm_(d_hidden, w_hh);
        });
  });
}

}  // namespace

LSTM_FUSED_GPU_KERNELS(m) {
  m.impl("gru_layer_forward", &gru_layer_forward_cuda);
  m.impl("gru_layer_backward", &gru_layer_backward_cuda);
}

}  // namespace lstm_fused
