// The emulator's execution model: barriers, exited threads, deadlocks, warp collectives,
// atomics, cooperative launches and grid sync, launch validation, dynamic shared memory, the
// report file. Every expected value is computed on the host from the CUDA rule, not from the
// emulator.
#include "../../csrc/simt/simt.h"
#include "check.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <numeric>
#include <sstream>

namespace cg = cooperative_groups;

namespace {

std::vector<int> random_ints(size_t n, int lo, int hi) {
  std::uniform_int_distribution<int> d(lo, hi);
  std::vector<int> v(n);
  for (auto& x : v) x = d(check::rng());
  return v;
}

bool contains(const char* haystack, const char* needle) { return std::strstr(haystack, needle) != nullptr; }

// ---- block barrier: a tree reduction in shared memory is right only with its barriers
template <bool kWithBarriers>
__global__ void block_sum(const int* in, int* out, int n) {
  int* s = static_cast<int*>(simt::dynamic_shared_memory());
  const unsigned tid = threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y;
  const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
  const unsigned block = blockIdx.x + blockIdx.y * gridDim.x;
  const unsigned i = block * threads + tid;
  s[tid] = i < static_cast<unsigned>(n) ? in[i] : 0;
  if (kWithBarriers) __syncthreads();
  for (unsigned stride = threads / 2; stride > 0; stride /= 2) {
    if (tid < stride) s[tid] += s[tid + stride];
    if (kWithBarriers) __syncthreads();
  }
  if (tid == 0) out[block] = s[0];
}

TEST(block_barrier_reduction) {
  for (dim3 block : {dim3(256), dim3(16, 8, 2), dim3(1024), dim3(32)}) {
    const unsigned threads = block.x * block.y * block.z;
    const dim3 grid(5, 3);
    const int n = static_cast<int>(threads * 15 - 7);  // ragged last block
    auto in = random_ints(static_cast<size_t>(n), -1000, 1000);
    std::vector<int> out(15, 12345);
    CHECK_OK(simt::launch("block_sum", block_sum<true>, grid, block, threads * sizeof(int), in.data(), out.data(), n));
    for (unsigned b = 0; b < 15; ++b) {
      long long expect = 0;
      for (unsigned k = b * threads; k < (b + 1) * threads && k < static_cast<unsigned>(n); ++k) expect += in[k];
      CHECK_MSG(out[b] == expect, "block %u: %d vs %lld", b, out[b], expect);
    }
  }
}

// Without its barriers the same kernel must give a wrong answer: the emulator does not run the
// threads of a block in an order that hides a missing __syncthreads.
TEST(missing_barrier_gives_wrong_result) {
  const int n = 256 * 4;
  auto in = random_ints(n, 1, 1000);
  std::vector<int> out(4, 0);
  CHECK_OK(simt::launch("block_sum_racy", block_sum<false>, dim3(4), dim3(256), 256 * sizeof(int), in.data(), out.data(), n));
  int wrong = 0;
  for (int b = 0; b < 4; ++b) wrong += out[b] != std::accumulate(in.begin() + b * 256, in.begin() + (b + 1) * 256, 0);
  CHECK(wrong == 4);
}

// ---- exited threads count as arrived at __syncthreads
__global__ void early_exit(int* out, int active) {
  __shared__ int s[256];
  if (static_cast<int>(threadIdx.x) >= active) return;  // exits before any barrier
  s[threadIdx.x] = static_cast<int>(threadIdx.x) * 3;
  __syncthreads();
  const int mine = s[(threadIdx.x + 1) % active];
  __syncthreads();
  s[threadIdx.x] = mine;
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}
__global__ void exit_after_last_barrier(int* out) {
  __shared__ int s[128];
  s[threadIdx.x] = static_cast<int>(threadIdx.x);
  __syncthreads();
  if (threadIdx.x % 3 == 0) return;
  out[threadIdx.x] = s[127 - threadIdx.x];
}
TEST(exited_threads_count_as_arrived) {
  for (int active : {1, 100, 255}) {
    std::vector<int> out(256, -1);
    CHECK_OK(simt::launch("early_exit", early_exit, dim3(1), dim3(256), 0, out.data(), active));
    for (int t = 0; t < 256; ++t) CHECK(out[t] == (t < active ? ((t + 1) % active) * 3 : -1));
  }
  std::vector<int> out(128, -1);
  CHECK_OK(simt::launch("exit_after_last_barrier", exit_after_last_barrier, dim3(1), dim3(128), 0, out.data()));
  for (int t = 0; t < 128; ++t) CHECK(out[t] == (t % 3 == 0 ? -1 : 127 - t));
}

// ---- deadlocks are reported, not hung
__global__ void barrier_against_shuffle(int* out) {
  if (threadIdx.x % 32 < 16) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x), 0);
  }
}
__global__ void divergent_barriers(int* out) {
  // Two different barriers: threads < 32 and the others never meet (each group's barrier waits
  // for the other group, which is at the other barrier... then both reach the end: not a
  // deadlock in CUDA's model of counting arrivals). Then a third barrier only the first warp
  // calls, after the others wait in a warp collective that needs warp 0.
  if (threadIdx.x < 32) {
    __syncwarp();
    __syncthreads();
  } else {
    __syncwarp();
    const unsigned all = __ballot_sync(0xffffffffu, 1);
    if (threadIdx.x == 32) out[0] = static_cast<int>(all);
  }
}
TEST(deadlock_is_reported) {
  std::vector<int> out(64, 0);
  simt::Error e = simt::launch("barrier_against_shuffle", barrier_against_shuffle, dim3(2), dim3(64), 0, out.data());
  CHECK(e == simt::Error::launch_failure);
  CHECK_MSG(contains(simt::last_error_message(), "deadlock"), "%s", simt::last_error_message());
  CHECK_MSG(contains(simt::last_error_message(), "__syncthreads"), "%s", simt::last_error_message());
  // warp 1 waits in __ballot_sync (complete by itself) then exits; warp 0 waits at the barrier:
  // exited threads count, so this one completes.
  CHECK_OK(simt::launch("divergent_barriers", divergent_barriers, dim3(1), dim3(64), 0, out.data()));
  // the emulator is usable after a failed launch
  std::vector<int> sums(1);
  auto in = random_ints(64, 0, 9);
  CHECK_OK(simt::launch("block_sum", block_sum<true>, dim3(1), dim3(64), 64 * sizeof(int), in.data(), sums.data(), 64));
  CHECK(sums[0] == std::accumulate(in.begin(), in.end(), 0));
}

