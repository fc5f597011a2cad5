// Both directions of a bidirectional layer in one call: on the CPU they run side by side, one
// thread each, when the intra-op pool has two threads or more; elsewhere one after the other.
//
// Why: the two directions of a layer are independent. Run one after the other, each spreads its
// recurrent loop over the cores and pays a barrier per step, or runs on one core when its steps are
// too small to split (below ~1 MFLOP: benchmarks/NOTES.md). Side by side, each direction's loop
// runs on one core with no barrier at all (inside the parallel region the loops, MKL and
// at::parallel_for all run single-threaded), and each core keeps its own direction's W_hh in its
// own cache.
//
// The ops are CompositeImplicitAutograd: each direction is a call of the per-direction op
// (lstm_layer_forward when a gradient is wanted, else lstm_layer_inference; the same for the GRU),
// with its own autograd, so backward is unchanged. The second direction runs on an OpenMP worker
// thread under the caller's thread-local state (grad mode, autocast, inference mode, profiler).
// Tensors or a thread state that involve Python (tensor subclasses, dispatch modes, fake tensors),
// functorch or forward-mode AD take the sequential path: their machinery is not for other threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <array>
#include <exception>
#include <string>
#include <tuple>
#include <vector>

namespace lstm_fused {
namespace {

using at::Tensor;
using OptionalTensors = c10::List<std::optional<Tensor>>;

std::optional<Tensor> weight(const OptionalTensors& weights, size_t k) {
  const std::optional<Tensor> w = weights.get(k);
  return w.has_value() && w->defined() ? w : std::nullopt;
}

// Dispatch keys of Python (tensor subclasses, dispatch modes, fake tensors), functorch and
// functionalization: on a tensor or switched on for this thread, they keep a layer's directions on
// the calling thread.
const c10::DispatchKeySet& foreign_keys() {
  static const c10::DispatchKeySet keys({
      c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot, c10::DispatchKey::PythonDispatcher,
      c10::DispatchKey::PreDispatch, c10::DispatchKey::Functionalize, c10::DispatchKey::FuncTorchGradWrapper,
      c10::DispatchKey::FuncTorchBatched, c10::DispatchKey::FuncTorchVmapMode,
      c10::DispatchKey::FuncTorchDynamicLayerFrontMode, c10::DispatchKey::FuncTorchDynamicLayerBackMode});
  return keys;
}

// Whether a tensor can be handed to another thread without Python or functorch noticing.
bool plain_cpu(const std::optional<Tensor>& t) {
  if (!t.has_value() || !t->defined()) return true;
  return t->device().is_cpu() && t->layout() == at::kStrided && !t->key_set().has_any(foreign_keys()) &&
         !t->_fw_grad(/*level=*/0).defined();
}

bool side_by_side_possible(const std::vector<std::optional<Tensor>>& tensors) {
#ifdef _OPENMP
  if (at::get_num_threads() < 2 || at::in_parallel_region()) return false;
  if (c10::impl::tls_local_dispatch_key_set().included_.has_any(foreign_keys())) return false;
  for (const auto& t : tensors) {
    if (!plain_cpu(t)) return false;
  }
  return true;
#else
  return false;
#endif
}

// Whether the per-direction forward op must run rather than the inference op (as in
// lstm_fused/ops.py): a gradient is wanted, or a forward-mode tangent must be carried.
bool forward_op_wanted(const std::vector<std::optional<Tensor>>& tensors) {
  const bool grad_mode = at::GradMode::is_enabled();
  for (const auto& t : tensors) {
    if (!t.has_value() || !t->defined()) continue;
    if ((grad_mode && t->requires_grad()) || t->_fw_grad(/*level=*/0).defined()) return true;
  }
  return false;
}

// run(reverse) for reverse = false and true, side by side when `parallel`; the results in that
// order. An exception in either direction is rethrown here, after both have finished.
template <typename Run>
std::array<std::vector<Tensor>, 2> both_directions(bool parallel, const Run& run) {
  std::array<std::vector<Tensor>, 2> results;
  if (!parallel) {
    results[0] = run(false);
    results[1] = run(true);
    return results;
  }
  std::array<std::exception_ptr, 2> errors;
  std::array<bool, 2> ran = {false, false};
  const at::ThreadLocalState caller_state;
#ifdef _OPENMP
#pragma omp parallel num_threads(2)
  {
    const int k = omp_get_thread_num();
    if (k < 2) {
      try {
        if (k == 0) {
          results[0] = run(false);
        } else {
          at::ThreadLocalStateGuard same_state(caller_state);
          results[1] = run(true);
        }
      } catch (...) {
        errors[k] = std::current_exception();
      }
      ran[k] = true;
    }
  }
#endif
  for (int k = 0; k < 2; ++k) {  // a team of one (the runtime's choice) leaves a direction to run here
    if (!ran[k] && !errors[0] && !errors[1]) results[k] = run(k == 1);
  }
  for (const auto& error : errors) {
    if (error) std::rethrow_exception(error);
  }
  return results;
}

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The LSTM's directions run side by side only up to this hidden size. Paired against one after
// the other (bidirectional nn.LSTM configs, 2 threads, inference): H = 64 and 128 gained 1.12-1.31x
// at B = 8-128; H = 256 0.99-1.05x and H = 512 0.95-1.04x, where each direction's loop already
// keeps both cores busy. (The GRU's per-step loop gained at every size measured, up to H = 256.)
constexpr int64_t kLargestSideBySideLstm = 128;

std::vector<Tensor> lstm_layer_bidirectional(const Tensor& x, at::TensorList state, const OptionalTensors& weights,
                                             const OptionalTensors& weights_reverse,
                                             const std::optional<Tensor>& lengths) {
  TORCH_CHECK(state.size() == 4, "lstm_layer_bidirectional: state is [h0, c0, h0_reverse, c0_reverse]");
  TORCH_CHECK(weights.size() == 5 && weights_reverse.size() == 5,
              "lstm_layer_bidirectional: weights are [w_ih, w_hh, b_ih, b_hh, w_hr] per direction");
  TORCH_CHECK(weight(weights, 0) && weight(weights, 1) && weight(weights_reverse, 0) && weight(weights_reverse, 1),
              "lstm_layer_bidirectional: w_ih and w_hh are required");
  static const auto forward_op = op<std::tuple<Tensor, Tensor, Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
      const std::optional<Tensor>&, const std::optional<Tensor>&, const std::optional<Tensor>&, bool)>(
      "lstm_fused::lstm_layer_forward");
  static const auto inference_op = op<std::tuple<Tensor, Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
      const std::optional<Tensor>&, const std::optional<Tensor>&, const std::optional<Tensor>&, bool)>(
      "lstm_fused::lstm_layer_inference");
  std::vector<std::optional<Tensor>> all = {x, lengths};
  for (const Tensor& s : state) all.emplace_back(s);
  for (size_t k = 0; k < 5; ++k) {
    all.push_back(weight(weights, k));
    all.push_back(weight(weights_reverse, k));
  }
  const bool with_grad = forward_op_wanted(all);
  const int64_t hidden_size = weight(weights, 0)->size(0) / 4;
  auto run = [&](bool reverse) -> std::vector<Tensor> {
    const OptionalTensors& w = reverse ? weights_reverse : weights;
    const Tensor& h0 = state[reverse ? 2 : 0];
    const Tensor& c0 = state[reverse ? 3 : 1];
    const Tensor w_ih = *weight(w, 0), w_hh = *weight(w, 1);
    if (with_grad) {
      auto [y, h_n, c_n, reserve] =
          forward_op.call(x, h0, c0, w_ih, w_hh, weight(w, 2), weight(w, 3), weight(w, 4), lengths, reverse);
      return {y, h_n, c_n};
    }
    auto [y, h_n, c_n] =
        inference_op.call(x, h0, c0, w_ih, w_hh, weight(w, 2), weight(w, 3), weight(w, 4), lengths, reverse);
    return {y, h_n, c_n};
  };
  auto [forward, backward] =
      both_directions(hidden_size <= kLargestSideBySideLstm && side_by_side_possible(all), run);
  forward.insert(forward.end(), backward.begin(), backward.end());
  return forward;
}

