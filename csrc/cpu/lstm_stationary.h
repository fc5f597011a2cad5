// The weight-stationary LSTM time loop of the CPU kernels (float32 and float64, no projection).
//
// One OpenMP team runs the whole sequence, instead of a GEMM call (and a fork/join of the thread
// pool) per step. Thread j owns a contiguous range of hidden units, in chunks of one SIMD vector
// (`w` units), and the part of W_hh those units need, packed once per call into panels that the
// register-blocked micro-kernel below streams with unit stride:
//   forward:  panel[chunk][k][gate][lane] = W_hh[gate * H + unit][k]: the four gate rows of each
//             unit, so that one tile of the product holds i, f, g, o of the same units and the cell
//             update runs in the product's epilogue;
//   backward: panel[chunk][k][lane] = W_hh[k][unit]: the unit's column across all 4H rows.
// A thread touches the same panels at every step, so they stay in its own L2 for the whole call.
// Per step:
//   forward:  gates[rows, own units] = h_{t-1} W_hh[own]^T in register tiles; in the same tile
//             the input projection, biases, activations and cell update (cell_math.h), and h_t of
//             the thread's units is written; one barrier (the next step reads every unit of h_t).
//   backward: the pointwise backward of the thread's units (their columns of d_gates, and dc);
//             one barrier (the product needs every column of d_gates); dh[rows, own units] =
//             d_gates W_hh[:, own] (each thread reads back only its own units of dh).
// When all the packed weights fit comfortably in each core's L2 (kRowSplitPanelBytes: H = 128
// and below for float32), the team shares each step by batch rows instead (TeamPlan): every thread
// owns a range of rows and all units, computes the whole step for its rows, and never waits for
// the others, since a row's next step reads only that row's h_t (and in backward only its own
// rows of d_gates). Each row's arithmetic is the same either way, so the results are bitwise equal.
// The buffers, the input projection and the gradient GEMMs after the loop are the shared ones
// (layer_loops.h); only the time loop differs from the per-step path.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <tuple>

#include "../cell_math.h"
#include "../layer_loops.h"
#include "cpu_common.h"

