// Compile check of mma.cuh's PTX branch (nvcc -arch=sm_90 -std=c++17 -c): one kernel calls
// every intrinsic, so each inline-asm string is assembled by ptxas.
#include <cstdint>

#include "../../csrc/cuda/mma.cuh"

using namespace lstm_fused::tc;

__global__ void every_intrinsic(const float* global_in, float* out) {
  __shared__ __align__(16) uint16_t tile[32][8];
  __shared__ __align__(16) float staged[32 * 4];
  const unsigned lane = threadIdx.x % 32;
  cp_async_16(&staged[lane * 4], global_in + lane * 4);
  cp_async_8(&staged[lane * 4], global_in + lane * 4);
  cp_async_4(&staged[lane * 4], global_in + lane * 4);
  cp_async_commit();
  cp_async_wait<1>();
  cp_async_wait<0>();
  __syncthreads();
  tile[lane][0] = static_cast<uint16_t>(pack_bf16x2(staged[lane], 1.0f));
  __syncthreads();
  uint32_t r1[1], r2[2], r4[4];
  ldmatrix_x1(r1, &tile[lane][0]);
  ldmatrix_x2(r2, &tile[lane][0]);
  ldmatrix_x4(r4, &tile[lane][0]);
  ldmatrix_x1_trans(r1, &tile[lane][0]);
  ldmatrix_x2_trans(r2, &tile[lane][0]);
  ldmatrix_x4_trans(r4, &tile[lane][0]);
  const uint32_t b[2] = {r2[0] ^ r1[0], pack_half2(staged[lane], 2.0f)};
  const uint32_t a[4] = {r4[0], r4[1], r4[2], to_tf32(staged[lane])};
  float c[4] = {0, 0, 0, 0}, d[4];
  mma_m16n8k16_bf16(d, a, b, c);
  mma_m16n8k16_f16(c, a, b, d);
  mma_m16n8k8_tf32(d, a, b, c);
  float* dynamic = dynamic_shared<float>();
  dynamic[threadIdx.x] = d[0];
  __syncthreads();
  for (int i = 0; i < 4; ++i) out[threadIdx.x * 4 + i] = d[i] + dynamic[(threadIdx.x + 1) % 32];
}