// ---- shuffles: CUDA's rules for width and out-of-range sources, per lane parameters
template <class T>
T value_of(int lane, int salt) {
  if (std::is_floating_point<T>::value) return static_cast<T>(lane * 1.25 + salt * 0.5 + 0.125);
  return static_cast<T>(static_cast<long long>(lane) * 1000003LL * (std::is_signed<T>::value ? -1 : 1) +
                        (sizeof(T) == 8 ? (1LL << 40) : 0) + salt);
}

template <class T>
__global__ void shuffles(T* out, const int* params, unsigned mask, int width, int salt) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int warp = static_cast<int>(threadIdx.x / 32);
  if (!((mask >> lane) & 1u)) return;
  const T v = value_of<T>(lane + 32 * warp, salt);
  const int p = params[threadIdx.x];
  T* o = out + threadIdx.x * 4;
  o[0] = __shfl_sync(mask, v, p, width);
  o[1] = __shfl_up_sync(mask, v, static_cast<unsigned>(p), width);
  o[2] = __shfl_down_sync(mask, v, static_cast<unsigned>(p), width);
  o[3] = __shfl_xor_sync(mask, v, p, width);
}

// CUDA Programming Guide, "Warp Shuffle Functions"
int ref_idx(int lane, int src, int width) { return (lane / width) * width + (src % width); }
int ref_up(int lane, int delta, int width) { return lane % width >= delta ? lane - delta : lane; }
int ref_down(int lane, int delta, int width) { return lane % width + delta < width ? lane + delta : lane; }
int ref_xor(int lane, int m, int width) {
  const int src = lane ^ m;
  return src >= (lane / width + 1) * width ? lane : src;  // later groups: own value; earlier: allowed
}

template <class T>
void check_shuffles(const char* type) {
  for (int width : {1, 2, 4, 8, 16, 32}) {
    const int warps = 2;
    std::vector<int> params(32 * warps);
    for (int& p : params) p = static_cast<int>(check::rng()() % static_cast<unsigned>(width));  // in range
    std::vector<T> out(32 * warps * 4);
    const int salt = static_cast<int>(check::rng()() % 100);
    CHECK_OK(simt::launch("shuffles", shuffles<T>, dim3(1), dim3(32 * warps), 0, out.data(), params.data(),
                          0xffffffffu, width, salt));
    for (int t = 0; t < 32 * warps; ++t) {
      const int lane = t % 32, base = t - lane, p = params[static_cast<size_t>(t)];
      const int src[4] = {ref_idx(lane, p, width), ref_up(lane, p, width), ref_down(lane, p, width),
                          ref_xor(lane, p, width)};
      for (int k = 0; k < 4; ++k)
        CHECK_MSG(out[static_cast<size_t>(t * 4 + k)] == value_of<T>(base + src[k], salt),
                  "%s width %d lane %d op %d param %d", type, width, lane, k, p);
    }
  }
}

