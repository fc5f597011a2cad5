// The tensor-core and asynchronous-copy instructions the kernels use, in one place: inline PTX
// when nvcc compiles for the device (sm_80+), the SIMT emulator (csrc/simt/simt.h) when the same
// kernel source is compiled as C++ for tests. Warp-collective like the instructions: every lane
// of the warp calls each mma/ldmatrix function. Fragment layouts are the PTX ISA's ("Matrix
// Fragments for mma.m16n8k16", "... m16n8k8", "ldmatrix"); ../shared/cuda-facts.md lists them.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LSTM_FUSED_TC_PTX 1
#else
#include "../simt/simt.h"
#endif

namespace lstm_fused {
namespace tc {

#if defined(LSTM_FUSED_TC_PTX)

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define LSTM_FUSED_TC_UNSUPPORTED 1
#endif

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                  const float (&c)[4]) {
#if defined(LSTM_FUSED_TC_UNSUPPORTED)
  __trap();
#elif defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#endif
}

__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                 const float (&c)[4]) {
#if defined(LSTM_FUSED_TC_UNSUPPORTED)
  __trap();
#elif defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#endif
}

__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                 const float (&c)[4]) {
#if defined(LSTM_FUSED_TC_UNSUPPORTED)
  __trap();
#elif defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#endif
}

__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], const void* row_address) {
#if defined(LSTM_FUSED_TC_UNSUPPORTED)
  __trap();
#elif defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(shared_address(row_address)));
#endif
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row_address) {
#if defined(LSTM_FUSED_TC_UNSUPPORTED)
  __trap();
#elif defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(shared_address(row_address)));
#endif
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row_address) {
#if defined(LSTM_FUSED_TC_UNSUPPORTED)
  __trap();
#elif defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row_address)));
#endif
}
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t (&r)[1], const void* row_address) {
#if defined(LSTM_FUSED_TC_UNSUPPORTED)
  __trap();
#elif defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
               : "=r"(r[0])
               : "r"(shared_address(row_address)));
#endif
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row_address) {
#if defined(LSTM_FUSED_TC_UNSUPPORTED)
  __trap();
#elif defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(shared_address(row_address)));
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_address) {
#if defined(LSTM_FUSED_TC_UNSUPPORTED)
  __trap();
#elif defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row_address)));
#endif
}

__device__ __forceinline__ void cp_async_16(void* shared_dst, const void* global_src) {
#if defined(LSTM_FUSED_TC_UNSUPPORTED)
  __trap();
#elif defined(__CUDA_ARCH__)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared_address(shared_dst)), "l"(global_src)
               : "memory");
#endif
}
__device__ __forceinline__ void cp_async_8(void* shared_dst, const void* global_src) {
#if defined(LSTM_FUSED_TC_UNSUPPORTED)
  __trap();
#elif defined(__CUDA_ARCH__)
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(shared_address(shared_dst)), "l"(global_src)
               : "memory");
#endif
}
__device__ __forceinline__ void cp_async_4(void* shared_dst, const void* global_src) {
#if defined(LSTM_FUSED_TC_UNSUPPORTED)
  __trap();
#elif defined(__CUDA_ARCH__)
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(shared_address(shared_dst)), "l"(global_src)
               : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(LSTM_FUSED_TC_UNSUPPORTED)
  __trap();
#elif defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(LSTM_FUSED_TC_UNSUPPORTED)
  __trap();
#elif defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// cvt.rn.{bf16x2,f16x2}.f32 d, a, b puts a in the upper half and b in the lower.
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  uint32_t r = 0;
#if defined(LSTM_FUSED_TC_UNSUPPORTED)
  __trap();
#elif defined(__CUDA_ARCH__)
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
#endif
  return r;
}
__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  uint32_t r = 0;
#if defined(LSTM_FUSED_TC_UNSUPPORTED)
  __trap();
#elif defined(__CUDA_ARCH__)
  asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
#endif
  return r;
}
__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r = 0;
#if defined(LSTM_FUSED_TC_UNSUPPORTED)
  __trap();
#elif defined(__CUDA_ARCH__)
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
#endif
  return r;
}

// The block's dynamic shared memory (16-byte aligned), one spelling for nvcc and the emulator.
template <class T>
__device__ __forceinline__ T* dynamic_shared() {
  extern __shared__ __align__(16) unsigned char lstm_fused_dynamic_shared[];
  return reinterpret_cast<T*>(lstm_fused_dynamic_shared);
}

