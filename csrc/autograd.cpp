// Autograd of the layer ops, as C++ autograd functions registered for the Autograd key.
//
// DESIGN.md first had this in Python (torch.library.register_autograd). That path costs about
// 60 us per forward call and 200 us per backward call on the 2-core CPU (Python ctx handling,
// saved-tensor unpacking, the library's wrapper), which an LSTMCell pays every step: a training
// loop of cells ran at 0.8x of nn.LSTMCell. Here the same logic costs a few microseconds.
// torch.compile still traces through it: the functions call the forward and backward ops through
// the dispatcher, whose fake kernels are in lstm_fused/ops.py.
//
// The reserve is not an output of the autograd functions: it leaves through a pointer argument.
// Marking it non-differentiable instead would work in eager mode, but compiled autograd
// (torch._dynamo.compiled_autograd) refuses C++ functions with non-differentiable outputs.
//
// Two things the fused kernels cannot do go through the same math in differentiable ATen ops
// (csrc/composite_layers.cpp):
// - a backward that must itself be differentiable (create_graph=True: gradient penalties,
//   Hessian-vector products, torch.autograd.gradgradcheck) recomputes the layer's forward in
//   those ops and differentiates it with create_graph, so that the gradients it returns carry a
//   graph back to the layer's inputs and weights;
// - torch.func's grad transforms (grad, vjp, jacrev, hessian), which refuse C++ autograd
//   functions, and forward-mode AD (torch.autograd.forward_ad, torch.func.jvp and jacfwd), which
//   C++ autograd functions do not support, run the layer's forward in those ops instead of the
//   fused kernel.
#include <ATen/ATen.h>
#include <ATen/FuncTorchTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "autograd_common.h"
#include "composite_layers.h"
#include "layer_args.h"

namespace lstm_fused {
namespace {

class LstmLayerFunction : public torch::autograd::Function<LstmLayerFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& h0, const Tensor& c0,
                               const Tensor& w_ih, const Tensor& w_hh, const optional<Tensor>& b_ih,
                               const optional<Tensor>& b_hh, const optional<Tensor>& w_hr,
                               const optional<Tensor>& lengths, bool reverse, Tensor* reserve_out) {
    static const auto forward_op = op<LstmForwardSig>("lstm_fused::lstm_layer_forward");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, h_n, c_n, reserve] = forward_op.call(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse);
    ctx->save_for_backward({x, h0, c0, w_ih, w_hh, or_undefined(w_hr), or_undefined(lengths), y, reserve});
    // The biases only for a differentiable backward: the LSTM's gradients do not depend on them.
    keep_for_recompute(ctx, "b_ih", or_undefined(b_ih));
    keep_for_recompute(ctx, "b_hh", or_undefined(b_hh));
    ctx->saved_data["reverse"] = reverse;
    ctx->set_materialize_grads(false);
    *reserve_out = reserve;
    return {y, h_n, c_n};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = op<LstmBackwardSig>("lstm_fused::lstm_layer_backward");
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &h0 = saved[1], &c0 = saved[2], &w_ih = saved[3], &w_hh = saved[4];
    const Tensor &w_hr = saved[5], &lengths = saved[6], &y = saved[7], &reserve = saved[8];
    const bool reverse = ctx->saved_data["reverse"].toBool();
    const variable_list inputs = {x,    h0, c0, w_ih, w_hh, kept_for_recompute(ctx, "b_ih"), kept_for_recompute(ctx, "b_hh"),
                                  w_hr};  // the order of forward
    const bool has_bias = inputs[5].defined();
    if (at::GradMode::is_enabled()) {  // create_graph=True: the engine runs backward with grad mode on
      check_kept_unchanged(ctx, "b_ih");
      check_kept_unchanged(ctx, "b_hh");
      const variable_list g = differentiable_gradients(
          ctx, grads, inputs, [&](const variable_list& a) {
            auto [y_again, h_n, c_n] = lstm_layer_composite(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], lengths,
                                                            reverse);
            return variable_list{y_again, h_n, c_n};
          });
      return {g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], Tensor(), Tensor(), Tensor()};
    }
    const std::vector<bool> wanted = wanted_inputs(ctx, inputs);
    const bool want_x = wanted[0];
    const bool want_weights = any_of(wanted, 3, 5);  // w_ih, w_hh, the biases, w_hr
    auto [grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr] =
        backward_op.call(or_zeros(grads[0], y), or_zeros(grads[1], h0), or_zeros(grads[2], c0), x, h0, c0, w_ih,
                         w_hh, as_optional(w_hr), y, reserve, as_optional(lengths), reverse, want_x,
                         want_weights);
    if (!want_x) grad_x = Tensor();
    if (!want_weights) grad_w_ih = grad_w_hh = grad_bias = grad_w_hr = Tensor();
    const Tensor grad_b = has_bias ? grad_bias : Tensor();
    return {grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_b, grad_b,
            w_hr.defined() ? grad_w_hr : Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

class GruLayerFunction : public torch::autograd::Function<GruLayerFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& h0, const Tensor& w_ih,
                               const Tensor& w_hh, const optional<Tensor>& b_ih, const optional<Tensor>& b_hh,
                               const optional<Tensor>& lengths, bool reverse, Tensor* reserve_out) {
    static const auto forward_op = op<GruForwardSig>("lstm_fused::gru_layer_forward");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, h_n, reserve] = forward_op.call(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse);
    ctx->save_for_backward({x, h0, w_ih, w_hh, or_undefined(lengths), y, reserve});
    // The biases only for a differentiable backward: the GRU's gradients do not depend on them.
    keep_for_recompute(ctx, "b_ih", or_undefined(b_ih));
    keep_for_recompute(ctx, "b_hh", or_undefined(b_hh));
    ctx->saved_data["reverse"] = reverse;
    ctx->set_materialize_grads(false);
    *reserve_out = reserve;
    return {y, h_n};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = op<GruBackwardSig>("lstm_fused::gru_layer_backward");
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &h0 = saved[1], &w_ih = saved[2], &w_hh = saved[3];
    const Tensor &lengths = saved[4], &y = saved[5], &reserve = saved[6];
    // b_ih and b_hh are both given or both absent (the op checks it); an absent argument gets
    // an undefined gradient. Inputs 0-1 are x, h0; then w_ih, w_hh and the biases where given.
    const bool reverse = ctx->saved_data["reverse"].toBool();
    const variable_list inputs = {x, h0, w_ih, w_hh, kept_for_recompute(ctx, "b_ih"), kept_for_recompute(ctx, "b_hh")};
    const bool has_bias = inputs[4].defined();
    if (at::GradMode::is_enabled()) {  // create_graph=True, as for the LSTM
      check_kept_unchanged(ctx, "b_ih");
      check_kept_unchanged(ctx, "b_hh");
      const variable_list g =
          differentiable_gradients(ctx, grads, inputs, [&](const variable_list& a) {
            auto [y_again, h_n] = gru_layer_composite(a[0], a[1], a[2], a[3], a[4], a[5], lengths, reverse);
            return variable_list{y_again, h_n};
          });
      return {g[0], g[1], g[2], g[3], g[4], g[5], Tensor(), Tensor(), Tensor()};
    }
    const std::vector<bool> wanted = wanted_inputs(ctx, inputs);
    const bool want_x = wanted[0];
    const bool want_weights = any_of(wanted, 2, 4);  // w_ih, w_hh, the biases
    auto [grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh] =
        backward_op.call(or_zeros(grads[0], y), or_zeros(grads[1], h0), x, h0, w_ih, w_hh, y, reserve,
                         as_optional(lengths), reverse, want_x, want_weights);
    if (!want_x) grad_x = Tensor();
    if (!want_weights) grad_w_ih = grad_w_hh = grad_b_ih = grad_b_hh = Tensor();
    return {grad_x,
            grad_h0,
            grad_w_ih,
            grad_w_hh,
            has_bias ? grad_b_ih : Tensor(),
            has_bias ? grad_b_hh : Tensor(),
            Tensor(),
            Tensor(),
            Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_layer_forward_autograd(
    const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const optional<Tensor>& b_ih, const optional<Tensor>& b_hh, const optional<Tensor>& w_hr,
    const optional<Tensor>& lengths, bool reverse) {
  const Tensor bias_ih = or_undefined(b_ih), bias_hh = or_undefined(b_hh), proj = or_undefined(w_hr);
  if (cpp_autograd_function_refused() || any_tangent({&x, &h0, &c0, &w_ih, &w_hh, &bias_ih, &bias_hh, &proj})) {
    check_lstm_layer_forward_args(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, readable(lengths));  // as the kernels do
    auto [y, h_n, c_n] =
        lstm_layer_composite(x, h0, c0, w_ih, w_hh, bias_ih, bias_hh, proj, or_undefined(lengths), reverse);
    return {y, h_n, c_n, x.new_empty({0})};  // no reserve: autograd differentiates the ATen ops
  }
  Tensor reserve;
  const variable_list out =
      LstmLayerFunction::apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, &reserve);
  return {out[0], out[1], out[2], reserve};
}