namespace lstm_fused {
namespace CPU_CAPABILITY {  // one copy per SIMD level: cpu_kernels.h
namespace stationary {

// Rows per register tile, with NV = 4 vectors (the four gates) per row. AVX-512 has 32 registers:
// 6 x 4 accumulators + 4 panel vectors + a broadcast. AVX2 has 16: 3 x 4 accumulators, and the
// compiler keeps 3 of the 4 panel vectors in registers and reads the fourth from L1 in each FMA
// (9 loads per 12 FMAs per k, no spills). 3 rows measured faster than 2 (8 accumulators, just
// the FMA latency times its throughput, and 10 loads per 8 FMAs): benchmarks/NOTES.md.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kMaxRows = 6;
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int kMaxRows = 3;
#else
constexpr int kMaxRows = 2;
#endif
constexpr int kMaxVectors = 4;

// c[MR][NV * w] (row stride ldc) = a[MR rows, stride lda][0, K) times the panel: vector v of panel
// row k is at b + k * ldk + v * ldv. Everything in the loop is in registers: MR x NV accumulators,
// NV panel vectors, and each a[r][k] broadcast straight from memory.
// With `accumulate`, the tile starts from c's values instead of zero.
template <typename scalar_t, int MR, int NV>
inline void gemm_tile(const scalar_t* a, int64_t lda, const scalar_t* b, int64_t ldk, int64_t ldv, int64_t K,
                      scalar_t* c, int64_t ldc, bool accumulate) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int w = Vec::size();
  Vec acc[MR][NV];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? Vec::loadu(c + r * ldc + v * w) : Vec(scalar_t(0));
  }
  for (int64_t k = 0; k < K; ++k) {
    const scalar_t* bk = b + k * ldk;
    Vec bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = Vec::loadu(bk + v * ldv);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const Vec ar(a[r * lda + k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(ar, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v].store(c + r * ldc + v * w);
  }
}

// gemm_tile with the tile's row count (1..kMaxRows) chosen at run time; only the row counts this
// build's tiles can have are instantiated.
template <typename scalar_t, int NV, int MR = kMaxRows>
inline void gemm_rows(int rows, const scalar_t* a, int64_t lda, const scalar_t* b, int64_t ldk, int64_t ldv,
                      int64_t K, scalar_t* c, int64_t ldc, bool accumulate) {
  if constexpr (MR > 1) {
    if (rows < MR) return gemm_rows<scalar_t, NV, MR - 1>(rows, a, lda, b, ldk, ldv, K, c, ldc, accumulate);
  }
  gemm_tile<scalar_t, MR, NV>(a, lda, b, ldk, ldv, K, c, ldc, accumulate);
}

// Splits `rows` into the fewest tiles of at most kMaxRows rows, of sizes that differ by at most one
// (32 rows: 6, 5, 5, 6, 5, 5 rather than five 6s and a 2), and calls fn(first_row, tile_rows).
template <typename Fn>
inline void for_each_row_tile(int64_t rows, Fn&& fn) {
  const int64_t tiles = (rows + kMaxRows - 1) / kMaxRows;
  for (int64_t i = 0; i < tiles; ++i) {
    const int64_t begin = rows * i / tiles, end = rows * (i + 1) / tiles;
    fn(begin, static_cast<int>(end - begin));
  }
}

// c[rows][NV * w] (row stride ldc) = a[rows, 0:K) times the panel (as in gemm_tile), in register
// tiles of up to kMaxRows rows. K is cut into blocks of kBlockBytes of panel, so that each block
// is read from L2 once and then from L1 by every row tile (the tiles accumulate into c).
// prefetch(row0, tile_rows) runs before each tile of the first block: the caller's chance to bring
// in what it will need for those rows after the product, while the product keeps the core busy.
constexpr int64_t kBlockBytes = 32 * 1024;

struct NoPrefetch {
  void operator()(int64_t, int) const {}
};

template <typename scalar_t, int NV, typename Prefetch = NoPrefetch>
inline void panel_product(int64_t rows, const scalar_t* a, int64_t lda, const scalar_t* b, int64_t ldk, int64_t ldv,
                          int64_t K, scalar_t* c, int64_t ldc, const Prefetch& prefetch = Prefetch(),
                          bool accumulate = false) {
  constexpr int64_t kc = std::max<int64_t>(16, kBlockBytes / (NV * at::vec::Vectorized<scalar_t>::size() *
                                                              static_cast<int64_t>(sizeof(scalar_t))));
  for (int64_t k0 = 0; k0 < K; k0 += kc) {
    const int64_t kl = std::min<int64_t>(kc, K - k0);
    for_each_row_tile(rows, [&](int64_t row0, int tile_rows) {
      if (k0 == 0) prefetch(row0, tile_rows);
      gemm_rows<scalar_t, NV>(tile_rows, a + row0 * lda + k0, lda, b + k0 * ldk, ldk, ldv, kl, c + row0 * ldc, ldc,
                              accumulate || k0 > 0);
    });
  }
}

template <typename scalar_t, typename Prefetch = NoPrefetch>
inline void panel_product_vectors(int vectors, int64_t rows, const scalar_t* a, int64_t lda, const scalar_t* b,
                                  int64_t ldk, int64_t ldv, int64_t K, scalar_t* c, int64_t ldc,
                                  const Prefetch& prefetch = Prefetch()) {
  switch (vectors) {
    case 1: return panel_product<scalar_t, 1>(rows, a, lda, b, ldk, ldv, K, c, ldc, prefetch);
    case 2: return panel_product<scalar_t, 2>(rows, a, lda, b, ldk, ldv, K, c, ldc, prefetch);
    case 3: return panel_product<scalar_t, 3>(rows, a, lda, b, ldk, ldv, K, c, ldc, prefetch);
    default: return panel_product<scalar_t, 4>(rows, a, lda, b, ldk, ldv, K, c, ldc, prefetch);
  }
}

// The contiguous range of chunks [begin, end) that thread `id` of `count` owns.
inline std::pair<int64_t, int64_t> owned_chunks(int64_t chunks, int id, int count) {
  return {chunks * id / count, chunks * (id + 1) / count};
}

inline int team_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

inline int team_size() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

inline void team_barrier() {
#ifdef _OPENMP
#pragma omp barrier
#endif
}

// Below kSingleThreadStep FLOPs of recurrent product per step the barrier costs more than the
// second thread saves: measured at B=8 H=64 and B=32 H=32 (0.26 MFLOP per step), one thread
// against two: training 1.64x vs 1.44x and 1.26x vs 1.11x over nn.LSTM, inference 2.20x vs 2.13x;
// at B=32 H=128 (4.2 MFLOP) two threads win (1.03x vs 0.86x).
constexpr double kSingleThreadStep = 1e6;

inline double step_flops(const LayerSizes& s) {
  return 2.0 * s.batch * 4.0 * s.hidden_size * s.hidden_size;
}

// How many threads the loop runs on: torch's intra-op setting, one for small steps, at most one
// per chunk, and one when called from inside a parallel region (a nested team would get one
// thread anyway). LSTM_FUSED_CPU_THREADS=n asks for n (up to one per chunk) whatever the step
// size: for measurements, and for tests of the partitioning on small shapes.
// `threads`, or LSTM_FUSED_CPU_THREADS where set, between 1 and `most`.
inline int threads_within(int64_t threads, int64_t most) {
  if (const char* setting = std::getenv("LSTM_FUSED_CPU_THREADS")) {
    const long value = std::strtol(setting, nullptr, 10);
    if (value > 0) threads = value;
  }
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, most)));
}

