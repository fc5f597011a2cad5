// What the layer ops' autograd functions share (csrc/autograd.cpp: one direction;
// csrc/directions.cpp: both directions of a bidirectional layer): the ops' signatures, optional
// and undefined gradients, functorch and forward-AD detection, and the differentiable backward.
#pragma once

#include <ATen/ATen.h>
#include <ATen/FuncTorchTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>

#include <initializer_list>
#include <tuple>
#include <string>
#include <vector>

namespace lstm_fused {

using at::Tensor;
using c10::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using LstmForwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&,
    const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&, bool);
using LstmBackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const optional<Tensor>&, const Tensor&, const Tensor&, const optional<Tensor>&, bool, bool, bool);
using GruForwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                         const optional<Tensor>&, const optional<Tensor>&,
                                                         const optional<Tensor>&, bool);
using GruBackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const optional<Tensor>&, bool, bool, bool);

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// An optional argument as the tensor to save: undefined when absent.
inline Tensor or_undefined(const optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }
inline optional<Tensor> as_optional(const Tensor& t) { return t.defined() ? optional<Tensor>(t) : c10::nullopt; }

// The gradient of an output that took no part in the loss arrives undefined (materialising it
// is switched off: the reserve alone is several times the output); the kernels want zeros.
inline Tensor or_zeros(const Tensor& grad, const Tensor& like) {
  return grad.defined() ? grad : at::zeros_like(like, at::MemoryFormat::Contiguous);
}

// Which of `inputs` (the function's tensor arguments in order, undefined for absent optional
// ones) autograd wants gradients for: needs_input_grad counts the present ones only.
inline std::vector<bool> wanted_inputs(AutogradContext* ctx, const variable_list& inputs) {
  std::vector<bool> wanted(inputs.size(), false);
  size_t edge = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (inputs[i].defined()) wanted[i] = ctx->needs_input_grad(edge++);
  }
  return wanted;
}

// Whether any of flags [first, first + count) is set.
inline bool any_of(const std::vector<bool>& flags, size_t first, size_t count) {
  for (size_t i = first; i < first + count; ++i) {
    if (flags[i]) return true;
  }
  return false;
}

// Whether a torch.func transform that refuses C++ autograd functions is active (functorch's own
// check, which Function::apply makes and turns into an error).
inline bool cpp_autograd_function_refused() {
  const auto& functorch_tls = at::functorch::functorchTLSAccessor();
  if (!functorch_tls) return false;
  try {
    functorch_tls->checkSupportsCppAutogradFunction();
    return false;
  } catch (const c10::Error&) {
    return true;
  }
}

// lengths where its values can be read for checking; under functorch it arrives wrapped, without
// storage, and is then left to the composite's ATen ops.
inline optional<Tensor> readable(const optional<Tensor>& lengths) {
  return lengths.has_value() && lengths->defined() && lengths->has_storage() ? lengths : c10::nullopt;
}

// Whether forward-mode AD carries a tangent on any of the tensors (torch.autograd.forward_ad, and
// torch.func's jvp and jacfwd, which C++ autograd functions do not support: eager forward AD
// raises, and functorch's jvp silently dropped the tangent through them).
inline bool any_tangent(std::initializer_list<const Tensor*> tensors) {
  for (const Tensor* t : tensors) {
    if (t->defined() && t->_fw_grad(/*level=*/0).defined()) return true;
  }
  return false;
}

// A tensor argument that only a differentiable backward reads (it recomputes the layer), the
// kernels' gradients not depending on it: the biases. Kept beside the saved variables, so that,
// as in torch.nn, changing it in place between the forward and a first-order backward is not
// refused. Its version is kept with it, and a recomputation over a changed one is refused
// (check_kept_unchanged) instead of silently differentiating other values.
inline void keep_for_recompute(AutogradContext* ctx, const std::string& key, const Tensor& t) {
  ctx->saved_data[key] = t;
  ctx->saved_data[key + ".version"] = static_cast<int64_t>(t.defined() && !t.is_inference() ? t._version() : 0);
}
inline Tensor kept_for_recompute(AutogradContext* ctx, const std::string& key) {
  return ctx->saved_data[key].toTensor();
}
inline void check_kept_unchanged(AutogradContext* ctx, const std::string& key) {
  const Tensor t = kept_for_recompute(ctx, key);
  if (!t.defined() || t.is_inference()) return;
  const int64_t expected = ctx->saved_data[key + ".version"].toInt();
  TORCH_CHECK(t._version() == expected,
              "one of the variables needed for gradient computation has been modified by an inplace operation: ",
              "the layer's ", key, " is at version ", t._version(), "; expected version ", expected,
              " instead (lstm_fused: a backward with create_graph=True recomputes the layer from its arguments)");
}

// A backward that must itself be differentiable (create_graph=True): recomputes the layer from
// `inputs` (its saved tensor arguments in order, undefined for absent optional ones) with
// `recompute`, in differentiable ATen ops, and returns the gradients of the recomputed outputs
// weighted by `grads` (undefined: that output took no part), with their graph, for the inputs
// autograd wants; undefined for the others.
// The recomputation runs on aliases of the wanted inputs, and the gradients are taken with respect
// to those: taken with respect to the saved tensors themselves they would be total derivatives,
// including the paths through each other's history (in a cell loop h0 is the previous step's h,
// made from the same weights), which the engine then propagates a second time. Autocast is off
// for both, as for the fused ops (it would otherwise follow the backward caller's autocast state).
template <typename Recompute>
variable_list differentiable_gradients(AutogradContext* ctx, const variable_list& grads, const variable_list& inputs,
                                       const Recompute& recompute) {
  const std::vector<bool> needed = wanted_inputs(ctx, inputs);
  variable_list aliases(inputs.size()), wanted;
  std::vector<size_t> slots;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!inputs[i].defined()) continue;
    const bool want = needed[i] && inputs[i].requires_grad();
    aliases[i] = want ? inputs[i].view_as(inputs[i]) : inputs[i];
    if (want) {
      wanted.push_back(aliases[i]);
      slots.push_back(i);
    }
  }
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const variable_list outputs = recompute(aliases);
  variable_list differentiated, weights;
  for (size_t i = 0; i < outputs.size(); ++i) {
    if (grads[i].defined() && outputs[i].requires_grad()) {
      differentiated.push_back(outputs[i]);
      weights.push_back(grads[i]);
    }
  }
  variable_list result(inputs.size());
  if (differentiated.empty() || wanted.empty()) return result;
  const variable_list found = torch::autograd::grad(differentiated, wanted, weights, /*retain_graph=*/true,
                                                    /*create_graph=*/true, /*allow_unused=*/true);
  for (size_t k = 0; k < slots.size(); ++k) result[slots[k]] = found[k];
  return result;
}

}  // namespace lstm_fused
