// CUDA kernels of the LSTM layer ops: float32, float64, float16 and bfloat16, with float32
// accumulation and a float32 running cell state for the half types.
//
// Forward: the persistent kernel (lstm_persistent.cu) when the plan allows it; otherwise per
// step, one kernel does the recurrent product h_{t-1} W_hh^T, the biases, the
// activations and the cell update together: each block owns a slice of hidden units across all four gates and a
// tile of batch rows, so the update needs nothing from other blocks. Large steps (StepForm,
// recurrent_step.cuh) take cuBLAS for the product, on tensor cores where the dtype allows, and
// one pointwise kernel for the rest. The input projection of all
// steps is one cuBLAS GEMM before the loop (layer_loops.h).
// Backward: the persistent kernel (lstm_persistent.cu) when the plan allows it; otherwise per
// step, one pointwise kernel gives the gate gradients, and cuBLAS the product dG_t W_hh that
// carries the gradient to h_{t-1}. The weight gradients are GEMMs after the loop either way.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../layer_loops.h"
#include "gpu_runtime.h"
#include "lstm_kernels.cuh"
#include "lstm_persistent.h"

namespace lstm_fused {
namespace {

using at::Tensor;

// A [rows, cols] tensor over device memory the step structs point into.
template <typename scalar_t>
Tensor rows_view(const scalar_t* data, int64_t rows, int64_t cols, const Tensor& like) {
  return at::from_blob(const_cast<scalar_t*>(data), {rows, cols}, like.options());
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_layer_forward_cuda(
    const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const c10::optional<Tensor>& b_ih, const c10::optional<Tensor>& b_hh,
    const c10::optional<Tensor>& w_hr, const c10::optional<Tensor>& lengths, bool reverse) {
  const LayerSizes s = check_lstm_layer_forward_args(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths);
  const gpu::DeviceGuard device_guard(x.device());
  at::AutoDispatchBelowADInplaceOrView guard;
  // The whole sequence in one launch when the weights fit on chip (persistent_plan.h).
  if (auto whole = lstm_layer_forward_persistent(s, x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths.has_value(), reverse)) {
    return *whole;
  }
  const Tensor w_hh_c = w_hh.contiguous();
  const int H = static_cast<int>(s.hidden_size), P = static_cast<int>(s.output_size);
  const StepForm form = step_form();
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lstm_layer_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    return run_lstm_layer_forward<scalar_t, acc_t>(
        s, x, h0, c0, w_ih, b_ih, b_hh, w_hr, lengths.has_value(), reverse,
        [&](const LstmForwardStep<scalar_t, acc_t>& step) {
          if (form.gemm(step.rows, H)) {
            Tensor gates = rows_view(step.gates, step.rows, 4 * s.hidden_size, x);
            gates.addmm_(rows_view(step.h_prev, step.rows, s.output_size, x), w_hh_c.t());
            gpu::launch("lstm_forward_pointwise_kernel", &lstm_forward_pointwise_kernel<scalar_t, acc_t>,
                        pointwise_blocks(step.rows * s.hidden_size), kPointwiseThreads, 0, step.gates, step.bias,
                        step.c_state, step.cells, step.h_out, step.h_next, static_cast<int>(step.rows), H);
            return;
          }
          gpu::launch("lstm_forward_step_kernel", &lstm_forward_step_kernel<scalar_t, acc_t>,
                      step_grid(H, step.rows), kStepThreads, 0, step.h_prev, w_hh_c.data_ptr<scalar_t>(),
                      step.gates, step.bias, step.c_state, step.cells, step.h_out, step.h_next,
                      static_cast<int>(step.rows), H, P);
        });
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_backward_cuda(
    const Tensor& grad_y, const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& x,
    const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const c10::optional<Tensor>& w_hr, const Tensor& y, const Tensor& reserve,
    const c10::optional<Tensor>& lengths, bool reverse, bool need_grad_x, bool need_grad_weights) {
  const WantedGradients wanted{need_grad_x, need_grad_weights};
  const LayerSizes s = check_lstm_layer_backward_args(grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih,
                                                      w_hh, w_hr, y, reserve, lengths);
  const gpu::DeviceGuard device_guard(x.device());
  at::AutoDispatchBelowADInplaceOrView guard;
  // The whole backward time loop in one launch when the weights fit on chip (persistent_plan.h).
  if (auto whole = lstm_layer_backward_persistent(s, grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, y, reserve,
                                                  lengths.has_value(), reverse, need_grad_x, need_grad_weights)) {
    return *whole;
  }
  const int B = static_cast<int>(s.batch), H = static_cast<int>(s.hidden_size);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lstm_layer_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    return run_lstm_layer_backward<scalar_t, acc_t>(
        s, grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hr, y, reserve, lengths.has_value(), reverse, wanted,
        [&](const LstmBackwardStep<scalar_t, acc_t>& step) {
          gpu::launch("lstm_backward_pointwise_kernel", &lstm_backward_pointwise_kernel<scalar_t, acc_t>,
                      pointwise_blocks(step.rows * s.hidden_size), kPointwiseThreads, 0, step.gates,
                      step.d_gates, step.cells, step.c0, step.d_cell_out, step.grad_y, step.dc_state,
                      step.lengths, step.t, s.seq_len, static_cast<int>(step.rows), B, H, reverse);
          Tensor dh_prev = rows_view(step.dh_prev, step.rows, s.output_size, x);
          at::mm_out(dh_prev, rows_view(step.d_gates, step.rows, 4 * s.hidden_size, x), w_hh);
        });
  });
}

}  // namespace

LSTM_FUSED_GPU_KERNELS(m) {
  m.impl("lstm_layer_forward", &lstm_layer_forward_cuda);
  m.impl("lstm_layer_backward", &lstm_layer_backward_cuda);
}

}  // namespace lstm_fused