inline int team_threads(const LayerSizes& s, int64_t chunks) {
  if (at::in_parallel_region()) return 1;
  return threads_within(step_flops(s) < kSingleThreadStep ? 1 : at::get_num_threads(), chunks);
}

// How a team shares each step. By units: each thread owns a range of hidden units (chunks) for
// every row, and the team meets at a barrier after each step, since the next step's product reads
// every unit of h_t. By rows: each thread owns a range of batch rows for every unit; a row's next
// step reads only that row's h_t, which the same thread wrote, so there is no barrier at all, but
// each thread streams all of the packed weights every step instead of its slice.
struct TeamPlan {
  int threads = 1;
  bool by_rows = false;
};

// Below kRowSplitPanelBytes of packed weights per thread (the whole of W_hh, and W_ih when the
// loop does the input projection) the rows split is taken: they then stay in each core's L2.
// Measured same-binary (time by units / time by rows, 2 threads): H = 128 at B = 16, 32, 64:
// inference 1.15 / 1.09 / 1.03x, training 1.27 / 1.16 / 1.18x; H = 64, B = 8: 1.44x and 1.31x
// (small steps ran on one thread by units: kSingleThreadStep). H = 256 (1-2 MB of panels): 0.91-1.04x.
// LSTM_FUSED_CPU_SPLIT=rows|units forces either (for measurements and tests).
constexpr int64_t kRowSplitPanelBytes = 512 * 1024;

inline TeamPlan plan_team(const LayerSizes& s, int64_t chunks, int64_t panel_bytes) {
  TeamPlan plan;
  bool by_rows = panel_bytes <= kRowSplitPanelBytes;
  if (const char* setting = std::getenv("LSTM_FUSED_CPU_SPLIT")) {
    if (std::strcmp(setting, "rows") == 0) by_rows = true;
    if (std::strcmp(setting, "units") == 0) by_rows = false;
  }
  if (!by_rows || at::in_parallel_region()) {
    plan.threads = team_threads(s, chunks);
    return plan;
  }
  plan.threads = threads_within(at::get_num_threads(), s.batch);
  plan.by_rows = plan.threads > 1;
  return plan;
}

// The first row of thread `id` of `count` under the rows split: boundaries that give each thread
// about the same number of (row, step) pairs (rows are sorted by decreasing length).
inline int64_t row_boundary(const LayerSizes& s, int id, int count) {
  if (id <= 0) return 0;
  if (id >= count) return s.batch;
  int64_t total = 0;
  for (int64_t length : s.lengths) total += length;
  const int64_t target = total * id / count;
  int64_t sum = 0, row = 0;
  // Take the row while that brings the sum nearer the target (sum + length/2 <= target): rows are
  // long first, so stopping short of the target would leave the first threads with less work.
  while (row < s.batch && 2 * sum + s.lengths[row] <= 2 * target) sum += s.lengths[row++];
  return row;
}

// What one thread of the team computes: units [first_chunk, last_chunk) of rows [first_row,
// last_row), or of a step's active rows where fewer.
struct Share {
  int64_t first_chunk = 0, last_chunk = 0, first_row = 0, last_row = 0;
  bool by_rows = false;

  Share(const TeamPlan& plan, const LayerSizes& s, int64_t chunks, int id, int count) : by_rows(plan.by_rows) {
    if (by_rows) {
      last_chunk = chunks;
      first_row = row_boundary(s, id, count);
      last_row = row_boundary(s, id + 1, count);
    } else {
      std::tie(first_chunk, last_chunk) = owned_chunks(chunks, id, count);
      last_row = s.batch;
    }
  }

  // [begin, end) of this thread's rows among a step's first `rows` (the active ones).
  std::pair<int64_t, int64_t> rows_of(int64_t rows) const {
    return {std::min(first_row, rows), std::min(last_row, rows)};
  }

  void step_done() const {
    if (!by_rows) team_barrier();  // the next step reads every unit of h_t
  }
};

// Runs body(share, product) on each thread of the team `plan` describes, where `product` is the
// thread's own scratch of product_elements values (its tiles' products of one chunk).
template <typename scalar_t, typename Body>
void run_team(const TeamPlan& plan, const LayerSizes& s, int64_t chunks, int64_t product_elements,
              const at::TensorOptions& options, const Body& body) {
  const at::Tensor products = at::empty({plan.threads, product_elements}, options);
  scalar_t* const product_base = products.data_ptr<scalar_t>();
#ifdef _OPENMP
#pragma omp parallel num_threads(plan.threads)
#endif
  {
    const Share share(plan, s, chunks, team_id(), team_size());
    body(share, product_base + team_id() * product_elements);
  }
}

