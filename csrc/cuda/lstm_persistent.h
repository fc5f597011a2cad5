// The persistent whole-sequence LSTM kernels' entry points (lstm_persistent.cu).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "../layer_args.h"

namespace lstm_fused {

// Runs the forward pass of one LSTM layer (no projection) as one cooperative launch, when
// persistent_plan.h allows it on this device and LSTM_FUSED_PERSISTENT is not "0". Returns the
// op's outputs, or nullopt when the caller must run the per-step kernels instead.
c10::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>> lstm_layer_forward_persistent(
    const LayerSizes& s, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
    bool padded, bool reverse);

// Runs the backward time loop of one LSTM layer (no projection) as one cooperative launch, and
// the gradient GEMMs after it, under the same conditions. Returns the backward op's outputs, or
// nullopt when the caller must run the per-step loop instead.
c10::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>>
lstm_layer_backward_persistent(const LayerSizes& s, const at::Tensor& grad_y, const at::Tensor& grad_h_n,
                               const at::Tensor& grad_c_n, const at::Tensor& x, const at::Tensor& h0,
                               const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                               const at::Tensor& y, const at::Tensor& reserve, bool padded, bool reverse,
                               bool need_grad_x, bool need_grad_weights);

}  // namespace lstm_fused
