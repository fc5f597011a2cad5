// The layer ops' math in differentiable ATen ops (see composite_layers.h). It follows
// lstm_fused/reference.py, the tests' oracle, except that the input projection of all steps is
// one product.
#include "composite_layers.h"

#include <vector>

namespace lstm_fused {
namespace {

using at::Tensor;

// Whether each row advances at each step: bool [T, B, 1] on x's device, undefined when every
// row advances at every step (no lengths).
Tensor advance_masks(const Tensor& lengths, int64_t seq_len, const Tensor& x) {
  if (!lengths.defined()) return Tensor();
  const Tensor steps = at::arange(seq_len, lengths.options()).unsqueeze(1);
  return steps.lt(lengths.unsqueeze(0)).unsqueeze(2).to(x.device());
}

// The state a row keeps, and the output it writes, at step t: the new values where it advances,
// its previous state and zeros where it does not.
Tensor keep(const Tensor& mask, const Tensor& updated, const Tensor& previous) {
  return mask.defined() ? at::where(mask, updated, previous) : updated;
}

Tensor zero_where_idle(const Tensor& mask, const Tensor& updated) {
  return mask.defined() ? at::where(mask, updated, 0) : updated;
}

int64_t step_at(int64_t s, int64_t seq_len, bool reverse) { return reverse ? seq_len - 1 - s : s; }

}  // namespace

std::tuple<Tensor, Tensor, Tensor> lstm_layer_composite(const Tensor& x, const Tensor& h0, const Tensor& c0,
                                                        const Tensor& w_ih, const Tensor& w_hh, const Tensor& b_ih,
                                                        const Tensor& b_hh, const Tensor& w_hr, const Tensor& lengths,
                                                        bool reverse) {
  const int64_t seq_len = x.size(0);
  if (seq_len == 0) return {x.new_empty({0, x.size(1), h0.size(1)}), h0.clone(), c0.clone()};
  Tensor projected = at::matmul(x, w_ih.t());
  if (b_ih.defined()) projected = projected + (b_ih + b_hh);
  const Tensor masks = advance_masks(lengths, seq_len, x);
  Tensor h = h0, c = c0;
  std::vector<Tensor> outputs(seq_len);
  for (int64_t s = 0; s < seq_len; ++s) {
    const int64_t t = step_at(s, seq_len, reverse);
    const std::vector<Tensor> gates = at::addmm(projected[t], h, w_hh.t()).chunk(4, 1);
    const Tensor c_new = gates[1].sigmoid() * c + gates[0].sigmoid() * gates[2].tanh();
    Tensor h_new = gates[3].sigmoid() * c_new.tanh();
    if (w_hr.defined()) h_new = at::mm(h_new, w_hr.t());
    const Tensor mask = masks.defined() ? masks[t] : Tensor();
    h = keep(mask, h_new, h);
    c = keep(mask, c_new, c);
    outputs[t] = zero_where_idle(mask, h_new);
  }
  return {at::stack(outputs), h, c};
}

std::tuple<Tensor, Tensor> gru_layer_composite(const Tensor& x, const Tensor& h0, const Tensor& w_ih,
                                               const Tensor& w_hh, const Tensor& b_ih, const Tensor& b_hh,
                                               const Tensor& lengths, bool reverse) {
  const int64_t seq_len = x.size(0);
  if (seq_len == 0) return {x.new_empty({0, x.size(1), h0.size(1)}), h0.clone()};
  Tensor projected = at::matmul(x, w_ih.t());
  if (b_ih.defined()) projected = projected + b_ih;
  const Tensor masks = advance_masks(lengths, seq_len, x);
  Tensor h = h0;
  std::vector<Tensor> outputs(seq_len);
  for (int64_t s = 0; s < seq_len; ++s) {
    const int64_t t = step_at(s, seq_len, reverse);
    const Tensor recurrent = b_hh.defined() ? at::addmm(b_hh, h, w_hh.t()) : at::mm(h, w_hh.t());
    const std::vector<Tensor> gi = projected[t].chunk(3, 1);
    const std::vector<Tensor> gh = recurrent.chunk(3, 1);
    const Tensor r = (gi[0] + gh[0]).sigmoid();
    const Tensor z = (gi[1] + gh[1]).sigmoid();
    const Tensor n = (gi[2] + r * gh[2]).tanh();
    const Tensor h_new = n + z * (h - n);  // (1 - z) n + z h
    const Tensor mask = masks.defined() ? masks[t] : Tensor();
    h = keep(mask, h_new, h);
    outputs[t] = zero_where_idle(mask, h_new);
  }
  return {at::stack(outputs), h};
}

}  // namespace lstm_fused