// Whether the CPU LSTM ops take this path: float32/float64 without projection, and a step's
// recurrent product below kLargestStationaryStep FLOPs where MKL is fast (large_steps_to_mkl).
// Above that MKL's per-step packed GEMM (two threads per step) was measured 4-6% faster at
// B=128 H=512 (268 MFLOP per step) on an AVX-512 Xeon, and the two were even at B=64 H=256
// (34 MFLOP), while at B=32 H=128 and below this loop wins by 20-80% (benchmarks/NOTES.md). LSTM_FUSED_CPU_LOOP=step or =stationary forces either path
// (for comparisons and tests); the per-step path is also the one with projection.
// The loop gives each thread at least one chunk of units, so with fewer chunks than threads it
// leaves cores idle: then it is only taken for steps small enough (kSmallStep) that one thread
// without a fork/join per step still wins.
constexpr double kLargestStationaryStep = 100e6;
constexpr double kSmallStep = 4e6;
// Packing W_hh costs about as much as a few steps' products at small batch: a sequence shorter
// than this (an LSTMCell call is one step) takes the per-step loop, which then does not pack.
constexpr int64_t kMinSteps = 4;

// MKL runs its best sgemm code only on Intel CPUs: on an AMD EPYC (Zen 3, AVX2) its sgemm
// reached 53 GFLOP/s at 128x512x2048 against a two-core FMA peak near 157, and this loop at
// B=128 H=512 gave 1.05x nn.LSTM where the per-step MKL path gave 0.68x (issue 18). So the
// largest steps go to MKL only on Intel, and on x86 CPUs of other vendors stay on this loop.
// On an Intel Xeon (AVX-512) MKL's per-step path is the faster one: at B=128, T=35,
// I=H=512 this loop's training forward took 131 ms against 92 ms (inference 111 against 96 ms;
// in one process, median of 21: benchmarks/NOTES.md, session 12).
// Elsewhere (not x86) the per-step path's BLAS is not MKL's and the rule is unchanged.
inline bool large_steps_to_mkl() { return mkl_runs_its_best_code(); }

inline bool enabled(const LayerSizes& s) {
  if (s.has_proj) return false;
  if (const char* setting = std::getenv("LSTM_FUSED_CPU_LOOP")) {
    if (std::strcmp(setting, "step") == 0) return false;
    if (std::strcmp(setting, "stationary") == 0) return true;
  }
  if (s.seq_len < kMinSteps) return false;
  const double flops = step_flops(s);
  const int64_t float_lanes = at::vec::Vectorized<float>::size();
  const int64_t chunks = (s.hidden_size + float_lanes - 1) / float_lanes;
  if (chunks < at::get_num_threads() && flops >= kSmallStep) return false;
  return flops < kLargestStationaryStep || !large_steps_to_mkl();
}

template <typename scalar_t>
constexpr int64_t lanes() {
  return at::vec::Vectorized<scalar_t>::size();
}

template <typename scalar_t>
int64_t chunk_count(int64_t H) {
  return (H + lanes<scalar_t>() - 1) / lanes<scalar_t>();
}

// A buffer of packed panels whose last dimension is `lanes` of H's units: only the lanes past H
// need zeros, so it is left uninitialised when H is a whole number of vectors.
inline at::Tensor panel_buffer(at::IntArrayRef shape, int64_t H, int64_t lanes, const at::TensorOptions& options) {
  return H % lanes == 0 ? at::empty(shape, options) : at::zeros(shape, options);
}

// Forward panels of a [G H, K] weight (G = 4 gates for the LSTM, 3 for the GRU; W_hh: K = H;
// W_ih: K = I): [chunks][K][G][w], panel[c][k][gate][l] = weight[gate * H + c * w + l][k], zero
// in the lanes past H.
template <typename scalar_t>
at::Tensor pack_forward(const at::Tensor& weight_in, int64_t H, int64_t G = 4) {
  constexpr int64_t w = lanes<scalar_t>();
  const int64_t chunks = chunk_count<scalar_t>(H), K = weight_in.size(1);
  at::Tensor packed = panel_buffer({chunks, K, G, w}, H, w, weight_in.options());
  const at::Tensor weight = weight_in.contiguous();
  const scalar_t* src = weight.data_ptr<scalar_t>();
  scalar_t* dst = packed.data_ptr<scalar_t>();
  // Each (chunk, gate) block is a transpose of n rows of K (16 x 16 register tiles with AVX-512):
  // the element-by-element copy, with its stores 4w apart, was ~4% of an inference at H = 256.
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int n = static_cast<int>(std::min<int64_t>(w, H - c * w));
      for (int64_t gate = 0; gate < G; ++gate)
        at::vec::transpose_mxn<scalar_t>(src + (gate * H + c * w) * K, K, dst + (c * K * G + gate) * w, G * w, n,
                                         static_cast<int>(K));
    }
  });
  return packed;
}

