// The host side of the layer ops, shared by every device: buffers, the input-projection GEMM,
// the time loop over active rows, and the weight/input-gradient GEMMs after the backward loop.
// What differs per device is the work of one step, passed in as a callable that receives raw
// pointers: building tensor views per step would cost more than a small step's work on the CPU.
// Every pointer covers only the `rows` rows that advance at step t; rows are contiguous.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "gradient_gemms.h"
#include "layer_args.h"

namespace lstm_fused {

// One LSTM forward step. cell_t is the running cell state's type (float for the half types).
template <typename scalar_t, typename cell_t>
struct LstmForwardStep {
  int64_t t = 0;
  int64_t rows = 0;
  const scalar_t* h_prev = nullptr;  // [rows, P]  recurrent input h_{t-1}
  scalar_t* gates = nullptr;         // [rows, 4H] input projection x W_ih^T in, activated gates out
  const scalar_t* bias = nullptr;    // [4H] b_ih + b_hh for the step to add; null without biases
  cell_t* c_state = nullptr;         // [rows, H]  c_{t-1} in, c_t out
  scalar_t* cells = nullptr;         // [rows, H]  receives c_t for the reserve
  scalar_t* h_out = nullptr;         // [rows, H]  receives o * tanh(c_t)
  scalar_t* h_next = nullptr;        // [rows, H]  receives it too, as the next h; null with projection
};

// One LSTM backward step.
template <typename scalar_t, typename cell_t>
struct LstmBackwardStep {
  int64_t t = 0;
  int64_t rows = 0;
  const scalar_t* gates = nullptr;       // [rows, 4H] activated gates of step t
  scalar_t* d_gates = nullptr;           // [rows, 4H] receives the pre-activation gradients
  const scalar_t* cells = nullptr;       // [T, B, H]  every step's cell state (c_{t-1} of row b is at
                                         //            its previous step, previous_step())
  const scalar_t* c0 = nullptr;          // [B, H]     the initial cell state
  const int64_t* lengths = nullptr;      // [B]        on the device of the tensors; null: every row has T steps
  const scalar_t* d_cell_out = nullptr;  // [rows, H]  gradient reaching o * tanh(c_t) from later steps
  const scalar_t* grad_y = nullptr;      // [rows, H]  gradient of y[t], to add to d_cell_out; null
                                         //            when the host has added it (projection)
  cell_t* dc_state = nullptr;            // [rows, H]  gradient reaching c_t in, c_{t-1} out
  scalar_t* dh_prev = nullptr;           // [rows, P]  receives d_gates W_hh, the gradient reaching h_{t-1}
};

// One GRU forward step.
template <typename scalar_t>
struct GruForwardStep {
  int64_t t = 0;
  int64_t rows = 0;
  const scalar_t* h_prev = nullptr;       // [rows, H]  h_{t-1}
  scalar_t* gates = nullptr;              // [rows, 3H] input projection x W_ih^T in, activated r, z, n out
  const scalar_t* input_bias = nullptr;   // [3H] b_ih; null without biases
  const scalar_t* hidden_bias = nullptr;  // [3H] b_hh; null without biases
  scalar_t* hidden_n_proj = nullptr;      // [rows, H]  receives h_{t-1} W_hn^T + b_hn (reserve)
  scalar_t* h_out = nullptr;              // [rows, H]  receives h_t (the layer output y[t])
  scalar_t* h_next = nullptr;             // [rows, H]  receives h_t too, as the next step's h
};

// One GRU backward step.
template <typename scalar_t>
struct GruBackwardStep {
  int64_t t = 0;
  int64_t rows = 0;
  const scalar_t* gates = nullptr;          // [rows, 3H] activated r, z, n
  const scalar_t* hidden_n_proj = nullptr;  // [rows, H]  h_{t-1} W_hn^T + b_hn
  const scalar_t* h_prev = nullptr;         // [rows, H]  h_{t-1}
  const scalar_t* grad_y = nullptr;         // [rows, H]  gradient of y[t]
  scalar_t* dh = nullptr;                   // [rows, H]  gradient reaching h_t from later steps in; the
                                            //            whole gradient reaching h_{t-1} out:
                                            //            z*dh (pointwise) + d_hidden_gates W_hh
  scalar_t* d_input_gates = nullptr;        // [rows, 3H] receives the gradients of x W_ih^T + b_ih
  scalar_t* d_hidden_gates = nullptr;       // [rows, 3H] receives the gradients of h W_hh^T + b_hh
                                            //            (step scratch: not kept after the step)
};

// Asks Linux to back a large fresh CPU buffer with 2 MB pages, before anything touches it.
// torch's CPU allocator hands large blocks straight from mmap, so every call's [T, B, 4H]
// buffers are new pages: with 4 KB pages, their first writes were thousands of page faults per
// call (at B=128 H=512 T=35, about a fifth of the forward loop's time). The system setting
// "transparent_hugepage=madvise" (a common default) honours exactly this request; elsewhere it is
// a no-op. Only from 32 MB: glibc serves every block that large with its own mmap (its dynamic
// mmap threshold stops at 32 MB), so the advice dies with the buffer; a smaller block may be heap
// memory that outlives the tensor, and the advice with it.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (!t.device().is_cpu() || t.nbytes() < (uintptr_t(32) << 20)) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + t.nbytes()) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advice only
#else
  (void)t;
#endif
}

