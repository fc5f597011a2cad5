// The recurrent product of one step for a block's slice of hidden units, shared by the LSTM and
// GRU step kernels: each block owns kUnitsPerBlock hidden units across all kGates gates and
// kRowsPerBlock batch rows, so the cell update that follows needs nothing from other blocks.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "device_compat.cuh"

namespace lstm_fused {

constexpr int kUnitsPerBlock = 32;  // hidden units per block (x gates = weight rows per block)
constexpr int kRowsPerBlock = 8;    // batch rows per block
constexpr int kTileK = 32;          // slice of the recurrent dimension staged in shared memory
constexpr int kStepThreads = kUnitsPerBlock * kRowsPerBlock;
constexpr int kPointwiseThreads = 256;

// acc[g] = sum_k h_prev[row, k] * w_hh[g*H + unit, k] for this thread's (row, unit), where
// row = blockIdx.y * kRowsPerBlock + threadIdx.x / kUnitsPerBlock and
// unit = blockIdx.x * kUnitsPerBlock + threadIdx.x % kUnitsPerBlock. All threads of the block
// must call it (it synchronises); rows and units outside the problem contribute zeros.
template <int kGates, typename scalar_t, typename acc_t>
__device__ __forceinline__ void block_recurrent_product(const scalar_t* __restrict__ h_prev,
                                                        const scalar_t* __restrict__ w_hh, int rows,
                                                        int H, int P, acc_t (&acc)[kGates]) {
  __shared__ acc_t h_tile[kRowsPerBlock][kTileK];
  // [gate][k][unit]: consecutive threads of a warp read consecutive units (no bank conflicts);
  // the +1 keeps the transposing stores conflict-free too.
  __shared__ acc_t w_tile[kGates][kTileK][kUnitsPerBlock + 1];

  const int unit0 = blockIdx.x * kUnitsPerBlock;
  const int row0 = blockIdx.y * kRowsPerBlock;
  const int local_unit = threadIdx.x % kUnitsPerBlock;
  const int local_row = threadIdx.x / kUnitsPerBlock;
#pragma unroll
  for (int g = 0; g < kGates; ++g) acc[g] = acc_t(0);

  for (int k0 = 0; k0 < P; k0 += kTileK) {
    for (int idx = threadIdx.x; idx < kRowsPerBlock * kTileK; idx += blockDim.x) {
      const int r = idx / kTileK, k = idx % kTileK;
      const bool inside = row0 + r < rows && k0 + k < P;
      h_tile[r][k] = inside ? static_cast<acc_t>(h_prev[(int64_t)(row0 + r) * P + k0 + k]) : acc_t(0);
    }
    for (int idx = threadIdx.x; idx < kGates * kUnitsPerBlock * kTileK; idx += blockDim.x) {
      const int k = idx % kTileK;
      const int u = (idx / kTileK) % kUnitsPerBlock;
      const int g = idx / (kTileK * kUnitsPerBlock);
      const bool inside = unit0 + u < H && k0 + k < P;
      w_tile[g][k][u] =
          inside ? static_cast<acc_t>(w_hh[(int64_t)(g * H + unit0 + u) * P + k0 + k]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kTileK; ++k) {
      const acc_t h = h_tile[local_row][k];
#pragma unroll
      for (int g = 0; g < kGates; ++g) acc[g] += h * w_tile[g][k][local_unit];
    }
    __syncthreads();
  }
}

// The per-step path's two forms: the fused kernel above (one launch; its K-tile loop is FMAs),
// or cuBLAS for h_{t-1} W_hh^T (tensor cores for bf16 / fp16, and TF32 where allowed) and one
// pointwise kernel. The GEMM form from this many rows x hidden units of a step on (est.: the
// fused kernel's blocks then outnumber the SMs several times over, and its serial K tiles
// dominate; benchmarks/NOTES.md); LSTM_FUSED_STEP=fused|gemm chooses one everywhere (tests,
// measurements). Read once per layer call (step_form()), asked per step (rows shrink with lengths).
constexpr int64_t kGemmStepMinRows = 32;
constexpr int64_t kGemmStepMinWork = 64 * 256;

struct StepForm {
  int forced = 0;  // 1: always the GEMM form, -1: always the fused kernel, 0: the rule
  bool gemm(int64_t rows, int64_t H) const {
    if (forced != 0) return forced > 0;
    return rows >= kGemmStepMinRows && rows * H >= kGemmStepMinWork;
  }
};

inline StepForm step_form() {
  const char* setting = std::getenv("LSTM_FUSED_STEP");
  StepForm form;
  if (setting != nullptr && std::strcmp(setting, "gemm") == 0) form.forced = 1;
  if (setting != nullptr && std::strcmp(setting, "fused") == 0) form.forced = -1;
  return form;
}

inline dim3 step_grid(int64_t H, int64_t rows) {
  return dim3(static_cast<unsigned>((H + kUnitsPerBlock - 1) / kUnitsPerBlock),
              static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock));
}

inline int pointwise_blocks(int64_t elements) {
  return static_cast<int>((elements + kPointwiseThreads - 1) / kPointwiseThreads);
}

}  // namespace lstm_fused