// Backward panels: [chunks][4H][w], zero in the lanes past H.
template <typename scalar_t>
at::Tensor pack_backward(const at::Tensor& w_hh, int64_t H) {
  constexpr int64_t w = lanes<scalar_t>();
  const int64_t chunks = chunk_count<scalar_t>(H);
  at::Tensor packed = panel_buffer({chunks, 4 * H, w}, H, w, w_hh.options());
  const at::Tensor weight = w_hh.contiguous();
  const scalar_t* src = weight.data_ptr<scalar_t>();
  scalar_t* dst = packed.data_ptr<scalar_t>();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t n = std::min<int64_t>(w, H - c * w);
      for (int64_t k = 0; k < 4 * H; ++k)
        std::memcpy(dst + (c * 4 * H + k) * w, src + k * H + c * w, n * sizeof(scalar_t));
    }
  });
  return packed;
}

// What the forward loop reads and writes; every pointer is to contiguous memory.
template <typename scalar_t>
struct ForwardState {
  scalar_t* h[2] = {nullptr, nullptr};  // [B, H] each: the ping-pong hidden states (layer_loops.h)
  scalar_t* c = nullptr;                // [B, H] the running cell state
  const scalar_t* bias = nullptr;       // [4H] b_ih + b_hh, or null
  scalar_t* y = nullptr;                // [T, B, H]
  scalar_t* cells = nullptr;            // [T, B, H] the reserve's cell states; null: not kept
  bool keep_gates = true;               // write the activated gates to gates_of(t)
  // With x set, the loop also does the input projection, x_t W_ih^T, in the same tiles (x_panels
  // = pack_forward(W_ih)), and gates_of(t) is only where the activated gates go.
  const scalar_t* x = nullptr;          // [T, B, I] contiguous
  const scalar_t* x_panels = nullptr;
  int64_t input_size = 0;
};

