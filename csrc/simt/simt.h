// SIMT emulator: CUDA device code compiled as plain C++ (g++) and run on the CPU with CUDA's
// execution rules, for tests only (DESIGN.md, "Verification without a GPU"). One OS thread per
// resident block, one fiber per CUDA thread; barriers, warp collectives, cooperative grid sync,
// dynamic shared memory, atomics; deadlocks and broken warp contracts are reported as launch
// failures. Built with -fsanitize=thread, barriers and collectives become TSan release/acquire
// pairs and fiber switches do not synchronise, so unsynchronised shared-memory accesses are
// reported as races (race mode).
#pragma once

#if defined(__CUDACC__) || defined(__CUDA_ARCH__)
#error "csrc/simt/simt.h is the host emulation of CUDA; nvcc builds use the real runtime"
#endif

#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "fiber.h"

// ---------------------------------------------------------------------------------------------
// CUDA's keywords and built-in types
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))  // alignas may not follow other specifiers
// The fibers of a block share one OS thread, so a thread_local static is per block.
#define __shared__ static thread_local

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct uint3 {
  unsigned x, y, z;
};
constexpr int warpSize = 32;

namespace simt {

// ---------------------------------------------------------------------------------------------
// Host side: the virtual device, errors, kernel attributes
struct Device {  // the virtual device; default = H100/H200-like
  int sm_count = 132;
  int max_threads_per_block = 1024, max_threads_per_sm = 2048, max_blocks_per_sm = 32;
  size_t shared_per_block = 48 * 1024;         // without opting in
  size_t shared_per_block_optin = 227 * 1024;  // cudaDevAttrMaxSharedMemoryPerBlockOptin
  size_t shared_per_sm = 228 * 1024;
  bool cooperative_launch = true;
  int cc_major = 9, cc_minor = 0;
  // additions to the lead's API:
  size_t reserved_shared_per_block = 1024;  // cudaDevAttrReservedSharedMemoryPerBlock (sm_80+)
  int registers_per_sm = 64 * 1024;
};

enum class Error {
  success,
  invalid_configuration,
  invalid_value,
  cooperative_launch_too_large,
  out_of_resources,
  launch_failure,
  not_supported,  // a cooperative launch on a device without cooperative_launch
};

inline const char* error_string(Error e) {
  switch (e) {
    case Error::success: return "no error";
    case Error::invalid_configuration: return "invalid configuration argument";
    case Error::invalid_value: return "invalid argument";
    case Error::cooperative_launch_too_large:
      return "too many blocks in cooperative launch";
    case Error::out_of_resources: return "too many resources requested for launch";
    case Error::launch_failure: return "unspecified launch failure";
    case Error::not_supported: return "operation not supported";
  }
  return "unknown error";
}

namespace detail {
inline Device& device_storage() {
  static Device d;
  return d;
}
struct KernelAttributes {
  size_t max_dynamic_shared = 0;  // 0: not opted in (limit = shared_per_block - static)
  bool opted_in = false;
  size_t static_shared = 0;     // declared by the test, the emulator cannot see __shared__ sizes
  int registers_per_thread = 0;  // 0: unknown, not a limit
};
inline std::mutex& attributes_mutex() {
  static std::mutex m;
  return m;
}
inline std::map<const void*, KernelAttributes>& attributes_map() {
  static std::map<const void*, KernelAttributes> m;
  return m;
}
inline KernelAttributes attributes_of(const void* kernel) {
  std::lock_guard<std::mutex> lock(attributes_mutex());
  auto it = attributes_map().find(kernel);
  return it == attributes_map().end() ? KernelAttributes{} : it->second;
}
inline std::string& last_error_storage() {
  static thread_local std::string message;
  return message;
}
}  // namespace detail

inline Device& device() { return detail::device_storage(); }
inline void set_device(const Device& d) { detail::device_storage() = d; }
// Message of the last launch from this host thread that failed ("" after a successful one).
inline const char* last_error_message() { return detail::last_error_storage().c_str(); }

template <class... P>
Error set_max_dynamic_shared(void (*kernel)(P...), size_t bytes) {
  std::lock_guard<std::mutex> lock(detail::attributes_mutex());
  auto& a = detail::attributes_map()[reinterpret_cast<const void*>(kernel)];
  if (bytes + a.static_shared > device().shared_per_block_optin) return Error::invalid_value;
  a.max_dynamic_shared = bytes;
  a.opted_in = true;
  return Error::success;
}
// Additions: the emulator cannot measure a kernel's static shared memory or registers, so a test
// that wants the occupancy of the real kernel declares them (from nvcc --resource-usage).
template <class... P>
void set_static_shared(void (*kernel)(P...), size_t bytes) {
  std::lock_guard<std::mutex> lock(detail::attributes_mutex());
  detail::attributes_map()[reinterpret_cast<const void*>(kernel)].static_shared = bytes;
}
template <class... P>
void set_registers_per_thread(void (*kernel)(P...), int registers) {
  std::lock_guard<std::mutex> lock(detail::attributes_mutex());
  detail::attributes_map()[reinterpret_cast<const void*>(kernel)].registers_per_thread = registers;
}

namespace detail {
inline size_t dynamic_shared_limit(const KernelAttributes& a) {
  const Device& d = device();
  if (a.opted_in) return a.max_dynamic_shared;
  return d.shared_per_block > a.static_shared ? d.shared_per_block - a.static_shared : 0;
}
inline int occupancy(const KernelAttributes& a, int threads, size_t dynamic_shared) {
  const Device& d = device();
  if (threads <= 0 || threads > d.max_threads_per_block) return 0;
  if (dynamic_shared > dynamic_shared_limit(a)) return 0;
  const int warps = (threads + 31) / 32;
  int blocks = d.max_threads_per_sm / (warps * 32);
  blocks = blocks < d.max_blocks_per_sm ? blocks : d.max_blocks_per_sm;
  const size_t shared = dynamic_shared + a.static_shared + d.reserved_shared_per_block;
  const int by_shared = static_cast<int>(d.shared_per_sm / shared);
  blocks = blocks < by_shared ? blocks : by_shared;
  if (a.registers_per_thread > 0) {
    // registers are allocated per warp in units of 256
    const int per_warp = ((a.registers_per_thread * 32 + 255) / 256) * 256;
    const int by_registers = d.registers_per_sm / (per_warp * warps);
    blocks = blocks < by_registers ? blocks : by_registers;
  }
  return blocks > 0 ? blocks : 0;
}
}  // namespace detail

template <class... P>
int max_active_blocks_per_sm(void (*kernel)(P...), int threads, size_t dynamic_shared) {
  return detail::occupancy(detail::attributes_of(reinterpret_cast<const void*>(kernel)), threads,
                           dynamic_shared);
}

// Emulator settings (additions). Stack per emulated thread, 64 KiB unless
// LSTM_FUSED_SIMT_STACK_KB says otherwise; OS threads for a non-cooperative launch (default: the
// hardware's, at most 8; LSTM_FUSED_SIMT_THREADS).
inline size_t& stack_size() {
  static size_t s = [] {
    const char* e = std::getenv("LSTM_FUSED_SIMT_STACK_KB");
    return (e && std::atoi(e) > 0 ? static_cast<size_t>(std::atoi(e)) : size_t(64)) * 1024;
  }();
  return s;
}
inline int& worker_threads() {
  static int n = [] {
    const char* e = std::getenv("LSTM_FUSED_SIMT_THREADS");
    if (e && std::atoi(e) > 0) return std::atoi(e);
    const int hw = static_cast<int>(std::thread::hardware_concurrency());
    return hw < 1 ? 1 : (hw > 8 ? 8 : hw);
  }();
  return n;
}
// Seconds a launch may run before it is failed as hung (a spin loop that never sees its flag);
// checked at yield points (atomics, fences, __nanosleep). LSTM_FUSED_SIMT_TIMEOUT_S, default 300.
inline double& launch_timeout_s() {
  static double t = [] {
    const char* e = std::getenv("LSTM_FUSED_SIMT_TIMEOUT_S");
    return e && std::atof(e) > 0 ? std::atof(e) : 300.0;
  }();
  return t;
}

// Counters of emulated events (additions), summed over all launches since the last reset; for
// performance models and for the emulator's own speed measurements.
struct Counters {
  std::atomic<unsigned long long> launches{0}, blocks{0}, threads{0}, block_barriers{0},
      warp_collectives{0}, grid_barriers{0}, mma{0}, ldmatrix{0}, cp_async{0}, switches{0};
  void reset() {
    launches = blocks = threads = block_barriers = warp_collectives = grid_barriers = mma =
        ldmatrix = cp_async = switches = 0;
  }
};
inline Counters& counters() {
  static Counters c;
  return c;
}

// ---------------------------------------------------------------------------------------------
// The runtime
namespace detail {

// A device-side contract broken (reported as launch_failure).
struct DeviceError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// Thrown into fibers that must unwind because their launch failed; not an error itself.
struct Abort {};

enum FiberState : int { kRunnable, kWaitBarrier, kWaitWarp, kWaitGrid, kExited };

struct Block;
struct Launch;

struct AsyncCopy {
  void* dst;
  const void* src;
  int bytes;
};

struct Fiber {
  Context ctx;
  std::atomic<int> state{kRunnable};
  uint3 thread_idx{0, 0, 0};
  unsigned linear = 0, lane = 0, warp = 0;
  Block* block = nullptr;
  std::atomic<const char*> waiting_in{""};  // what the fiber is blocked in (deadlock messages)
  std::vector<AsyncCopy> open_group;
  std::deque<std::vector<AsyncCopy>> committed_groups;
};

struct Block;
using CollectiveComplete = void (*)(Block& block, unsigned warp, unsigned mask);

struct WarpLane {
  unsigned mask = 0;
  int kind = 0;
  void* data = nullptr;
  CollectiveComplete complete = nullptr;
  const char* name = "";
  std::atomic<unsigned> depart{0};  // which tsan_depart slot the completer released
};

struct Warp {
  unsigned present = 0;  // lanes that exist (the last warp of a block may be partial)
  unsigned waiting = 0;  // lanes blocked in a collective
  unsigned exited = 0;
  WarpLane lane[32];
  // TSan: `tsan_sync` orders the bookkeeping above; each completed collective releases its lanes'
  // history on its own slot of `tsan_depart`, so a lane leaving collective n does not also
  // acquire what a faster lane did after n (which would hide races).
  char tsan_sync = 0;
  unsigned completions = 0;
  char tsan_depart[256] = {};
};

struct Launch {
  const char* name = "";
  dim3 grid, block;
  size_t dynamic_shared = 0;
  bool cooperative = false;
  void (*invoke)(const void* params) = nullptr;
  const void* params = nullptr;
  std::atomic<bool> aborting{false};
  std::mutex error_mutex;
  std::string error;
  std::chrono::steady_clock::time_point deadline;
  // grid barrier (cooperative launches)
  std::mutex grid_mutex;
  std::condition_variable grid_cv;
  unsigned long long grid_blocks = 0, grid_arrived = 0, grid_finished = 0, grid_generation = 0;
  char grid_tsan_generation[2] = {0, 0};  // release on arrival / acquire on departure, by parity