std::tuple<Tensor, Tensor, Tensor> gru_layer_forward_autograd(const Tensor& x, const Tensor& h0, const Tensor& w_ih,
                                                              const Tensor& w_hh, const optional<Tensor>& b_ih,
                                                              const optional<Tensor>& b_hh,
                                                              const optional<Tensor>& lengths, bool reverse) {
  const Tensor bias_ih = or_undefined(b_ih), bias_hh = or_undefined(b_hh);
  if (cpp_autograd_function_refused() || any_tangent({&x, &h0, &w_ih, &w_hh, &bias_ih, &bias_hh})) {
    check_gru_layer_forward_args(x, h0, w_ih, w_hh, b_ih, b_hh, readable(lengths));
    auto [y, h_n] = gru_layer_composite(x, h0, w_ih, w_hh, bias_ih, bias_hh, or_undefined(lengths), reverse);
    return {y, h_n, x.new_empty({0})};
  }
  Tensor reserve;
  const variable_list out = GruLayerFunction::apply(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, &reserve);
  return {out[0], out[1], reserve};
}

}  // namespace
}  // namespace lstm_fused

TORCH_LIBRARY_IMPL(lstm_fused, Autograd, m) {
  m.impl("lstm_layer_forward", &lstm_fused::lstm_layer_forward_autograd);
  m.impl("gru_layer_forward", &lstm_fused::gru_layer_forward_autograd);
  // The backward ops are not differentiable: the autograd functions above do not call them when
  // the backward must be differentiable. Called directly under create_graph, they would be treated
  // as constants, with a warning, and a second-order gradient would come out as silent zeros; this
  // fallback makes that an error ("derivative ... is not implemented").
  m.impl("lstm_layer_backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("gru_layer_backward", torch::autograd::autogradNotImplementedFallback());
}