// Runs the steps of processing indices [first_index, end_index) on one OpenMP team.
// gates_of(t) is step t's input projection x_t W_ih^T, [B, 4H]. `packed` is pack_forward's.
template <typename scalar_t, typename GatesOf>
void forward_steps(const LayerSizes& s, bool reverse, int64_t first_index, int64_t end_index, const ForwardState<scalar_t>& st,
                   const at::Tensor& packed, const GatesOf& gates_of) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t w = lanes<scalar_t>();
  const int64_t B = s.batch, H = s.hidden_size, chunks = chunk_count<scalar_t>(H);
  const int64_t panel_bytes =
      (packed.numel() + (st.x != nullptr ? chunks * st.input_size * 4 * w : 0)) * static_cast<int64_t>(sizeof(scalar_t));
  const TeamPlan plan = plan_team(s, chunks, panel_bytes);
  const scalar_t* panels = packed.data_ptr<scalar_t>();
  // Each thread's product of one chunk for every row: [B][4 * w], the gates of its w units.
  run_team<scalar_t>(plan, s, chunks, B * 4 * w, packed.options(), [&](const Share& share, scalar_t* product) {
    for_each_active_step(s, reverse, [&](int64_t index, int64_t t, int64_t rows) {
      const auto [row_begin, row_end] = share.rows_of(rows);
      const int64_t own_rows = row_end - row_begin;
      const scalar_t* h_prev = st.h[index % 2] + row_begin * H;
      scalar_t* h_next = st.h[(index + 1) % 2] + row_begin * H;
      scalar_t* gates_t = gates_of(t);
      if (gates_t != nullptr) gates_t += row_begin * 4 * H;
      scalar_t* y_t = st.y + (t * B + row_begin) * H;
      scalar_t* c_rows = st.c + row_begin * H;
      scalar_t* cells_t = st.cells != nullptr ? st.cells + (t * B + row_begin) * H : nullptr;
      for (int64_t chunk = share.first_chunk; own_rows > 0 && chunk < share.last_chunk; ++chunk) {
        const int64_t u = chunk * w;
        const int n = static_cast<int>(std::min<int64_t>(w, H - u));
        // While the product runs, fetch the rows the cell update reads (the input projection, c)
        // and writes (y, the reserve): otherwise each of them is a cache miss in the epilogue.
        // (Rows from here on count from row_begin.)
        const auto prefetch = [&](int64_t row0, int tile_rows) {
          for (int64_t b = row0; b < row0 + tile_rows; ++b) {
            if (gates_t != nullptr) {
              const scalar_t* g = gates_t + b * 4 * H + u;
              for (int gate = 0; gate < 4; ++gate) __builtin_prefetch(g + gate * H, 1);
            }
            __builtin_prefetch(c_rows + b * H + u, 1);
            __builtin_prefetch(y_t + b * H + u, 1);
            if (cells_t != nullptr) __builtin_prefetch(cells_t + b * H + u, 1);
          }
        };
        if (st.x != nullptr) {
          const int64_t I = st.input_size;
          panel_product<scalar_t, 4>(own_rows, st.x + (t * B + row_begin) * I, I, st.x_panels + chunk * I * 4 * w,
                                     4 * w, w, I, product, 4 * w, prefetch);
          panel_product<scalar_t, 4>(own_rows, h_prev, H, panels + chunk * H * 4 * w, 4 * w, w, H, product, 4 * w,
                                     NoPrefetch(), /*accumulate=*/I > 0);
        } else {
          panel_product<scalar_t, 4>(own_rows, h_prev, H, panels + chunk * H * 4 * w, 4 * w, w, H, product, 4 * w,
                                     prefetch);
        }
        for (int64_t b = 0; b < own_rows; ++b) {
          scalar_t* g = gates_t != nullptr ? gates_t + b * 4 * H + u : nullptr;
          const scalar_t* acc = product + b * 4 * w;
          Vec i = Vec::loadu(acc), fg = Vec::loadu(acc + w), gg = Vec::loadu(acc + 2 * w), o = Vec::loadu(acc + 3 * w);
          if (st.x == nullptr) {  // the input projection was computed before the loop
            i = i + Vec::loadu(g, n);
            fg = fg + Vec::loadu(g + H, n);
            gg = gg + Vec::loadu(g + 2 * H, n);
            o = o + Vec::loadu(g + 3 * H, n);
          }
          if (st.bias != nullptr) {
            i = i + Vec::loadu(st.bias + u, n);
            fg = fg + Vec::loadu(st.bias + H + u, n);
            gg = gg + Vec::loadu(st.bias + 2 * H + u, n);
            o = o + Vec::loadu(st.bias + 3 * H + u, n);
          }
          const int64_t k = b * H + u;
          Vec c, h;
          lstm_cell_forward<Vec, CellActivations<scalar_t>>(i, fg, gg, o, Vec::loadu(c_rows + k, n), c, h);
          if (st.keep_gates) {
            i.store(g, n);
            fg.store(g + H, n);
            gg.store(g + 2 * H, n);
            o.store(g + 3 * H, n);
          }
          c.store(c_rows + k, n);
          if (cells_t != nullptr) c.store(cells_t + k, n);
          h.store(y_t + k, n);
          h.store(h_next + k, n);
        }
      }
      share.step_done();
    }, first_index, end_index);
  });
}

// Whether the stationary loop also does the input projection, in the same register tiles as the
// recurrent product (K = I + H per step instead of one separate GEMM over all steps), while W_ih's
// panels are small next to W_hh's. Measured against the separate GEMM, same binary (ratio =
// separate time / fused time): inference 1.02-1.22x at B=64 I=H=256, 1.04x at B=32 I=32 H=128,
// 1.00x at B=8 I=1 H=64; training 0.97x at B=64 I=256 (the fused loop then also takes the first
// touch of the reserve's fresh pages inside its barrier-bound steps), 1.02-1.10x at B=32 and
// 1.07x at B=8. Hence I <= H for inference and I <= H/2 for training, on an Intel Xeon.
// The separate GEMM is MKL's sgemm, which runs its best code only on Intel CPUs: on an AMD EPYC
// (Zen 5, AVX-512) the fused loop was faster at every size tried, I up to 2H, in inference
// (1.6-1.8x at B=32 I=1024 H=512, B=64 I=512 H=256, B=128 I=H=512) and in training (1.04-1.3x),
// so on other vendors' CPUs the loop always projects the input itself (benchmarks/NOTES.md,
// session 9).
// LSTM_FUSED_CPU_INPUT=separate|fused forces either (for comparisons and tests).
inline bool fuse_input_projection(const LayerSizes& s, bool training) {
  if (const char* setting = std::getenv("LSTM_FUSED_CPU_INPUT")) {
    if (std::strcmp(setting, "separate") == 0) return false;
    if (std::strcmp(setting, "fused") == 0) return true;
  }
  if (!mkl_runs_its_best_code()) return true;
  return training ? 2 * s.input_size <= s.hidden_size : s.input_size <= s.hidden_size;
}