TEST(shuffles_match_cuda_rules) {
  check_shuffles<int>("int");
  check_shuffles<unsigned>("unsigned");
  check_shuffles<float>("float");
  check_shuffles<double>("double");
  check_shuffles<long long>("long long");
  check_shuffles<unsigned long long>("unsigned long long");
}

// Out-of-range parameters: srcLane >= width wraps within the segment; deltas beyond the width
// give the caller's own value; xor may reach earlier segments.
TEST(shuffles_out_of_range_sources) {
  for (int width : {4, 8, 32}) {
    std::vector<int> params(32);
    for (int& p : params) p = static_cast<int>(check::rng()() % 32);
    std::vector<int> out(32 * 4);
    CHECK_OK(simt::launch("shuffles", shuffles<int>, dim3(1), dim3(32), 0, out.data(), params.data(), 0xffffffffu,
                          width, 7));
    for (int lane = 0; lane < 32; ++lane) {
      const int p = params[static_cast<size_t>(lane)];
      CHECK(out[static_cast<size_t>(lane * 4 + 0)] == value_of<int>(ref_idx(lane, p, width), 7));
      CHECK(out[static_cast<size_t>(lane * 4 + 1)] == value_of<int>(ref_up(lane, p, width), 7));
      CHECK(out[static_cast<size_t>(lane * 4 + 2)] == value_of<int>(ref_down(lane, p, width), 7));
      CHECK_MSG(out[static_cast<size_t>(lane * 4 + 3)] == value_of<int>(ref_xor(lane, p, width), 7),
                "xor width %d lane %d mask %d", width, lane, p);
    }
  }
}

// A partial mask: the lanes of the mask shuffle among themselves; the others have returned.
__global__ void partial_shuffle(int* out, unsigned mask) {
  const int lane = static_cast<int>(threadIdx.x);
  if (!((mask >> lane) & 1u)) return;
  out[lane] = __shfl_down_sync(mask, lane * 10, 1, 16);
}
TEST(shuffle_partial_mask) {
  std::vector<int> out(32, -1);
  CHECK_OK(simt::launch("partial_shuffle", partial_shuffle, dim3(1), dim3(32), 0, out.data(), 0x0000ffffu));
  for (int lane = 0; lane < 16; ++lane) CHECK(out[static_cast<size_t>(lane)] == (lane < 15 ? lane + 1 : lane) * 10);
  for (int lane = 16; lane < 32; ++lane) CHECK(out[static_cast<size_t>(lane)] == -1);
}

__global__ void shuffle_bad_mask_caller(int* out) { out[threadIdx.x] = __shfl_sync(0x0000fffeu, 1, 1); }
__global__ void shuffle_mask_names_exited(int* out) {
  if (threadIdx.x == 31) return;
  out[threadIdx.x] = __shfl_sync(0xffffffffu, 1, 0);
}
__global__ void shuffle_source_outside_mask(int* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_sync(0x0000ffffu, 1, 20);  // srcLane 20 % 32 = 20: not in the mask
}
__global__ void exits_while_others_wait(int* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_sync(0xffffffffu, 1, 0);
}
TEST(bad_masks_are_reported) {
  std::vector<int> out(64);
  CHECK(simt::launch("shuffle_bad_mask_caller", shuffle_bad_mask_caller, dim3(1), dim3(32), 0, out.data()) ==
        simt::Error::launch_failure);
  CHECK_MSG(contains(simt::last_error_message(), "does not name the calling lane"), "%s", simt::last_error_message());
  // lane 31 returns first or last depending on the schedule; either way it is reported
  CHECK(simt::launch("shuffle_mask_names_exited", shuffle_mask_names_exited, dim3(1), dim3(32), 0, out.data()) ==
        simt::Error::launch_failure);
  CHECK_MSG(contains(simt::last_error_message(), "exited"), "%s", simt::last_error_message());
  CHECK(simt::launch("exits_while_others_wait", exits_while_others_wait, dim3(1), dim3(32), 0, out.data()) ==
        simt::Error::launch_failure);
  CHECK_MSG(contains(simt::last_error_message(), "exited"), "%s", simt::last_error_message());
  CHECK(simt::launch("shuffle_source_outside_mask", shuffle_source_outside_mask, dim3(1), dim3(32), 0, out.data()) ==
        simt::Error::launch_failure);
  CHECK_MSG(contains(simt::last_error_message(), "not in the mask"), "%s", simt::last_error_message());
  // a mask that names lanes past the end of a partial warp
  CHECK(simt::launch("shuffle_mask_names_exited", shuffle_mask_names_exited, dim3(1), dim3(20), 0, out.data()) ==
        simt::Error::launch_failure);
  CHECK_MSG(contains(simt::last_error_message(), "do not exist"), "%s", simt::last_error_message());
}

