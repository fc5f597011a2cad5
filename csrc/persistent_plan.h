// How the persistent whole-sequence GPU kernel (csrc/cuda/lstm_persistent.cu) splits one layer
// across the chip, and whether it can. Plain host C++, so that the rule is tested without a GPU
// (the lstm_fused::_persistent_plan op exposes it).
#pragma once

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

}  // namespace lstm_fused
