// The lstm_fused operator library: op schemas (LSTM and GRU layers), and the Python module init of lstm_fused._C.
// Kernels register themselves per device (csrc/cpu, csrc/cuda); autograd and fake (meta)
// implementations live in lstm_fused/ops.py.
#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <tuple>

#include "op_schemas.h"

extern "C" {
// `import lstm_fused._C` loads this shared library, which runs the TORCH_LIBRARY registrations.
// The module itself is empty: everything is reached through torch.ops.lstm_fused.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(lstm_fused, m) {
  m.def(lstm_fused::schemas::kLstmLayerForward);
  m.def(lstm_fused::schemas::kLstmLayerInference);
  m.def(lstm_fused::schemas::kLstmLayerBackward);
  m.def(lstm_fused::schemas::kGruLayerForward);
  m.def(lstm_fused::schemas::kGruLayerInference);
  m.def(lstm_fused::schemas::kGruLayerBackward);
}

namespace lstm_fused {
namespace {

// lstm_layer_inference on a device without a kernel of its own: the forward op, less the reserve.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_layer_inference_from_forward(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
    const c10::optional<at::Tensor>& w_hr, const c10::optional<at::Tensor>& lengths, bool reverse) {
  static const auto forward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lstm_fused::lstm_layer_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
              const c10::optional<at::Tensor>&, bool)>();
  at::AutoDispatchBelowADInplaceOrView guard;  // straight to the device kernel: no graph, no reserve kept
  auto [y, h_n, c_n, reserve] = forward.call(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse);
  return {y, h_n, c_n};
}

// gru_layer_inference on a device without a kernel of its own: the forward op, less the reserve.
std::tuple<at::Tensor, at::Tensor> gru_layer_inference_from_forward(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
    const c10::optional<at::Tensor>& lengths, bool reverse) {
  static const auto forward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lstm_fused::gru_layer_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
              bool)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  auto [y, h_n, reserve] = forward.call(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse);
  return {y, h_n};
}

}  // namespace
}  // namespace lstm_fused

TORCH_LIBRARY_IMPL(lstm_fused, CompositeExplicitAutograd, m) {
  m.impl("lstm_layer_inference", &lstm_fused::lstm_layer_inference_from_forward);
  m.impl("gru_layer_inference", &lstm_fused::gru_layer_inference_from_forward);
}

namespace lstm_fused {
namespace {

// Under autocast the ops compute in the dtype of their arguments: the modules cast those
// themselves, following torch.nn's policy per device. This kernel only switches autocast off
// below the op, so that the ATen calls inside the kernels (the input-projection and gradient
// GEMMs) are not cast to the autocast dtype behind the kernel's back.
// (callBoxed recomputes the dispatch keys from scratch, with autocast now excluded, so the keys
// above autocast, functorch's and PreDispatch, are passed again, as ATen's own autocast
// wrappers do; then Autograd and the device kernel.)
void call_without_autocast(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  op.callBoxed(stack);
}

template <typename Library>
void register_without_autocast(Library& m) {
  for (const char* name : {"lstm_layer_forward", "lstm_layer_inference", "lstm_layer_backward", "gru_layer_forward",
                           "gru_layer_inference", "gru_layer_backward"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&call_without_autocast>());
  }
}

}  // namespace
}  // namespace lstm_fused

TORCH_LIBRARY_IMPL(lstm_fused, AutocastCPU, m) { lstm_fused::register_without_autocast(m); }
TORCH_LIBRARY_IMPL(lstm_fused, AutocastCUDA, m) { lstm_fused::register_without_autocast(m); }