// ---- votes, with two disjoint masks in flight in one warp at once
__global__ void votes(const int* predicates, unsigned* out) {
  const unsigned lane = threadIdx.x % 32;
  const int p = predicates[threadIdx.x];
  unsigned* o = out + threadIdx.x * 6;
  o[0] = __ballot_sync(0xffffffffu, p);
  o[1] = static_cast<unsigned>(__any_sync(0xffffffffu, p));
  o[2] = static_cast<unsigned>(__all_sync(0xffffffffu, p));
  const unsigned half = lane % 2 ? 0xaaaaaaaau : 0x55555555u;  // odd and even lanes separately
  o[3] = __ballot_sync(half, p);
  o[4] = static_cast<unsigned>(__any_sync(half, p));
  o[5] = static_cast<unsigned>(__all_sync(half, p));
}
TEST(votes_match_reference) {
  for (int density : {0, 1, 50, 99, 100}) {
    std::vector<int> pred(64);
    for (int& p : pred) p = static_cast<int>(check::rng()() % 100) < density ? static_cast<int>(check::rng()() % 7 + 1) : 0;
    std::vector<unsigned> out(64 * 6);
    CHECK_OK(simt::launch("votes", votes, dim3(1), dim3(64), 0, pred.data(), out.data()));
    for (int t = 0; t < 64; ++t) {
      const int base = t - t % 32;
      unsigned ballot = 0, half_ballot = 0;
      const unsigned half = (t % 32) % 2 ? 0xaaaaaaaau : 0x55555555u;
      for (int l = 0; l < 32; ++l)
        if (pred[static_cast<size_t>(base + l)]) ballot |= 1u << l;
      half_ballot = ballot & half;
      const unsigned* o = &out[static_cast<size_t>(t * 6)];
      CHECK(o[0] == ballot);
      CHECK(o[1] == (ballot != 0));
      CHECK(o[2] == (ballot == 0xffffffffu));
      CHECK(o[3] == half_ballot);
      CHECK(o[4] == (half_ballot != 0));
      CHECK(o[5] == (half_ballot == half));
    }
  }
}

// __activemask() in emulation: the lanes that have not exited (divergence is invisible, so only
// a call before any lane can have exited has a defined answer).
__global__ void syncwarp_exchange(int* out) {
  __shared__ int s[64];
  out[64 + threadIdx.x] = static_cast<int>(__activemask());
  s[threadIdx.x] = static_cast<int>(threadIdx.x) + 1;
  __syncwarp();
  out[threadIdx.x] = s[(threadIdx.x / 32) * 32 + (threadIdx.x + 1) % 32];
}
TEST(syncwarp_and_activemask) {
  std::vector<int> out(192, -1);
  CHECK_OK(simt::launch("syncwarp_exchange", syncwarp_exchange, dim3(1), dim3(64), 0, out.data()));
  for (int t = 0; t < 64; ++t) {
    CHECK(out[static_cast<size_t>(t)] == (t / 32) * 32 + (t + 1) % 32 + 1);
    CHECK(static_cast<unsigned>(out[static_cast<size_t>(64 + t)]) == 0xffffffffu);
  }
}