// With lengths, rows that do not advance are never written: those buffers start from zeros so
// that y is zero-padded and the gradient GEMMs meet no uninitialised memory.
inline at::Tensor layer_buffer(at::IntArrayRef shape, const at::TensorOptions& options, bool padded,
                               bool onednn_operand = false) {
  at::Tensor buffer = gemm_operand_buffer(shape, options, onednn_operand);
  advise_huge_pages(buffer);
  return padded ? buffer.zero_() : buffer;
}

// h ping-pongs between two buffers so that a step may read h_{t-1} of every row while it writes
// h_t (a GPU kernel's blocks do both at once). Both start as h0: a row that has not yet advanced
// (reverse direction with lengths) reads h0 from either.
inline void init_hidden_buffers(at::Tensor (&h_buffers)[2], const at::Tensor& h0) {
  h_buffers[0] = h0.clone(at::MemoryFormat::Contiguous);
  h_buffers[1] = h0.clone(at::MemoryFormat::Contiguous);
}

// h_n from the ping-pong buffers. Row b last wrote buffer (its last step index + 1) % 2: T % 2
// in reverse (every row ends at t = 0), lengths[b] % 2 forward. Rows that never advanced hold h0
// in both.
inline at::Tensor final_hidden(const at::Tensor (&h_buffers)[2], const LayerSizes& s, bool reverse) {
  if (reverse) return h_buffers[s.seq_len % 2];
  std::vector<int64_t> is_odd(s.batch);
  int64_t odd_rows = 0;
  for (int64_t b = 0; b < s.batch; ++b) {
    is_odd[b] = s.lengths[b] % 2;
    odd_rows += is_odd[b];
  }
  if (odd_rows == 0) return h_buffers[0];
  if (odd_rows == s.batch) return h_buffers[1];
  const at::Tensor odd = host_to_device(is_odd, h_buffers[0].device()).view({s.batch, 1}).to(at::kBool);
  return at::where(odd, h_buffers[1], h_buffers[0]);
}

// Calls fn(index, t, rows) for every step with rows to advance, in processing order: t runs
// backwards in time when `backwards` (a reverse direction's forward pass, a forward direction's
// backward pass). `index` counts the steps (its parity picks the ping-pong hidden buffer).
// [first_index, end_index) limits it to part of the sequence (-1: to its end).
template <typename Fn>
void for_each_active_step(const LayerSizes& s, bool backwards, Fn&& fn, int64_t first_index = 0,
                          int64_t end_index = -1) {
  if (end_index < 0) end_index = s.seq_len;
  for (int64_t index = first_index; index < end_index; ++index) {
    const int64_t t = backwards ? s.seq_len - 1 - index : index;
    if (s.active_rows[t] > 0) fn(index, t, s.active_rows[t]);
  }
}

