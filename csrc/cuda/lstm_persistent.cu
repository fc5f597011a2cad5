// Host side of the persistent LSTM kernels: whether a plan (persistent_plan.h) and the device
// allow one, and its single cooperative launch. Forward: the tensor-core kernel
// (lstm_persistent_tc_kernel.cuh) for bfloat16 and float16, and for float32 when TF32 is allowed
// (torch.backends.cuda.matmul.fp32_precision = "tf32", or the legacy allow_tf32); the FMA one
// (lstm_persistent_kernel.cuh, a policy of persistent_recurrent.cuh) otherwise. Backward
// (lstm_persistent_backward_kernel.cuh): the whole backward time loop the same way, on tensor
// cores under the same dtype rule, leaving the gradient GEMMs to layer_loops.h.
// LSTM_FUSED_PERSISTENT=0 turns them off, =fma keeps the FMA products only (persistent_host.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <type_traits>


#include "../layer_loops.h"
#include "../persistent_plan.h"
#include "gpu_runtime.h"
#include "lstm_persistent.h"
#include "persistent_host.h"
#include "lstm_persistent_backward_kernel.cuh"
#include "lstm_persistent_kernel.cuh"
#include "lstm_persistent_tc_kernel.cuh"

namespace lstm_fused {
namespace {

using at::Tensor;

// The arguments both persistent kernels take, pointing into the forward's buffers. active_rows is
// undefined without lengths (the kernels then advance every row).
template <typename scalar_t, typename acc_t, typename Args>
void fill_persistent_args(Args& args, const LayerSizes& s, LstmForwardBuffers<acc_t>& f, const Tensor& w_hh,
                          const Tensor& active_rows, bool reverse) {
  args.w_hh = w_hh.data_ptr<scalar_t>();
  args.bias = s.has_bias ? f.bias.template data_ptr<scalar_t>() : nullptr;
  args.gates = f.r.gates.template data_ptr<scalar_t>();
  args.c_state = f.c.template data_ptr<acc_t>();
  args.cells = f.r.cells.template data_ptr<scalar_t>();
  args.y = f.y.template data_ptr<scalar_t>();
  args.h_even = f.h_buffers[0].template data_ptr<scalar_t>();
  args.h_odd = f.h_buffers[1].template data_ptr<scalar_t>();
  args.active_rows = active_rows.defined() ? active_rows.data_ptr<int64_t>() : nullptr;
  args.T = static_cast<int>(s.seq_len);
  args.B = static_cast<int>(s.batch);
  args.H = static_cast<int>(s.hidden_size);
  args.reverse = reverse;
}

// The tensor-core format for x's dtype (persistent_host.h's rule), or nullopt where the FMA kernel must run.
c10::optional<TensorCoreFormat> tensor_core_format(at::ScalarType dtype) {
  const c10::optional<PersistentProduct> product = tensor_core_product(dtype);
  if (!product) return c10::nullopt;
  switch (*product) {
    case PersistentProduct::kBFloat16:
      return TensorCoreFormat::kBFloat16;
    case PersistentProduct::kHalf:
      return TensorCoreFormat::kHalf;
    case PersistentProduct::kTF32:
      return TensorCoreFormat::kTF32;
    case PersistentProduct::kFma:
      break;
  }
  return c10::nullopt;
}

using ForwardResult = c10::optional<std::tuple<Tensor, Tensor, Tensor, Tensor>>;

// One persistent launch, for either kernel: opt in to its shared memory, check that every block
// is resident (the grid barrier needs it) before any buffer is made, set up the forward's buffers,
// fill the arguments both kernels take (add_own adds the kernel's own), launch. nullopt: the
// caller takes another path.
template <typename scalar_t, typename acc_t, typename Args, typename AddOwn>
ForwardResult run_persistent(const char* name, void (*kernel)(Args), int64_t threads, int64_t blocks,
                             int64_t shared_bytes, const gpu::DeviceInfo& device,
                             const LayerSizes& s, const Tensor& x, const Tensor& h0, const Tensor& c0,
                             const Tensor& w_ih, const Tensor& w_hh, const c10::optional<Tensor>& b_ih,
                             const c10::optional<Tensor>& b_hh, bool padded, bool reverse, AddOwn&& add_own) {
  if (!persistent_grid_fits(kernel, x.device(), device, threads, blocks, shared_bytes)) return c10::nullopt;
  LstmForwardBuffers<acc_t> f = begin_lstm_forward<acc_t>(s, x, h0, c0, w_ih, b_ih, b_hh, padded);
  // The rows that advance at each step: without lengths every row does, and the kernel needs no
  // table (nothing to copy to the device, so the call stays free of host-device traffic).
  const Tensor active_rows = padded ? host_to_device(s.active_rows, x.device()) : Tensor();
  const Tensor w = w_hh.contiguous();
  std::remove_const_t<std::remove_reference_t<Args>> args;
  fill_persistent_args<scalar_t>(args, s, f, w, active_rows, reverse);
  add_own(args);
  if (!gpu::launch_cooperative(name, kernel, dim3(blocks), dim3(threads), shared_bytes, args)) {
    return c10::nullopt;  // the device refused the grid after all: the per-step path recomputes it
  }
  return f.outputs(s, reverse, x.scalar_type());
}

template <typename scalar_t, TensorCoreFormat kFormat>
ForwardResult run_tensor_core_kernel(const LayerSizes& s, const PersistentTcPlan& plan, const gpu::DeviceInfo& device,
                                     const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih,
                                     const Tensor& w_hh, const c10::optional<Tensor>& b_ih,
                                     const c10::optional<Tensor>& b_hh, bool padded, bool reverse) {
  return run_persistent<scalar_t, float>(
      "lstm_persistent_tc_forward_kernel", &lstm_persistent_tc_forward_kernel<scalar_t, kFormat>,
      kPersistentTcThreads, plan.blocks, plan.shared_bytes, device, s, x, h0, c0, w_ih, w_hh,
      b_ih, b_hh, padded, reverse, [&](PersistentLstmTcArgs<scalar_t>& args) {
        args.units_per_block = static_cast<int>(plan.units_per_block);
        args.m_tiles = static_cast<int>(plan.m_tiles);
        args.n_tiles = static_cast<int>(plan.n_tiles);
        args.k_tiles = static_cast<int>(plan.k_tiles);
        args.k_split = static_cast<int>(plan.k_split);
        args.row_stride = static_cast<int>(plan.row_stride);
      });
}

// The tensor-core kernel when the dtype, the device (sm_80+: mma.sync with bf16) and the plan allow it.
ForwardResult try_tensor_core_kernel(const LayerSizes& s, const gpu::DeviceInfo& device, const Tensor& x,
                                     const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
                                     const c10::optional<Tensor>& b_ih, const c10::optional<Tensor>& b_hh,
                                     bool padded, bool reverse) {
  const c10::optional<TensorCoreFormat> format = tensor_core_format(x.scalar_type());
  if (!format || device.cc_major < 8) return c10::nullopt;
  const PersistentTcPlan plan =
      plan_persistent_tc_layer(s.hidden_size, s.batch, x.element_size(), planned_sm_count(device),
                               device.max_shared_optin, requested_k_split());
  if (!plan.usable) return c10::nullopt;
  switch (*format) {
    case TensorCoreFormat::kBFloat16:
      return run_tensor_core_kernel<c10::BFloat16, TensorCoreFormat::kBFloat16>(s, plan, device, x, h0, c0, w_ih,
                                                                                 w_hh, b_ih, b_hh, padded, reverse);
    case TensorCoreFormat::kHalf:
      return run_tensor_core_kernel<c10::Half, TensorCoreFormat::kHalf>(s, plan, device, x, h0, c0, w_ih, w_hh, b_ih,
                                                                         b_hh, padded, reverse);
    case TensorCoreFormat::kTF32:
      return run_tensor_core_kernel<float, TensorCoreFormat::kTF32>(s, plan, device, x, h0, c0, w_ih, w_hh, b_ih,
                                                                     b_hh, padded, reverse);
  }
  return c10::nullopt;
}

}  // namespace

c10::optional<std::tuple<Tensor, Tensor, Tensor, Tensor>> lstm_layer_forward_persistent(
    const LayerSizes& s, const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const c10::optional<Tensor>& b_ih, const c10::optional<Tensor>& b_hh, bool padded, bool reverse) {
  using Result = ForwardResult;
  const PersistentChoice choice = persistent_choice();
  const c10::optional<gpu::DeviceInfo> found = persistent_device(s, x, choice);
  if (!found) return c10::nullopt;
  const gpu::DeviceInfo& device = *found;
  if (choice == PersistentChoice::kAny) {
    if (auto whole = try_tensor_core_kernel(s, device, x, h0, c0, w_ih, w_hh, b_ih, b_hh, padded, reverse)) {
      return whole;
    }
  }
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lstm_layer_forward_persistent",
                                         [&]() -> Result {
    using acc_t = at::opmath_type<scalar_t>;
    const PersistentProductPlan plan =
        plan_persistent_product_layer(s.hidden_size, s.batch, 4, s.hidden_size, sizeof(scalar_t), sizeof(acc_t),
                                      /*tensor_cores=*/false, planned_sm_count(device), device.max_shared_optin,
                                      requested_k_split());
    if (!plan.usable) return c10::nullopt;
    return run_persistent<scalar_t, acc_t>(
        "lstm_persistent_forward_kernel", &lstm_persistent_forward_kernel<scalar_t, acc_t>,
        kPersistentProductThreads, plan.blocks, plan.shared_bytes, device, s, x, h0, c0, w_ih, w_hh, b_ih, b_hh,
        padded, reverse,
        [&](typename LstmForwardPolicy<scalar_t, acc_t>::Args& args) {
          args.units_per_block = static_cast<int>(plan.units_per_block);
          args.shape = product_shape(plan);
        });
  });
}

