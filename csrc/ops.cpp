// The lstm_fused operator library: op schemas (LSTM and GRU layers), and the Python module init of lstm_fused._C.
// Kernels register themselves per device (csrc/cpu, csrc/cuda); autograd and fake (meta)
// implementations live in lstm_fused/ops.py.
#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <tuple>

extern "C" {
// `import lstm_fused._C` loads this shared library, which runs the TORCH_LIBRARY registrations.
// The module itself is empty: everything is reached through torch.ops.lstm_fused.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(lstm_fused, m) {
  // One LSTM layer in one direction over a whole time-major sequence.
  // x [T,B,I], h0 [B,P], c0 [B,H], w_ih [4H,I], w_hh [4H,P], b_ih/b_hh [4H], w_hr [P,H];
  // lengths: int64 [B] on the CPU, sorted in decreasing order; row b advances at step t only
  // while t < lengths[b] (the reverse direction starts at each row's own last step).
  // Returns y [T,B,P] (zero where a row does not advance), h_n, c_n, and the reserve that
  // lstm_layer_backward needs.
  m.def(
      "lstm_layer_forward(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor? lengths, bool reverse) "
      "-> (Tensor y, Tensor h_n, Tensor c_n, Tensor reserve)");
  // lstm_layer_forward without the reserve, for when no gradient is wanted: the same y, h_n, c_n.
  // Kernels may skip storing what only backward reads (the CPU one does).
  m.def(
      "lstm_layer_inference(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor? lengths, bool reverse) "
      "-> (Tensor y, Tensor h_n, Tensor c_n)");
  // Gradients of lstm_layer_forward. grad_bias is the gradient of b_ih and of b_hh alike (the
  // caller drops it when the layer has no bias);
  // grad_w_hr is an empty tensor when there is no projection. need_grad_x / need_grad_weights
  // false: grad_x / the weight and bias gradients are empty tensors, their GEMMs skipped (a first
  // layer's input is data; a frozen layer's weights want no gradient).
  m.def(
      "lstm_layer_backward(Tensor grad_y, Tensor grad_h_n, Tensor grad_c_n, Tensor x, Tensor h0, "
      "Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor y, Tensor reserve, "
      "Tensor? lengths, bool reverse, bool need_grad_x=True, bool need_grad_weights=True) "
      "-> (Tensor grad_x, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, "
      "Tensor grad_bias, Tensor grad_w_hr)");

  // One GRU layer in one direction (nn.GRU's formulation, gates r, z, n): x [T,B,I], h0 [B,H],
  // w_ih [3H,I], w_hh [3H,H], b_ih/b_hh [3H]; lengths and reverse as for the LSTM.
  m.def(
      "gru_layer_forward(Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor? lengths, bool reverse) -> (Tensor y, Tensor h_n, Tensor reserve)");
  // gru_layer_forward without the reserve, for when no gradient is wanted.
  m.def(
      "gru_layer_inference(Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor? lengths, bool reverse) -> (Tensor y, Tensor h_n)");
  // Gradients of gru_layer_forward; need_grad_x and need_grad_weights as for the LSTM.
  m.def(
      "gru_layer_backward(Tensor grad_y, Tensor grad_h_n, Tensor x, Tensor h0, Tensor w_ih, "
      "Tensor w_hh, Tensor y, Tensor reserve, Tensor? lengths, bool reverse, bool need_grad_x=True, "
      "bool need_grad_weights=True) "
      "-> (Tensor grad_x, Tensor grad_h0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, "
      "Tensor grad_b_hh)");
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