// Which of the gradients computed after the backward loop the caller wants. A first layer's
// input is data: its grad_x (the GEMM d_gates W_ih, a sixth of a large layer's training FLOPs)
// is not needed. A frozen layer's weights need no gradients (the d_gates^T [x | h] GEMMs and
// the bias sums, a third). What is not wanted comes back as an empty tensor.
struct WantedGradients {
  bool x = true;
  bool weights = true;
};

inline at::Tensor unwanted(const at::Tensor& like) { return at::empty({0}, like.options()); }

// grad_x from d_gates W_ih (gate_gemms' `nn`), in x's shape, or empty when not wanted.
inline at::Tensor input_gradient(const at::Tensor& product, const at::Tensor& x, const WantedGradients& wanted) {
  return wanted.x ? product.view({x.size(0), x.size(1), x.size(2)}) : unwanted(x);
}


// The buffers of one LSTM forward pass, set up before its time loop (the per-step loop below, or
// a device's whole-sequence kernel) and turned into the op's outputs after it.
template <typename cell_t>
struct LstmForwardBuffers {
  at::Tensor reserve;       // the op's reserve output
  LstmReserve r;            // its views
  at::Tensor y;             // [T, B, P]
  at::Tensor bias;          // [4H] b_ih + b_hh, undefined without biases
  at::Tensor c;             // [B, H] the running cell state, in cell_t
  at::Tensor h_buffers[2];  // [B, P] the ping-pong hidden states (init_hidden_buffers)

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs(const LayerSizes& s, bool reverse,
                                                                     at::ScalarType dtype) const {
    return {y, final_hidden(h_buffers, s, reverse), c.to(dtype), reserve};
  }
};

template <typename cell_t>
LstmForwardBuffers<cell_t> begin_lstm_forward(const LayerSizes& s, const at::Tensor& x, const at::Tensor& h0,
                                              const at::Tensor& c0, const at::Tensor& w_ih,
                                              const c10::optional<at::Tensor>& b_ih,
                                              const c10::optional<at::Tensor>& b_hh, bool padded,
                                              bool project_input = true) {
  const int64_t T = s.seq_len, B = s.batch, H = s.hidden_size, P = s.output_size;
  LstmForwardBuffers<cell_t> f;
  f.reserve = layer_buffer({lstm_reserve_numel(s)}, x.options(), padded);
  f.r = split_lstm_reserve(f.reserve, s);
  f.y = layer_buffer({T, B, P}, x.options(), padded);
  // The input projection of every step in one GEMM. The biases are added by each step's
  // pointwise pass, where they cost nothing, rather than broadcast into this [T*B, 4H] buffer
  // first (a whole extra pass over it).
  // (A device loop that projects the input inside its own product passes project_input=false.)
  if (project_input) {
    at::Tensor gates_2d = f.r.gates.view({T * B, 4 * H});
    at::mm_out(gates_2d, x.reshape({T * B, s.input_size}), w_ih.t());
  }
  if (s.has_bias) f.bias = (*b_ih + *b_hh).contiguous();
  init_hidden_buffers(f.h_buffers, h0);
  f.c = c0.to(c10::CppTypeToScalarType<cell_t>::value, /*non_blocking=*/false, /*copy=*/true).contiguous();
  return f;
}

