// The GRU's weight-stationary inference loop: the LSTM loop's pieces (lstm_stationary.h: packed
// panels, register-tiled products, team plans) for the GRU's three gates, without a reserve.
//
// Why: the GRU ran MKL's packed GEMM per step, and at small steps a step's fixed costs (the
// GEMM call, a parallel pointwise pass) outweigh its arithmetic: at B=8 H=64 the LSTM's
// stationary loop took ~3 us per step and the GRU's per-step loop 7.5-9.5 us, for less work.
//
// Scope: inference (no gradient wanted), when the team needs no barrier: the packed W_hh fits the
// rows split (each thread owns batch rows and all units; a row's next step reads only its own
// h_t), or the team is one thread. Otherwise, and for training, the per-step loop runs. The input
// projection is one GEMM per segment of steps before the loop (for_each_projected_segment), as on
// the per-step path: the n gate needs x W_in^T and h W_hn^T apart (r multiplies only the latter),
// so it cannot share the recurrent product's tiles as the LSTM's does.
#pragma once

#include <ATen/ATen.h>

#include "lstm_stationary.h"

namespace lstm_fused {
namespace CPU_CAPABILITY {  // one copy per SIMD level: cpu_kernels.h

// The biases (null: none) of units [u, u + n) added to a GRU step's input-side (r, z, n) and
// hidden-side (hr, hz, hn) pre-activations.
template <typename scalar_t, typename Vec>
inline void add_gru_biases(const scalar_t* b_ih, const scalar_t* b_hh, int64_t u, int64_t H, int n, Vec& r, Vec& z,
                           Vec& nn, Vec& hr, Vec& hz, Vec& hn) {
  if (b_ih == nullptr) return;
  r = r + Vec::loadu(b_ih + u, n);
  z = z + Vec::loadu(b_ih + H + u, n);
  nn = nn + Vec::loadu(b_ih + 2 * H + u, n);
  hr = hr + Vec::loadu(b_hh + u, n);
  hz = hz + Vec::loadu(b_hh + H + u, n);
  hn = hn + Vec::loadu(b_hh + 2 * H + u, n);
}

namespace stationary {

constexpr int64_t kGruGates = 3;

// The team for the GRU's loop: the LSTM's plan for W_hh's panels.
template <typename scalar_t>
TeamPlan gru_plan(const LayerSizes& s) {
  const int64_t chunks = chunk_count<scalar_t>(s.hidden_size);
  const int64_t panel_bytes = chunks * s.hidden_size * kGruGates * lanes<scalar_t>() * int64_t(sizeof(scalar_t));
  return plan_team(s, chunks, panel_bytes);
}

// Whether the GRU inference op takes this loop. LSTM_FUSED_CPU_LOOP=step turns it off and
// =stationary turns the sequence-length limit off (for comparisons and tests); a team that would
// need a barrier per step (units split on several threads) never takes it.
inline bool gru_enabled(const LayerSizes& s, const TeamPlan& plan) {
  if (!plan.by_rows && plan.threads > 1) return false;
  if (const char* setting = std::getenv("LSTM_FUSED_CPU_LOOP")) {
    if (std::strcmp(setting, "step") == 0) return false;
    if (std::strcmp(setting, "stationary") == 0) return true;
  }
  return s.seq_len >= kMinSteps;
}

// Steps [first_index, end_index) of the GRU forward without a reserve. gates_of(t): step t's
// input projection x_t W_ih^T, [B, 3H]; h[2] the ping-pong hidden states; y [T, B, H].
template <typename scalar_t, typename GatesOf>
void gru_inference_steps(const LayerSizes& s, bool reverse, int64_t first_index, int64_t end_index,
                         const TeamPlan& plan, scalar_t* const h[2], scalar_t* y, const scalar_t* b_ih,
                         const scalar_t* b_hh, const at::Tensor& packed, const GatesOf& gates_of) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t w = lanes<scalar_t>();
  const int64_t B = s.batch, H = s.hidden_size, chunks = chunk_count<scalar_t>(H);
  const scalar_t* panels = packed.data_ptr<scalar_t>();
  // Each thread's product of one chunk for its rows: [B][3 * w], h W_hr^T, h W_hz^T, h W_hn^T.
  run_team<scalar_t>(plan, s, chunks, B * kGruGates * w, packed.options(), [&](const Share& share, scalar_t* product) {
    for_each_active_step(s, reverse, [&](int64_t index, int64_t t, int64_t rows) {
      const auto [row_begin, row_end] = share.rows_of(rows);
      const int64_t own_rows = row_end - row_begin;
      const scalar_t* h_prev = h[index % 2] + row_begin * H;
      scalar_t* h_next = h[(index + 1) % 2] + row_begin * H;
      const scalar_t* gates_t = gates_of(t) + row_begin * kGruGates * H;
      scalar_t* y_t = y + (t * B + row_begin) * H;
      for (int64_t chunk = share.first_chunk; own_rows > 0 && chunk < share.last_chunk; ++chunk) {
        const int64_t u = chunk * w;
        const int n = static_cast<int>(std::min<int64_t>(w, H - u));
        panel_product<scalar_t, kGruGates>(own_rows, h_prev, H, panels + chunk * H * kGruGates * w, kGruGates * w, w,
                                           H, product, kGruGates * w);
        for (int64_t b = 0; b < own_rows; ++b) {
          const scalar_t* g = gates_t + b * kGruGates * H + u;
          const scalar_t* acc = product + b * kGruGates * w;
          Vec r = Vec::loadu(g, n), z = Vec::loadu(g + H, n), nn = Vec::loadu(g + 2 * H, n);
          Vec hr = Vec::loadu(acc), hz = Vec::loadu(acc + w), hn = Vec::loadu(acc + 2 * w);
          add_gru_biases(b_ih, b_hh, u, H, n, r, z, nn, hr, hz, hn);
          const int64_t k = b * H + u;
          Vec h_t;
          gru_cell_forward<Vec, CellActivations<scalar_t>>(r, z, nn, hr, hz, hn, Vec::loadu(h_prev + k, n), h_t);
          h_t.store(y_t + k, n);
          h_t.store(h_next + k, n);
        }
      }
      share.step_done();
    }, first_index, end_index);
  });
}

// The GRU inference op's loop: returns (y, h_n). `plan` from gru_plan, with gru_enabled true.
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> gru_inference(const LayerSizes& s, const TeamPlan& plan, bool reverse,
                                                 const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                                                 const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                                                 const c10::optional<at::Tensor>& b_hh, bool padded) {
  const int64_t T = s.seq_len, B = s.batch, H = s.hidden_size;
  at::Tensor y = layer_buffer({T, B, H}, x.options(), padded);
  at::Tensor h_buffers[2];
  init_hidden_buffers(h_buffers, h0);
  const at::Tensor input_bias = s.has_bias ? b_ih->contiguous() : at::Tensor();
  const at::Tensor hidden_bias = s.has_bias ? b_hh->contiguous() : at::Tensor();
  scalar_t* const h[2] = {h_buffers[0].data_ptr<scalar_t>(), h_buffers[1].data_ptr<scalar_t>()};
  const at::Tensor packed = pack_forward<scalar_t>(w_hh, H, kGruGates);
  for_each_projected_segment(s, x, w_ih, reverse, [&](int64_t first, int64_t end, int64_t t_low, const at::Tensor& proj) {
    const scalar_t* base = proj.data_ptr<scalar_t>();
    gru_inference_steps<scalar_t>(s, reverse, first, end, plan, h, y.data_ptr<scalar_t>(),
                                  s.has_bias ? input_bias.data_ptr<scalar_t>() : nullptr,
                                  s.has_bias ? hidden_bias.data_ptr<scalar_t>() : nullptr, packed,
                                  [&](int64_t t) { return base + (t - t_low) * B * kGruGates * H; });
  });
  return {y, final_hidden(h_buffers, s, reverse)};
}

}  // namespace stationary
}  // namespace CPU_CAPABILITY
}  // namespace lstm_fused