// ---- atomics across many blocks on several OS threads
struct AtomicTotals {
  int add_int;
  unsigned add_unsigned;
  unsigned long long add_ull;
  float add_float;
  double add_double;
  int sub_int;
  int max_int, min_int;
  unsigned max_unsigned, min_unsigned;
  int cas_counter;
  int exch_count;
  unsigned long long cas_ull;
};
__global__ void atomics(const int* values, AtomicTotals* t) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  const int v = values[i];
  atomicAdd(&t->add_int, v);
  atomicAdd(&t->add_unsigned, static_cast<unsigned>(v + 1000));
  atomicAdd(&t->add_ull, static_cast<unsigned long long>(v + 1000) << 20);
  atomicAdd(&t->add_float, static_cast<float>(v));  // integers below 2^24: exact in any order
  atomicAdd(&t->add_double, static_cast<double>(v) * 0.5);
  atomicSub(&t->sub_int, v);
  atomicMax(&t->max_int, v);
  atomicMin(&t->min_int, v);
  atomicMax(&t->max_unsigned, static_cast<unsigned>(v + 1000));
  atomicMin(&t->min_unsigned, static_cast<unsigned>(v + 1000));
  int old = atomicAdd(&t->cas_counter, 0), assumed;
  do {
    assumed = old;
    old = atomicCAS(&t->cas_counter, assumed, assumed + 2);
  } while (old != assumed);
  unsigned long long uold = atomicAdd(&t->cas_ull, 0ull), uassumed;
  do {
    uassumed = uold;
    uold = atomicCAS(&t->cas_ull, uassumed, uassumed + 3);
  } while (uold != uassumed);
  if (atomicExch(&t->exch_count, i) >= 0) atomicAdd(&t->add_int, 0);
}
TEST(atomics_across_blocks) {
  const int blocks = 64, threads = 128, n = blocks * threads;
  auto values = random_ints(n, -999, 999);
  AtomicTotals t{};
  t.min_int = 1 << 30;
  t.min_unsigned = 1u << 30;
  t.max_int = -(1 << 30);
  t.exch_count = -1;
  CHECK_OK(simt::launch("atomics", atomics, dim3(blocks), dim3(threads), 0, values.data(), &t));
  long long sum = 0;
  for (int v : values) sum += v;
  CHECK(t.add_int == sum);
  CHECK(t.add_unsigned == static_cast<unsigned>(sum + 1000LL * n));
  CHECK(t.add_ull == static_cast<unsigned long long>(sum + 1000LL * n) << 20);
  CHECK(t.add_float == static_cast<float>(sum));
  CHECK(t.add_double == 0.5 * static_cast<double>(sum));
  CHECK(t.sub_int == -sum);
  CHECK(t.max_int == *std::max_element(values.begin(), values.end()));
  CHECK(t.min_int == *std::min_element(values.begin(), values.end()));
  CHECK(t.max_unsigned == static_cast<unsigned>(t.max_int + 1000));
  CHECK(t.min_unsigned == static_cast<unsigned>(t.min_int + 1000));
  CHECK(t.cas_counter == 2 * n);
  CHECK(t.cas_ull == 3ull * n);
  CHECK(t.exch_count >= 0 && t.exch_count < n);
}

// ---- cooperative launch: grid.sync() across blocks, a ping-pong over steps
__global__ void ping_pong(float* a, float* b, int n, int steps) {
  cg::grid_group grid = cg::this_grid();
  const int i = static_cast<int>(grid.thread_rank());
  for (int s = 0; s < steps; ++s) {
    const float* from = s % 2 ? b : a;
    float* to = s % 2 ? a : b;
    // reads two elements that other blocks wrote in the previous step
    to[i] = 0.5f * from[(i + 1) % n] + 0.25f * from[(i + n - 37) % n] + static_cast<float>(s);
    grid.sync();
  }
}
TEST(grid_sync_ping_pong) {
  const int blocks = 12, threads = 64, n = blocks * threads, steps = 21;
  std::vector<float> a(n), b(n, 0.0f);
  for (auto& x : a) x = static_cast<float>(check::rng()() % 1000) / 8.0f;
  std::vector<float> ra = a, rb = b;
  for (int s = 0; s < steps; ++s) {
    std::vector<float>& from = s % 2 ? rb : ra;
    std::vector<float>& to = s % 2 ? ra : rb;
    for (int i = 0; i < n; ++i)
      to[static_cast<size_t>(i)] = 0.5f * from[static_cast<size_t>((i + 1) % n)] +
                                   0.25f * from[static_cast<size_t>((i + n - 37) % n)] + static_cast<float>(s);
  }
  CHECK_OK(simt::launch_cooperative("ping_pong", ping_pong, dim3(blocks), dim3(threads), 0, a.data(), b.data(), n, steps));
  CHECK(rb == b);
  CHECK(ra == a);
}

__global__ void grid_sync_anyway(int* out) {
  // One writer per word: every thread writing out[0] was a race between the blocks (race mode
  // reported it whenever the two blocks ran on different workers). The launch fails at the first
  // sync, so a block may never start: each block that does reports in its own slot.
  if (threadIdx.x == 0) out[blockIdx.x] = cg::this_grid().is_valid();
  cg::this_grid().sync();
}
__global__ void cooperative_validity(int* out) {
  cg::grid_group g = cg::this_grid();
  cg::thread_block b = cg::this_thread_block();
  if (g.thread_rank() == 0) {
    out[0] = g.is_valid();
    out[1] = static_cast<int>(g.size());
    out[2] = static_cast<int>(b.size());
  }
  b.sync();
}
TEST(grid_sync_requires_cooperative_launch) {
  std::vector<int> out(3, -1);
  CHECK(simt::launch("grid_sync_anyway", grid_sync_anyway, dim3(2), dim3(32), 0, out.data()) == simt::Error::launch_failure);
  CHECK_MSG(contains(simt::last_error_message(), "not cooperative"), "%s", simt::last_error_message());
  CHECK((out[0] == 0 || out[1] == 0) && out[0] != 1 && out[1] != 1);
  CHECK_OK(simt::launch_cooperative("cooperative_validity", cooperative_validity, dim3(3, 2), dim3(8, 4), 0, out.data()));
  CHECK(out[0] == 1 && out[1] == 3 * 2 * 32 && out[2] == 32);
}