template <typename scalar_t, typename cell_t, typename StepFn>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_lstm_layer_forward(
    const LayerSizes& s, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& w_ih, const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
    const c10::optional<at::Tensor>& w_hr, bool padded, bool reverse, StepFn&& step) {
  const int64_t B = s.batch, H = s.hidden_size;
  LstmForwardBuffers<cell_t> f = begin_lstm_forward<cell_t>(s, x, h0, c0, w_ih, b_ih, b_hh, padded);
  scalar_t* h_ptr[2] = {f.h_buffers[0].template data_ptr<scalar_t>(), f.h_buffers[1].template data_ptr<scalar_t>()};
  scalar_t* gates = f.r.gates.template data_ptr<scalar_t>();
  scalar_t* cells = f.r.cells.template data_ptr<scalar_t>();
  scalar_t* h_out = (s.has_proj ? f.r.proj_in : f.y).template data_ptr<scalar_t>();

  LstmForwardStep<scalar_t, cell_t> fs;
  fs.bias = s.has_bias ? f.bias.template data_ptr<scalar_t>() : nullptr;
  fs.c_state = f.c.template data_ptr<cell_t>();
  for_each_active_step(s, reverse, [&](int64_t index, int64_t t, int64_t rows) {
    fs.t = t;
    fs.rows = rows;
    fs.h_prev = h_ptr[index % 2];
    fs.gates = gates + t * B * 4 * H;
    fs.cells = cells + t * B * H;
    fs.h_out = h_out + t * B * H;
    fs.h_next = s.has_proj ? nullptr : h_ptr[(index + 1) % 2];
    step(fs);
    if (s.has_proj) {
      at::Tensor y_t = f.y[t].narrow(0, 0, fs.rows);
      at::mm_out(y_t, f.r.proj_in[t].narrow(0, 0, fs.rows), w_hr->t());
      f.h_buffers[(index + 1) % 2].narrow(0, 0, fs.rows).copy_(y_t);
    }
  });
  return f.outputs(s, reverse, x.scalar_type());
}

// The buffers of one LSTM backward pass, set up before its time loop (the per-step loop below, or
// a device's own loop) and turned into the op's gradients after it: the input, weight and bias
// gradients are single GEMMs / reductions over every step's gate gradients.
template <typename cell_t>
struct LstmBackwardBuffers {
  LstmReserve r;          // views of the forward's reserve
  at::Tensor d_gates;     // [T, B, 4H] the pre-activation gradients of every step
  at::Tensor d_h_steps;   // [T, B, P] with a projection: the total gradient reaching each step's h
  at::Tensor d_proj_in;   // [B, H] with a projection: one step's gradient reaching o * tanh(c)
  at::Tensor dh;          // [B, P] the gradient reaching h from later steps (grad_h_n at first)
  at::Tensor dc;          // [B, H] the same for c, in cell_t
  at::Tensor c0;          // contiguous c0
  at::Tensor grad_y;      // contiguous grad_y
  at::Tensor lengths;     // [B] int64 on the tensors' device, for kernels that need each row's own
                          // first step; undefined without lengths (every row then has T steps)

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gradients(
      const LayerSizes& s, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
      const at::Tensor& y, bool reverse, const WantedGradients& wanted) const {
    const int64_t T = s.seq_len, B = s.batch, H = s.hidden_size, P = s.output_size, I = s.input_size;
    const int64_t M = T * B;
    const at::Tensor d_gates_2d = d_gates.view({M, 4 * H});
    const at::Tensor w_for_x = wanted.x ? w_ih : at::Tensor();
    if (!wanted.weights) {
      const at::Tensor grad_x = input_gradient(gate_gemms(d_gates_2d, w_for_x, {}, false).nn, x, wanted);
      return {grad_x, dh, dc.to(x.scalar_type()), unwanted(x), unwanted(x), unwanted(x), unwanted(x)};
    }
    at::Tensor grad_x, grad_w_ih, grad_w_hh, grad_bias;
    // A few rows (an LSTMCell step: T * B <= 16) make the weight gradients outer-product-like
    // GEMMs that write as much as they read: there the two copies out of one combined result
    // cost as much as the GEMM, and two GEMMs straight into their results are cheaper.
    constexpr int64_t kFewRows = 16;
    if (I <= P && M > kFewRows) {
      // Both weight gradients in one GEMM, d_gates^T [x | h_{t-1}]: d_gates (the large operand)
      // is read and packed once instead of twice, for a copy of x (at most as large as h_{t-1},
      // which is copied anyway). With MKL on the CPU the bias gradient comes out of the same
      // GEMM as one more column, of ones, instead of a third pass over d_gates (measured
      // 1.01-1.50x faster than GEMM + column sum, benchmarks/NOTES.md); where the GEMM goes to
      // oneDNN (gradient_gemms.h) it is ATen's column sum. Not on CUDA, unmeasured there: the
      // odd leading dimension could keep cuBLAS off its tensor-core kernels.
      const bool onednn = gradient_gemm_on_onednn(d_gates_2d, I + P + (wanted.x ? I : 0));
      const int64_t ones = x.is_cpu() && !onednn ? 1 : 0;
      at::Tensor inputs = gemm_operand_buffer({T, B, I + P + ones}, x.options(), onednn);
      inputs.narrow(2, 0, I).copy_(x);
      write_previous_hidden(inputs.narrow(2, I, P), y, h0, s, reverse);
      if (ones) inputs.narrow(2, I + P, 1).fill_(1);
      GateGemms products = gate_gemms(d_gates_2d, w_for_x, inputs.view({M, I + P + ones}), /*sums=*/!ones);
      const at::Tensor& grad_w = products.tn;
      grad_x = products.nn;
      grad_bias = ones ? grad_w.select(1, I + P).contiguous() : products.sums;
      grad_w_ih = grad_w.narrow(1, 0, I).contiguous();
      grad_w_hh = grad_w.narrow(1, I, P).contiguous();
    } else {
      GateGemms products = gate_gemms(d_gates_2d, w_for_x, x.reshape({M, I}), /*sums=*/true);
      grad_x = products.nn;
      grad_w_ih = products.tn;
      grad_bias = products.sums;
      grad_w_hh = gemm_tn(d_gates_2d, gather_previous_hidden(y, h0, s, reverse).view({M, P}));
    }
    grad_x = input_gradient(grad_x, x, wanted);
    at::Tensor grad_w_hr = s.has_proj ? gemm_tn(d_h_steps.view({T * B, P}), r.proj_in.view({T * B, H}))
                                      : at::empty({0}, x.options());
    return {grad_x, dh, dc.to(x.scalar_type()), grad_w_ih, grad_w_hh, grad_bias, grad_w_hr};
  }
};