// The training forward over the buffers begin_lstm_forward set up: f.r.gates receives the
// activated gates, and holds the input projection of every step beforehand unless the loop does
// the projection itself (fuse_input, from fuse_input_projection: then begin_lstm_forward was told
// not to).
template <typename scalar_t>
void lstm_forward(const LayerSizes& s, bool reverse, LstmForwardBuffers<scalar_t>& f, const at::Tensor& x,
                  const at::Tensor& w_ih, const at::Tensor& w_hh, bool fuse_input) {
  const int64_t B = s.batch, H = s.hidden_size;
  ForwardState<scalar_t> st;
  at::Tensor x_c, x_panels;
  if (fuse_input) {
    x_c = x.contiguous();
    x_panels = pack_forward<scalar_t>(w_ih, H);
    st.x = x_c.data_ptr<scalar_t>();
    st.x_panels = x_panels.data_ptr<scalar_t>();
    st.input_size = s.input_size;
  }
  st.h[0] = f.h_buffers[0].template data_ptr<scalar_t>();
  st.h[1] = f.h_buffers[1].template data_ptr<scalar_t>();
  st.c = f.c.template data_ptr<scalar_t>();
  st.bias = s.has_bias ? f.bias.template data_ptr<scalar_t>() : nullptr;
  st.y = f.y.template data_ptr<scalar_t>();
  st.cells = f.r.cells.template data_ptr<scalar_t>();
  scalar_t* gates = f.r.gates.template data_ptr<scalar_t>();
  forward_steps<scalar_t>(s, reverse, 0, s.seq_len, st, pack_forward<scalar_t>(w_hh, H),
                          [&](int64_t t) { return gates + t * B * 4 * H; });
}

// The forward without a reserve, for when no gradient is wanted: the input projection is computed
// a segment of steps at a time into one reused buffer (for_each_projected_segment), and neither the
// activated gates nor the cell states are stored.
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_inference(const LayerSizes& s, bool reverse, const at::Tensor& x,
                                                              const at::Tensor& h0, const at::Tensor& c0,
                                                              const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                              const c10::optional<at::Tensor>& b_ih,
                                                              const c10::optional<at::Tensor>& b_hh, bool padded) {
  const int64_t T = s.seq_len, B = s.batch, H = s.hidden_size, I = s.input_size;
  at::Tensor y = layer_buffer({T, B, H}, x.options(), padded);
  at::Tensor h_buffers[2];
  init_hidden_buffers(h_buffers, h0);
  at::Tensor c = c0.contiguous().clone();
  at::Tensor bias = s.has_bias ? (*b_ih + *b_hh).contiguous() : at::Tensor();
  ForwardState<scalar_t> st;
  st.h[0] = h_buffers[0].data_ptr<scalar_t>();
  st.h[1] = h_buffers[1].data_ptr<scalar_t>();
  st.c = c.data_ptr<scalar_t>();
  st.bias = s.has_bias ? bias.data_ptr<scalar_t>() : nullptr;
  st.y = y.data_ptr<scalar_t>();
  st.keep_gates = false;

  const at::Tensor packed = pack_forward<scalar_t>(w_hh, H);
  if (fuse_input_projection(s, /*training=*/false)) {
    const at::Tensor x_c = x.contiguous();
    const at::Tensor x_panels = pack_forward<scalar_t>(w_ih, H);
    st.x = x_c.data_ptr<scalar_t>();
    st.x_panels = x_panels.data_ptr<scalar_t>();
    st.input_size = I;
    forward_steps<scalar_t>(s, reverse, 0, T, st, packed, [](int64_t) -> scalar_t* { return nullptr; });
    return {y, final_hidden(h_buffers, s, reverse), c};
  }
  for_each_projected_segment(s, x, w_ih, reverse, [&](int64_t first, int64_t end, int64_t t_low, const at::Tensor& proj) {
    scalar_t* base = proj.data_ptr<scalar_t>();
    forward_steps<scalar_t>(s, reverse, first, end, st, packed, [&](int64_t t) { return base + (t - t_low) * B * 4 * H; });
  });
  return {y, final_hidden(h_buffers, s, reverse), c};
}

