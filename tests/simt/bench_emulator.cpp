// Speed of the emulator itself (not a test): context switches per second, a 256-thread block
// with 100 barriers, warp shuffles, an mma loop. Build: g++ -std=c++17 -O2 -pthread.
#include "../../csrc/cuda/mma.cuh"

#include <chrono>
#include <ctime>
#include <cstdio>

using namespace lstm_fused;

__global__ void barriers(int rounds, int* out) {
  __shared__ int s[1024];
  int acc = 0;
  for (int r = 0; r < rounds; ++r) {
    s[threadIdx.x] = r + static_cast<int>(threadIdx.x);
    __syncthreads();
    acc += s[(threadIdx.x + 1) % blockDim.x];
    __syncthreads();
  }
  out[threadIdx.x] = acc;
}
__global__ void shuffles(int rounds, float* out) {
  float v = static_cast<float>(threadIdx.x);
  for (int r = 0; r < rounds; ++r) v += __shfl_xor_sync(0xffffffffu, v, r % 32);
  out[threadIdx.x] = v;
}
__global__ void mmas(int rounds, float* out) {
  uint32_t a[4] = {0x3f803f80u, 0x3f803f80u, 0x3f803f80u, 0x3f803f80u}, b[2] = {0x3f803f80u, 0x3f803f80u};
  float c[4] = {0, 0, 0, 0};
  for (int r = 0; r < rounds; ++r) tc::mma_m16n8k16_bf16(c, a, b, c);
  out[threadIdx.x] = c[0];
}
__global__ void empty_kernel() {}

// CPU seconds of the process (the machine may be shared, so wall time overstates).
template <class F>
double seconds(F f) {
  timespec t0, t1;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t0);
  f();
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t1);
  return static_cast<double>(t1.tv_sec - t0.tv_sec) + 1e-9 * static_cast<double>(t1.tv_nsec - t0.tv_nsec);
}

int main() {
  static int iout[1024];
  static float fout[1024];
  simt::Error e = simt::Error::success;
  const double launch = seconds([&] {
    for (int i = 0; i < 100; ++i) e = simt::launch("empty", empty_kernel, dim3(1), dim3(32), 0);
  }) / 100;
  std::printf("empty launch (1 block x 32 threads): %.1f us\n", launch * 1e6);
  for (int threads : {256, 1024}) {
    simt::counters().reset();
    const double t = seconds([&] { e = simt::launch("barriers", barriers, dim3(1), dim3(threads), 0, 50, iout); });
    const double switches = static_cast<double>(simt::counters().switches.load());
    std::printf("%d-thread block, 100 barriers: %.2f ms; %.0f switches (to and from the scheduler), %.1f M/s\n",
                threads, t * 1e3, 2 * switches, 2 * switches / t / 1e6);
  }
  const double shfl = seconds([&] { e = simt::launch("shuffles", shuffles, dim3(1), dim3(256), 0, 1000, fout); });
  std::printf("256 threads x 1000 __shfl_xor_sync: %.2f ms, %.0f ns per warp shuffle\n", shfl * 1e3,
              shfl / (8 * 1000) * 1e9);
  const double mma = seconds([&] { e = simt::launch("mmas", mmas, dim3(1), dim3(128), 0, 2000, fout); });
  std::printf("4 warps x 2000 mma.m16n8k16: %.2f ms, %.2f us per warp mma\n", mma * 1e3, mma / (4 * 2000) * 1e6);
  const double grid = seconds([&] { e = simt::launch("barriers", barriers, dim3(132), dim3(256), 0, 10, iout); });
  std::printf("132 blocks x 256 threads, 20 barriers each: %.1f ms\n", grid * 1e3);
  return e == simt::Error::success ? 0 : 1;
}
