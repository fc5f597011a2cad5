// Host-side rules shared by the persistent kernels' entry points (lstm_persistent.cu, gru_cuda.cu):
// the LSTM_FUSED_PERSISTENT setting, which product a dtype gets, and the checks before a
// cooperative launch. ATen and the CUDA runtime (or the SIMT emulator) only, no device code.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "../layer_args.h"
#include "gpu_runtime.h"
#include "persistent_recurrent.cuh"

namespace lstm_fused {

// LSTM_FUSED_PERSISTENT=0 turns the persistent kernels off, =fma keeps their FMA products only.
enum class PersistentChoice { kOff, kFmaOnly, kAny };

inline PersistentChoice persistent_choice() {
  const char* setting = std::getenv("LSTM_FUSED_PERSISTENT");
  if (setting == nullptr) return PersistentChoice::kAny;
  if (std::strcmp(setting, "0") == 0) return PersistentChoice::kOff;
  if (std::strcmp(setting, "fma") == 0) return PersistentChoice::kFmaOnly;
  return PersistentChoice::kAny;
}

// Plan overrides for measurements (benchmarks/gpu_bench.py's tile sweep), read on every call:
// LSTM_FUSED_PERSISTENT_BLOCKS=n plans as if the device had min(n, SMs) multiprocessors (fewer,
// wider blocks: ceil(H / n) units each); LSTM_FUSED_PERSISTENT_K_SPLIT=n asks for n K ranges per
// tile. Unset or not a positive number: the plan's own rule.
inline int64_t positive_setting(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr) return 0;
  const long long n = std::strtoll(value, nullptr, 10);
  return n > 0 ? n : 0;
}

inline int64_t planned_sm_count(const gpu::DeviceInfo& device) {
  const int64_t blocks = positive_setting("LSTM_FUSED_PERSISTENT_BLOCKS");
  return blocks > 0 ? std::min<int64_t>(blocks, device.sm_count) : device.sm_count;
}

inline int64_t requested_k_split() { return positive_setting("LSTM_FUSED_PERSISTENT_K_SPLIT"); }

// The tensor-core product for a dtype, or nullopt where FMAs must do: bf16 and fp16 always,
// float32 as TF32 when matmuls may use it. The precision setting is read, not the legacy
// allowTF32CuBLAS(), which throws once a user has set TF32 through the newer API
// (torch.backends.cuda.matmul.fp32_precision) alone.
inline c10::optional<PersistentProduct> tensor_core_product(at::ScalarType dtype) {
  if (dtype == at::kBFloat16) return PersistentProduct::kBFloat16;
  if (dtype == at::kHalf) return PersistentProduct::kHalf;
  if (dtype == at::kFloat && at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
                                 at::Float32Precision::TF32) {
    return PersistentProduct::kTF32;
  }
  return c10::nullopt;
}

// A product kind as a type, for generic lambdas.
template <PersistentProduct kProduct>
using ProductTag = std::integral_constant<PersistentProduct, kProduct>;

// Calls run(scalar_t{}, acc_t{}, ProductTag<kProduct>{}) with the tensor-core product that the
// dtype, the device (mma.sync with bf16 needs sm_80) and the setting allow, and where there is
// none or it returns nullopt (its plan does not fit), with FMAs in the dtype's own types.
template <typename Result, typename Run>
Result run_with_product(at::ScalarType dtype, const gpu::DeviceInfo& device, PersistentChoice choice, Run&& run) {
  if (choice == PersistentChoice::kAny && device.cc_major >= 8) {
    if (const c10::optional<PersistentProduct> product = tensor_core_product(dtype)) {
      Result result;
      switch (*product) {
        case PersistentProduct::kBFloat16:
          result = run(c10::BFloat16(), float(), ProductTag<PersistentProduct::kBFloat16>());
          break;
        case PersistentProduct::kHalf:
          result = run(c10::Half(), float(), ProductTag<PersistentProduct::kHalf>());
          break;
        case PersistentProduct::kTF32:
          result = run(float(), float(), ProductTag<PersistentProduct::kTF32>());
          break;
        case PersistentProduct::kFma:
          break;
      }
      if (result) return result;
    }
  }
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "persistent kernel", [&]() -> Result {
    return run(scalar_t(), at::opmath_type<scalar_t>(), ProductTag<PersistentProduct::kFma>());
  });
}

// Whether a persistent kernel may run at all (a layer without projection, with steps and rows,
// the setting not "0", cooperative launches on the device): then the device's description.
inline c10::optional<gpu::DeviceInfo> persistent_device(const LayerSizes& s, const at::Tensor& x,
                                                        PersistentChoice choice) {
  if (s.has_proj || s.seq_len == 0 || s.batch == 0 || s.hidden_size == 0 || choice == PersistentChoice::kOff) {
    return c10::nullopt;
  }
  const gpu::DeviceInfo device = gpu::device_info(x.device());
  if (!device.cooperative_launch) return c10::nullopt;
  return device;
}

// Before a persistent launch: opt the kernel in to its shared memory and check that every block
// of the grid can be resident at once (the grid barrier needs it). false: take another path.
template <typename Kernel>
bool persistent_grid_fits(Kernel kernel, const at::Device& where, const gpu::DeviceInfo& device, int64_t threads,
                          int64_t blocks, int64_t shared_bytes) {
  gpu::allow_dynamic_shared(kernel, where, shared_bytes);
  return gpu::max_active_blocks_per_sm(kernel, where, threads, shared_bytes) * device.sm_count >= blocks;
}

// The loop sizes and the plan's shape, which every product kernel's arguments carry.
template <typename Args>
void set_loop_sizes(Args& args, const LayerSizes& s, bool reverse, const PersistentProductPlan& plan) {
  args.T = static_cast<int>(s.seq_len);
  args.B = static_cast<int>(s.batch);
  args.H = static_cast<int>(s.hidden_size);
  args.reverse = reverse;
  args.shape = product_shape(plan);
}

// The cooperative launch of a product kernel, named by its product (the emulator's report and the
// tests tell the FMA and tensor-core instances apart). false: the device refused the grid.
template <PersistentProduct kProduct, typename Kernel, typename Args>
bool launch_product_kernel(const char* fma_name, const char* tensor_core_name, Kernel kernel,
                           const PersistentProductPlan& plan, const Args& args) {
  return gpu::launch_cooperative(kProduct == PersistentProduct::kFma ? fma_name : tensor_core_name, kernel,
                                 dim3(plan.blocks), dim3(kPersistentProductThreads), plan.shared_bytes, args);
}

}  // namespace lstm_fused