  void fail(const std::string& message) {
    {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (error.empty()) error = message;
    }
    aborting.store(true);
    std::lock_guard<std::mutex> lock(grid_mutex);
    grid_cv.notify_all();
  }
};

struct Block {
  Launch* launch = nullptr;
  uint3 block_idx{0, 0, 0};
  dim3 block_dim, grid_dim;
  unsigned nthreads = 0;
  std::unique_ptr<Fiber[]> fibers;
  std::unique_ptr<Warp[]> warps;
  unsigned nwarps = 0;
  Context scheduler;
  // __syncthreads state; only fibers touch it, ordered for TSan through &barrier_tsan_sync.
  // Arrivals at barrier generation g release on barrier_tsan_generation[g % 2] and departures
  // acquire it: a thread cannot reach g + 2 before every thread has left g.
  unsigned barrier_arrived = 0, live = 0, barrier_generation = 0;
  char barrier_tsan_sync = 0;
  char barrier_tsan_generation[2] = {0, 0};
  std::atomic<unsigned long long> grid_syncs{0};  // grid barriers this block has passed
  void* dynamic_shared = nullptr;
  unsigned long long switches = 0;
};

inline std::atomic<Fiber*>& current_slot() {
  static thread_local std::atomic<Fiber*> f{nullptr};
  return f;
}
inline Fiber* current() {
  Fiber* f = current_slot().load(std::memory_order_relaxed);
  if (!f) throw std::logic_error("simt: device code called outside a kernel launch");
  return f;
}

inline std::string block_name(const Block& b) {
  return "block (" + std::to_string(b.block_idx.x) + "," + std::to_string(b.block_idx.y) + "," +
         std::to_string(b.block_idx.z) + ")";
}
inline std::string thread_name(const Fiber& f) {
  return block_name(*f.block) + " thread (" + std::to_string(f.thread_idx.x) + "," +
         std::to_string(f.thread_idx.y) + "," + std::to_string(f.thread_idx.z) + ")";
}
inline std::string hex(unsigned v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}
[[noreturn]] inline void device_error(const std::string& what) {
  throw DeviceError(thread_name(*current()) + ": " + what);
}

// Blocks the current fiber (its state already says why) until the scheduler resumes it.
inline void wait_in_scheduler(Fiber* f) {
  Block* b = f->block;
  switch_context(f->ctx, b->scheduler, false);
  if (b->launch->aborting.load(std::memory_order_relaxed)) throw Abort{};
}

// A yield point: lets the other threads of the block run (spin loops on flags need it).
inline void yield() {
  Fiber* f = current_slot().load(std::memory_order_relaxed);
  if (!f) return;
  wait_in_scheduler(f);
}

// ---- __syncthreads
inline void release_barrier(Block& b) {
  b.barrier_arrived = 0;
  ++b.barrier_generation;
  for (unsigned i = 0; i < b.nthreads; ++i)
    if (b.fibers[i].state.load(std::memory_order_relaxed) == kWaitBarrier)
      b.fibers[i].state.store(kRunnable, std::memory_order_relaxed);
}

inline void syncthreads() {
  Fiber* f = current();
  Block& b = *f->block;
  counters().block_barriers.fetch_add(1, std::memory_order_relaxed);
  SIMT_TSAN_RELEASE(&b.barrier_tsan_sync);
  SIMT_TSAN_ACQUIRE(&b.barrier_tsan_sync);
  char* generation_sync = &b.barrier_tsan_generation[b.barrier_generation & 1u];
  SIMT_TSAN_RELEASE(generation_sync);
  if (++b.barrier_arrived == b.live) {
    release_barrier(b);
    SIMT_TSAN_ACQUIRE(generation_sync);
    SIMT_TSAN_RELEASE(&b.barrier_tsan_sync);
    return;
  }
  f->waiting_in = "__syncthreads";
  f->state.store(kWaitBarrier, std::memory_order_relaxed);
  SIMT_TSAN_RELEASE(&b.barrier_tsan_sync);
  wait_in_scheduler(f);
  SIMT_TSAN_ACQUIRE(generation_sync);
  (void)generation_sync;
}

// ---- warp collectives: a lane waits until every lane of its mask has arrived at a collective
// with the same mask; the last to arrive runs `complete` for all of them.
inline void warp_collective(const char* name, int kind, unsigned mask, void* data,
                            CollectiveComplete complete) {
  Fiber* f = current();
  Block& b = *f->block;
  Warp& w = b.warps[f->warp];
  const unsigned bit = 1u << f->lane;
  counters().warp_collectives.fetch_add(1, std::memory_order_relaxed);
  SIMT_TSAN_RELEASE(&w.tsan_sync);
  SIMT_TSAN_ACQUIRE(&w.tsan_sync);
  if (!(mask & bit))
    device_error(std::string(name) + " with mask " + hex(mask) + " that does not name the calling lane " +
                 std::to_string(f->lane));
  if (mask & ~w.present)
    device_error(std::string(name) + " with mask " + hex(mask) + " names lanes that do not exist (warp has " +
                 hex(w.present) + ")");
  if (mask & w.exited)
    device_error(std::string(name) + " with mask " + hex(mask) + " names exited lanes " + hex(mask & w.exited));
  WarpLane& me = w.lane[f->lane];
  me.mask = mask;
  me.kind = kind;
  me.data = data;
  me.complete = complete;
  me.name = name;
  w.waiting |= bit;
  bool all_here = (w.waiting & mask) == mask;
  if (all_here)
    for (unsigned l = 0; l < 32; ++l)
      if ((mask >> l) & 1u)
        if (w.lane[l].mask != mask) {
          all_here = false;
          break;
        }
  if (all_here) {
    for (unsigned l = 0; l < 32; ++l)
      if (((mask >> l) & 1u) && w.lane[l].kind != kind)
        device_error(std::string("lanes of mask ") + hex(mask) + " meet in different warp collectives: " +
                     name + " and " + w.lane[l].name);
    complete(b, f->warp, mask);
    w.waiting &= ~mask;
    const unsigned slot = w.completions++ % sizeof(w.tsan_depart);
    SIMT_TSAN_RELEASE(&w.tsan_depart[slot]);
    const unsigned base = f->warp * 32;
    for (unsigned l = 0; l < 32; ++l)
      if (((mask >> l) & 1u) && l != f->lane) {
        w.lane[l].depart.store(slot, std::memory_order_relaxed);
        b.fibers[base + l].state.store(kRunnable, std::memory_order_relaxed);
      }
    SIMT_TSAN_RELEASE(&w.tsan_sync);
    return;
  }
  f->waiting_in = name;
  f->state.store(kWaitWarp, std::memory_order_relaxed);
  SIMT_TSAN_RELEASE(&w.tsan_sync);
  wait_in_scheduler(f);
  SIMT_TSAN_ACQUIRE(&w.tsan_depart[me.depart.load(std::memory_order_relaxed)]);
}

template <class T>
T* lane_data(Block& b, unsigned warp, unsigned lane) {
  return static_cast<T*>(b.warps[warp].lane[lane].data);
}

// ---- grid.sync
inline void grid_sync() {
  Fiber* f = current();
  Launch& l = *f->block->launch;
  if (!l.cooperative) device_error("grid.sync() in a launch that is not cooperative");
  char* generation_sync = &l.grid_tsan_generation[f->block->grid_syncs.load(std::memory_order_relaxed) & 1u];
  SIMT_TSAN_RELEASE(generation_sync);
  f->waiting_in = "grid.sync";
  f->state.store(kWaitGrid, std::memory_order_relaxed);
  wait_in_scheduler(f);
  SIMT_TSAN_ACQUIRE(generation_sync);
  (void)generation_sync;
}

// ---- cp.async
inline void land(std::vector<AsyncCopy>& group) {
  for (const AsyncCopy& c : group) std::memcpy(c.dst, c.src, static_cast<size_t>(c.bytes));
  group.clear();
}
inline void cp_async(void* dst, const void* src, int bytes) {
  Fiber* f = current();
  if (reinterpret_cast<uintptr_t>(dst) % bytes || reinterpret_cast<uintptr_t>(src) % bytes)
    device_error("cp.async of " + std::to_string(bytes) + " bytes with a misaligned address");
  counters().cp_async.fetch_add(1, std::memory_order_relaxed);
  f->open_group.push_back({dst, src, bytes});
}
inline void cp_async_commit() {
  Fiber* f = current();
  f->committed_groups.push_back(std::move(f->open_group));
  f->open_group.clear();
}
inline void cp_async_wait(int pending) {
  Fiber* f = current();
  while (static_cast<int>(f->committed_groups.size()) > pending) {
    land(f->committed_groups.front());
    f->committed_groups.pop_front();
  }
}

// ---- one fiber's life
inline void thread_exit_bookkeeping(Fiber* f) {
  Block& b = *f->block;
  // Copies still in flight land eventually on a GPU too.
  for (auto& g : f->committed_groups) land(g);
  land(f->open_group);
  f->committed_groups.clear();
  Warp& w = b.warps[f->warp];
  SIMT_TSAN_RELEASE(&w.tsan_sync);
  SIMT_TSAN_ACQUIRE(&w.tsan_sync);
  w.exited |= 1u << f->lane;
  for (unsigned l = 0; l < 32; ++l)
    if (((w.waiting >> l) & 1u) && ((w.lane[l].mask >> f->lane) & 1u))
      b.launch->fail(thread_name(*f) + " exited while lane " + std::to_string(l) + " waits for it in " +
                     w.lane[l].name + " (mask " + hex(w.lane[l].mask) + ")");
  SIMT_TSAN_RELEASE(&w.tsan_sync);
  // Exited threads count as arrived at __syncthreads, as on the hardware.
  SIMT_TSAN_RELEASE(&b.barrier_tsan_sync);
  SIMT_TSAN_ACQUIRE(&b.barrier_tsan_sync);
  SIMT_TSAN_RELEASE(&b.barrier_tsan_generation[b.barrier_generation & 1u]);
  --b.live;
  if (b.live > 0 && b.barrier_arrived == b.live) release_barrier(b);
  SIMT_TSAN_RELEASE(&b.barrier_tsan_sync);
}

inline void fiber_main(void* arg) {
  Fiber* f = static_cast<Fiber*>(arg);
  Block& b = *f->block;
  Launch& l = *b.launch;
  // First return to the scheduler before any kernel code: the scheduler starts every fiber once
  // (a synchronising switch that publishes the block's setup) before any of them runs.
  switch_context(f->ctx, b.scheduler, false);
  if (!l.aborting.load()) {
    try {
      l.invoke(l.params);
    } catch (Abort&) {
    } catch (DeviceError& e) {
      l.fail(e.what());
    } catch (std::exception& e) {
      l.fail(thread_name(*f) + ": exception thrown by kernel code: " + e.what());
    } catch (...) {
      l.fail(thread_name(*f) + ": unknown exception thrown by kernel code");
    }
  }
  try {
    thread_exit_bookkeeping(f);
  } catch (std::exception& e) {
    l.fail(e.what());
  }
  f->state.store(kExited, std::memory_order_relaxed);
  // Synchronising: the scheduler (and the next block on this OS thread) comes after this thread.
  final_switch(f->ctx, b.scheduler);
  std::abort();  // an exited fiber is never resumed
}

inline std::string deadlock_message(Block& b) {
  std::map<std::string, int> by_place;
  for (unsigned i = 0; i < b.nthreads; ++i) {
    const Fiber& f = b.fibers[i];
    const int s = f.state.load(std::memory_order_relaxed);
    if (s == kExited) continue;
    std::string where = f.waiting_in.load(std::memory_order_relaxed);
    if (s == kWaitWarp) {
      SIMT_TSAN_ACQUIRE(&b.warps[f.warp].tsan_sync);
      where += " (warp " + std::to_string(f.warp) + ", mask " + hex(b.warps[f.warp].lane[f.lane].mask) + ")";
    }
    ++by_place[where];
  }
  std::string m = "deadlock in " + block_name(b) + " of kernel " + b.launch->name + ": every live thread waits and none can proceed:";
  for (auto& p : by_place) m += " " + std::to_string(p.second) + " in " + p.first + ";";
  return m;
}

// Waits at the grid barrier for the whole block. Returns false if the launch failed meanwhile.
inline bool block_arrive_at_grid(Block& b) {
  Launch& l = *b.launch;
  std::unique_lock<std::mutex> lock(l.grid_mutex);
  const unsigned long long generation = l.grid_generation;
  if (++l.grid_arrived == l.grid_blocks) {
    l.grid_arrived = 0;
    ++l.grid_generation;
    counters().grid_barriers.fetch_add(1, std::memory_order_relaxed);
    l.grid_cv.notify_all();
    return true;
  }
  if (l.grid_arrived + l.grid_finished == l.grid_blocks) {
    lock.unlock();
    l.fail("deadlock in grid.sync of kernel " + std::string(l.name) +
           ": some blocks have exited and will never arrive");
    return false;
  }
  while (l.grid_generation == generation && !l.aborting.load()) {
    if (l.grid_cv.wait_until(lock, l.deadline) == std::cv_status::timeout) {
      lock.unlock();
      l.fail("kernel " + std::string(l.name) + " timed out in grid.sync");
      return false;
    }
  }
  return l.grid_generation != generation;
}

inline void block_finished_for_grid(Block& b) {
  Launch& l = *b.launch;
  if (!l.cooperative) return;
  std::unique_lock<std::mutex> lock(l.grid_mutex);
  ++l.grid_finished;
  if (l.grid_arrived > 0 && l.grid_arrived + l.grid_finished == l.grid_blocks) {
    lock.unlock();
    l.fail("deadlock in grid.sync of kernel " + std::string(l.name) +
           ": some blocks have exited and will never arrive");
  }
}

// Runs one block to completion on the calling OS thread.
inline void run_block(Launch& l, uint3 block_idx, void* dynamic_shared, const PooledStack* stacks) {
  Block b;
  b.launch = &l;
  b.block_idx = block_idx;
  b.block_dim = l.block;
  b.grid_dim = l.grid;
  b.nthreads = l.block.x * l.block.y * l.block.z;
  b.live = b.nthreads;
  b.dynamic_shared = dynamic_shared;
  if (dynamic_shared) std::memset(dynamic_shared, 0xFF, l.dynamic_shared);  // reads before writes give NaN
  b.fibers.reset(new Fiber[b.nthreads]);
  b.nwarps = (b.nthreads + 31) / 32;
  b.warps.reset(new Warp[b.nwarps]);
  for (unsigned w = 0; w < b.nwarps; ++w) {
    const unsigned n = b.nthreads - w * 32 < 32 ? b.nthreads - w * 32 : 32;
    b.warps[w].present = n == 32 ? 0xffffffffu : ((1u << n) - 1);
  }
  init_scheduler_context(b.scheduler);
  for (unsigned i = 0; i < b.nthreads; ++i) {
    Fiber& f = b.fibers[i];
    f.block = &b;
    f.linear = i;
    f.lane = i % 32;
    f.warp = i / 32;
    f.thread_idx = uint3{i % l.block.x, (i / l.block.x) % l.block.y, i / (l.block.x * l.block.y)};
    make_context(f.ctx, stacks[i], &fiber_main, &f);
  }
  std::atomic<Fiber*>& cur = current_slot();
  for (unsigned i = 0; i < b.nthreads; ++i) {
    cur.store(&b.fibers[i], std::memory_order_relaxed);
    switch_context(b.scheduler, b.fibers[i].ctx, true);
  }
  counters().blocks.fetch_add(1, std::memory_order_relaxed);
  counters().threads.fetch_add(b.nthreads, std::memory_order_relaxed);
  unsigned exited = 0;
  bool failed_here = false;
  while (exited < b.nthreads) {
    bool ran = false;
    for (unsigned i = 0; i < b.nthreads; ++i) {
      Fiber& f = b.fibers[i];
      if (f.state.load(std::memory_order_relaxed) != kRunnable) continue;
      ran = true;
      cur.store(&f, std::memory_order_relaxed);
      ++b.switches;
      switch_context(b.scheduler, f.ctx, false);
      if (f.state.load(std::memory_order_relaxed) == kExited) ++exited;
      if ((b.switches & 4095) == 0 && std::chrono::steady_clock::now() > l.deadline)
        l.fail("kernel " + std::string(l.name) + " timed out in " + block_name(b) +
               " (a spin loop that never sees its flag?)");
    }
    cur.store(nullptr, std::memory_order_relaxed);
    if (exited == b.nthreads) break;
    if (l.aborting.load()) {
      // Resume every blocked fiber; its wait throws Abort and it unwinds to its end.
      for (unsigned i = 0; i < b.nthreads; ++i)
        if (b.fibers[i].state.load(std::memory_order_relaxed) != kExited)
          b.fibers[i].state.store(kRunnable, std::memory_order_relaxed);
      continue;
    }
    if (ran) continue;
    // Nobody can run: either the whole block waits at the grid barrier, or it is a deadlock.
    bool all_grid = true;
    for (unsigned i = 0; i < b.nthreads; ++i) {
      const int s = b.fibers[i].state.load(std::memory_order_relaxed);
      if (s != kExited && s != kWaitGrid) all_grid = false;
    }
    if (all_grid) {
      if (block_arrive_at_grid(b)) {
        b.grid_syncs.fetch_add(1, std::memory_order_relaxed);
        for (unsigned i = 0; i < b.nthreads; ++i)
          if (b.fibers[i].state.load(std::memory_order_relaxed) == kWaitGrid)
            b.fibers[i].state.store(kRunnable, std::memory_order_relaxed);
      }
      continue;
    }
    failed_here = true;
    l.fail(deadlock_message(b));
  }
  (void)failed_here;
  block_finished_for_grid(b);
  counters().switches.fetch_add(b.switches, std::memory_order_relaxed);
  for (unsigned i = 0; i < b.nthreads; ++i)
    if (stack_overflowed(b.fibers[i].ctx)) {
      l.fail(thread_name(b.fibers[i]) + ": stack overflow (raise LSTM_FUSED_SIMT_STACK_KB, now " +
             std::to_string(stack_size() / 1024) + ")");
      break;
    }
}

inline void* aligned_buffer(size_t bytes) {
  if (bytes == 0) return nullptr;
  return ::operator new(bytes, std::align_val_t(128));
}
inline void free_aligned(void* p) {
  if (p) ::operator delete(p, std::align_val_t(128));
}

inline uint3 block_index(const dim3& grid, unsigned long long i) {
  return uint3{static_cast<unsigned>(i % grid.x), static_cast<unsigned>((i / grid.x) % grid.y),
               static_cast<unsigned>(i / (static_cast<unsigned long long>(grid.x) * grid.y))};
}

inline void append_report(const char* name) {
  const char* path = std::getenv("LSTM_FUSED_SIMT_REPORT");
  if (!path || !*path) return;
  static std::mutex m;
  std::lock_guard<std::mutex> lock(m);
  if (FILE* out = std::fopen(path, "a")) {
    std::fprintf(out, "%s\n", name);
    std::fclose(out);
  }
}

inline Error validate(const void* kernel, dim3 grid, dim3 block, size_t dynamic_shared, std::string& why) {
  const Device& d = device();
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 || block.z > 64 ||
      threads > static_cast<unsigned long long>(d.max_threads_per_block)) {
    why = "block (" + std::to_string(block.x) + "," + std::to_string(block.y) + "," + std::to_string(block.z) +
          ") is not a valid block shape";
    return Error::invalid_configuration;
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    why = "grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," + std::to_string(grid.z) +
          ") is not a valid grid shape";
    return Error::invalid_configuration;
  }
  const KernelAttributes a = attributes_of(kernel);
  if (dynamic_shared > dynamic_shared_limit(a)) {
    why = std::to_string(dynamic_shared) + " bytes of dynamic shared memory exceed the kernel's limit of " +
          std::to_string(dynamic_shared_limit(a)) + (a.opted_in ? "" : " (no set_max_dynamic_shared opt-in)");
    return Error::invalid_value;
  }
  if (occupancy(a, static_cast<int>(threads), dynamic_shared) == 0) {
    why = "the block does not fit on one SM (registers or shared memory)";
    return Error::out_of_resources;
  }
  return Error::success;
}

template <class Tuple, class Kernel>
struct Invoker {
  Kernel kernel;
  Tuple params;
  static void invoke(const void* self) {
    const Invoker* me = static_cast<const Invoker*>(self);
    std::apply([me](const auto&... p) { me->kernel(p...); }, me->params);
  }
};

template <class... P, class... A>
Error launch_impl(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t dynamic_shared,
                  bool cooperative, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  static_assert(!std::disjunction_v<std::is_reference<P>...>, "CUDA kernel parameters are values");
  std::string why;
  Error e = validate(reinterpret_cast<const void*>(kernel), grid, block, dynamic_shared, why);
  const Device& d = device();
  const unsigned long long nblocks = 1ull * grid.x * grid.y * grid.z;
  if (e == Error::success && cooperative) {
    if (!d.cooperative_launch) {
      e = Error::not_supported;
      why = "the virtual device does not support cooperative launches";
    } else {
      const int per_sm = max_active_blocks_per_sm(kernel, static_cast<int>(block.x * block.y * block.z), dynamic_shared);
      if (nblocks > 1ull * per_sm * d.sm_count) {
        e = Error::cooperative_launch_too_large;
        why = std::to_string(nblocks) + " blocks exceed " + std::to_string(d.sm_count) + " SMs x " +
              std::to_string(per_sm) + " resident blocks per SM";
      }
    }
  }
  if (e != Error::success) {
    last_error_storage() = std::string(name) + ": " + error_string(e) + ": " + why;
    return e;
  }
  append_report(name);
  counters().launches.fetch_add(1, std::memory_order_relaxed);

  // Kernel arguments are copied by value, as CUDA does.
  using Tuple = std::tuple<std::decay_t<P>...>;
  Invoker<Tuple, void (*)(P...)> invoker{kernel, Tuple(std::forward<A>(args)...)};
  Launch l;
  l.name = name;
  l.grid = grid;
  l.block = block;
  l.dynamic_shared = dynamic_shared;
  l.cooperative = cooperative;
  l.invoke = &decltype(invoker)::invoke;
  l.params = &invoker;
  l.grid_blocks = nblocks;
  l.deadline = std::chrono::steady_clock::now() +
               std::chrono::milliseconds(static_cast<long long>(launch_timeout_s() * 1000));

  const unsigned long long workers =
      cooperative ? nblocks : (nblocks < static_cast<unsigned long long>(worker_threads()) ? nblocks : worker_threads());
  // Every stack the launch needs is taken here, before the workers start (see StackPool).
  const unsigned nthreads = block.x * block.y * block.z;
  std::vector<PooledStack> stacks;
  try {
    stacks = stack_pool().take(workers * nthreads, stack_size());
  } catch (std::exception& ex) {
    last_error_storage() = std::string(name) + ": " + error_string(Error::out_of_resources) +
                           ": cannot map emulated thread stacks: " + ex.what();
    return Error::out_of_resources;
  }
  // Relaxed: under TSan a synchronising counter would order the blocks of different workers.
  std::atomic<unsigned long long> next_block{0};
  auto work = [&](unsigned long long worker) {
    void* shared = aligned_buffer(dynamic_shared);
    try {
      // A cooperative launch runs block i on worker i: all resident at once, none after another.
      if (cooperative) run_block(l, block_index(grid, worker), shared, &stacks[worker * nthreads]);
      for (; !cooperative;) {
        const unsigned long long i = next_block.fetch_add(1, std::memory_order_relaxed);
        if (i >= nblocks || (!cooperative && l.aborting.load(std::memory_order_relaxed))) break;
        run_block(l, block_index(grid, i), shared, &stacks[worker * nthreads]);
      }
    } catch (std::exception& ex) {
      l.fail(std::string("emulator failure: ") + ex.what());
    }
    free_aligned(shared);
  };
  std::vector<std::thread> threads;
  threads.reserve(workers);
  try {
    for (unsigned long long t = 0; t < workers; ++t) threads.emplace_back(work, t);
  } catch (std::exception& ex) {
    l.fail(std::string("cannot start emulator threads: ") + ex.what());
  }
  for (auto& t : threads) t.join();
  stack_pool().give_back(stacks);
  if (l.aborting.load()) {
    last_error_storage() = std::string(name) + ": " + error_string(Error::launch_failure) + ": " + l.error;
    return Error::launch_failure;
  }
  last_error_storage().clear();
  return Error::success;
}

}  // namespace detail