// A block that exits while the others wait in grid.sync, and a block whose threads split between
// grid.sync and __syncthreads: both deadlocks, both reported.
__global__ void block_skips_grid_sync(int* out) {
  if (blockIdx.x == 2) return;
  cg::this_grid().sync();
  atomicAdd(out, 1);
}
__global__ void grid_sync_against_barrier(int* out) {
  if (threadIdx.x < 32)
    cg::this_grid().sync();
  else
    __syncthreads();
  atomicAdd(out, 1);
}
TEST(grid_sync_deadlocks_are_reported) {
  int out = 0;
  CHECK(simt::launch_cooperative("block_skips_grid_sync", block_skips_grid_sync, dim3(4), dim3(32), 0, &out) ==
        simt::Error::launch_failure);
  CHECK_MSG(contains(simt::last_error_message(), "deadlock in grid.sync"), "%s", simt::last_error_message());
  CHECK(out == 0);
  CHECK(simt::launch_cooperative("grid_sync_against_barrier", grid_sync_against_barrier, dim3(2), dim3(64), 0, &out) ==
        simt::Error::launch_failure);
  CHECK_MSG(contains(simt::last_error_message(), "deadlock"), "%s", simt::last_error_message());
}

__global__ void mark_ran(int* ran) { atomicAdd(ran, 1); }
TEST(cooperative_launch_too_large) {
  const simt::Device saved = simt::device();
  simt::Device small = saved;
  small.sm_count = 4;
  small.max_blocks_per_sm = 2;
  simt::set_device(small);
  int ran = 0;
  // 4 SMs x 2 blocks fit; 9 do not
  CHECK(simt::max_active_blocks_per_sm(mark_ran, 64, 0) == 2);
  CHECK_OK(simt::launch_cooperative("mark_ran", mark_ran, dim3(8), dim3(64), 0, &ran));
  CHECK(ran == 8 * 64);
  ran = 0;
  CHECK(simt::launch_cooperative("mark_ran", mark_ran, dim3(9), dim3(64), 0, &ran) ==
        simt::Error::cooperative_launch_too_large);
  CHECK(ran == 0);
  // shared memory limits residency: 100 KiB + 1 KiB reserved -> 2 per SM in 228 KiB, 150 -> 1
  CHECK_OK(simt::set_max_dynamic_shared(mark_ran, 150 * 1024));
  CHECK(simt::max_active_blocks_per_sm(mark_ran, 64, 100 * 1024) == 2);
  CHECK(simt::max_active_blocks_per_sm(mark_ran, 64, 150 * 1024) == 1);
  CHECK(simt::launch_cooperative("mark_ran", mark_ran, dim3(5), dim3(64), 150 * 1024, &ran) ==
        simt::Error::cooperative_launch_too_large);
  CHECK(ran == 0);
  // threads limit residency: 1024-thread blocks, 2048 per SM -> 2; 768 -> 2; 1000 -> 2 (32 rounded)
  CHECK(simt::max_active_blocks_per_sm(mark_ran, 1024, 0) == 2);
  small.max_blocks_per_sm = 32;
  simt::set_device(small);
  CHECK(simt::max_active_blocks_per_sm(mark_ran, 96, 0) == 21);
  simt::set_device(saved);
}