template <typename cell_t>
LstmBackwardBuffers<cell_t> begin_lstm_backward(const LayerSizes& s, const at::Tensor& grad_y,
                                                const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                                                const at::Tensor& x, const at::Tensor& c0,
                                                const at::Tensor& reserve, bool padded) {
  const int64_t T = s.seq_len, B = s.batch, H = s.hidden_size, P = s.output_size;
  LstmBackwardBuffers<cell_t> g;
  g.r = split_lstm_reserve(reserve, s);
  // The gate gradients are the large operand of the gradient GEMMs after the loop: where those go
  // to oneDNN, in oneDNN's memory from the start (gemm_operand_buffer).
  g.d_gates = layer_buffer({T, B, 4 * H}, x.options(), padded,
                           gradient_gemm_on_onednn(T * B, 4 * H, s.input_size + P, x.options()));
  if (s.has_proj) {
    g.d_h_steps = layer_buffer({T, B, P}, x.options(), padded);
    g.d_proj_in = at::empty({B, H}, x.options());
  }
  g.dh = grad_h_n.clone(at::MemoryFormat::Contiguous);
  g.dc = grad_c_n.to(c10::CppTypeToScalarType<cell_t>::value, /*non_blocking=*/false, /*copy=*/true)
             .contiguous();
  g.c0 = c0.contiguous();
  g.grad_y = grad_y.contiguous();
  if (padded) g.lengths = host_to_device(s.lengths, x.device());
  return g;
}

