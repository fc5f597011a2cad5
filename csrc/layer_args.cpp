#include "layer_args.h"

#include <ATen/ATen.h>

#include <algorithm>

namespace lstm_fused {
namespace {

void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* name) {
  TORCH_CHECK(t.sizes() == expected, "lstm_fused: ", name, " must have shape ", expected,
              ", got ", t.sizes());
}

void check_same_kind(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "lstm_fused: ", name, " has dtype ",
              t.scalar_type(), " but the input has dtype ", like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "lstm_fused: ", name, " is on ", t.device(),
              " but the input is on ", like.device());
}

// A tensor argument: its shape, and the input's dtype and device.
void check_tensor(const at::Tensor& t, at::IntArrayRef expected, const at::Tensor& like, const char* name) {
  check_shape(t, expected, name);
  check_same_kind(t, like, name);
}

std::vector<int64_t> read_lengths(const c10::optional<at::Tensor>& lengths, int64_t seq_len,
                                  int64_t batch) {
  if (!lengths.has_value()) return std::vector<int64_t>(batch, seq_len);
  const at::Tensor& l = *lengths;
  TORCH_CHECK(l.dim() == 1 && l.size(0) == batch, "lstm_fused: lengths must have shape [", batch,
              "], got ", l.sizes());
  TORCH_CHECK(l.scalar_type() == at::kLong && l.device().is_cpu(),
              "lstm_fused: lengths must be an int64 tensor on the CPU, got ", l.scalar_type(),
              " on ", l.device());
  const at::Tensor lc = l.contiguous();
  const int64_t* p = lc.const_data_ptr<int64_t>();
  std::vector<int64_t> out(p, p + batch);
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(out[b] >= 0 && out[b] <= seq_len, "lstm_fused: lengths[", b, "] = ", out[b],
                " is outside [0, ", seq_len, "]");
    TORCH_CHECK(b == 0 || out[b] <= out[b - 1],
                "lstm_fused: lengths must be sorted in decreasing order (as in a PackedSequence)");
  }
  return out;
}

// The checks every recurrent layer shares; `gates` is 4 for LSTM, 3 for GRU.
LayerSizes check_layer_args(const char* cell, int64_t gates, const at::Tensor& x, const at::Tensor& h0,
                            const at::Tensor& w_ih, const at::Tensor& w_hh,
                            const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
                            const c10::optional<at::Tensor>& w_hr, const c10::optional<at::Tensor>& lengths) {
  TORCH_CHECK(x.dim() == 3, "lstm_fused: x must be [seq_len, batch, input_size], got ", x.dim(),
              " dimensions");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "lstm_fused: x must be a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) % gates == 0, "lstm_fused: ", cell, " w_ih must be [",
              gates, "*hidden_size, input_size], got ", w_ih.sizes());
  LayerSizes s;
  s.seq_len = x.size(0);
  s.batch = x.size(1);
  s.input_size = x.size(2);
  s.hidden_size = w_ih.size(0) / gates;
  s.has_proj = w_hr.has_value();
  s.output_size = s.has_proj ? w_hr->size(0) : s.hidden_size;
  const int64_t H = s.hidden_size, P = s.output_size;

  check_tensor(w_ih, {gates * H, s.input_size}, x, "w_ih");
  check_tensor(w_hh, {gates * H, P}, x, "w_hh");
  check_tensor(h0, {s.batch, P}, x, "h0");
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(),
              "lstm_fused: b_ih and b_hh must be given together or not at all");
  s.has_bias = b_ih.has_value();
  if (s.has_bias) {
    check_tensor(*b_ih, {gates * H}, x, "b_ih");
    check_tensor(*b_hh, {gates * H}, x, "b_hh");
  }
  if (s.has_proj) {
    TORCH_CHECK(w_hr->dim() == 2 && P > 0 && P < H,
                "lstm_fused: w_hr must be [proj_size, hidden_size] with 0 < proj_size < hidden_size, got ",
                w_hr->sizes());
    check_tensor(*w_hr, {P, H}, x, "w_hr");
  }
  s.lengths = read_lengths(lengths, s.seq_len, s.batch);
  s.active_rows.assign(s.seq_len, 0);
  for (int64_t t = 0; t < s.seq_len; ++t) {
    int64_t n = 0;
    while (n < s.batch && s.lengths[n] > t) ++n;
    s.active_rows[t] = n;
  }
  return s;
}

}  // namespace

int64_t lstm_reserve_numel(const LayerSizes& s) {
  return s.seq_len * s.batch * s.hidden_size * (s.has_proj ? 6 : 5);
}

int64_t gru_reserve_numel(const LayerSizes& s) { return s.seq_len * s.batch * s.hidden_size * 4; }

LayerSizes check_lstm_layer_forward_args(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                         const at::Tensor& w_ih, const at::Tensor& w_hh,
                                         const c10::optional<at::Tensor>& b_ih,
                                         const c10::optional<at::Tensor>& b_hh,
                                         const c10::optional<at::Tensor>& w_hr,
                                         const c10::optional<at::Tensor>& lengths) {
  LayerSizes s = check_layer_args("LSTM", 4, x, h0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths);
  check_tensor(c0, {s.batch, s.hidden_size}, x, "c0");
  return s;
}

