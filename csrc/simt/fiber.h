// Fibers for the SIMT emulator: one per emulated CUDA thread, all fibers of a block on one OS
// thread. On x86-64 a small assembly switch (callee-saved registers, MXCSR and the x87 control
// word) replaces ucontext, whose swapcontext makes a sigprocmask syscall on every switch; other
// targets, or SIMT_USE_UCONTEXT, use ucontext.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <new>
#include <stdexcept>
#include <vector>

#if !defined(__x86_64__) && !defined(SIMT_USE_UCONTEXT)
#define SIMT_USE_UCONTEXT 1
#endif
#if defined(SIMT_USE_UCONTEXT)
#include <ucontext.h>
#endif

#if defined(__SANITIZE_THREAD__)
#define SIMT_TSAN 1
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_set_fiber_name(void* fiber, const char* name);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
void __tsan_func_exit(void);
}
#define SIMT_TSAN_ACQUIRE(p) __tsan_acquire((void*)(p))
#define SIMT_TSAN_RELEASE(p) __tsan_release((void*)(p))
#else
#define SIMT_TSAN_ACQUIRE(p) ((void)0)
#define SIMT_TSAN_RELEASE(p) ((void)0)
#endif

#if !defined(SIMT_USE_UCONTEXT)
// One copy across translation units: the section is a COMDAT group, so the linker keeps one.
// simt_fiber_switch(save, next): saves the callee-saved state on the current stack, stores the
// stack pointer in *save and resumes the stack `next`. simt_fiber_trampoline starts a new fiber:
// it calls r13(r12) and must never return.
asm(R"(
  .pushsection .text.simt_fiber_switch,"axG",@progbits,simt_fiber_switch,comdat
  .globl simt_fiber_switch
  .hidden simt_fiber_switch
  .type simt_fiber_switch,@function
simt_fiber_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw (%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr 8(%rsp)
  fldcw (%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size simt_fiber_switch, .-simt_fiber_switch
  .globl simt_fiber_trampoline
  .hidden simt_fiber_trampoline
  .type simt_fiber_trampoline,@function
simt_fiber_trampoline:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size simt_fiber_trampoline, .-simt_fiber_trampoline
  .popsection
)");
extern "C" void simt_fiber_switch(void** save, void* next);
extern "C" void simt_fiber_trampoline();
#endif

namespace simt {
namespace detail {

// Stacks come from a process-wide pool, carved from large anonymous mappings (a cooperative
// launch of 132 blocks x 512 threads needs 67k stacks; one mapping plus a guard page each would
// pass Linux's default vm.max_map_count). Overflow is caught by a canary at the bottom of each
// stack instead, checked when the block ends. Under TSan each pooled stack keeps its TSan fiber:
// creating one costs ~0.5-1.5 ms. The host thread takes every stack a launch needs before the
// workers start and returns them after they are joined, so no emulated thread inherits ordering
// from another through the pool (a reused TSan fiber only continues a history that precedes it).
struct PooledStack {
  void* stack;
  size_t size;
  void* tsan_fiber;
};
constexpr uint64_t kStackCanary = 0x5349'4d54'4341'4e59ull;  // "SIMTCANY"
constexpr int kCanaryWords = 512;  // 4 KiB: an overflow smaller than this harms no neighbour
struct StackPool {
  std::mutex mu;
  std::vector<PooledStack> free_stacks;
  std::vector<PooledStack> take(size_t count, size_t size) {
    std::vector<PooledStack> out;
    out.reserve(count);
    std::lock_guard<std::mutex> lock(mu);
    for (size_t i = 0; i < free_stacks.size() && out.size() < count;)
      if (free_stacks[i].size == size) {
        out.push_back(free_stacks[i]);
        free_stacks[i] = free_stacks.back();
        free_stacks.pop_back();
      } else {
        ++i;
      }
    const size_t missing = count - out.size();
    if (missing) {
      void* base = mmap(nullptr, missing * size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                        -1, 0);
      if (base == MAP_FAILED) {
        free_stacks.insert(free_stacks.end(), out.begin(), out.end());
        throw std::bad_alloc();
      }
      for (size_t i = 0; i < missing; ++i) {
        void* tsan_fiber = nullptr;
#if defined(SIMT_TSAN)
        tsan_fiber = __tsan_create_fiber(0);
#endif
        out.push_back({static_cast<char*>(base) + i * size, size, tsan_fiber});
      }
    }
    return out;
  }
  void give_back(const std::vector<PooledStack>& stacks) {
    std::lock_guard<std::mutex> lock(mu);
    free_stacks.insert(free_stacks.end(), stacks.begin(), stacks.end());
  }
};
inline StackPool& stack_pool() {
  static StackPool* pool = new StackPool();  // never destroyed: fibers may outlive statics
  return *pool;
}

// A context: a fiber's stack and saved state, or the scheduler's (the OS thread's own stack).
struct Context {
#if defined(SIMT_USE_UCONTEXT)
  ucontext_t uc;
#else
  void* sp = nullptr;
#endif
  void* stack = nullptr;
  size_t stack_size = 0;
#if defined(SIMT_TSAN)
  void* tsan_fiber = nullptr;
#endif
};

#if defined(SIMT_USE_UCONTEXT)
inline void ucontext_entry(unsigned lo, unsigned hi, unsigned flo, unsigned fhi) {
  auto fn = reinterpret_cast<void (*)(void*)>((static_cast<uintptr_t>(fhi) << 32) | flo);
  fn(reinterpret_cast<void*>((static_cast<uintptr_t>(hi) << 32) | lo));
  std::abort();
}
#endif

// Prepares `ctx` to run fn(arg) on `stack` when first switched to.
inline void make_context(Context& ctx, const PooledStack& stack, void (*fn)(void*), void* arg) {
  const size_t size = stack.size;
  ctx.stack_size = size;
  ctx.stack = stack.stack;
#if defined(SIMT_TSAN)
  ctx.tsan_fiber = stack.tsan_fiber;
#endif
  uint64_t* bottom = static_cast<uint64_t*>(ctx.stack);
  for (int i = 0; i < kCanaryWords; ++i) bottom[i] = kStackCanary;
#if defined(SIMT_USE_UCONTEXT)
  getcontext(&ctx.uc);
  ctx.uc.uc_stack.ss_sp = ctx.stack;
  ctx.uc.uc_stack.ss_size = size;
  ctx.uc.uc_link = nullptr;
  const uintptr_t a = reinterpret_cast<uintptr_t>(arg), f = reinterpret_cast<uintptr_t>(fn);
  makecontext(&ctx.uc, reinterpret_cast<void (*)()>(&ucontext_entry), 4, unsigned(a), unsigned(a >> 32),
              unsigned(f), unsigned(f >> 32));
#else
  uintptr_t top = (reinterpret_cast<uintptr_t>(ctx.stack) + size) & ~uintptr_t(15);
  uint64_t* s = reinterpret_cast<uint64_t*>(top);
  unsigned mxcsr;
  unsigned short fcw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fcw));
  s[-1] = reinterpret_cast<uint64_t>(&simt_fiber_trampoline);  // return address of the switch
  s[-2] = 0;                                                     // rbp
  s[-3] = 0;                                                     // rbx
  s[-4] = reinterpret_cast<uint64_t>(arg);                       // r12
  s[-5] = reinterpret_cast<uint64_t>(fn);                        // r13
  s[-6] = 0;                                                     // r14
  s[-7] = 0;                                                     // r15
  s[-8] = mxcsr;                                                 // 8(%rsp)
  s[-9] = fcw;                                                   // (%rsp)
  ctx.sp = &s[-9];
#endif
}

inline bool stack_overflowed(const Context& ctx) {
  const uint64_t* bottom = static_cast<const uint64_t*>(ctx.stack);
  for (int i = 0; i < kCanaryWords; ++i)
    if (bottom[i] != kStackCanary) return true;
  return false;
}

inline void init_scheduler_context(Context& ctx) {
#if defined(SIMT_TSAN)
  ctx.tsan_fiber = __tsan_get_current_fiber();
#else
  (void)ctx;
#endif
}

// Switches from `from` (the running context) to `to`. `synchronise` makes the switch a
// happens-before edge for TSan; the emulator passes false for every switch that is not a real
// ordering point, so that TSan sees the emulated threads as concurrent.
inline void switch_context(Context& from, Context& to, bool synchronise) {
#if defined(SIMT_TSAN)
  __tsan_switch_to_fiber(to.tsan_fiber, synchronise ? 0u : 1u);
#else
  (void)synchronise;
#endif
#if defined(SIMT_USE_UCONTEXT)
  swapcontext(&from.uc, &to.uc);
#else
  simt_fiber_switch(&from.sp, to.sp);
#endif
}

// The last switch out of an exited fiber. Under TSan it first pops the entry frame of the
// fiber's function, which never returns, so a pooled TSan fiber's shadow stack stays balanced.
inline void final_switch(Context& from, Context& to) {
#if defined(SIMT_TSAN)
  __tsan_func_exit();
  __tsan_switch_to_fiber(to.tsan_fiber, 0);
#endif
#if defined(SIMT_USE_UCONTEXT)
  swapcontext(&from.uc, &to.uc);
#else
  simt_fiber_switch(&from.sp, to.sp);
#endif
}

}  // namespace detail
}  // namespace simt
