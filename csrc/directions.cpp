// Both directions of a bidirectional layer in one call: on the CPU they run side by side, one
// thread each, when the intra-op pool has two threads; elsewhere one after the other.
//
// Why: the two directions of a layer are independent. Run one after the other, each spreads its
// recurrent loop over the cores and pays a barrier per step, or runs on one core when its steps are
// too small to split (below ~1 MFLOP: benchmarks/NOTES.md). Side by side, each direction's loop
// runs on one core with no barrier at all (inside the parallel region the loops, MKL and
// at::parallel_for all run single-threaded), and each core keeps its own direction's W_hh in its
// own cache.
//
// When a gradient is wanted, a pair autograd function runs both directions' forward ops side by
// side and, in backward, both directions' backward ops side by side (the autograd engine would run
// two per-direction nodes one after the other on one thread). Otherwise each direction is a call of
// its own op (the inference op without gradients; the forward op, with its own autograd, where the
// pair function cannot be used). The second direction runs on an OpenMP worker thread under the
// caller's thread-local state (grad mode, autocast, inference mode, profiler). Tensors or a thread
// state that involve Python (tensor subclasses, dispatch modes, fake tensors), functorch or
// forward-mode AD take the sequential path: their machinery is not for other threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <array>
#include <exception>
#include <tuple>
#include <vector>

#include "autograd_common.h"
#include "composite_layers.h"

namespace lstm_fused {
namespace {

using OptionalTensors = c10::List<std::optional<Tensor>>;
using LstmInferenceSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                            const Tensor&, const optional<Tensor>&,
                                                            const optional<Tensor>&, const optional<Tensor>&,
                                                            const optional<Tensor>&, bool);
using GruInferenceSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                   const optional<Tensor>&, const optional<Tensor>&,
                                                   const optional<Tensor>&, bool);

