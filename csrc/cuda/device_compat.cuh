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

// Sixteen bytes as four 32-bit words, the unit of a vector load (LDG.128 / LDS.128).
struct alignas(16) Words16 {
  uint32_t w[4];
};

// The float whose bits a 32-bit word holds.
__device__ __forceinline__ float word_float(uint32_t w) {
  float f;
  memcpy(&f, &w, sizeof(f));
  return f;
}

// load_uncached of 16 bytes; p must be 16-byte aligned.
__device__ __forceinline__ Words16 load_uncached_16(const void* p) {
  Words16 out;
#if defined(__CUDACC__)
  const uint4 v = __ldcg(reinterpret_cast<const uint4*>(p));
  out.w[0] = v.x;
  out.w[1] = v.y;
  out.w[2] = v.z;
  out.w[3] = v.w;
#else
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) ::simt::detail::device_error("16-byte load from a misaligned address");
  const uint32_t* words = static_cast<const uint32_t*>(p);
  for (int i = 0; i < 4; ++i) out.w[i] = __ldcg(words + i);
#endif
  return out;
}

}  // namespace lstm_fused
