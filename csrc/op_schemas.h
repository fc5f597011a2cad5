// The schemas of the lstm_fused layer ops: one place for the text that ops.cpp registers and
// that the test-only SIMT build registers again under lstm_fused_simt (its kernels are the CUDA
// sources run in the emulator, so they must take exactly the same arguments).
#pragma once

namespace lstm_fused {
namespace schemas {

// One LSTM layer in one direction over a whole time-major sequence.
// x [T,B,I], h0 [B,P], c0 [B,H], w_ih [4H,I], w_hh [4H,P], b_ih/b_hh [4H], w_hr [P,H];
// lengths: int64 [B] on the CPU, sorted in decreasing order; row b advances at step t only
// while t < lengths[b] (the reverse direction starts at each row's own last step).
// Returns y [T,B,P] (zero where a row does not advance), h_n, c_n, and the reserve that
// lstm_layer_backward needs.
constexpr const char* kLstmLayerForward =
    "lstm_layer_forward(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, "
    "Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor? lengths, bool reverse) "
    "-> (Tensor y, Tensor h_n, Tensor c_n, Tensor reserve)";

// lstm_layer_forward without the reserve, for when no gradient is wanted: the same y, h_n, c_n.
// Kernels may skip storing what only backward reads (the CPU one does).
constexpr const char* kLstmLayerInference =
    "lstm_layer_inference(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, "
    "Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor? lengths, bool reverse) "
    "-> (Tensor y, Tensor h_n, Tensor c_n)";

// Gradients of lstm_layer_forward. grad_bias is the gradient of b_ih and of b_hh alike (the
// caller drops it when the layer has no bias);
// grad_w_hr is an empty tensor when there is no projection. need_grad_x / need_grad_weights
// false: grad_x / the weight and bias gradients are empty tensors, their GEMMs skipped (a first
// layer's input is data; a frozen layer's weights want no gradient).
constexpr const char* kLstmLayerBackward =
    "lstm_layer_backward(Tensor grad_y, Tensor grad_h_n, Tensor grad_c_n, Tensor x, Tensor h0, "
    "Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor y, Tensor reserve, "
    "Tensor? lengths, bool reverse, bool need_grad_x=True, bool need_grad_weights=True) "
    "-> (Tensor grad_x, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, "
    "Tensor grad_bias, Tensor grad_w_hr)";

// One GRU layer in one direction (nn.GRU's formulation, gates r, z, n): x [T,B,I], h0 [B,H],
// w_ih [3H,I], w_hh [3H,H], b_ih/b_hh [3H]; lengths and reverse as for the LSTM.
constexpr const char* kGruLayerForward =
    "gru_layer_forward(Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
    "Tensor? lengths, bool reverse) -> (Tensor y, Tensor h_n, Tensor reserve)";

// gru_layer_forward without the reserve, for when no gradient is wanted.
constexpr const char* kGruLayerInference =
    "gru_layer_inference(Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
    "Tensor? lengths, bool reverse) -> (Tensor y, Tensor h_n)";

// Gradients of gru_layer_forward; need_grad_x and need_grad_weights as for the LSTM.
constexpr const char* kGruLayerBackward =
    "gru_layer_backward(Tensor grad_y, Tensor grad_h_n, Tensor x, Tensor h0, Tensor w_ih, "
    "Tensor w_hh, Tensor y, Tensor reserve, Tensor? lengths, bool reverse, bool need_grad_x=True, "
    "bool need_grad_weights=True) "
    "-> (Tensor grad_x, Tensor grad_h0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, "
    "Tensor grad_b_hh)";

}  // namespace schemas
}  // namespace lstm_fused