template <typename scalar_t, typename cell_t, typename StepFn>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
run_lstm_layer_backward(const LayerSizes& s, const at::Tensor& grad_y, const at::Tensor& grad_h_n,
                        const at::Tensor& grad_c_n, const at::Tensor& x, const at::Tensor& h0,
                        const at::Tensor& c0, const at::Tensor& w_ih, const c10::optional<at::Tensor>& w_hr,
                        const at::Tensor& y, const at::Tensor& reserve, bool padded, bool reverse,
                        const WantedGradients& wanted, StepFn&& step) {
  const int64_t B = s.batch, H = s.hidden_size;
  LstmBackwardBuffers<cell_t> g = begin_lstm_backward<cell_t>(s, grad_y, grad_h_n, grad_c_n, x, c0, reserve, padded);

  LstmBackwardStep<scalar_t, cell_t> bs;
  bs.cells = g.r.cells.template data_ptr<scalar_t>();
  bs.c0 = g.c0.template data_ptr<scalar_t>();
  bs.lengths = g.lengths.defined() ? g.lengths.template data_ptr<int64_t>() : nullptr;
  bs.dc_state = g.dc.template data_ptr<cell_t>();
  bs.dh_prev = g.dh.template data_ptr<scalar_t>();
  for_each_active_step(s, !reverse, [&](int64_t, int64_t t, int64_t rows) {
    bs.t = t;
    bs.rows = rows;
    bs.gates = g.r.gates.template data_ptr<scalar_t>() + t * B * 4 * H;
    bs.d_gates = g.d_gates.template data_ptr<scalar_t>() + t * B * 4 * H;
    if (s.has_proj) {
      at::Tensor dh_t = g.dh.narrow(0, 0, bs.rows);
      dh_t.add_(g.grad_y[t].narrow(0, 0, bs.rows));
      g.d_h_steps[t].narrow(0, 0, bs.rows).copy_(dh_t);
      at::Tensor d_proj_in_t = g.d_proj_in.narrow(0, 0, bs.rows);
      at::mm_out(d_proj_in_t, dh_t, *w_hr);
      bs.d_cell_out = d_proj_in_t.template data_ptr<scalar_t>();
      bs.grad_y = nullptr;
    } else {
      bs.d_cell_out = g.dh.template data_ptr<scalar_t>();
      bs.grad_y = g.grad_y.template data_ptr<scalar_t>() + t * B * H;
    }
    step(bs);
  });
  return g.gradients(s, x, h0, w_ih, y, reverse, wanted);
}

// The buffers of one GRU forward pass, set up before its time loop (the per-step loop below, or a
// device's whole-sequence kernel) and turned into the op's outputs after it.
struct GruForwardBuffers {
  at::Tensor reserve;       // the op's reserve output
  GruReserve r;             // its views
  at::Tensor y;             // [T, B, H]
  at::Tensor input_bias;    // [3H] b_ih, undefined without biases
  at::Tensor hidden_bias;   // [3H] b_hh, likewise
  at::Tensor h_buffers[2];  // [B, H] the ping-pong hidden states (init_hidden_buffers)

  std::tuple<at::Tensor, at::Tensor, at::Tensor> outputs(const LayerSizes& s, bool reverse) const {
    return {y, final_hidden(h_buffers, s, reverse), reserve};
  }
};

inline GruForwardBuffers begin_gru_forward(const LayerSizes& s, const at::Tensor& x, const at::Tensor& h0,
                                           const at::Tensor& w_ih, const c10::optional<at::Tensor>& b_ih,
                                           const c10::optional<at::Tensor>& b_hh, bool padded) {
  const int64_t T = s.seq_len, B = s.batch, H = s.hidden_size;
  GruForwardBuffers f;
  f.reserve = layer_buffer({gru_reserve_numel(s)}, x.options(), padded);
  f.r = split_gru_reserve(f.reserve, s);
  f.y = layer_buffer({T, B, H}, x.options(), padded);
  // The input projection of every step in one GEMM; the steps add the biases (b_hn must stay
  // apart anyway: it sits inside r * (.)).
  at::Tensor gates_2d = f.r.gates.view({T * B, 3 * H});
  at::mm_out(gates_2d, x.reshape({T * B, s.input_size}), w_ih.t());
  if (s.has_bias) {
    f.input_bias = b_ih->contiguous();
    f.hidden_bias = b_hh->contiguous();
  }
  init_hidden_buffers(f.h_buffers, h0);
  return f;
}