// The backward time loop over the buffers begin_lstm_backward set up.
template <typename scalar_t>
void lstm_backward(const LayerSizes& s, bool reverse, LstmBackwardBuffers<scalar_t>& g, const at::Tensor& w_hh) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t w = lanes<scalar_t>();
  const int64_t T = s.seq_len, B = s.batch, H = s.hidden_size, chunks = chunk_count<scalar_t>(H);
  const at::Tensor packed = pack_backward<scalar_t>(w_hh, H);
  const scalar_t* panels = packed.data_ptr<scalar_t>();
  const scalar_t* gates = g.r.gates.template data_ptr<scalar_t>();
  const scalar_t* cells = g.r.cells.template data_ptr<scalar_t>();
  const scalar_t* c0 = g.c0.template data_ptr<scalar_t>();
  const scalar_t* grad_y = g.grad_y.template data_ptr<scalar_t>();
  scalar_t* d_gates = g.d_gates.template data_ptr<scalar_t>();
  scalar_t* dh = g.dh.template data_ptr<scalar_t>();
  scalar_t* dc = g.dc.template data_ptr<scalar_t>();
  const int64_t* lengths = s.lengths.data();
  const TeamPlan plan = plan_team(s, chunks, packed.numel() * static_cast<int64_t>(sizeof(scalar_t)));
  // Each thread's product of up to kMaxVectors chunks for every row.
  run_team<scalar_t>(plan, s, chunks, B * kMaxVectors * w, packed.options(), [&](const Share& share,
                                                                                 scalar_t* product) {
    const int64_t first_chunk = share.first_chunk, last_chunk = share.last_chunk;
    for_each_active_step(s, !reverse, [&](int64_t, int64_t t, int64_t rows) {
      const auto [row_begin, row_end] = share.rows_of(rows);
      const scalar_t* gates_t = gates + t * B * 4 * H;
      scalar_t* d_gates_t = d_gates + t * B * 4 * H;
      for (int64_t b = row_begin; b < row_end; ++b) {
        const int64_t prev = previous_step(t, lengths[b], reverse);
        const scalar_t* c_prev = prev < 0 ? c0 + b * H : cells + (prev * B + b) * H;
        const scalar_t* c_t = cells + (t * B + b) * H;
        for (int64_t chunk = first_chunk; chunk < last_chunk; ++chunk) {
          const int64_t u = chunk * w;
          const int n = static_cast<int>(std::min<int64_t>(w, H - u));
          const scalar_t* gb = gates_t + b * 4 * H + u;
          scalar_t* dg = d_gates_t + b * 4 * H + u;
          const int64_t k = b * H + u;
          Vec i = Vec::loadu(gb, n), fg = Vec::loadu(gb + H, n);
          Vec gg = Vec::loadu(gb + 2 * H, n), o = Vec::loadu(gb + 3 * H, n);
          const Vec dh_total = Vec::loadu(dh + k, n) + Vec::loadu(grad_y + t * B * H + k, n);
          Vec dc_v = Vec::loadu(dc + k, n);
          lstm_cell_backward<Vec, CellActivations<scalar_t>>(i, fg, gg, o, Vec::loadu(c_prev + u, n),
                                                            Vec::loadu(c_t + u, n), dh_total, dc_v);
          i.store(dg, n);
          fg.store(dg + H, n);
          gg.store(dg + 2 * H, n);
          o.store(dg + 3 * H, n);
          dc_v.store(dc + k, n);
        }
      }
      share.step_done();  // by units, the product below reads every unit's d_gates
      // While the product runs, fetch what the next step's pointwise pass reads for these
      // chunks (its gates, grad_y, c_t) and writes (d_gates): cold lines of the reserve otherwise.
      const int64_t next_t = reverse ? t + 1 : t - 1;
      const bool has_next = next_t >= 0 && next_t < T;
      // dh[rows, own units] = d_gates_t W_hh[:, own units], up to kMaxVectors chunks per tile.
      for (int64_t chunk = first_chunk; chunk < last_chunk; chunk += kMaxVectors) {
        const int vectors = static_cast<int>(std::min<int64_t>(kMaxVectors, last_chunk - chunk));
        const int64_t u = chunk * w;
        const int64_t units = std::min<int64_t>(vectors * w, H - u);
        const auto prefetch = [&](int64_t row0, int tile_rows) {  // row0 counts from row_begin
          if (!has_next) return;
          for (int64_t b = row_begin + row0; b < row_begin + row0 + tile_rows; ++b) {
            const int64_t row = next_t * B + b;
            for (int64_t unit = u; unit < u + units; unit += w) {
              for (int gate = 0; gate < 4; ++gate) {
                __builtin_prefetch(gates + row * 4 * H + gate * H + unit);
                __builtin_prefetch(d_gates + row * 4 * H + gate * H + unit, 1);
              }
              __builtin_prefetch(grad_y + row * H + unit);
              __builtin_prefetch(cells + row * H + unit);
            }
          }
        };
        if (row_end == row_begin) continue;
        panel_product_vectors<scalar_t>(vectors, row_end - row_begin, d_gates_t + row_begin * 4 * H, 4 * H,
                                        panels + chunk * 4 * H * w, w, 4 * H * w, 4 * H, product, kMaxVectors * w,
                                        prefetch);
        for (int64_t b = row_begin; b < row_end; ++b)
          std::memcpy(dh + b * H + u, product + (b - row_begin) * kMaxVectors * w, units * sizeof(scalar_t));
      }
    });
  });
}

}  // namespace stationary
}  // namespace CPU_CAPABILITY
}  // namespace lstm_fused