template <class... P, class... A>
Error launch(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t dynamic_shared, A&&... args) {
  return detail::launch_impl(name, kernel, grid, block, dynamic_shared, false, std::forward<A>(args)...);
}
template <class... P, class... A>
Error launch_cooperative(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t dynamic_shared,
                         A&&... args) {
  return detail::launch_impl(name, kernel, grid, block, dynamic_shared, true, std::forward<A>(args)...);
}

// The current block's dynamic shared memory (16-byte aligned, 0xFF-filled at block start).
inline void* dynamic_shared_memory() { return detail::current()->block->dynamic_shared; }

}  // namespace simt

// ---------------------------------------------------------------------------------------------
// Device built-ins
#define threadIdx (::simt::detail::current()->thread_idx)
#define blockIdx (::simt::detail::current()->block->block_idx)
#define blockDim (::simt::detail::current()->block->block_dim)
#define gridDim (::simt::detail::current()->block->grid_dim)

inline void __syncthreads() { ::simt::detail::syncthreads(); }
inline int __syncthreads_count(int predicate);
inline int __syncthreads_and(int predicate);
inline int __syncthreads_or(int predicate);

namespace simt {
namespace detail {
enum CollectiveKind : int { kSyncwarp = 1, kShfl, kVote, kMma, kLdmatrix };

inline void complete_nothing(Block&, unsigned, unsigned) {}

// PTX shfl.sync: c = ((32 - width) << 8) | clamp, segmask = c[12:8]
struct ShflLane {
  uint64_t value;
  uint64_t result;
  int mode;  // 0 idx, 1 up, 2 down, 3 bfly
  unsigned b;
  int width;
};
inline void complete_shfl(Block& blk, unsigned warp, unsigned mask) {
  uint64_t results[32];
  for (unsigned lane = 0; lane < 32; ++lane) {
    if (!((mask >> lane) & 1u)) continue;
    ShflLane* me = lane_data<ShflLane>(blk, warp, lane);
    const unsigned segmask = static_cast<unsigned>(32 - me->width) & 0x1fu;
    const unsigned clamp = me->mode == 1 ? 0u : 0x1fu;
    const unsigned bval = me->b & 0x1fu;
    const int max_lane = static_cast<int>((lane & segmask) | (clamp & ~segmask));
    const int min_lane = static_cast<int>(lane & segmask);
    int j = 0;
    bool in_range = true;
    switch (me->mode) {
      case 0: j = min_lane | static_cast<int>(bval & ~segmask); in_range = j <= max_lane; break;
      case 1: j = static_cast<int>(lane) - static_cast<int>(bval); in_range = j >= max_lane; break;
      case 2: j = static_cast<int>(lane + bval); in_range = j <= max_lane; break;
      default: j = static_cast<int>(lane ^ bval); in_range = j <= max_lane; break;
    }
    if (!in_range) j = static_cast<int>(lane);
    if (!((mask >> j) & 1u))
      throw DeviceError(thread_name(blk.fibers[warp * 32 + lane]) + ": __shfl*_sync reads lane " +
                        std::to_string(j) + ", which is not in the mask " + hex(mask));
    results[lane] = lane_data<ShflLane>(blk, warp, static_cast<unsigned>(j))->value;
  }
  for (unsigned lane = 0; lane < 32; ++lane)
    if ((mask >> lane) & 1u) lane_data<ShflLane>(blk, warp, lane)->result = results[lane];
}

template <class T>
T shfl(const char* name, unsigned mask, T var, int mode, unsigned b, int width) {
  static_assert(std::is_trivially_copyable<T>::value && (sizeof(T) == 4 || sizeof(T) == 8),
                "__shfl*_sync takes a trivially copyable value of 4 or 8 bytes");
  ShflLane me{0, 0, mode, b, width};
  std::memcpy(&me.value, &var, sizeof(T));
  warp_collective(name, kShfl, mask, &me, &complete_shfl);
  T out;
  std::memcpy(&out, &me.result, sizeof(T));
  return out;
}

struct VoteLane {
  int predicate;
  unsigned ballot;
};
inline void complete_vote(Block& blk, unsigned warp, unsigned mask) {
  unsigned ballot = 0;
  for (unsigned lane = 0; lane < 32; ++lane)
    if (((mask >> lane) & 1u) && lane_data<VoteLane>(blk, warp, lane)->predicate) ballot |= 1u << lane;
  for (unsigned lane = 0; lane < 32; ++lane)
    if ((mask >> lane) & 1u) lane_data<VoteLane>(blk, warp, lane)->ballot = ballot;
}
inline unsigned ballot(const char* name, unsigned mask, int predicate) {
  VoteLane me{predicate != 0, 0};
  warp_collective(name, kVote, mask, &me, &complete_vote);
  return me.ballot;
}
}  // namespace detail
}  // namespace simt

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::simt::detail::warp_collective("__syncwarp", ::simt::detail::kSyncwarp, mask, nullptr,
                                  &::simt::detail::complete_nothing);
}
template <class T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  return ::simt::detail::shfl("__shfl_sync", mask, var, 0, static_cast<unsigned>(src_lane), width);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return ::simt::detail::shfl("__shfl_up_sync", mask, var, 1, delta, width);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return ::simt::detail::shfl("__shfl_down_sync", mask, var, 2, delta, width);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  return ::simt::detail::shfl("__shfl_xor_sync", mask, var, 3, static_cast<unsigned>(lane_mask), width);
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return ::simt::detail::ballot("__ballot_sync", mask, predicate);
}
inline int __any_sync(unsigned mask, int predicate) {
  return ::simt::detail::ballot("__any_sync", mask, predicate) != 0;
}
inline int __all_sync(unsigned mask, int predicate) {
  return ::simt::detail::ballot("__all_sync", mask, predicate) == mask;
}
// The lanes of the warp that have not exited (the emulator cannot see divergence).
inline unsigned __activemask() {
  ::simt::detail::Fiber* f = ::simt::detail::current();
  const ::simt::detail::Warp& w = f->block->warps[f->warp];
  return w.present & ~w.exited;
}

