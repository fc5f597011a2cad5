// Validation of the layer ops' arguments, shared by every device's kernels so that bad input is
// refused the same way (and before any kernel runs) on CPU and CUDA.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <vector>

namespace lstm_fused {

// Sizes of one recurrent layer in one direction, read off (and checked against) its arguments.
struct LayerSizes {
  int64_t seq_len = 0;      // T
  int64_t batch = 0;        // B
  int64_t input_size = 0;   // I
  int64_t hidden_size = 0;  // H: cell size
  int64_t output_size = 0;  // P: size of h and of y (proj_size when an LSTM projects, else H)
  bool has_bias = false;
  bool has_proj = false;
  // lengths[b]: how many steps row b advances (T for every row without a lengths tensor).
  std::vector<int64_t> lengths;
  // active_rows[t]: how many rows advance at time t. Lengths are sorted in decreasing order, so
  // they are always the first active_rows[t] rows of the batch.
  std::vector<int64_t> active_rows;
};

// The LSTM reserve is one flat buffer: activated gates [T,B,4H], cell states [T,B,H], and with a
// projection the unprojected outputs o*tanh(c) [T,B,H].
int64_t lstm_reserve_numel(const LayerSizes& sizes);
struct LstmReserve {
  at::Tensor gates;    // [T, B, 4H]
  at::Tensor cells;    // [T, B, H]
  at::Tensor proj_in;  // [T, B, H], undefined without projection
};
LstmReserve split_lstm_reserve(const at::Tensor& reserve, const LayerSizes& sizes);

// The GRU reserve: activated gates r, z, n [T,B,3H], and the hidden-side projection of the n
// gate, h W_hn^T + b_hn [T,B,H] (the gradient of r needs it).
int64_t gru_reserve_numel(const LayerSizes& sizes);
struct GruReserve {
  at::Tensor gates;          // [T, B, 3H]
  at::Tensor hidden_n_proj;  // [T, B, H]
};
GruReserve split_gru_reserve(const at::Tensor& reserve, const LayerSizes& sizes);

LayerSizes check_lstm_layer_forward_args(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                         const at::Tensor& w_ih, const at::Tensor& w_hh,
                                         const c10::optional<at::Tensor>& b_ih,
                                         const c10::optional<at::Tensor>& b_hh,
                                         const c10::optional<at::Tensor>& w_hr,
                                         const c10::optional<at::Tensor>& lengths);

// Checks the forward arguments again and the tensors that only backward receives.
LayerSizes check_lstm_layer_backward_args(
    const at::Tensor& grad_y, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const c10::optional<at::Tensor>& w_hr, const at::Tensor& y,
    const at::Tensor& reserve, const c10::optional<at::Tensor>& lengths);

LayerSizes check_gru_layer_forward_args(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                                        const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                                        const c10::optional<at::Tensor>& b_hh,
                                        const c10::optional<at::Tensor>& lengths);

LayerSizes check_gru_layer_backward_args(const at::Tensor& grad_y, const at::Tensor& grad_h_n,
                                         const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                                         const at::Tensor& w_hh, const at::Tensor& y,
                                         const at::Tensor& reserve,
                                         const c10::optional<at::Tensor>& lengths);

// Host values as an int64 tensor on `device`. On CUDA the copy is queued on the current stream
// from pinned memory, so the op never waits for the device (a copy from pageable memory blocks
// the host until the stream drains, stalls a cell loop every step, and breaks graph capture).
at::Tensor host_to_device(c10::ArrayRef<int64_t> values, const at::Device& device);

// h_{t-1} for every step, [T, B, P], gathered from the layer's output y and h0: the right-hand
// side of the single dW_hh GEMM after the backward loop. Rows that do not advance at a step hold
// values that are multiplied by zero gradients.
at::Tensor gather_previous_hidden(const at::Tensor& y, const at::Tensor& h0, const LayerSizes& sizes,
                                  bool reverse);
// The same, written into `out` ([T, B, P], possibly a strided view of a larger buffer).
void write_previous_hidden(const at::Tensor& out, const at::Tensor& y, const at::Tensor& h0, const LayerSizes& sizes,
                           bool reverse);

}  // namespace lstm_fused
