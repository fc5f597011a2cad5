// How the persistent whole-sequence GPU kernel (csrc/cuda/lstm_persistent.cu) splits one layer
// across the chip, and whether it can. Plain host C++, so that the rule is tested without a GPU
// (the lstm_fused::_persistent_plan op exposes it).
#pragma once

#include <algorithm>
#include <cstdint>

namespace lstm_fused {

constexpr int64_t kPersistentThreads = 256;  // 8 warps; a warp computes one (row, unit) pair at a time
// Above this many (row, unit) pairs per block, each warp loops over so many pairs per step that
// the per-step kernel's wider grid is predicted to win (benchmarks/NOTES.md; to be measured).
constexpr int64_t kPersistentMaxPairsPerBlock = 512;

struct PersistentPlan {
  bool usable = false;
  int64_t units_per_block = 0;  // hidden units per block; their rows of W_hh (all gates) stay in shared memory
  int64_t blocks = 0;           // at most one per SM: all must be resident for the grid-wide barrier
  int64_t shared_bytes = 0;     // the block's slice of W_hh
};

// hidden: H; recurrent_size: the width of h (P); gates: 4 (LSTM); element_bytes: sizeof the
// weights' dtype; sm_count and max_shared_bytes: the device's multiprocessors and the opt-in
// shared memory per block.
inline PersistentPlan plan_persistent_layer(int64_t hidden, int64_t recurrent_size, int64_t batch, int64_t gates,
                                            int64_t element_bytes, int64_t sm_count, int64_t max_shared_bytes) {
  PersistentPlan plan;
  if (hidden <= 0 || recurrent_size <= 0 || batch <= 0 || sm_count <= 0) return plan;
  plan.units_per_block = (hidden + sm_count - 1) / sm_count;
  plan.blocks = (hidden + plan.units_per_block - 1) / plan.units_per_block;
  plan.shared_bytes = gates * plan.units_per_block * recurrent_size * element_bytes;
  plan.usable = plan.shared_bytes <= max_shared_bytes &&
                batch * plan.units_per_block <= kPersistentMaxPairsPerBlock;
  return plan;
}

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

inline PersistentTcPlan plan_persistent_tc_layer(int64_t hidden, int64_t batch, int64_t element_bytes,
                                                 int64_t sm_count, int64_t max_shared_bytes) {
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
  plan.row_stride = 16 * plan.k_tiles + kPersistentTcPad;
  const int64_t columns = 4 * plan.units_per_block, rows = 16 * plan.m_tiles;
  plan.shared_bytes = (columns + rows) * plan.row_stride * element_bytes + plan.k_split * rows * columns * 4;
  plan.usable = plan.shared_bytes <= max_shared_bytes && batch * plan.units_per_block <= kPersistentMaxPairsPerBlock;
  return plan;
}

}  // namespace lstm_fused
