// Race mode: built with -fsanitize=thread, the emulator must report two threads touching the same
// shared-memory word between the same two barriers (one of them writing), and must stay silent
// when the barrier is there. Usage: test_race <kernel> racy|clean. The kernels:
//   exchange       write s[t], barrier, read s[t+1]                       (read after write)
//   tile_reuse     per tile: fill, barrier, use, barrier; the second one missing makes the next
//                  fill overwrite words other threads still read            (write after read)
//   warp_exchange  write s[lane], __syncwarp, read s[lane ^ 1]              (within a warp)
//   dynamic        exchange in dynamic shared memory
//   grid           a cooperative ping-pong through global memory, grid.sync between steps
#include "../../csrc/simt/simt.h"

#include <cstdio>
#include <cstring>
#include <vector>

namespace cg = cooperative_groups;

namespace {

__global__ void exchange(const float* in, float* out, bool with_barrier) {
  __shared__ float s[128];
  s[threadIdx.x] = in[threadIdx.x];
  if (with_barrier) __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

__global__ void tile_reuse(const float* in, float* out, int tiles, bool with_second_barrier) {
  __shared__ float tile[64];
  float acc = 0.0f;
  for (int k = 0; k < tiles; ++k) {
    tile[threadIdx.x] = in[k * 64 + threadIdx.x];
    __syncthreads();
    for (int j = 0; j < 64; ++j) acc += tile[j];
    if (with_second_barrier) __syncthreads();
  }
  out[threadIdx.x] = acc;
}

__global__ void warp_exchange(const float* in, float* out, bool with_syncwarp) {
  __shared__ float s[64];
  s[threadIdx.x] = in[threadIdx.x];
  if (with_syncwarp) __syncwarp();
  out[threadIdx.x] = s[threadIdx.x ^ 1u];
}

__global__ void dynamic_exchange(const float* in, float* out, bool with_barrier) {
  float* s = static_cast<float*>(simt::dynamic_shared_memory());
  s[threadIdx.x] = in[threadIdx.x];
  if (with_barrier) __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x + 7) % blockDim.x];
}

__global__ void grid_ping_pong(float* a, float* b, int steps, bool with_grid_sync) {
  cg::grid_group grid = cg::this_grid();
  const int n = static_cast<int>(grid.size()), i = static_cast<int>(grid.thread_rank());
  for (int s = 0; s < steps; ++s) {
    const float* from = s % 2 ? b : a;
    float* to = s % 2 ? a : b;
    to[i] = from[(i + 32) % n] + 1.0f;  // written by another block in the previous step
    if (with_grid_sync) grid.sync();
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3 || (std::strcmp(argv[2], "racy") && std::strcmp(argv[2], "clean"))) {
    std::fprintf(stderr, "usage: %s exchange|tile_reuse|warp_exchange|dynamic|grid racy|clean\n", argv[0]);
    return 2;
  }
  const std::string kernel = argv[1];
  const bool synchronised = std::strcmp(argv[2], "clean") == 0;
  std::vector<float> in(64 * 8), out(256, 0.0f), a(128, 1.0f), b(128, 0.0f);
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<float>(i % 13);
  simt::Error e;
  if (kernel == "exchange")
    e = simt::launch("exchange", exchange, dim3(2), dim3(128), 0, in.data(), out.data(), synchronised);
  else if (kernel == "tile_reuse")
    e = simt::launch("tile_reuse", tile_reuse, dim3(1), dim3(64), 0, in.data(), out.data(), 8, synchronised);
  else if (kernel == "warp_exchange")
    e = simt::launch("warp_exchange", warp_exchange, dim3(1), dim3(64), 0, in.data(), out.data(), synchronised);
  else if (kernel == "dynamic")
    e = simt::launch("dynamic_exchange", dynamic_exchange, dim3(1), dim3(96), 96 * sizeof(float), in.data(),
                     out.data(), synchronised);
  else if (kernel == "grid")
    e = simt::launch_cooperative("grid_ping_pong", grid_ping_pong, dim3(4), dim3(32), 0, a.data(), b.data(), 6,
                                 synchronised);
  else {
    std::fprintf(stderr, "unknown kernel %s\n", kernel.c_str());
    return 2;
  }
  if (e != simt::Error::success) {
    std::fprintf(stderr, "launch failed: %s\n", simt::last_error_message());
    return 3;
  }
  std::printf("ran %s %s\n", kernel.c_str(), argv[2]);
  return 0;
}