std::vector<Tensor> gru_layer_bidirectional(const Tensor& x, at::TensorList state, const OptionalTensors& weights,
                                            const OptionalTensors& weights_reverse,
                                            const std::optional<Tensor>& lengths) {
  TORCH_CHECK(state.size() == 2, "gru_layer_bidirectional: state is [h0, h0_reverse]");
  TORCH_CHECK(weights.size() == 4 && weights_reverse.size() == 4,
              "gru_layer_bidirectional: weights are [w_ih, w_hh, b_ih, b_hh] per direction");
  TORCH_CHECK(weight(weights, 0) && weight(weights, 1) && weight(weights_reverse, 0) && weight(weights_reverse, 1),
              "gru_layer_bidirectional: w_ih and w_hh are required");
  static const auto forward_op = op<std::tuple<Tensor, Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
      const std::optional<Tensor>&, const std::optional<Tensor>&, bool)>("lstm_fused::gru_layer_forward");
  static const auto inference_op = op<std::tuple<Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
      const std::optional<Tensor>&, const std::optional<Tensor>&, bool)>("lstm_fused::gru_layer_inference");
  std::vector<std::optional<Tensor>> all = {x, lengths, state[0], state[1]};
  for (size_t k = 0; k < 4; ++k) {
    all.push_back(weight(weights, k));
    all.push_back(weight(weights_reverse, k));
  }
  const bool with_grad = forward_op_wanted(all);
  auto run = [&](bool reverse) -> std::vector<Tensor> {
    const OptionalTensors& w = reverse ? weights_reverse : weights;
    const Tensor& h0 = state[reverse ? 1 : 0];
    const Tensor w_ih = *weight(w, 0), w_hh = *weight(w, 1);
    if (with_grad) {
      auto [y, h_n, reserve] = forward_op.call(x, h0, w_ih, w_hh, weight(w, 2), weight(w, 3), lengths, reverse);
      return {y, h_n};
    }
    auto [y, h_n] = inference_op.call(x, h0, w_ih, w_hh, weight(w, 2), weight(w, 3), lengths, reverse);
    return {y, h_n};
  };
  auto [forward, backward] = both_directions(side_by_side_possible(all), run);
  forward.insert(forward.end(), backward.begin(), backward.end());
  return forward;
}

}  // namespace
}  // namespace lstm_fused

TORCH_LIBRARY_FRAGMENT(lstm_fused, m) {
  // Both directions of a bidirectional layer (csrc/directions.cpp): state [h0, c0, h0_reverse,
  // c0_reverse], weights [w_ih, w_hh, b_ih, b_hh, w_hr] per direction (None where absent);
  // returns [y, h_n, c_n, y_reverse, h_n_reverse, c_n_reverse], as two lstm_layer_forward calls
  // (or lstm_layer_inference calls, when no gradient is wanted) would.
  m.def(
      "lstm_layer_bidirectional(Tensor x, Tensor[] state, Tensor?[] weights, Tensor?[] weights_reverse, "
      "Tensor? lengths) -> Tensor[]",
      &lstm_fused::lstm_layer_bidirectional);
  // The GRU's: state [h0, h0_reverse], weights [w_ih, w_hh, b_ih, b_hh]; returns [y, h_n,
  // y_reverse, h_n_reverse].
  m.def(
      "gru_layer_bidirectional(Tensor x, Tensor[] state, Tensor?[] weights, Tensor?[] weights_reverse, "
      "Tensor? lengths) -> Tensor[]",
      &lstm_fused::gru_layer_bidirectional);
}
