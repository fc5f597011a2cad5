// What the device code takes from CUDA. nvcc compiles the kernels against CUDA itself; plain C++
// (the test-only SIMT emulator build, csrc/simt) gets the same names from the emulator, so that
// one kernel source is both what runs on a GPU and what the emulated tests run.
// Kernel headers include this and nothing of ATen: pointers and sizes in, results out.
#pragma once

#if defined(__CUDACC__)
#include <cooperative_groups.h>
#else
#include "../simt/simt.h"
#endif

#include <cstdint>
#include <cstring>

// Declares `name`, an unsigned char pointer to the block's dynamic shared memory (16-byte aligned).
#if defined(__CUDACC__)
#define LSTM_FUSED_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#else
#define LSTM_FUSED_DYNAMIC_SHARED(name) \
  unsigned char* const name = static_cast<unsigned char*>(::simt::dynamic_shared_memory())
#endif

namespace lstm_fused {

// A load that bypasses L1 (ld.global.cg): for data that other SMs wrote before the last grid
// barrier, since L1 is not coherent across SMs. 2-byte types (Half, BFloat16) go through their bits.
template <typename T>
__device__ __forceinline__ T load_uncached(const T* p) {
  if constexpr (sizeof(T) == 2) {
    const unsigned short bits = __ldcg(reinterpret_cast<const unsigned short*>(p));
    T value;
    memcpy(&value, &bits, sizeof(T));
    return value;
  } else {
    return __ldcg(p);
  }
}

}  // namespace lstm_fused