template <typename scalar_t, typename StepFn>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_gru_layer_forward(
    const LayerSizes& s, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
    const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh, bool padded, bool reverse,
    StepFn&& step) {
  const int64_t B = s.batch, H = s.hidden_size;
  GruForwardBuffers f = begin_gru_forward(s, x, h0, w_ih, b_ih, b_hh, padded);
  scalar_t* h_ptr[2] = {f.h_buffers[0].data_ptr<scalar_t>(), f.h_buffers[1].data_ptr<scalar_t>()};
  GruForwardStep<scalar_t> fs;
  fs.input_bias = s.has_bias ? f.input_bias.data_ptr<scalar_t>() : nullptr;
  fs.hidden_bias = s.has_bias ? f.hidden_bias.data_ptr<scalar_t>() : nullptr;
  for_each_active_step(s, reverse, [&](int64_t index, int64_t t, int64_t rows) {
    fs.t = t;
    fs.rows = rows;
    fs.h_prev = h_ptr[index % 2];
    fs.gates = f.r.gates.data_ptr<scalar_t>() + t * B * 3 * H;
    fs.hidden_n_proj = f.r.hidden_n_proj.data_ptr<scalar_t>() + t * B * H;
    fs.h_out = f.y.data_ptr<scalar_t>() + t * B * H;
    fs.h_next = h_ptr[(index + 1) % 2];
    step(fs);
  });
  return f.outputs(s, reverse);
}

// The buffers of one GRU backward pass, set up before its time loop (the per-step loop below, or
// a device's own loop) and turned into the op's gradients after it.
struct GruBackwardBuffers {
  GruReserve r;              // views of the forward's reserve
  at::Tensor d_input_gates;  // [T, B, 3H] the gradients of x W_ih^T + b_ih of every step
  // h_{t-1} of every row at step t is y's previous step, or h0 at the first step, except for a
  // reverse row shorter than T, which starts from h0 at its own last step (and y is zero there):
  // only then is h_{t-1} gathered into a [T, B, H] buffer; otherwise it is read where it is.
  bool gathered = false;
  at::Tensor h_prev;         // [T, B, H] when gathered
  at::Tensor y;              // contiguous y
  at::Tensor h0;             // contiguous h0
  at::Tensor dh;             // [B, H] grad_h_n in, the gradient of h0 out
  at::Tensor grad_y;         // contiguous grad_y

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gradients(
      const LayerSizes& s, const at::Tensor& x, const at::Tensor& w_ih, bool reverse,
      const WantedGradients& wanted) const {
    const int64_t T = s.seq_len, B = s.batch, H = s.hidden_size;
    const at::Tensor d_input_2d = d_input_gates.view({T * B, 3 * H});
    GateGemms products = gate_gemms(d_input_2d, wanted.x ? w_ih : at::Tensor(),
                                    wanted.weights ? x.reshape({T * B, s.input_size}) : at::Tensor(), wanted.weights);
    const at::Tensor grad_x = input_gradient(products.nn, x, wanted);
    if (!wanted.weights) return {grad_x, dh, unwanted(x), unwanted(x), unwanted(x), unwanted(x)};
    const at::Tensor grad_w_ih = products.tn, grad_b_ih = products.sums;
    // d_input_gates is no longer needed as such: its n column times r turns it into the gradients
    // of h W_hh^T + b_hh, in place.
    d_input_2d.narrow(1, 2 * H, H).mul_(r.gates.view({T * B, 3 * H}).narrow(1, 0, H));
    at::Tensor grad_w_hh, grad_b_hh;
    if (gathered) {
      GateGemms hidden = gate_gemms(d_input_2d, {}, h_prev.view({T * B, H}), /*sums=*/true);
      grad_w_hh = hidden.tn;
      grad_b_hh = hidden.sums;
    } else if (T > 0) {
      // The step that starts from h0, then the T - 1 steps whose h_{t-1} is a step of y.
      const int64_t first = reverse ? T - 1 : 0;
      grad_w_hh = at::mm(d_input_gates[first].t(), h0);
      if (T > 1) {  // (an empty addmm_ would still pass over the result)
        const at::Tensor d_rest = d_input_gates.narrow(0, reverse ? 0 : 1, T - 1).reshape({(T - 1) * B, 3 * H});
        const at::Tensor y_rest = y.narrow(0, reverse ? 1 : 0, T - 1).reshape({(T - 1) * B, H});
        if (gradient_gemm_on_onednn(d_rest, H)) {
          grad_w_hh.add_(gemm_tn(d_rest, y_rest));
        } else {
          grad_w_hh.addmm_(d_rest.t(), y_rest);
        }
      }
    } else {
      grad_w_hh = at::zeros({3 * H, H}, x.options());
    }
    if (!grad_b_hh.defined()) grad_b_hh = d_input_2d.sum(0);
    return {grad_x, dh, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh};
  }
};