TEST(invalid_configurations) {
  int ran = 0;
  CHECK(simt::launch("mark_ran", mark_ran, dim3(0), dim3(32), 0, &ran) == simt::Error::invalid_configuration);
  CHECK(simt::launch("mark_ran", mark_ran, dim3(4, 0), dim3(32), 0, &ran) == simt::Error::invalid_configuration);
  CHECK(simt::launch("mark_ran", mark_ran, dim3(1), dim3(1025), 0, &ran) == simt::Error::invalid_configuration);
  CHECK(simt::launch("mark_ran", mark_ran, dim3(1), dim3(32, 33), 0, &ran) == simt::Error::invalid_configuration);
  CHECK(simt::launch("mark_ran", mark_ran, dim3(1), dim3(1, 1, 65), 0, &ran) == simt::Error::invalid_configuration);
  CHECK(simt::launch("mark_ran", mark_ran, dim3(1), dim3(0), 0, &ran) == simt::Error::invalid_configuration);
  CHECK(simt::launch_cooperative("mark_ran", mark_ran, dim3(0), dim3(32), 0, &ran) == simt::Error::invalid_configuration);
  CHECK(ran == 0);
  // dynamic shared memory beyond 48 KiB needs the opt-in
  auto kernel = [](int* r) { atomicAdd(r, 1); };
  void (*k)(int*) = kernel;
  CHECK(simt::launch("opt_in", k, dim3(1), dim3(32), 48 * 1024 + 1, &ran) == simt::Error::invalid_value);
  CHECK(ran == 0);
  CHECK_OK(simt::launch("opt_in", k, dim3(1), dim3(32), 48 * 1024, &ran));
  CHECK(simt::set_max_dynamic_shared(k, 227 * 1024 + 1) == simt::Error::invalid_value);
  CHECK_OK(simt::set_max_dynamic_shared(k, 100 * 1024));
  CHECK_OK(simt::launch("opt_in", k, dim3(1), dim3(32), 100 * 1024, &ran));
  CHECK(simt::launch("opt_in", k, dim3(1), dim3(32), 100 * 1024 + 16, &ran) == simt::Error::invalid_value);
  CHECK(ran == 64);
  CHECK_MSG(contains(simt::last_error_message(), "dynamic shared"), "%s", simt::last_error_message());
}

// ---- dynamic shared memory: the launch's size, aligned, garbage at every block's start
__global__ void dynamic_shared_probe(int* bad_bytes, int* misaligned, size_t bytes, float* first) {
  unsigned char* s = static_cast<unsigned char*>(simt::dynamic_shared_memory());
  if (reinterpret_cast<uintptr_t>(s) % 16) atomicAdd(misaligned, 1);
  __syncthreads();
  int bad = 0;
  for (size_t i = threadIdx.x; i < bytes; i += blockDim.x) bad += s[i] != 0xFF;
  atomicAdd(bad_bytes, bad);
  __syncthreads();
  if (threadIdx.x == 0) first[blockIdx.x] = *reinterpret_cast<float*>(s);
  __syncthreads();
  for (size_t i = threadIdx.x; i < bytes; i += blockDim.x) s[i] = 0;  // the next block must not see this
}
TEST(dynamic_shared_garbage_and_size) {
  for (size_t bytes : {size_t(16), size_t(4096), size_t(48 * 1024)}) {
    int bad = 0, misaligned = 0;
    std::vector<float> first(6, 0.0f);
    CHECK_OK(simt::launch("dynamic_shared_probe", dynamic_shared_probe, dim3(6), dim3(64), bytes, &bad, &misaligned,
                          bytes, first.data()));
    CHECK(bad == 0);
    CHECK(misaligned == 0);
    for (float f : first) CHECK(std::isnan(f));
  }
}

// ---- thread and block indices of 3-D launches; arguments are copied by value
struct Args {
  int scale;
  int pad[7];
};
__global__ void indices(Args args, int* out) {
  const unsigned tl = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned bl = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned i = bl * blockDim.x * blockDim.y * blockDim.z + tl;
  out[i] = static_cast<int>(bl * 10000 + tl) * args.scale;
  args.scale = 0;  // a copy: no other thread sees it
}
TEST(indices_3d_and_arguments_by_value) {
  const dim3 grid(3, 2, 2), block(4, 3, 5);
  const unsigned n = 12 * 60;
  std::vector<int> out(n, -1);
  Args args{};
  args.scale = 3;
  CHECK_OK(simt::launch("indices", indices, grid, block, 0, args, out.data()));
  for (unsigned i = 0; i < n; ++i) CHECK(out[i] == static_cast<int>((i / 60) * 10000 + i % 60) * 3);
  CHECK(args.scale == 3);
}

// ---- exceptions thrown by kernel code fail the launch
__global__ void throws(int* out) {
  if (threadIdx.x == 7 && blockIdx.x == 1) throw std::runtime_error("kernel says no");
  __syncthreads();
  atomicExch(out, 1);
}
TEST(exception_is_launch_failure) {
  int out = 0;
  CHECK(simt::launch("throws", throws, dim3(3), dim3(32), 0, &out) == simt::Error::launch_failure);
  CHECK_MSG(contains(simt::last_error_message(), "kernel says no"), "%s", simt::last_error_message());
}