namespace {

using BackwardResult =
    c10::optional<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>>;

template <typename scalar_t, typename acc_t, PersistentProduct kProduct>
BackwardResult run_persistent_backward(const PersistentProductPlan& plan, const gpu::DeviceInfo& device,
                                       const LayerSizes& s, const Tensor& grad_y, const Tensor& grad_h_n,
                                       const Tensor& grad_c_n, const Tensor& x, const Tensor& h0, const Tensor& c0,
                                       const Tensor& w_ih, const Tensor& w_hh, const Tensor& y, const Tensor& reserve,
                                       bool padded, bool reverse, const WantedGradients& wanted) {
  auto* kernel = &lstm_persistent_backward_kernel<scalar_t, acc_t, kProduct>;
  if (!persistent_grid_fits(kernel, x.device(), device, kPersistentProductThreads, plan.blocks, plan.shared_bytes)) {
    return c10::nullopt;
  }
  LstmBackwardBuffers<acc_t> g = begin_lstm_backward<acc_t>(s, grad_y, grad_h_n, grad_c_n, x, c0, reserve, padded);
  const Tensor active_rows = padded ? host_to_device(s.active_rows, x.device()) : Tensor();
  const Tensor w = w_hh.contiguous();
  // The running gradient of h in the accumulator's type (the op's grad_h0 is g.dh, written at the end).
  const Tensor dh_state = grad_h_n.to(g.dc.scalar_type(), /*non_blocking=*/false, /*copy=*/true).contiguous();
  PersistentLstmBackwardArgs<scalar_t, acc_t> args;
  args.w_hh = w.data_ptr<scalar_t>();
  args.gates = g.r.gates.template data_ptr<scalar_t>();
  args.cells = g.r.cells.template data_ptr<scalar_t>();
  args.c0 = g.c0.template data_ptr<scalar_t>();
  args.grad_y = g.grad_y.template data_ptr<scalar_t>();
  args.d_gates = g.d_gates.template data_ptr<scalar_t>();
  args.dh_state = dh_state.data_ptr<acc_t>();
  args.dc_state = g.dc.template data_ptr<acc_t>();
  args.grad_h0 = g.dh.template data_ptr<scalar_t>();
  args.active_rows = active_rows.defined() ? active_rows.data_ptr<int64_t>() : nullptr;
  args.lengths = g.lengths.defined() ? g.lengths.template data_ptr<int64_t>() : nullptr;
  set_loop_sizes(args, s, reverse, plan);
  if (!launch_product_kernel<kProduct>("lstm_persistent_backward_kernel", "lstm_persistent_tc_backward_kernel", kernel,
                                       plan, args)) {
    return c10::nullopt;
  }
  return g.gradients(s, x, h0, w_ih, y, reverse, wanted);
}

}  // namespace