optional<Tensor> weight(const OptionalTensors& weights, size_t k) {
  const optional<Tensor> w = weights.get(k);
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
bool plain_cpu(const optional<Tensor>& t) {
  if (!t.has_value() || !t->defined()) return true;
  return t->device().is_cpu() && t->layout() == at::kStrided && !t->key_set().has_any(foreign_keys()) &&
         !t->_fw_grad(/*level=*/0).defined();
}

bool side_by_side_possible(const std::vector<optional<Tensor>>& tensors) {
#ifdef _OPENMP
  // Two threads exactly: the only team size measured. With more, side by side would leave all but
  // two cores idle (each direction runs single-threaded in the region), so the directions go one
  // after the other, each on the whole team.
  if (at::get_num_threads() != 2 || at::in_parallel_region()) return false;
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
bool forward_op_wanted(const std::vector<optional<Tensor>>& tensors) {
  const bool grad_mode = at::GradMode::is_enabled();
  for (const auto& t : tensors) {
    if (!t.has_value() || !t->defined()) continue;
    if ((grad_mode && t->requires_grad()) || t->_fw_grad(/*level=*/0).defined()) return true;
  }
  return false;
}

// run(reverse) for reverse = false and true, side by side when `parallel`; the results in that
// order. An exception in either direction is rethrown here, after both have finished.
template <typename Result, typename Run>
std::array<Result, 2> both_directions(bool parallel, const Run& run) {
  std::array<Result, 2> results;
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

// The directions run side by side only up to this hidden size. Paired against one after the
// other (bidirectional configs of benchmarks/NOTES.md, 2 threads): the LSTM at H = 64 and 128
// gained 1.12-1.31x in inference (before the stationary loop's rows split; 1.04-1.24x after it),
// at H = 256 and 512 0.95-1.05x, where each direction's loop already keeps both cores busy. The
// GRU gained 1.04-1.13x at H = 256 and 512 too, but side by side both directions' temporaries are
// alive at once: its training peak memory rose from 73 to 104 MB (B = 64, H = 256) and from 194
// to 278 MB (B = 128, H = 512), above nn.GRU's 91 and 222 MB. Hence the same limit for both.
constexpr int64_t kLargestSideBySide = 128;

// The keys of each direction's biases, kept for a differentiable backward only (autograd_common.h).
inline std::string bias_key(const char* name, int reverse) { return reverse ? std::string(name) + "_reverse" : name; }

inline void check_biases_unchanged(AutogradContext* ctx) {
  for (int r = 0; r < 2; ++r) {
    check_kept_unchanged(ctx, bias_key("b_ih", r));
    check_kept_unchanged(ctx, bias_key("b_hh", r));
  }
}

// --- LSTM ------------------------------------------------------------------------------------

// One direction's arguments of lstm_layer_forward, after x.
struct LstmDirection {
  static constexpr int64_t kGates = 4;
  Tensor h0, c0, w_ih, w_hh;
  optional<Tensor> b_ih, b_hh, w_hr;
  // Both directions' arguments from the op's.
  static std::array<LstmDirection, 2> read(at::TensorList state, const OptionalTensors& weights,
                                           const OptionalTensors& weights_reverse);
};

std::array<LstmDirection, 2> LstmDirection::read(at::TensorList state, const OptionalTensors& weights,
                                                 const OptionalTensors& weights_reverse) {
  TORCH_CHECK(state.size() == 4, "lstm_layer_bidirectional: state is [h0, c0, h0_reverse, c0_reverse]");
  TORCH_CHECK(weights.size() == 5 && weights_reverse.size() == 5,
              "lstm_layer_bidirectional: weights are [w_ih, w_hh, b_ih, b_hh, w_hr] per direction");
  TORCH_CHECK(weight(weights, 0) && weight(weights, 1) && weight(weights_reverse, 0) && weight(weights_reverse, 1),
              "lstm_layer_bidirectional: w_ih and w_hh are required");
  std::array<LstmDirection, 2> d;
  for (int r = 0; r < 2; ++r) {
    const OptionalTensors& w = r ? weights_reverse : weights;
    d[r] = {state[2 * r], state[2 * r + 1], *weight(w, 0), *weight(w, 1), weight(w, 2), weight(w, 3), weight(w, 4)};
  }
  return d;
}

// x, lengths and the tensors of the given directions.
std::vector<optional<Tensor>> direction_tensors(const Tensor& x, const std::vector<const LstmDirection*>& directions,
                                                const optional<Tensor>& lengths) {
  std::vector<optional<Tensor>> all = {x, lengths};
  for (const LstmDirection* a : directions) {
    for (const optional<Tensor>& t : {optional<Tensor>(a->h0), optional<Tensor>(a->c0), optional<Tensor>(a->w_ih),
                                      optional<Tensor>(a->w_hh), a->b_ih, a->b_hh, a->w_hr}) {
      all.push_back(t);
    }
  }
  return all;
}

// Each direction a call of its own op, through the dispatcher (so with its own autograd).
std::vector<Tensor> by_direction(const Tensor& x, const std::array<LstmDirection, 2>& d,
                                 const optional<Tensor>& lengths, const std::array<bool, 2>& with_grad,
                                 bool parallel) {
  static const auto forward_op = op<LstmForwardSig>("lstm_fused::lstm_layer_forward");
  static const auto inference_op = op<LstmInferenceSig>("lstm_fused::lstm_layer_inference");
  const auto results = both_directions<std::tuple<Tensor, Tensor, Tensor>>(parallel, [&](bool reverse) {
    const LstmDirection& a = d[reverse];
    if (with_grad[reverse]) {
      auto [y, h_n, c_n, reserve] =
          forward_op.call(x, a.h0, a.c0, a.w_ih, a.w_hh, a.b_ih, a.b_hh, a.w_hr, lengths, reverse);
      return std::make_tuple(y, h_n, c_n);
    }
    return inference_op.call(x, a.h0, a.c0, a.w_ih, a.w_hh, a.b_ih, a.b_hh, a.w_hr, lengths, reverse);
  });
  const auto& [y, h_n, c_n] = results[0];
  const auto& [y_r, h_n_r, c_n_r] = results[1];
  return {y, h_n, c_n, y_r, h_n_r, c_n_r};
}

// Both directions' forward ops side by side, and in backward both backward ops side by side.
// Inputs: x, then h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr of each direction, then lengths.
class LstmPairFunction : public torch::autograd::Function<LstmPairFunction> {
 public:
  static constexpr size_t kPerDirection = 7;

  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& h0, const Tensor& c0,
                               const Tensor& w_ih, const Tensor& w_hh, const optional<Tensor>& b_ih,
                               const optional<Tensor>& b_hh, const optional<Tensor>& w_hr, const Tensor& h0_r,
                               const Tensor& c0_r, const Tensor& w_ih_r, const Tensor& w_hh_r,
                               const optional<Tensor>& b_ih_r, const optional<Tensor>& b_hh_r,
                               const optional<Tensor>& w_hr_r, const optional<Tensor>& lengths) {
    static const auto forward_op = op<LstmForwardSig>("lstm_fused::lstm_layer_forward");
    at::AutoDispatchBelowADInplaceOrView guard;
    const std::array<LstmDirection, 2> d = {{{h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr},
                                             {h0_r, c0_r, w_ih_r, w_hh_r, b_ih_r, b_hh_r, w_hr_r}}};
    const auto results = both_directions<std::tuple<Tensor, Tensor, Tensor, Tensor>>(true, [&](bool reverse) {
      const LstmDirection& a = d[reverse];
      return forward_op.call(x, a.h0, a.c0, a.w_ih, a.w_hh, a.b_ih, a.b_hh, a.w_hr, lengths, reverse);
    });
    variable_list saved = {x, or_undefined(lengths)};
    variable_list outputs;
    for (int r = 0; r < 2; ++r) {
      const auto& [y, h_n, c_n, reserve] = results[r];
      const LstmDirection& a = d[r];
      saved.insert(saved.end(), {a.h0, a.c0, a.w_ih, a.w_hh, or_undefined(a.w_hr), y, reserve});
      keep_for_recompute(ctx, bias_key("b_ih", r), or_undefined(a.b_ih));  // as in csrc/autograd.cpp
      keep_for_recompute(ctx, bias_key("b_hh", r), or_undefined(a.b_hh));
      outputs.insert(outputs.end(), {y, h_n, c_n});
    }
    ctx->save_for_backward(saved);
    ctx->set_materialize_grads(false);
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = op<LstmBackwardSig>("lstm_fused::lstm_layer_backward");
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &lengths = saved[1];
    // The inputs in the forward's order (lengths aside), and each direction's y and reserve.
    variable_list inputs = {x};
    std::array<Tensor, 2> y, reserve;
    for (int r = 0; r < 2; ++r) {
      const size_t base = 2 + 7 * r;
      inputs.insert(inputs.end(), {saved[base], saved[base + 1], saved[base + 2], saved[base + 3],
                                   kept_for_recompute(ctx, bias_key("b_ih", r)),
                                   kept_for_recompute(ctx, bias_key("b_hh", r)), saved[base + 4]});
      y[r] = saved[base + 5];
      reserve[r] = saved[base + 6];
    }
    variable_list result;
    if (at::GradMode::is_enabled()) {  // create_graph=True: see csrc/autograd.cpp
      check_biases_unchanged(ctx);
      result = differentiable_gradients(ctx, grads, inputs, [&](const variable_list& a) {
        variable_list outputs;
        for (int r = 0; r < 2; ++r) {
          const size_t k = 1 + kPerDirection * r;
          auto [y_again, h_n, c_n] = lstm_layer_composite(a[0], a[k], a[k + 1], a[k + 2], a[k + 3], a[k + 4],
                                                          a[k + 5], a[k + 6], lengths, r == 1);
          outputs.insert(outputs.end(), {y_again, h_n, c_n});
        }
        return outputs;
      });
      result.push_back(Tensor());  // lengths
      return result;
    }
    const std::vector<bool> wanted = wanted_inputs(ctx, inputs);
    const bool want_x = wanted[0];
    std::vector<optional<Tensor>> all(saved.begin(), saved.end());
    all.insert(all.end(), grads.begin(), grads.end());  // a gradient may be a Python subclass too
    const auto grads_of = both_directions<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>>(
        side_by_side_possible(all), [&](bool reverse) {
          const size_t k = 1 + kPerDirection * reverse;
          const Tensor &h0 = inputs[k], &c0 = inputs[k + 1], &w_hr = inputs[k + 6];
          return backward_op.call(or_zeros(grads[3 * reverse], y[reverse]), or_zeros(grads[3 * reverse + 1], h0),
                                  or_zeros(grads[3 * reverse + 2], c0), x, h0, c0, inputs[k + 2], inputs[k + 3],
                                  as_optional(w_hr), y[reverse], reserve[reverse], as_optional(lengths), reverse,
                                  want_x, any_of(wanted, k + 2, 5));
        });
    result.assign(inputs.size() + 1, Tensor());
    if (want_x) result[0] = std::get<0>(grads_of[0]).add_(std::get<0>(grads_of[1]));  // fresh: summed in place
    for (int r = 0; r < 2; ++r) {
      const size_t k = 1 + kPerDirection * r;
      const auto& [grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr] = grads_of[r];
      result[k] = grad_h0;
      result[k + 1] = grad_c0;
      if (!any_of(wanted, k + 2, 5)) continue;
      result[k + 2] = grad_w_ih;
      result[k + 3] = grad_w_hh;
      if (inputs[k + 4].defined()) result[k + 4] = result[k + 5] = grad_bias;
      if (inputs[k + 6].defined()) result[k + 6] = grad_w_hr;
    }
    return result;
  }
};

// --- GRU -------------------------------------------------------------------------------------

struct GruDirection {
  static constexpr int64_t kGates = 3;
  Tensor h0, w_ih, w_hh;
  optional<Tensor> b_ih, b_hh;
  static std::array<GruDirection, 2> read(at::TensorList state, const OptionalTensors& weights,
                                          const OptionalTensors& weights_reverse);
};

std::array<GruDirection, 2> GruDirection::read(at::TensorList state, const OptionalTensors& weights,
                                               const OptionalTensors& weights_reverse) {
  TORCH_CHECK(state.size() == 2, "gru_layer_bidirectional: state is [h0, h0_reverse]");
  TORCH_CHECK(weights.size() == 4 && weights_reverse.size() == 4,
              "gru_layer_bidirectional: weights are [w_ih, w_hh, b_ih, b_hh] per direction");
  TORCH_CHECK(weight(weights, 0) && weight(weights, 1) && weight(weights_reverse, 0) && weight(weights_reverse, 1),
              "gru_layer_bidirectional: w_ih and w_hh are required");
  std::array<GruDirection, 2> d;
  for (int r = 0; r < 2; ++r) {
    const OptionalTensors& w = r ? weights_reverse : weights;
    d[r] = {state[r], *weight(w, 0), *weight(w, 1), weight(w, 2), weight(w, 3)};
  }
  return d;
}

std::vector<optional<Tensor>> direction_tensors(const Tensor& x, const std::vector<const GruDirection*>& directions,
                                                const optional<Tensor>& lengths) {
  std::vector<optional<Tensor>> all = {x, lengths};
  for (const GruDirection* a : directions) {
    for (const optional<Tensor>& t :
         {optional<Tensor>(a->h0), optional<Tensor>(a->w_ih), optional<Tensor>(a->w_hh), a->b_ih, a->b_hh}) {
      all.push_back(t);
    }
  }
  return all;
}

std::vector<Tensor> by_direction(const Tensor& x, const std::array<GruDirection, 2>& d,
                                 const optional<Tensor>& lengths, const std::array<bool, 2>& with_grad,
                                 bool parallel) {
  static const auto forward_op = op<GruForwardSig>("lstm_fused::gru_layer_forward");
  static const auto inference_op = op<GruInferenceSig>("lstm_fused::gru_layer_inference");
  const auto results = both_directions<std::tuple<Tensor, Tensor>>(parallel, [&](bool reverse) {
    const GruDirection& a = d[reverse];
    if (with_grad[reverse]) {
      auto [y, h_n, reserve] = forward_op.call(x, a.h0, a.w_ih, a.w_hh, a.b_ih, a.b_hh, lengths, reverse);
      return std::make_tuple(y, h_n);
    }
    return inference_op.call(x, a.h0, a.w_ih, a.w_hh, a.b_ih, a.b_hh, lengths, reverse);
  });
  return {std::get<0>(results[0]), std::get<1>(results[0]), std::get<0>(results[1]), std::get<1>(results[1])};
}

// The GRU's pair function. Inputs: x, then h0, w_ih, w_hh, b_ih, b_hh of each direction, then
// lengths. The biases are kept outside the version check, as in csrc/autograd.cpp.
class GruPairFunction : public torch::autograd::Function<GruPairFunction> {
 public:
  static constexpr size_t kPerDirection = 5;

  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& h0, const Tensor& w_ih,
                               const Tensor& w_hh, const optional<Tensor>& b_ih, const optional<Tensor>& b_hh,
                               const Tensor& h0_r, const Tensor& w_ih_r, const Tensor& w_hh_r,
                               const optional<Tensor>& b_ih_r, const optional<Tensor>& b_hh_r,
                               const optional<Tensor>& lengths) {
    static const auto forward_op = op<GruForwardSig>("lstm_fused::gru_layer_forward");
    at::AutoDispatchBelowADInplaceOrView guard;
    const std::array<GruDirection, 2> d = {{{h0, w_ih, w_hh, b_ih, b_hh}, {h0_r, w_ih_r, w_hh_r, b_ih_r, b_hh_r}}};
    const auto results = both_directions<std::tuple<Tensor, Tensor, Tensor>>(true, [&](bool reverse) {
      const GruDirection& a = d[reverse];
      return forward_op.call(x, a.h0, a.w_ih, a.w_hh, a.b_ih, a.b_hh, lengths, reverse);
    });
    variable_list saved = {x, or_undefined(lengths)};
    variable_list outputs;
    for (int r = 0; r < 2; ++r) {
      const auto& [y, h_n, reserve] = results[r];
      saved.insert(saved.end(), {d[r].h0, d[r].w_ih, d[r].w_hh, y, reserve});
      keep_for_recompute(ctx, bias_key("b_ih", r), or_undefined(d[r].b_ih));
      keep_for_recompute(ctx, bias_key("b_hh", r), or_undefined(d[r].b_hh));
      outputs.insert(outputs.end(), {y, h_n});
    }
    ctx->save_for_backward(saved);
    ctx->set_materialize_grads(false);
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = op<GruBackwardSig>("lstm_fused::gru_layer_backward");
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &lengths = saved[1];
    variable_list inputs = {x};
    std::array<Tensor, 2> y, reserve;
    for (int r = 0; r < 2; ++r) {
      const size_t base = 2 + 5 * r;
      inputs.insert(inputs.end(), {saved[base], saved[base + 1], saved[base + 2],
                                   kept_for_recompute(ctx, bias_key("b_ih", r)),
                                   kept_for_recompute(ctx, bias_key("b_hh", r))});
      y[r] = saved[base + 3];
      reserve[r] = saved[base + 4];
    }
    variable_list result;
    if (at::GradMode::is_enabled()) {  // create_graph=True
      check_biases_unchanged(ctx);
      result = differentiable_gradients(ctx, grads, inputs, [&](const variable_list& a) {
        variable_list outputs;
        for (int r = 0; r < 2; ++r) {
          const size_t k = 1 + kPerDirection * r;
          auto [y_again, h_n] =
              gru_layer_composite(a[0], a[k], a[k + 1], a[k + 2], a[k + 3], a[k + 4], lengths, r == 1);
          outputs.insert(outputs.end(), {y_again, h_n});
        }
        return outputs;
      });
      result.push_back(Tensor());  // lengths
      return result;
    }
    const std::vector<bool> wanted = wanted_inputs(ctx, inputs);
    const bool want_x = wanted[0];
    std::vector<optional<Tensor>> all(saved.begin(), saved.end());
    all.insert(all.end(), grads.begin(), grads.end());  // a gradient may be a Python subclass too
    const auto grads_of = both_directions<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>>(
        side_by_side_possible(all), [&](bool reverse) {
          const size_t k = 1 + kPerDirection * reverse;
          const Tensor& h0 = inputs[k];
          return backward_op.call(or_zeros(grads[2 * reverse], y[reverse]), or_zeros(grads[2 * reverse + 1], h0), x,
                                  h0, inputs[k + 1], inputs[k + 2], y[reverse], reserve[reverse],
                                  as_optional(lengths), reverse, want_x, any_of(wanted, k + 1, 4));
        });
    result.assign(inputs.size() + 1, Tensor());
    if (want_x) result[0] = std::get<0>(grads_of[0]).add_(std::get<0>(grads_of[1]));  // fresh: summed in place
    for (int r = 0; r < 2; ++r) {
      const size_t k = 1 + kPerDirection * r;
      const auto& [grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh] = grads_of[r];
      result[k] = grad_h0;
      if (!any_of(wanted, k + 1, 4)) continue;
      result[k + 1] = grad_w_ih;
      result[k + 2] = grad_w_hh;
      if (inputs[k + 3].defined()) {
        result[k + 3] = grad_b_ih;
        result[k + 4] = grad_b_hh;
      }
    }
    return result;
  }
};

// --- Both cells -------------------------------------------------------------------------------

std::vector<Tensor> pair_function(const Tensor& x, const std::array<LstmDirection, 2>& d,
                                  const optional<Tensor>& lengths) {
  return LstmPairFunction::apply(x, d[0].h0, d[0].c0, d[0].w_ih, d[0].w_hh, d[0].b_ih, d[0].b_hh, d[0].w_hr, d[1].h0,
                                 d[1].c0, d[1].w_ih, d[1].w_hh, d[1].b_ih, d[1].b_hh, d[1].w_hr, lengths);
}

std::vector<Tensor> pair_function(const Tensor& x, const std::array<GruDirection, 2>& d,
                                  const optional<Tensor>& lengths) {
  return GruPairFunction::apply(x, d[0].h0, d[0].w_ih, d[0].w_hh, d[0].b_ih, d[0].b_hh, d[1].h0, d[1].w_ih,
                                d[1].w_hh, d[1].b_ih, d[1].b_hh, lengths);
}

// Both directions of a layer. With `may_pair` (the Autograd kernel) the pair function runs when
// both directions need their forward op and may go side by side; otherwise each direction is its
// own op: the inference op for a direction that needs no gradient (no reserve, no backward).
template <typename Direction>
std::vector<Tensor> bidirectional(const Tensor& x, at::TensorList state, const OptionalTensors& weights,
                                  const OptionalTensors& weights_reverse, const optional<Tensor>& lengths,
                                  bool may_pair) {
  const std::array<Direction, 2> d = Direction::read(state, weights, weights_reverse);
  using Directions = std::vector<const Direction*>;
  const std::array<bool, 2> with_grad = {forward_op_wanted(direction_tensors(x, Directions{&d[0]}, lengths)),
                                         forward_op_wanted(direction_tensors(x, Directions{&d[1]}, lengths))};
  const bool parallel = d[0].w_ih.size(0) / Direction::kGates <= kLargestSideBySide &&
                        side_by_side_possible(direction_tensors(x, Directions{&d[0], &d[1]}, lengths));
  if (may_pair && with_grad[0] && with_grad[1] && parallel && !cpp_autograd_function_refused()) {
    return pair_function(x, d, lengths);
  }
  return by_direction(x, d, lengths, with_grad, parallel);
}

// The kernels: CompositeExplicitAutograd (below autograd: inference mode) and Autograd.
template <typename Direction, bool kMayPair>
std::vector<Tensor> bidirectional_kernel(const Tensor& x, at::TensorList state, const OptionalTensors& weights,
                                         const OptionalTensors& weights_reverse, const optional<Tensor>& lengths) {
  return bidirectional<Direction>(x, state, weights, weights_reverse, lengths, kMayPair);
}

}  // namespace
}  // namespace lstm_fused