inline GruBackwardBuffers begin_gru_backward(const LayerSizes& s, const at::Tensor& grad_y,
                                             const at::Tensor& grad_h_n, const at::Tensor& x, const at::Tensor& h0,
                                             const at::Tensor& y, const at::Tensor& reserve, bool padded,
                                             bool reverse) {
  const int64_t T = s.seq_len, B = s.batch, H = s.hidden_size;
  GruBackwardBuffers g;
  g.r = split_gru_reserve(reserve, s);
  g.d_input_gates = layer_buffer({T, B, 3 * H}, x.options(), padded,
                                 gradient_gemm_on_onednn(T * B, 3 * H, s.input_size, x.options()));
  g.gathered = reverse && padded;
  if (g.gathered) g.h_prev = gather_previous_hidden(y, h0, s, reverse);
  g.y = y.contiguous();
  g.h0 = h0.contiguous();
  g.dh = grad_h_n.clone(at::MemoryFormat::Contiguous);
  g.grad_y = grad_y.contiguous();
  return g;
}

template <typename scalar_t, typename StepFn>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
run_gru_layer_backward(const LayerSizes& s, const at::Tensor& grad_y, const at::Tensor& grad_h_n,
                       const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                       const at::Tensor& y, const at::Tensor& reserve, bool padded, bool reverse,
                       const WantedGradients& wanted, StepFn&& step) {
  const int64_t T = s.seq_len, B = s.batch, H = s.hidden_size;
  GruBackwardBuffers g = begin_gru_backward(s, grad_y, grad_h_n, x, h0, y, reserve, padded, reverse);
  // The gradients of h W_hh^T + b_hh are d_input_gates' in the r and z columns and d_n * r in the
  // n column. Each step writes its own into one [B, 3H] scratch for the recurrent product, and
  // after the loop d_input_gates becomes them in place, instead of a second [T, B, 3H] buffer
  // (at B=128, H=512: 27 MB less at the peak).
  at::Tensor d_hidden_step = at::empty({B, 3 * H}, x.options());
  const auto h_prev_at = [&](int64_t t) -> const scalar_t* {
    if (g.gathered) return g.h_prev.data_ptr<scalar_t>() + t * B * H;
    const int64_t prev = reverse ? t + 1 : t - 1;
    return prev < 0 || prev >= T ? g.h0.data_ptr<scalar_t>() : g.y.data_ptr<scalar_t>() + prev * B * H;
  };

  GruBackwardStep<scalar_t> bs;
  bs.dh = g.dh.data_ptr<scalar_t>();
  for_each_active_step(s, !reverse, [&](int64_t, int64_t t, int64_t rows) {
    bs.t = t;
    bs.rows = rows;
    bs.gates = g.r.gates.data_ptr<scalar_t>() + t * B * 3 * H;
    bs.hidden_n_proj = g.r.hidden_n_proj.data_ptr<scalar_t>() + t * B * H;
    bs.h_prev = h_prev_at(t);
    bs.grad_y = g.grad_y.data_ptr<scalar_t>() + t * B * H;
    bs.d_input_gates = g.d_input_gates.data_ptr<scalar_t>() + t * B * 3 * H;
    bs.d_hidden_gates = d_hidden_step.data_ptr<scalar_t>();
    step(bs);
  });
  return g.gradients(s, x, w_ih, reverse, wanted);
}

}  // namespace lstm_fused