#else  // emulation

template <class T>
inline T* dynamic_shared() {
  return static_cast<T*>(::simt::dynamic_shared_memory());
}

namespace emu {

inline uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}
inline float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf, NaN
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}
inline uint16_t float_to_bf16_rn(float x) {
  const uint32_t u = float_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline uint16_t float_to_half_rn(float x) {
  const uint32_t u = float_bits(x);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t magnitude = u & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (magnitude >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to inf
  if (magnitude < 0x38800000u) {  // below the smallest normal half: a multiple of 2^-24
    const float scaled = std::ldexp(bits_float(magnitude), 24);  // exact
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(scaled)));  // round-to-even mode
  }
  const uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);
  return static_cast<uint16_t>(sign | ((rounded >> 13) - (112u << 10)));
}
// The tensor cores read only sign, exponent and the top 10 mantissa bits of a tf32 operand.
inline float tf32_operand(uint32_t r) { return bits_float(r & 0xffffe000u); }

enum Format { kBF16, kF16, kTF32 };

struct MmaLane {
  const uint32_t* a;
  const uint32_t* b;
  const float* c;
  float* d;
};

inline float low_half(uint32_t r, Format f) {
  return f == kBF16 ? bf16_to_float(static_cast<uint16_t>(r)) : half_to_float(static_cast<uint16_t>(r));
}
inline float high_half(uint32_t r, Format f) {
  return f == kBF16 ? bf16_to_float(static_cast<uint16_t>(r >> 16)) : half_to_float(static_cast<uint16_t>(r >> 16));
}

template <Format F>
void complete_mma(::simt::detail::Block& blk, unsigned warp, unsigned) {
  constexpr int K = F == kTF32 ? 8 : 16;
  double A[16][16], B[16][8], C[16][8];
  for (unsigned lane = 0; lane < 32; ++lane) {
    const MmaLane* m = ::simt::detail::lane_data<MmaLane>(blk, warp, lane);
    const int g = static_cast<int>(lane >> 2), t = static_cast<int>(lane & 3);
    if (F == kTF32) {
      A[g][t] = tf32_operand(m->a[0]);
      A[g + 8][t] = tf32_operand(m->a[1]);
      A[g][t + 4] = tf32_operand(m->a[2]);
      A[g + 8][t + 4] = tf32_operand(m->a[3]);
      B[t][g] = tf32_operand(m->b[0]);
      B[t + 4][g] = tf32_operand(m->b[1]);
    } else {
      for (int i = 0; i < 8; ++i) {  // a_i: row g + 8*((i>>1)&1), col 2t + (i&1) + 8*(i>>2)
        const uint32_t r = m->a[i >> 1];
        A[g + 8 * ((i >> 1) & 1)][2 * t + (i & 1) + 8 * (i >> 2)] = (i & 1) ? high_half(r, F) : low_half(r, F);
      }
      for (int i = 0; i < 4; ++i) {  // b_i: k = 2t + (i&1) + 8*(i>>1), n = g
        const uint32_t r = m->b[i >> 1];
        B[2 * t + (i & 1) + 8 * (i >> 1)][g] = (i & 1) ? high_half(r, F) : low_half(r, F);
      }
    }
    for (int i = 0; i < 4; ++i) C[g + 8 * (i >> 1)][2 * t + (i & 1)] = m->c[i];
  }
  float D[16][8];
  for (int row = 0; row < 16; ++row)
    for (int col = 0; col < 8; ++col) {
      double s = C[row][col];
      for (int k = 0; k < K; ++k) s += A[row][k] * B[k][col];
      D[row][col] = static_cast<float>(s);
    }
  for (unsigned lane = 0; lane < 32; ++lane) {  // after every lane's C is read: d may alias c
    MmaLane* m = ::simt::detail::lane_data<MmaLane>(blk, warp, lane);
    const int g = static_cast<int>(lane >> 2), t = static_cast<int>(lane & 3);
    for (int i = 0; i < 4; ++i) m->d[i] = D[g + 8 * (i >> 1)][2 * t + (i & 1)];
  }
  ::simt::counters().mma.fetch_add(1, std::memory_order_relaxed);
}

template <Format F>
inline void mma(const char* name, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  MmaLane me{a, b, c, d};
  ::simt::detail::warp_collective(name, ::simt::detail::kMma + F * 16, 0xffffffffu, &me, &complete_mma<F>);
}