inline int __syncthreads_count(int predicate) {
  // One barrier to publish, one to read, one so the counter can be reset safely.
  __shared__ std::atomic<int> count;
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0) count.store(0);
  __syncthreads();
  if (predicate) count.fetch_add(1);
  __syncthreads();
  const int n = count.load();
  __syncthreads();
  return n;
}
inline int __syncthreads_and(int predicate) {
  const unsigned n = blockDim.x * blockDim.y * blockDim.z;
  return __syncthreads_count(predicate) == static_cast<int>(n);
}
inline int __syncthreads_or(int predicate) { return __syncthreads_count(predicate) != 0; }

// ---- atomics (real ones: blocks run on different OS threads). Modelled as acq_rel so that TSan
// accepts the usual "data, __threadfence, flag" patterns; a missing fence is not detected.
namespace simt {
namespace detail {
template <class T>
T atomic_rmw_float(T* address, T operand, T (*op)(T, T)) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  Bits* p = reinterpret_cast<Bits*>(address);
  Bits old_bits = __atomic_load_n(p, __ATOMIC_RELAXED);
  for (;;) {
    T old_value;
    std::memcpy(&old_value, &old_bits, sizeof(T));
    const T new_value = op(old_value, operand);
    Bits new_bits;
    std::memcpy(&new_bits, &new_value, sizeof(T));
    if (__atomic_compare_exchange_n(p, &old_bits, new_bits, false, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
      return old_value;
  }
}
}  // namespace detail
}  // namespace simt

#define SIMT_ATOMIC_INT(T)                                                                          \
  inline T atomicAdd(T* a, T v) { ::simt::detail::yield(); return __atomic_fetch_add(a, v, __ATOMIC_ACQ_REL); } \
  inline T atomicSub(T* a, T v) { ::simt::detail::yield(); return __atomic_fetch_sub(a, v, __ATOMIC_ACQ_REL); } \
  inline T atomicExch(T* a, T v) { ::simt::detail::yield(); return __atomic_exchange_n(a, v, __ATOMIC_ACQ_REL); } \
  inline T atomicCAS(T* a, T compare, T v) {                                                         \
    ::simt::detail::yield();                                                                          \
    __atomic_compare_exchange_n(a, &compare, v, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);            \
    return compare;                                                                                   \
  }
SIMT_ATOMIC_INT(int)
SIMT_ATOMIC_INT(unsigned)
SIMT_ATOMIC_INT(unsigned long long)
#undef SIMT_ATOMIC_INT

#define SIMT_ATOMIC_MINMAX(T)                                                                        \
  inline T atomicMax(T* a, T v) {                                                                   \
    ::simt::detail::yield();                                                                          \
    T old = __atomic_load_n(a, __ATOMIC_RELAXED);                                                     \
    while (old < v && !__atomic_compare_exchange_n(a, &old, v, false, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) { \
    }                                                                                                 \
    return old;                                                                                       \
  }                                                                                                   \
  inline T atomicMin(T* a, T v) {                                                                   \
    ::simt::detail::yield();                                                                          \
    T old = __atomic_load_n(a, __ATOMIC_RELAXED);                                                     \
    while (old > v && !__atomic_compare_exchange_n(a, &old, v, false, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) { \
    }                                                                                                 \
    return old;                                                                                       \
  }
SIMT_ATOMIC_MINMAX(int)
SIMT_ATOMIC_MINMAX(unsigned)
SIMT_ATOMIC_MINMAX(unsigned long long)
#undef SIMT_ATOMIC_MINMAX

inline float atomicAdd(float* a, float v) {
  ::simt::detail::yield();
  return ::simt::detail::atomic_rmw_float<float>(a, v, [](float x, float y) { return x + y; });
}
inline double atomicAdd(double* a, double v) {
  ::simt::detail::yield();
  return ::simt::detail::atomic_rmw_float<double>(a, v, [](double x, double y) { return x + y; });
}
inline float atomicExch(float* a, float v) {
  ::simt::detail::yield();
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits = __atomic_exchange_n(reinterpret_cast<uint32_t*>(a), bits, __ATOMIC_ACQ_REL);
  float old;
  std::memcpy(&old, &bits, 4);
  return old;
}

// TSan does not model fences (atomics here are acq_rel instead), so it gets a plain mfence.
inline void simt_fence() {
#if defined(SIMT_TSAN) && defined(__x86_64__)
  asm volatile("mfence" ::: "memory");
#elif defined(SIMT_TSAN)
  __sync_synchronize();
#else
  std::atomic_thread_fence(std::memory_order_seq_cst);
#endif
}
inline void __threadfence() {
  simt_fence();
  ::simt::detail::yield();
}
inline void __threadfence_block() { simt_fence(); }
inline void __threadfence_system() { __threadfence(); }
inline void __nanosleep(unsigned) { ::simt::detail::yield(); }

// ---- cache-hint loads and stores: volatile, so a polling loop re-reads as the PTX load does
namespace simt {
namespace detail {
template <class T>
using CacheHintType = std::enable_if_t<std::is_arithmetic<T>::value, T>;
}
}  // namespace simt
template <class T>
inline ::simt::detail::CacheHintType<T> __ldg(const T* p) { return *p; }
template <class T>
inline ::simt::detail::CacheHintType<T> __ldcg(const T* p) { return *static_cast<const volatile T*>(p); }
template <class T>
inline ::simt::detail::CacheHintType<T> __ldca(const T* p) { return *static_cast<const volatile T*>(p); }
template <class T>
inline ::simt::detail::CacheHintType<T> __ldcs(const T* p) { return *static_cast<const volatile T*>(p); }
template <class T>
inline ::simt::detail::CacheHintType<T> __ldlu(const T* p) { return *static_cast<const volatile T*>(p); }
template <class T>
inline std::enable_if_t<std::is_arithmetic<T>::value> __stcg(T* p, T v) { *static_cast<volatile T*>(p) = v; }
template <class T>
inline std::enable_if_t<std::is_arithmetic<T>::value> __stcs(T* p, T v) { *static_cast<volatile T*>(p) = v; }
template <class T>
inline std::enable_if_t<std::is_arithmetic<T>::value> __stwt(T* p, T v) { *static_cast<volatile T*>(p) = v; }

// ---- device math. min/max are plain overloads (not macros, not templates) as in CUDA, so they
// do not change what std::min/std::max or ATen's code mean.
#define SIMT_MINMAX(T)                                \
  inline T min(T a, T b) { return b < a ? b : a; } \
  inline T max(T a, T b) { return a < b ? b : a; }
SIMT_MINMAX(int)
SIMT_MINMAX(unsigned)
SIMT_MINMAX(long)
SIMT_MINMAX(unsigned long)
SIMT_MINMAX(long long)
SIMT_MINMAX(unsigned long long)
#undef SIMT_MINMAX
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __saturatef(float x) { return x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f; }  // NaN -> 0
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}

// ---- cooperative groups
namespace cooperative_groups {
class grid_group {
 public:
  void sync() const { ::simt::detail::grid_sync(); }
  unsigned long long size() const {
    const dim3 g = gridDim, b = blockDim;
    return 1ull * g.x * g.y * g.z * b.x * b.y * b.z;
  }
  unsigned long long num_threads() const { return size(); }
  unsigned long long thread_rank() const {
    const dim3 g = gridDim, b = blockDim;
    const uint3 bi = blockIdx;
    const unsigned long long block_rank = bi.x + 1ull * g.x * (bi.y + 1ull * g.y * bi.z);
    return block_rank * b.x * b.y * b.z + ::simt::detail::current()->linear;
  }
  bool is_valid() const { return ::simt::detail::current()->block->launch->cooperative; }
};
class thread_block {
 public:
  void sync() const { __syncthreads(); }
  unsigned size() const {
    const dim3 b = blockDim;
    return b.x * b.y * b.z;
  }
  unsigned num_threads() const { return size(); }
  unsigned thread_rank() const { return ::simt::detail::current()->linear; }
  dim3 group_index() const {
    const uint3 b = blockIdx;
    return dim3(b.x, b.y, b.z);
  }
  dim3 thread_index() const {
    const uint3 t = threadIdx;
    return dim3(t.x, t.y, t.z);
  }
};
inline grid_group this_grid() { return grid_group(); }
inline thread_block this_thread_block() { return thread_block(); }
inline void sync(const grid_group& g) { g.sync(); }
inline void sync(const thread_block& b) { b.sync(); }
}  // namespace cooperative_groups
