// CUDA kernels of the GRU layer ops (float32, float64, float16, bfloat16; float32 math for the
// half types). Forward and backward: the persistent kernels (gru_persistent_kernels.cuh: one
// cooperative launch for the whole time loop, on tensor cores for bf16 / fp16 and TF32) when
// their plan fits the device, under the LSTM's rules (persistent_host.h). Otherwise, forward, per
// step, one kernel: the recurrent product h_{t-1} W_hh^T for the block's hidden units across the
// three gates (recurrent_step.cuh), b_hh, and the gate and state update, or for large steps
// (StepForm) cuBLAS for the product and one pointwise kernel; backward, per step: one
// pointwise kernel, then cuBLAS for dG_h W_hh.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../layer_loops.h"
#include "gpu_runtime.h"
#include "gru_kernels.cuh"
#include "gru_persistent_kernels.cuh"
#include "persistent_host.h"

namespace lstm_fused {
namespace {

using at::Tensor;

using GruForwardResult = c10::optional<std::tuple<Tensor, Tensor, Tensor>>;
using GruBackwardResult = c10::optional<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>>;

// The plan of a persistent GRU kernel: N = columns_per_unit * U, K = depth.
template <typename scalar_t, typename acc_t, PersistentProduct kProduct>
PersistentProductPlan gru_plan(const LayerSizes& s, const gpu::DeviceInfo& device, int64_t columns_per_unit,
                               int64_t depth) {
  return plan_persistent_product_layer(s.hidden_size, s.batch, columns_per_unit, depth, sizeof(scalar_t),
                                       sizeof(acc_t), kProduct != PersistentProduct::kFma, planned_sm_count(device),
                                       device.max_shared_optin, requested_k_split());
}

GruForwardResult gru_forward_persistent(const LayerSizes& s, const Tensor& x, const Tensor& h0, const Tensor& w_ih,
                                        const Tensor& w_hh, const c10::optional<Tensor>& b_ih,
                                        const c10::optional<Tensor>& b_hh, bool padded, bool reverse) {
  const PersistentChoice choice = persistent_choice();
  const c10::optional<gpu::DeviceInfo> device = persistent_device(s, x, choice);
  if (!device) return c10::nullopt;
  return run_with_product<GruForwardResult>(x.scalar_type(), *device, choice,
                                            [&](auto scalar, auto acc, auto product) -> GruForwardResult {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    constexpr PersistentProduct kProduct = decltype(product)::value;
    const PersistentProductPlan plan = gru_plan<scalar_t, acc_t, kProduct>(s, *device, 3, s.hidden_size);
    const auto kernel = &gru_persistent_forward_kernel<scalar_t, acc_t, kProduct>;
    if (!plan.usable || !persistent_grid_fits(kernel, x.device(), *device, kPersistentProductThreads, plan.blocks,
                                              plan.shared_bytes)) {
      return c10::nullopt;
    }
    GruForwardBuffers f = begin_gru_forward(s, x, h0, w_ih, b_ih, b_hh, padded);
    const Tensor active_rows = padded ? host_to_device(s.active_rows, x.device()) : Tensor();
    const Tensor w = w_hh.contiguous();
    typename GruForwardPolicy<scalar_t, acc_t>::Args args;
    args.w_hh = w.data_ptr<scalar_t>();
    args.b_ih = s.has_bias ? f.input_bias.data_ptr<scalar_t>() : nullptr;
    args.b_hh = s.has_bias ? f.hidden_bias.data_ptr<scalar_t>() : nullptr;
    args.gates = f.r.gates.data_ptr<scalar_t>();
    args.hidden_n_proj = f.r.hidden_n_proj.data_ptr<scalar_t>();
    args.y = f.y.data_ptr<scalar_t>();
    args.h_even = f.h_buffers[0].data_ptr<scalar_t>();
    args.h_odd = f.h_buffers[1].data_ptr<scalar_t>();
    args.active_rows = active_rows.defined() ? active_rows.data_ptr<int64_t>() : nullptr;
    set_loop_sizes(args, s, reverse, plan);
    if (!launch_product_kernel<kProduct>("gru_persistent_forward_kernel", "gru_persistent_tc_forward_kernel", kernel,
                                         plan, args)) {
      return c10::nullopt;
    }
    return f.outputs(s, reverse);
  });
}

GruBackwardResult gru_backward_persistent(const LayerSizes& s, const Tensor& grad_y, const Tensor& grad_h_n,
                                          const Tensor& x, const Tensor& h0, const Tensor& w_ih, const Tensor& w_hh,
                                          const Tensor& y, const Tensor& reserve, bool padded, bool reverse,
                                          const WantedGradients& wanted) {
  const PersistentChoice choice = persistent_choice();
  const c10::optional<gpu::DeviceInfo> device = persistent_device(s, x, choice);
  if (!device) return c10::nullopt;
  return run_with_product<GruBackwardResult>(x.scalar_type(), *device, choice,
                                             [&](auto scalar, auto acc, auto product) -> GruBackwardResult {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    constexpr PersistentProduct kProduct = decltype(product)::value;
    const PersistentProductPlan plan = gru_plan<scalar_t, acc_t, kProduct>(s, *device, 1, 3 * s.hidden_size);
    const auto kernel = &gru_persistent_backward_kernel<scalar_t, acc_t, kProduct>;
    if (!plan.usable || !persistent_grid_fits(kernel, x.device(), *device, kPersistentProductThreads, plan.blocks,
                                              plan.shared_bytes)) {
      return c10::nullopt;
    }
    GruBackwardBuffers g = begin_gru_backward(s, grad_y, grad_h_n, x, h0, y, reserve, padded, reverse);
    const Tensor active_rows = padded ? host_to_device(s.active_rows, x.device()) : Tensor();
    const Tensor lengths = padded ? host_to_device(s.lengths, x.device()) : Tensor();
    const Tensor w = w_hh.contiguous();
    const Tensor d_hidden = at::empty({2, s.batch, 3 * s.hidden_size}, x.options());
    const Tensor dh_state = grad_h_n.to(c10::CppTypeToScalarType<acc_t>::value, /*non_blocking=*/false,
                                        /*copy=*/true).contiguous();
    typename GruBackwardPolicy<scalar_t, acc_t>::Args args;
    args.w_hh = w.data_ptr<scalar_t>();
    args.gates = g.r.gates.data_ptr<scalar_t>();
    args.hidden_n_proj = g.r.hidden_n_proj.data_ptr<scalar_t>();
    args.y = g.y.data_ptr<scalar_t>();
    args.h0 = g.h0.data_ptr<scalar_t>();
    args.grad_y = g.grad_y.data_ptr<scalar_t>();
    args.d_input_gates = g.d_input_gates.data_ptr<scalar_t>();
    args.d_hidden_even = d_hidden[0].data_ptr<scalar_t>();
    args.d_hidden_odd = d_hidden[1].data_ptr<scalar_t>();
    args.dh_state = dh_state.data_ptr<acc_t>();
    args.grad_h0 = g.dh.data_ptr<scalar_t>();
    args.active_rows = active_rows.defined() ? active_rows.data_ptr<int64_t>() : nullptr;
    args.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
    set_loop_sizes(args, s, reverse, plan);
    if (!launch_product_kernel<kProduct>("gru_persistent_backward_kernel", "gru_persistent_tc_backward_kernel", kernel,
                                         plan, args)) {
      return c10::nullopt;
    }
    return g.gradients(s, x, w_ih, reverse, wanted);
  });
}

std::tuple<Tensor, Tensor, Tensor> gru_layer_forward_cuda(const Tensor& x, const Tensor& h0, const Tensor& w_ih,
                                                          const Tensor& w_hh, const c10::optional<Tensor>& b_ih,
                                                          const c10::optional<Tensor>& b_hh,
                                                          const c10::optional<Tensor>& lengths, bool reverse) {
  const LayerSizes s = check_gru_layer_forward_args(x, h0, w_ih, w_hh, b_ih, b_hh, lengths);
  const gpu::DeviceGuard device_guard(x.device());
  at::AutoDispatchBelowADInplaceOrView guard;
  if (auto whole = gru_forward_persistent(s, x, h0, w_ih, w_hh, b_ih, b_hh, lengths.has_value(), reverse)) {
    return *whole;
  }
  const Tensor w_hh_c = w_hh.contiguous();
  const int H = static_cast<int>(s.hidden_size);
  // The large-step path's h_{t-1} W_hh^T (StepForm), made once for the layer when a step may want it.
  const StepForm form = step_form();
  const Tensor hidden_proj =
      form.gemm(s.batch, s.hidden_size) ? at::empty({s.batch, 3 * s.hidden_size}, x.options()) : Tensor();
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gru_layer_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    return run_gru_layer_forward<scalar_t>(
        s, x, h0, w_ih, b_ih, b_hh, lengths.has_value(), reverse, [&](const GruForwardStep<scalar_t>& step) {
          if (hidden_proj.defined() && form.gemm(step.rows, H)) {
            Tensor hp = hidden_proj.narrow(0, 0, step.rows);
            at::mm_out(hp, at::from_blob(const_cast<scalar_t*>(step.h_prev), {step.rows, s.hidden_size}, x.options()),
                       w_hh_c.t());
            gpu::launch("gru_forward_pointwise_kernel", &gru_forward_pointwise_kernel<scalar_t, acc_t>,
                        pointwise_blocks(step.rows * s.hidden_size), kPointwiseThreads, 0, step.h_prev,
                        hp.data_ptr<scalar_t>(), step.input_bias, step.hidden_bias, step.gates, step.hidden_n_proj,
                        step.h_out, step.h_next, static_cast<int>(step.rows), H);
            return;
          }
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
  if (auto whole = gru_backward_persistent(s, grad_y, grad_h_n, x, h0, w_ih, w_hh, y, reserve, lengths.has_value(),
                                           reverse, wanted)) {
    return *whole;
  }
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