TORCH_LIBRARY_FRAGMENT(lstm_fused, m) {
  // Both directions of a bidirectional layer (csrc/directions.cpp): state [h0, c0, h0_reverse,
  // c0_reverse], weights [w_ih, w_hh, b_ih, b_hh, w_hr] per direction (None where absent);
  // returns [y, h_n, c_n, y_reverse, h_n_reverse, c_n_reverse], as lstm_layer_forward (or
  // lstm_layer_inference, when no gradient is wanted) of each direction would.
  m.def(
      "lstm_layer_bidirectional(Tensor x, Tensor[] state, Tensor?[] weights, Tensor?[] weights_reverse, "
      "Tensor? lengths) -> Tensor[]");
  // The GRU's: state [h0, h0_reverse], weights [w_ih, w_hh, b_ih, b_hh]; returns [y, h_n,
  // y_reverse, h_n_reverse].
  m.def(
      "gru_layer_bidirectional(Tensor x, Tensor[] state, Tensor?[] weights, Tensor?[] weights_reverse, "
      "Tensor? lengths) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(lstm_fused, CompositeExplicitAutograd, m) {
  m.impl("lstm_layer_bidirectional", &lstm_fused::bidirectional_kernel<lstm_fused::LstmDirection, false>);
  m.impl("gru_layer_bidirectional", &lstm_fused::bidirectional_kernel<lstm_fused::GruDirection, false>);
}

TORCH_LIBRARY_IMPL(lstm_fused, Autograd, m) {
  m.impl("lstm_layer_bidirectional", &lstm_fused::bidirectional_kernel<lstm_fused::LstmDirection, true>);
  m.impl("gru_layer_bidirectional", &lstm_fused::bidirectional_kernel<lstm_fused::GruDirection, true>);
}