LayerSizes check_lstm_layer_backward_args(
    const at::Tensor& grad_y, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const c10::optional<at::Tensor>& w_hr, const at::Tensor& y,
    const at::Tensor& reserve, const c10::optional<at::Tensor>& lengths) {
  LayerSizes s =
      check_lstm_layer_forward_args(x, h0, c0, w_ih, w_hh, c10::nullopt, c10::nullopt, w_hr, lengths);
  check_tensor(grad_y, {s.seq_len, s.batch, s.output_size}, x, "grad_y");
  check_tensor(grad_h_n, {s.batch, s.output_size}, x, "grad_h_n");
  check_tensor(grad_c_n, {s.batch, s.hidden_size}, x, "grad_c_n");
  check_tensor(y, {s.seq_len, s.batch, s.output_size}, x, "y");
  check_tensor(reserve, {lstm_reserve_numel(s)}, x, "reserve");
  return s;
}

LstmReserve split_lstm_reserve(const at::Tensor& reserve, const LayerSizes& s) {
  const int64_t T = s.seq_len, B = s.batch, H = s.hidden_size;
  LstmReserve r;
  r.gates = reserve.narrow(0, 0, T * B * 4 * H).view({T, B, 4 * H});
  r.cells = reserve.narrow(0, T * B * 4 * H, T * B * H).view({T, B, H});
  if (s.has_proj) r.proj_in = reserve.narrow(0, T * B * 5 * H, T * B * H).view({T, B, H});
  return r;
}

LayerSizes check_gru_layer_forward_args(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                                        const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                                        const c10::optional<at::Tensor>& b_hh,
                                        const c10::optional<at::Tensor>& lengths) {
  return check_layer_args("GRU", 3, x, h0, w_ih, w_hh, b_ih, b_hh, c10::nullopt, lengths);
}

LayerSizes check_gru_layer_backward_args(const at::Tensor& grad_y, const at::Tensor& grad_h_n,
                                         const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                                         const at::Tensor& w_hh, const at::Tensor& y,
                                         const at::Tensor& reserve,
                                         const c10::optional<at::Tensor>& lengths) {
  LayerSizes s = check_gru_layer_forward_args(x, h0, w_ih, w_hh, c10::nullopt, c10::nullopt, lengths);
  check_tensor(grad_y, {s.seq_len, s.batch, s.hidden_size}, x, "grad_y");
  check_tensor(grad_h_n, {s.batch, s.hidden_size}, x, "grad_h_n");
  check_tensor(y, {s.seq_len, s.batch, s.hidden_size}, x, "y");
  check_tensor(reserve, {gru_reserve_numel(s)}, x, "reserve");
  return s;
}

GruReserve split_gru_reserve(const at::Tensor& reserve, const LayerSizes& s) {
  const int64_t T = s.seq_len, B = s.batch, H = s.hidden_size;
  GruReserve r;
  r.gates = reserve.narrow(0, 0, T * B * 3 * H).view({T, B, 3 * H});
  r.hidden_n_proj = reserve.narrow(0, T * B * 3 * H, T * B * H).view({T, B, H});
  return r;
}

void write_previous_hidden(const at::Tensor& out, const at::Tensor& y, const at::Tensor& h0, const LayerSizes& s,
                           bool reverse) {
  const int64_t T = s.seq_len;
  if (T == 0) return;
  if (!reverse) {
    out[0].copy_(h0);
    out.narrow(0, 1, T - 1).copy_(y.narrow(0, 0, T - 1));
    return;
  }
  out.narrow(0, 0, T - 1).copy_(y.narrow(0, 1, T - 1));
  out[T - 1].copy_(h0);
  // A reverse row starts at its own last step, lengths[b] - 1, from h0: one indexed copy for all
  // the rows shorter than T (one small copy per row would be a kernel launch per row on CUDA).
  std::vector<int64_t> steps, rows;
  for (int64_t b = 0; b < s.batch; ++b) {
    const int64_t first = s.lengths[b] - 1;
    if (first >= 0 && first < T - 1) {
      steps.push_back(first);
      rows.push_back(b);
    }
  }
  if (!rows.empty()) {
    const at::Tensor row_index = host_to_device(rows, y.device());
    out.index_put_({host_to_device(steps, y.device()), row_index}, h0.index_select(0, row_index));
  }
}

at::Tensor host_to_device(c10::ArrayRef<int64_t> values, const at::Device& device) {
  const auto options = at::TensorOptions().dtype(at::kLong);
  if (device.is_cpu()) return at::tensor(values, options);
  at::Tensor staged = at::empty({static_cast<int64_t>(values.size())}, options.pinned_memory(true));
  std::copy(values.begin(), values.end(), staged.data_ptr<int64_t>());
  // The caching host allocator keeps `staged` alive until the queued copy has read it.
  return staged.to(device, /*non_blocking=*/true);
}

at::Tensor gather_previous_hidden(const at::Tensor& y, const at::Tensor& h0, const LayerSizes& s, bool reverse) {
  at::Tensor prev = at::empty_like(y, at::MemoryFormat::Contiguous);
  write_previous_hidden(prev, y, h0, s, reverse);
  return prev;
}

}  // namespace lstm_fused
