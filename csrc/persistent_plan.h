// How the persistent whole-sequence GPU kernels (csrc/cuda/lstm_persistent.cu, gru_cuda.cu) split
// one layer across the chip, and whether they can. Plain host C++ (and the layout helpers host and
// device), so that the rules are tested without a GPU (the lstm_fused::_persistent_tc_plan and
// _persistent_product_plan ops expose them).
#pragma once

#include <algorithm>
#include <cstdint>

#include "cell_math.h"

namespace lstm_fused {

// Above this many (row, unit) pairs per block, each thread finishes more than two pairs per step
// and the per-step path's wider grid is predicted to win (benchmarks/NOTES.md; to be measured).
constexpr int64_t kPersistentMaxPairsPerBlock = 512;

// The tensor-core persistent kernel (csrc/cuda/lstm_persistent_tc_kernel.cuh): bf16 / fp16, or
// float32 as TF32 when allowed.
constexpr int64_t kPersistentTcThreads = 256;  // 8 warps share the (n tile, K range) jobs
constexpr int64_t kPersistentTcPad = 8;        // elements past each shared row: consecutive rows
                                               // start 16 bytes apart mod 128, so ldmatrix's 8 row
                                               // reads hit distinct banks

struct PersistentTcPlan {
  bool usable = false;
  int64_t units_per_block = 0;  // U, even: 4U columns = whole n8 tiles
  int64_t blocks = 0;
  int64_t m_tiles = 0;          // ceil(B / 16)
  int64_t n_tiles = 0;          // 4U / 8
  int64_t k_tiles = 0;          // ceil(H / 16)
  int64_t k_split = 0;          // K ranges per n tile, so that the 8 warps have work at small N
  int64_t row_stride = 0;       // elements per shared row of W and h: 16 k_tiles + pad
  int64_t shared_bytes = 0;     // W slice + h_{t-1} + the partial sums
};

// k_split_request > 0 asks for that many K ranges (clamped to the K tiles) instead of the rule's:
// measurements sweep it (LSTM_FUSED_PERSISTENT_K_SPLIT, csrc/cuda/persistent_host.h).
inline PersistentTcPlan plan_persistent_tc_layer(int64_t hidden, int64_t batch, int64_t element_bytes,
                                                 int64_t sm_count, int64_t max_shared_bytes,
                                                 int64_t k_split_request = 0) {
  PersistentTcPlan plan;
  if (hidden <= 0 || batch <= 0 || sm_count <= 0 || element_bytes <= 0) return plan;
  const auto ceil_div = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  plan.units_per_block = 2 * ceil_div(ceil_div(hidden, sm_count), 2);
  plan.blocks = ceil_div(hidden, plan.units_per_block);
  plan.m_tiles = ceil_div(batch, 16);
  plan.n_tiles = 4 * plan.units_per_block / 8;
  plan.k_tiles = ceil_div(hidden, 16);
  const int64_t warps = kPersistentTcThreads / 32;
  plan.k_split = std::max<int64_t>(1, std::min<int64_t>(plan.k_tiles, warps / plan.n_tiles));
  if (k_split_request > 0) plan.k_split = std::min<int64_t>(k_split_request, plan.k_tiles);
  plan.row_stride = 16 * plan.k_tiles + kPersistentTcPad;
  const int64_t columns = 4 * plan.units_per_block, rows = 16 * plan.m_tiles;
  plan.shared_bytes = (columns + rows) * plan.row_stride * element_bytes + plan.k_split * rows * columns * 4;
  plan.usable = plan.shared_bytes <= max_shared_bytes && batch * plan.units_per_block <= kPersistentMaxPairsPerBlock;
  return plan;
}

// The product-generic persistent kernels (csrc/cuda/persistent_recurrent.cuh): the LSTM FMA
// forward and backward, the GRU forward and backward. Block j owns hidden units [j*U, j*U + U):
// their pointwise work, and N = columns_per_unit * U columns of each step's product A W^T, with K
// the product's depth; W's rows for those columns stay in shared memory. Products: FP32/FP64 FMAs
// (4 x 4 register tiles per warp, lanes over K), or mma.sync (bf16 / fp16 m16n8k16, TF32
// m16n8k8) with M = batch rows, N columns; K split over the warps where the tiles leave some idle.
//   LSTM forward: columns_per_unit 4, K = H; LSTM backward: 1, K = 4H; GRU forward: 3, K = H;
//   GRU backward: 1, K = 3H.
constexpr int64_t kPersistentProductThreads = 256;
constexpr int64_t kPersistentFmaTile = 4;  // the FMA product's register tile: 4 rows x 4 columns per warp

struct PersistentProductPlan {
  bool usable = false;
  int64_t units_per_block = 0;  // U
  int64_t blocks = 0;
  int64_t m_rows = 0;      // rows of the partial sums: B (FMA) or 16 * ceil(B / 16) (tensor cores)
  int64_t n_cols = 0;      // columns of the W slice and the partial sums: columns_per_unit * U (FMA),
                           // rounded up to whole n8 tiles (tensor cores)
  int64_t n_tiles = 0;     // tensor cores: n_cols / 8
  int64_t chunks = 0;      // tensor cores: K in chunks of 64 bytes per row (two mma.sync each)
  int64_t k_split = 0;     // K ranges per n tile (tensor cores), so that 8 warps share small N; 1 for FMA
  int64_t row_stride = 0;  // elements per shared row of the W slice (and of staged A)
  bool stage_a = false;    // several n tiles (tensor cores) or FMA column tiles: A is staged in shared
                           // memory once per step (every tile reads it) instead of each reading it from L2
  int64_t shared_bytes = 0;
};

// The shared-memory layout of the product kernels: the W slice, the partial sums, then staged A,
// each region starting 16-byte aligned (the kernels compute the same offsets).
// (Host and device: the kernels call them; LSTM_FUSED_HOST_DEVICE is cell_math.h's.)
LSTM_FUSED_HOST_DEVICE int64_t round_up_16(int64_t bytes) { return (bytes + 15) / 16 * 16; }
LSTM_FUSED_HOST_DEVICE int64_t persistent_weight_bytes(int64_t n_cols, int64_t row_stride, int64_t element_bytes) {
  return round_up_16(n_cols * row_stride * element_bytes);
}
LSTM_FUSED_HOST_DEVICE int64_t persistent_partial_bytes(int64_t k_split, int64_t m_rows, int64_t n_cols,
                                                        int64_t acc_bytes) {
  return round_up_16(k_split * m_rows * n_cols * acc_bytes);
}

// element_bytes: the weights' dtype; acc_bytes: the accumulator's (4, or 8 for float64);
// tensor_cores: the mma.sync product (bf16, fp16, TF32) instead of FMAs; k_split_request > 0: that
// many K ranges (clamped to the chunks, or to K / 32 for FMAs) instead of the rule's.
inline PersistentProductPlan plan_persistent_product_layer(int64_t hidden, int64_t batch, int64_t columns_per_unit,
                                                           int64_t depth, int64_t element_bytes, int64_t acc_bytes,
                                                           bool tensor_cores, int64_t sm_count,
                                                           int64_t max_shared_bytes, int64_t k_split_request = 0) {
  PersistentProductPlan plan;
  if (hidden <= 0 || batch <= 0 || sm_count <= 0 || element_bytes <= 0 || acc_bytes <= 0 || columns_per_unit <= 0 ||
      depth <= 0) {
    return plan;
  }
  const auto ceil_div = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  plan.units_per_block = ceil_div(hidden, sm_count);
  plan.blocks = ceil_div(hidden, plan.units_per_block);
  const int64_t columns = columns_per_unit * plan.units_per_block;
  if (tensor_cores) {
    const int64_t chunk = 64 / element_bytes;  // columns per 64-byte chunk: 4 lanes x 16 bytes
    plan.chunks = ceil_div(depth, chunk);
    // A row stride of 64 bytes mod 128: the 8 lanes of each LDS.128 phase (two rows, four
    // 16-byte columns) hit 8 distinct 16-byte bank groups.
    const int64_t row_bytes = plan.chunks * 64;
    plan.row_stride = (row_bytes % 128 == 0 ? row_bytes + 64 : row_bytes) / element_bytes;
    plan.n_tiles = ceil_div(columns, 8);
    plan.n_cols = 8 * plan.n_tiles;
    plan.m_rows = 16 * ceil_div(batch, 16);
    const int64_t warps = kPersistentProductThreads / 32;
    plan.k_split = std::max<int64_t>(1, std::min<int64_t>(plan.chunks, warps / plan.n_tiles));
    if (k_split_request > 0) plan.k_split = std::min<int64_t>(k_split_request, plan.chunks);
  } else {
    plan.row_stride = depth;
    plan.n_cols = columns;
    plan.m_rows = batch;
    // K ranges per register tile when the tiles alone would leave warps idle (small B x N)
    const int64_t warps = kPersistentProductThreads / 32;
    const int64_t tiles = ceil_div(batch, kPersistentFmaTile) * ceil_div(columns, kPersistentFmaTile);
    plan.k_split = std::max<int64_t>(1, std::min<int64_t>(warps / tiles, ceil_div(depth, 32)));
    if (k_split_request > 0) plan.k_split = std::min<int64_t>(k_split_request, ceil_div(depth, 32));
  }
  plan.shared_bytes = persistent_weight_bytes(plan.n_cols, plan.row_stride, element_bytes) +
                      persistent_partial_bytes(plan.k_split, plan.m_rows, plan.n_cols, acc_bytes);
  const int64_t staged_bytes = plan.m_rows * plan.row_stride * element_bytes;
  const bool several_tiles = tensor_cores ? plan.n_tiles > 1 : plan.n_cols > kPersistentFmaTile;
  if (several_tiles && plan.shared_bytes + staged_bytes <= max_shared_bytes) {
    plan.stage_a = true;
    plan.shared_bytes += staged_bytes;
  }
  plan.usable = plan.shared_bytes <= max_shared_bytes && batch * plan.units_per_block <= kPersistentMaxPairsPerBlock;
  return plan;
}

}  // namespace lstm_fused