BackwardResult lstm_layer_backward_persistent(const LayerSizes& s, const Tensor& grad_y, const Tensor& grad_h_n,
                                              const Tensor& grad_c_n, const Tensor& x, const Tensor& h0,
                                              const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
                                              const Tensor& y, const Tensor& reserve, bool padded, bool reverse,
                                              bool need_grad_x, bool need_grad_weights) {
  const PersistentChoice choice = persistent_choice();
  const c10::optional<gpu::DeviceInfo> found = persistent_device(s, x, choice);
  if (!found) return c10::nullopt;
  const gpu::DeviceInfo& device = *found;
  const WantedGradients wanted{need_grad_x, need_grad_weights};
  const auto run = [&](auto scalar, auto acc, auto product) -> BackwardResult {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    constexpr PersistentProduct kProduct = decltype(product)::value;
    const PersistentProductPlan plan = plan_persistent_product_layer(
        s.hidden_size, s.batch, 1, 4 * s.hidden_size, sizeof(scalar_t), sizeof(acc_t),
        kProduct != PersistentProduct::kFma, planned_sm_count(device), device.max_shared_optin, requested_k_split());
    if (!plan.usable) return c10::nullopt;
    return run_persistent_backward<scalar_t, acc_t, kProduct>(plan, device, s, grad_y, grad_h_n, grad_c_n, x, h0,
                                                              c0, w_ih, w_hh, y, reserve, padded, reverse, wanted);
  };
  return run_with_product<BackwardResult>(x.scalar_type(), device, choice, run);
}

}  // namespace lstm_fused
