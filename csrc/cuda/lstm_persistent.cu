// The persistent LSTM forward kernel (DESIGN.md, "CUDA", step 2), first version: one cooperative
// launch runs the whole sequence. Each block owns a slice of hidden units across the four gates
// and keeps those rows of W_hh in shared memory for every step; per step, each warp computes one
// (row, unit) pair at a time (lanes split the recurrent dimension, a shuffle reduction joins
// them), finishes the cell (lstm_unit.cuh), writes h_t to a ping-pong buffer in global memory,
// and the grid meets at one barrier. No tensor cores yet: FP32 FMAs (FP64 for float64).
// Compiled, not yet run on a GPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>

#include <cstdlib>
#include <cstring>

#include "../layer_loops.h"
#include "../persistent_plan.h"
#include "lstm_persistent.h"
#include "lstm_unit.cuh"

namespace cg = cooperative_groups;

namespace lstm_fused {
namespace {

using at::Tensor;

// Loads that bypass L1: h_{t-1} was written by other SMs before the last grid barrier, and L1 is
// not coherent across SMs (a cached line from two steps ago would be stale).
__device__ __forceinline__ float load_uncached(const float* p) { return __ldcg(p); }
__device__ __forceinline__ double load_uncached(const double* p) { return __ldcg(p); }
__device__ __forceinline__ c10::Half load_uncached(const c10::Half* p) {
  return c10::Half(__ldcg(reinterpret_cast<const unsigned short*>(p)), c10::Half::from_bits());
}
__device__ __forceinline__ c10::BFloat16 load_uncached(const c10::BFloat16* p) {
  return c10::BFloat16(__ldcg(reinterpret_cast<const unsigned short*>(p)), c10::BFloat16::from_bits());
}

template <typename scalar_t, typename acc_t>
struct PersistentLstmArgs {
  const scalar_t* w_hh;        // [4H, H]
  const scalar_t* bias;        // [4H] b_ih + b_hh, or null
  scalar_t* gates;             // [T, B, 4H] input projection in, activated gates out
  acc_t* c_state;              // [B, H]
  scalar_t* cells;             // [T, B, H]
  scalar_t* y;                 // [T, B, H]
  scalar_t* h_even;            // [B, H] ping-pong pair, both h0 at the start (init_hidden_buffers):
  scalar_t* h_odd;             //        even steps read h_even and write h_odd, odd steps the reverse
  const int64_t* active_rows;  // [T] rows that advance at each t (a prefix of the batch)
  int T, B, H, units_per_block;
  bool reverse;
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kPersistentThreads)
    lstm_persistent_forward_kernel(const PersistentLstmArgs<scalar_t, acc_t> a) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  // Row (gate * U + u) holds W_hh row (gate * H + u0 + u): lanes read consecutive k, no conflicts.
  scalar_t* w_slice = reinterpret_cast<scalar_t*>(shared_raw);
  const int U = a.units_per_block, H = a.H, B = a.B;
  const int u0 = blockIdx.x * U;
  const int units = max(0, min(U, H - u0));
  for (int64_t idx = threadIdx.x; idx < int64_t(4) * U * H; idx += blockDim.x) {
    const int row = static_cast<int>(idx / H), k = static_cast<int>(idx % H);
    const int gate = row / U, u = row % U;
    w_slice[idx] = u < units ? a.w_hh[int64_t(gate * H + u0 + u) * H + k] : scalar_t(0);
  }
  __syncthreads();