struct LdmatrixLane {
  const void* address;
  uint32_t* r;
};
template <int N, bool Trans>
void complete_ldmatrix(::simt::detail::Block& blk, unsigned warp, unsigned) {
  uint16_t m[N][8][8];
  for (int j = 0; j < N; ++j)
    for (int row = 0; row < 8; ++row) {
      const unsigned lane = static_cast<unsigned>(8 * j + row);
      const void* p = ::simt::detail::lane_data<LdmatrixLane>(blk, warp, lane)->address;
      if (reinterpret_cast<uintptr_t>(p) % 16)
        throw ::simt::detail::DeviceError(::simt::detail::thread_name(blk.fibers[warp * 32 + lane]) +
                                          ": ldmatrix row address is not 16-byte aligned");
      std::memcpy(m[j][row], p, 16);
    }
  for (unsigned lane = 0; lane < 32; ++lane) {
    uint32_t* r = ::simt::detail::lane_data<LdmatrixLane>(blk, warp, lane)->r;
    const unsigned g = lane >> 2, t = lane & 3;
    for (int j = 0; j < N; ++j) {
      const uint16_t lo = Trans ? m[j][2 * t][g] : m[j][g][2 * t];
      const uint16_t hi = Trans ? m[j][2 * t + 1][g] : m[j][g][2 * t + 1];
      r[j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
  }
  ::simt::counters().ldmatrix.fetch_add(1, std::memory_order_relaxed);
}
template <int N, bool Trans>
inline void ldmatrix(uint32_t (&r)[N], const void* row_address) {
  LdmatrixLane me{row_address, r};
  ::simt::detail::warp_collective(Trans ? "ldmatrix.trans" : "ldmatrix",
                                  ::simt::detail::kLdmatrix + 16 * (N + (Trans ? 8 : 0)), 0xffffffffu, &me,
                                  &complete_ldmatrix<N, Trans>);
}

}  // namespace emu

inline void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  emu::mma<emu::kBF16>("mma.m16n8k16.bf16", d, a, b, c);
}
inline void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  emu::mma<emu::kF16>("mma.m16n8k16.f16", d, a, b, c);
}
inline void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  emu::mma<emu::kTF32>("mma.m16n8k8.tf32", d, a, b, c);
}
inline void ldmatrix_x1(uint32_t (&r)[1], const void* p) { emu::ldmatrix<1, false>(r, p); }
inline void ldmatrix_x2(uint32_t (&r)[2], const void* p) { emu::ldmatrix<2, false>(r, p); }
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) { emu::ldmatrix<4, false>(r, p); }
inline void ldmatrix_x1_trans(uint32_t (&r)[1], const void* p) { emu::ldmatrix<1, true>(r, p); }
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* p) { emu::ldmatrix<2, true>(r, p); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { emu::ldmatrix<4, true>(r, p); }
// Deferred: a group's copies land only when a cp_async_wait lets it complete.
inline void cp_async_16(void* shared_dst, const void* global_src) { ::simt::detail::cp_async(shared_dst, global_src, 16); }
inline void cp_async_8(void* shared_dst, const void* global_src) { ::simt::detail::cp_async(shared_dst, global_src, 8); }
inline void cp_async_4(void* shared_dst, const void* global_src) { ::simt::detail::cp_async(shared_dst, global_src, 4); }
inline void cp_async_commit() { ::simt::detail::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
  ::simt::detail::cp_async_wait(N);
}
inline uint32_t pack_bf16x2(float lo, float hi) {
  return static_cast<uint32_t>(emu::float_to_bf16_rn(lo)) | (static_cast<uint32_t>(emu::float_to_bf16_rn(hi)) << 16);
}
inline uint32_t pack_half2(float lo, float hi) {
  return static_cast<uint32_t>(emu::float_to_half_rn(lo)) | (static_cast<uint32_t>(emu::float_to_half_rn(hi)) << 16);
}
// cvt.rna.tf32.f32: round to nearest, ties away from zero, to 10 mantissa bits.
inline uint32_t to_tf32(float x) {
  const uint32_t u = emu::float_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffffffu;  // canonical NaN
  return (u + 0x1000u) & 0xffffe000u;
}

#endif

}  // namespace tc
}  // namespace lstm_fused
