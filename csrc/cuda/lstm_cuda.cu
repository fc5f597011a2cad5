// CUDA kernels of the LSTM layer ops: float32, float64, float16 and bfloat16, with float32
// accumulation and a float32 running cell state for the half types.
//
// Forward: the persistent kernel (lstm_persistent.cu) when the plan allows it; otherwise per
// step, one kernel does the recurrent product h_{t-1} W_hh^T, the biases, the
// activations and the cell update together: each block owns a slice of hidden units across all four gates and a
// tile of batch rows, so the update needs nothing from other blocks. The input projection of all
// steps is one cuBLAS GEMM before the loop (layer_loops.h).
// Backward, per step: one pointwise kernel gives the gate gradients, and cuBLAS the product
// dG_t W_hh that carries the gradient to h_{t-1}; the weight gradients are GEMMs after the loop.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../cell_math.h"
#include "../layer_loops.h"
#include "lstm_persistent.h"
#include "lstm_unit.cuh"
#include "recurrent_step.cuh"

namespace lstm_fused {
namespace {

using at::Tensor;

// One forward step over `rows` rows. Thread (row, unit) accumulates the four gate products of
// its hidden unit, adds them to the input projection already in `gates`, and updates its cell.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kStepThreads)
    lstm_forward_step_kernel(const scalar_t* __restrict__ h_prev,  // [rows, P]
                             const scalar_t* __restrict__ w_hh,    // [4H, P]
                             scalar_t* __restrict__ gates,         // [rows, 4H]
                             const scalar_t* __restrict__ bias,    // [4H] or null
                             acc_t* __restrict__ c_state,          // [rows, H]
                             scalar_t* __restrict__ cells,         // [rows, H]
                             scalar_t* __restrict__ h_out,         // [rows, H]
                             scalar_t* __restrict__ h_next,        // [rows, H] or null
                             int rows, int H, int P) {
  acc_t acc[4];
  block_recurrent_product<4>(h_prev, w_hh, rows, H, P, acc);
  const int row = blockIdx.y * kRowsPerBlock + threadIdx.x / kUnitsPerBlock;
  const int unit = blockIdx.x * kUnitsPerBlock + threadIdx.x % kUnitsPerBlock;
  if (row >= rows || unit >= H) return;
  const int64_t k = (int64_t)row * H + unit;
  lstm_finish_unit(acc, gates + (int64_t)row * 4 * H, bias, unit, H, c_state + k, cells + k, h_out + k,
                   h_next == nullptr ? nullptr : h_next + k);
}

// One backward step's pointwise work over `rows` rows of time step t: one thread per (row, unit).
template <typename scalar_t, typename acc_t>
__global__ void lstm_backward_pointwise_kernel(const scalar_t* __restrict__ gates,   // [rows, 4H]
                                               scalar_t* __restrict__ d_gates,       // [rows, 4H]
                                               const scalar_t* __restrict__ cells,   // [T, B, H]
                                               const scalar_t* __restrict__ c0,      // [B, H]
                                               const scalar_t* __restrict__ d_cell_out,  // [rows, H]
                                               const scalar_t* __restrict__ grad_y,  // [rows, H] or null
                                               acc_t* __restrict__ dc_state,         // [rows, H]
                                               const int64_t* __restrict__ lengths,  // [B]
                                               int64_t t, int rows, int B, int H, bool reverse) {
  const int64_t index = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (index >= (int64_t)rows * H) return;
  const int row = static_cast<int>(index / H), unit = static_cast<int>(index % H);
  const scalar_t* g = gates + (int64_t)row * 4 * H;
  const int64_t prev = previous_step(t, lengths[row], reverse);
  const scalar_t c_prev = prev < 0 ? c0[index] : cells[(prev * B + row) * H + unit];
  acc_t i = static_cast<acc_t>(g[unit]), f = static_cast<acc_t>(g[H + unit]);
  acc_t gg = static_cast<acc_t>(g[2 * H + unit]), o = static_cast<acc_t>(g[3 * H + unit]);
  acc_t dc = dc_state[index];
  acc_t dh = static_cast<acc_t>(d_cell_out[index]);
  if (grad_y != nullptr) dh += static_cast<acc_t>(grad_y[index]);
  lstm_cell_backward<acc_t>(i, f, gg, o, static_cast<acc_t>(c_prev),
                            static_cast<acc_t>(cells[(t * B + row) * H + unit]), dh, dc);
  scalar_t* dg = d_gates + (int64_t)row * 4 * H;
  dg[unit] = static_cast<scalar_t>(i);
  dg[H + unit] = static_cast<scalar_t>(f);
  dg[2 * H + unit] = static_cast<scalar_t>(gg);
  dg[3 * H + unit] = static_cast<scalar_t>(o);
  dc_state[index] = dc;
}

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
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::AutoDispatchBelowADInplaceOrView guard;
  // The whole sequence in one launch when the weights fit on chip (persistent_plan.h).
  if (auto whole = lstm_layer_forward_persistent(s, x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths.has_value(), reverse)) {
    return *whole;
  }
  const Tensor w_hh_c = w_hh.contiguous();
  const int H = static_cast<int>(s.hidden_size), P = static_cast<int>(s.output_size);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lstm_layer_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    return run_lstm_layer_forward<scalar_t, acc_t>(
        s, x, h0, c0, w_ih, b_ih, b_hh, w_hr, lengths.has_value(), reverse,
        [&](const LstmForwardStep<scalar_t, acc_t>& step) {
          lstm_forward_step_kernel<scalar_t, acc_t>
              <<<step_grid(H, step.rows), kStepThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
                  step.h_prev, w_hh_c.data_ptr<scalar_t>(), step.gates, step.bias, step.c_state, step.cells,
                  step.h_out, step.h_next, static_cast<int>(step.rows), H, P);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::AutoDispatchBelowADInplaceOrView guard;
  const int B = static_cast<int>(s.batch), H = static_cast<int>(s.hidden_size);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lstm_layer_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    return run_lstm_layer_backward<scalar_t, acc_t>(
        s, grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hr, y, reserve, lengths.has_value(), reverse, wanted,
        [&](const LstmBackwardStep<scalar_t, acc_t>& step) {
          lstm_backward_pointwise_kernel<scalar_t, acc_t>
              <<<pointwise_blocks(step.rows * s.hidden_size), kPointwiseThreads, 0,
                 c10::cuda::getCurrentCUDAStream()>>>(
                  step.gates, step.d_gates, step.cells, step.c0, step.d_cell_out, step.grad_y, step.dc_state,
                  step.lengths, step.t, static_cast<int>(step.rows), B, H, reverse);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          Tensor dh_prev = rows_view(step.dh_prev, step.rows, s.output_size, x);
          at::mm_out(dh_prev, rows_view(step.d_gates, step.rows, 4 * s.hidden_size, x), w_hh);
        });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lstm_fused, CUDA, m) {
  m.impl("lstm_layer_forward", &lstm_layer_forward_cuda);
  m.impl("lstm_layer_backward", &lstm_layer_backward_cuda);
}

}  // namespace lstm_fused
