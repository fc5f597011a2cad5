// CUDA kernels of the GRU layer ops (float32, float64, float16, bfloat16; float32 math for the
// half types). Forward, per step, one kernel: the recurrent product h_{t-1} W_hh^T for the
// block's hidden units across the three gates (recurrent_step.cuh), b_hh, and the gate and state
// update. Backward, per step: one pointwise kernel, then cuBLAS for dG_h W_hh.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../cell_math.h"
#include "../layer_loops.h"
#include "recurrent_step.cuh"

namespace lstm_fused {
namespace {

using at::Tensor;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kStepThreads)
    gru_forward_step_kernel(const scalar_t* __restrict__ h_prev,  // [rows, H]
                            const scalar_t* __restrict__ w_hh,    // [3H, H]
                            const scalar_t* __restrict__ b_ih,    // [3H] or null
                            const scalar_t* __restrict__ b_hh,    // [3H] or null (with b_ih)
                            scalar_t* __restrict__ gates,         // [rows, 3H]
                            scalar_t* __restrict__ hidden_n_proj, // [rows, H]
                            scalar_t* __restrict__ h_out,         // [rows, H]
                            scalar_t* __restrict__ h_next,        // [rows, H]
                            int rows, int H) {
  acc_t acc[3];
  block_recurrent_product<3>(h_prev, w_hh, rows, H, H, acc);
  const int row = blockIdx.y * kRowsPerBlock + threadIdx.x / kUnitsPerBlock;
  const int unit = blockIdx.x * kUnitsPerBlock + threadIdx.x % kUnitsPerBlock;
  if (row >= rows || unit >= H) return;
  scalar_t* g = gates + (int64_t)row * 3 * H;
  acc_t r = static_cast<acc_t>(g[unit]);
  acc_t z = static_cast<acc_t>(g[H + unit]);
  acc_t n = static_cast<acc_t>(g[2 * H + unit]);
  if (b_hh != nullptr) {
#pragma unroll
    for (int gate = 0; gate < 3; ++gate) acc[gate] += static_cast<acc_t>(b_hh[gate * H + unit]);
    r += static_cast<acc_t>(b_ih[unit]);
    z += static_cast<acc_t>(b_ih[H + unit]);
    n += static_cast<acc_t>(b_ih[2 * H + unit]);
  }
  const int64_t k = (int64_t)row * H + unit;
  acc_t h;
  gru_cell_forward<acc_t>(r, z, n, acc[0], acc[1], acc[2], static_cast<acc_t>(h_prev[k]), h);
  g[unit] = static_cast<scalar_t>(r);
  g[H + unit] = static_cast<scalar_t>(z);
  g[2 * H + unit] = static_cast<scalar_t>(n);
  hidden_n_proj[k] = static_cast<scalar_t>(acc[2]);
  h_out[k] = static_cast<scalar_t>(h);
  h_next[k] = static_cast<scalar_t>(h);
}

// One thread per (row, unit): see GruBackwardStep for the tensors.
template <typename scalar_t, typename acc_t>
__global__ void gru_backward_pointwise_kernel(const scalar_t* __restrict__ gates,          // [rows, 3H]
                                              const scalar_t* __restrict__ hidden_n_proj,  // [rows, H]
                                              const scalar_t* __restrict__ h_prev,         // [rows, H]
                                              const scalar_t* __restrict__ grad_y,         // [rows, H]
                                              scalar_t* __restrict__ dh,                   // [rows, H]
                                              scalar_t* __restrict__ d_input_gates,        // [rows, 3H]
                                              scalar_t* __restrict__ d_hidden_gates,       // [rows, 3H]
                                              int rows, int H) {
  const int64_t index = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (index >= (int64_t)rows * H) return;
  const int64_t row = index / H, unit = index % H;
  const scalar_t* g = gates + row * 3 * H;
  acc_t r = static_cast<acc_t>(g[unit]), z = static_cast<acc_t>(g[H + unit]);
  acc_t n = static_cast<acc_t>(g[2 * H + unit]);
  acc_t d_hn, dh_prev;
  gru_cell_backward<acc_t>(r, z, n, static_cast<acc_t>(hidden_n_proj[index]), static_cast<acc_t>(h_prev[index]),
                           static_cast<acc_t>(dh[index]) + static_cast<acc_t>(grad_y[index]), d_hn, dh_prev);
  scalar_t* di = d_input_gates + row * 3 * H;
  scalar_t* dhid = d_hidden_gates + row * 3 * H;
  di[unit] = dhid[unit] = static_cast<scalar_t>(r);
  di[H + unit] = dhid[H + unit] = static_cast<scalar_t>(z);
  di[2 * H + unit] = static_cast<scalar_t>(n);
  dhid[2 * H + unit] = static_cast<scalar_t>(d_hn);
  dh[index] = static_cast<scalar_t>(dh_prev);
}

std::tuple<Tensor, Tensor, Tensor> gru_layer_forward_cuda(const Tensor& x, const Tensor& h0, const Tensor& w_ih,
                                                          const Tensor& w_hh, const c10::optional<Tensor>& b_ih,
                                                          const c10::optional<Tensor>& b_hh,
                                                          const c10::optional<Tensor>& lengths, bool reverse) {
  const LayerSizes s = check_gru_layer_forward_args(x, h0, w_ih, w_hh, b_ih, b_hh, lengths);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::AutoDispatchBelowADInplaceOrView guard;
  const Tensor w_hh_c = w_hh.contiguous();
  const int H = static_cast<int>(s.hidden_size);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gru_layer_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    return run_gru_layer_forward<scalar_t>(
        s, x, h0, w_ih, b_ih, b_hh, lengths.has_value(), reverse, [&](const GruForwardStep<scalar_t>& step) {
          gru_forward_step_kernel<scalar_t, acc_t>
              <<<step_grid(H, step.rows), kStepThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
                  step.h_prev, w_hh_c.data_ptr<scalar_t>(), step.input_bias, step.hidden_bias, step.gates,
                  step.hidden_n_proj, step.h_out, step.h_next, static_cast<int>(step.rows), H);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_layer_backward_cuda(
    const Tensor& grad_y, const Tensor& grad_h_n, const Tensor& x, const Tensor& h0, const Tensor& w_ih,
    const Tensor& w_hh, const Tensor& y, const Tensor& reserve, const c10::optional<Tensor>& lengths,
    bool reverse, bool need_grad_x, bool need_grad_weights) {
  const WantedGradients wanted{need_grad_x, need_grad_weights};
  const LayerSizes s = check_gru_layer_backward_args(grad_y, grad_h_n, x, h0, w_ih, w_hh, y, reserve, lengths);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::AutoDispatchBelowADInplaceOrView guard;
  const int H = static_cast<int>(s.hidden_size);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gru_layer_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    return run_gru_layer_backward<scalar_t>(
        s, grad_y, grad_h_n, x, h0, w_ih, y, reserve, lengths.has_value(), reverse, wanted,
        [&](const GruBackwardStep<scalar_t>& step) {
          gru_backward_pointwise_kernel<scalar_t, acc_t>
              <<<pointwise_blocks(step.rows * H), kPointwiseThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
                  step.gates, step.hidden_n_proj, step.h_prev, step.grad_y, step.dh, step.d_input_gates,
                  step.d_hidden_gates, static_cast<int>(step.rows), H);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          Tensor dh = at::from_blob(step.dh, {step.rows, s.hidden_size}, x.options());
          const Tensor d_hidden = at::from_blob(step.d_hidden_gates, {step.rows, 3 * s.hidden_size}, x.options());
          dh.addmm_(d_hidden, w_hh);
        });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lstm_fused, CUDA, m) {
  m.impl("gru_layer_forward", &gru_layer_forward_cuda);
  m.impl("gru_layer_backward", &gru_layer_backward_cuda);
}

}  // namespace lstm_fused
