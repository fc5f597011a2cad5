// The host side of a CUDA op's work that touches the CUDA runtime: launches, device properties,
// kernel attributes, the device guard. nvcc builds it on CUDA; the test-only SIMT build
// (csrc/simt, plain C++) on the emulator with a virtual device, so that the ops' host logic (plans,
// fallbacks, the time loop) runs in the emulated tests exactly as it runs on a GPU.
#pragma once

#include <ATen/ATen.h>

#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#include "device_compat.cuh"

#if defined(__CUDACC__)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
// The kernels of a .cu file serve the lstm_fused ops on CUDA tensors.
#define LSTM_FUSED_GPU_KERNELS(m) TORCH_LIBRARY_IMPL(lstm_fused, CUDA, m)
#else
// In the SIMT build the same host code serves lstm_fused_simt's ops on CPU tensors
// (csrc/simt/simt_ops.cpp defines them with lstm_fused's schemas).
#define LSTM_FUSED_GPU_KERNELS(m) TORCH_LIBRARY_IMPL(lstm_fused_simt, CPU, m)
#endif

namespace lstm_fused {
namespace gpu {

// What the plans read of a device.
struct DeviceInfo {
  int64_t sm_count = 0;
  int64_t max_shared_optin = 0;  // dynamic shared memory a block may opt in to
  bool cooperative_launch = false;
  int cc_major = 0;  // compute capability: mma.sync with bf16 needs 8.0
};

#if defined(__CUDACC__)
using DeviceGuard = c10::cuda::CUDAGuard;

inline int attribute(cudaDeviceAttr which, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, which, device));
  return value;
}

// Queried once per device: attributes are constant, and a query per call costs microseconds.
inline DeviceInfo device_info(const at::Device& device) {
  static std::mutex mutex;
  static std::map<int, DeviceInfo> known;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = known.find(device.index());
  if (found != known.end()) return found->second;
  DeviceInfo info;
  info.sm_count = attribute(cudaDevAttrMultiProcessorCount, device.index());
  info.max_shared_optin = attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device.index());
  info.cooperative_launch = attribute(cudaDevAttrCooperativeLaunch, device.index()) != 0;
  info.cc_major = attribute(cudaDevAttrComputeCapabilityMajor, device.index());
  known.emplace(device.index(), info);
  return info;
}
#else
// No device to guard: the SIMT build's tensors are on the CPU.
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};

// The emulator's virtual device, read on every call: tests change it to exercise other plans.
inline DeviceInfo device_info(const at::Device&) {
  const simt::Device& d = simt::device();
  DeviceInfo info;
  info.sm_count = d.sm_count;
  info.max_shared_optin = static_cast<int64_t>(d.shared_per_block_optin);
  info.cooperative_launch = d.cooperative_launch;
  info.cc_major = d.cc_major;
  return info;
}

inline void check(simt::Error error, const char* name) {
  TORCH_CHECK(error == simt::Error::success, "lstm_fused (SIMT emulator): launch of ", name, " failed: ",
              simt::error_string(error), ": ", simt::last_error_message());
}
#endif

// Lets `kernel` use `bytes` of dynamic shared memory (past the 48 KB default), once per kernel
// and device: the attribute persists, so setting it on every call would only cost time.
template <typename... P>
void allow_dynamic_shared(void (*kernel)(P...), const at::Device& device, int64_t bytes) {
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, int64_t> allowed;
  const std::lock_guard<std::mutex> lock(mutex);
  int64_t& current = allowed[{device.index(), reinterpret_cast<const void*>(kernel)}];
  if (bytes <= current) return;
#if defined(__CUDACC__)
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
#else
  check(simt::set_max_dynamic_shared(kernel, static_cast<size_t>(bytes)), "cudaFuncSetAttribute");
#endif
  current = bytes;
}

// How many blocks of `kernel` fit on one multiprocessor of `device` at once (the current
// device: the callers hold a device guard). Asked once per kernel, device and shape on CUDA, like
// the attributes above; the emulator's virtual device changes between tests, so it is asked there.
template <typename... P>
int64_t max_active_blocks_per_sm(void (*kernel)(P...), const at::Device& device, int64_t threads,
                                 int64_t dynamic_shared) {
#if defined(__CUDACC__)
  static std::mutex mutex;
  static std::map<std::tuple<int, const void*, int64_t, int64_t>, int64_t> known;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(device.index(), reinterpret_cast<const void*>(kernel), threads, dynamic_shared);
  const auto found = known.find(key);
  if (found != known.end()) return found->second;
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, static_cast<int>(threads),
                                                               static_cast<size_t>(dynamic_shared)));
  known.emplace(key, blocks);
  return blocks;
#else
  (void)device;
  return simt::max_active_blocks_per_sm(kernel, static_cast<int>(threads), static_cast<size_t>(dynamic_shared));
#endif
}

// Launches `kernel` on the current stream and checks the launch. An empty grid (no rows, or
// hidden_size 0) launches nothing: CUDA refuses a grid with a zero dimension, and there is no work.
template <typename... P, typename... A>
void launch(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, int64_t dynamic_shared, A&&... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
#if defined(__CUDACC__)
  (void)name;
  kernel<<<grid, block, static_cast<size_t>(dynamic_shared), c10::cuda::getCurrentCUDAStream()>>>(
      std::forward<A>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#else
  check(simt::launch(name, kernel, grid, block, static_cast<size_t>(dynamic_shared), std::forward<A>(args)...), name);
#endif
}

// A cooperative launch (every block resident at once, grid-wide barriers allowed). Returns false,
// having run nothing, when the device cannot hold the whole grid at once; the caller then takes
// another path. Any other failure throws.
template <typename... P, typename... A>
bool launch_cooperative(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, int64_t dynamic_shared,
                        A&&... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return true;
#if defined(__CUDACC__)
  (void)name;
  std::tuple<P...> values(std::forward<A>(args)...);
  void* pointers[sizeof...(P) > 0 ? sizeof...(P) : 1];
  std::apply([&](auto&... v) {
    int i = 0;
    ((pointers[i++] = static_cast<void*>(&v)), ...);
  }, values);
  const cudaError_t status =
      cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), grid, block, pointers,
                                  static_cast<size_t>(dynamic_shared), c10::cuda::getCurrentCUDAStream());
  if (status == cudaErrorCooperativeLaunchTooLarge) {
    (void)cudaGetLastError();  // clear it: the fallback's launches must not inherit the error
    return false;
  }
  C10_CUDA_CHECK(status);
  return true;
#else
  const simt::Error error =
      simt::launch_cooperative(name, kernel, grid, block, static_cast<size_t>(dynamic_shared), std::forward<A>(args)...);
  if (error == simt::Error::cooperative_launch_too_large) return false;
  check(error, name);
  return true;
#endif
}

}  // namespace gpu
}  // namespace lstm_fused