// ---- the report file
__global__ void report_a(int*) {}
__global__ void report_b(int*) {}
TEST(report_file) {
  char path[] = "/tmp/simt_report_XXXXXX";
  const int fd = mkstemp(path);
  CHECK(fd >= 0);
  close(fd);
  setenv("LSTM_FUSED_SIMT_REPORT", path, 1);
  int x = 0;
  CHECK_OK(simt::launch("report_a", report_a, dim3(2), dim3(32), 0, &x));
  CHECK_OK(simt::launch("lstm_fused::report_b<float>", report_b, dim3(1), dim3(1), 0, &x));
  CHECK_OK(simt::launch("report_a", report_a, dim3(1), dim3(32), 0, &x));
  unsetenv("LSTM_FUSED_SIMT_REPORT");
  CHECK_OK(simt::launch("report_b", report_b, dim3(1), dim3(32), 0, &x));  // not reported
  std::ifstream in(path);
  std::stringstream all;
  all << in.rdbuf();
  CHECK_MSG(all.str() == "report_a\nlstm_fused::report_b<float>\nreport_a\n", "%s", all.str().c_str());
  std::remove(path);
}

// ---- many blocks on few OS threads: each block runs exactly once
__global__ void count_blocks(int* hits) {
  if (threadIdx.x == 0) atomicAdd(&hits[blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z)], 1);
}
TEST(every_block_runs_once) {
  const dim3 grid(17, 9, 3);
  std::vector<int> hits(17 * 9 * 3, 0);
  CHECK_OK(simt::launch("count_blocks", count_blocks, grid, dim3(33), 0, hits.data()));
  for (int h : hits) CHECK(h == 1);
}

// ---- a spin loop on a flag set by another block of a cooperative launch (atomics yield)
__global__ void flag_handoff(int* flag, int* data, int* seen) {
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    data[0] = 42;
    __threadfence();
    atomicExch(flag, 1);
  }
  if (blockIdx.x == 1 && threadIdx.x == 0) {
    while (atomicAdd(flag, 0) == 0) {
    }
    __threadfence();
    seen[0] = data[0];
  }
}
TEST(spin_on_flag_across_blocks) {
  int flag = 0, data = 0, seen = 0;
  CHECK_OK(simt::launch_cooperative("flag_handoff", flag_handoff, dim3(2), dim3(32), 0, &flag, &data, &seen));
  CHECK(seen == 42);
}

// ---- a kernel that spins forever is failed after the launch timeout, not hung
__global__ void spins_forever(int* flag) {
  while (atomicAdd(flag, 0) == 0) {
  }
}
TEST(spin_forever_times_out) {
  const double saved = simt::launch_timeout_s();
  simt::launch_timeout_s() = 0.5;
  int flag = 0;
  CHECK(simt::launch("spins_forever", spins_forever, dim3(2), dim3(32), 0, &flag) == simt::Error::launch_failure);
  CHECK_MSG(contains(simt::last_error_message(), "timed out"), "%s", simt::last_error_message());
  simt::launch_timeout_s() = saved;
}

// ---- a thread that overflows its stack is reported (the canary at the stack's bottom)
__global__ void deep_frame(int* out) {
  volatile char frame[62 * 1024];
  for (size_t i = 0; i < sizeof(frame); i += 64) frame[i] = static_cast<char>(i);
  out[0] = frame[4096];
}
TEST(stack_overflow_is_reported) {
  int out = 0;
  CHECK(simt::launch("deep_frame", deep_frame, dim3(1), dim3(1), 0, &out) == simt::Error::launch_failure);
  CHECK_MSG(contains(simt::last_error_message(), "stack overflow"), "%s", simt::last_error_message());
  const size_t saved = simt::stack_size();
  simt::stack_size() = 256 * 1024;
  CHECK_OK(simt::launch("deep_frame", deep_frame, dim3(1), dim3(1), 0, &out));
  simt::stack_size() = saved;
}

// ---- __syncthreads_count / _and / _or
__global__ void barrier_votes(const int* predicates, int* out) {
  const int p = predicates[threadIdx.x];
  const int count = __syncthreads_count(p), all = __syncthreads_and(p), any = __syncthreads_or(p);
  if (threadIdx.x == 5) {
    out[0] = count;
    out[1] = all;
    out[2] = any;
  }
}
TEST(syncthreads_count_and_or) {
  for (int density : {0, 30, 100}) {
    std::vector<int> pred(96);
    for (int& p : pred) p = static_cast<int>(check::rng()() % 100) < density;
    std::vector<int> out(3, -1);
    CHECK_OK(simt::launch("barrier_votes", barrier_votes, dim3(1), dim3(96), 0, pred.data(), out.data()));
    const int count = static_cast<int>(std::count(pred.begin(), pred.end(), 1));
    CHECK(out[0] == count);
    CHECK(out[1] == (count == 96));
    CHECK(out[2] == (count > 0));
  }
}

}  // namespace

TEST_MAIN()