  cg::grid_group grid = cg::this_grid();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int step = 0; step < a.T; ++step) {
    const int t = a.reverse ? a.T - 1 - step : step;
    const int rows = static_cast<int>(a.active_rows[t]);
    // Named members, not an array indexed at run time: that would move the parameters to the stack.
    const scalar_t* h_prev = step % 2 == 0 ? a.h_even : a.h_odd;
    scalar_t* h_next = step % 2 == 0 ? a.h_odd : a.h_even;
    for (int pair = warp; pair < rows * units; pair += warps) {
      const int b = pair / units, u = pair % units;
      acc_t acc[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
      const scalar_t* h_row = h_prev + int64_t(b) * H;
      for (int k = lane; k < H; k += 32) {
        const acc_t h = static_cast<acc_t>(load_uncached(h_row + k));
#pragma unroll
        for (int gate = 0; gate < 4; ++gate) acc[gate] += h * static_cast<acc_t>(w_slice[(gate * U + u) * H + k]);
      }
#pragma unroll
      for (int gate = 0; gate < 4; ++gate) {
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) acc[gate] += __shfl_down_sync(0xffffffffu, acc[gate], offset);
      }
      if (lane == 0) {
        const int unit = u0 + u;
        const int64_t k = int64_t(b) * H + unit;
        const int64_t tk = int64_t(t) * B * H + k;
        lstm_finish_unit(acc, a.gates + (int64_t(t) * B + b) * 4 * H, a.bias, unit, H, a.c_state + k, a.cells + tk,
                         a.y + tk, h_next + k);
      }
    }
    grid.sync();  // every h_t is written before any block reads it as h_{t-1}
  }
}

bool persistent_enabled() {
  const char* setting = std::getenv("LSTM_FUSED_PERSISTENT");
  return setting == nullptr || std::strcmp(setting, "0") != 0;
}

int device_attribute(cudaDeviceAttr attribute, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
  return value;
}

}  // namespace

c10::optional<std::tuple<Tensor, Tensor, Tensor, Tensor>> lstm_layer_forward_persistent(
    const LayerSizes& s, const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const c10::optional<Tensor>& b_ih, const c10::optional<Tensor>& b_hh, bool padded, bool reverse) {
  using Result = c10::optional<std::tuple<Tensor, Tensor, Tensor, Tensor>>;
  if (s.has_proj || s.seq_len == 0 || s.batch == 0 || !persistent_enabled()) return c10::nullopt;
  const int device = x.device().index();
  if (!device_attribute(cudaDevAttrCooperativeLaunch, device)) return c10::nullopt;
  const int sm_count = device_attribute(cudaDevAttrMultiProcessorCount, device);
  const PersistentPlan plan =
      plan_persistent_layer(s.hidden_size, s.hidden_size, s.batch, 4, x.element_size(), sm_count,
                            device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (!plan.usable) return c10::nullopt;

  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lstm_layer_forward_persistent",
                                         [&]() -> Result {
    using acc_t = at::opmath_type<scalar_t>;
    const auto kernel = &lstm_persistent_forward_kernel<scalar_t, acc_t>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(plan.shared_bytes)));
    int blocks_per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kPersistentThreads,
                                                                 plan.shared_bytes));
    if (int64_t(blocks_per_sm) * sm_count < plan.blocks) return c10::nullopt;  // not all resident

    LstmForwardBuffers<acc_t> f = begin_lstm_forward<acc_t>(s, x, h0, c0, w_ih, b_ih, b_hh, padded);
    const Tensor active_rows = at::tensor(s.active_rows, at::TensorOptions().dtype(at::kLong)).to(x.device());
    const Tensor w = w_hh.contiguous();
    PersistentLstmArgs<scalar_t, acc_t> args;
    args.w_hh = w.data_ptr<scalar_t>();
    args.bias = s.has_bias ? f.bias.data_ptr<scalar_t>() : nullptr;
    args.gates = f.r.gates.data_ptr<scalar_t>();
    args.c_state = f.c.data_ptr<acc_t>();
    args.cells = f.r.cells.data_ptr<scalar_t>();
    args.y = f.y.data_ptr<scalar_t>();
    args.h_even = f.h_buffers[0].data_ptr<scalar_t>();
    args.h_odd = f.h_buffers[1].data_ptr<scalar_t>();
    args.active_rows = active_rows.data_ptr<int64_t>();
    args.T = static_cast<int>(s.seq_len);
    args.B = static_cast<int>(s.batch);
    args.H = static_cast<int>(s.hidden_size);
    args.units_per_block = static_cast<int>(plan.units_per_block);
    args.reverse = reverse;
    void* kernel_args[] = {&args};
    C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(plan.blocks),
                                               dim3(kPersistentThreads), kernel_args, plan.shared_bytes,
                                               c10::cuda::getCurrentCUDAStream()));
    return f.outputs(s, reverse, x.scalar_type());
  });
}

}  // namespace lstm_fused
