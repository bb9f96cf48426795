// Runs a grid on the host. Blocks are spread over a pool of host threads; the
// threads of one block are fibers on one host thread. A fiber runs until it
// reaches a barrier (__syncthreads, __syncwarp, a shuffle) or exits, then
// hands over to the next lane of its warp. A warp's shuffle completes once
// every lane of its mask has offered its value, so a warp runs on until all
// its lanes wait at __syncthreads, which opens once every thread of the block
// that has not exited is there. A barrier that can never complete (threads at
// different barriers, a shuffle naming a lane that exited) fails the launch
// with a description instead of hanging.
#include "runtime.h"

#include <sys/mman.h>

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <thread>

#include "device.h"

// The context switch: saves the callee-saved registers on the current stack,
// stores the stack pointer in *save and continues on `load`. The x87 and SSE
// control words are left alone: nothing in a kernel or the runtime changes
// them, so every fiber runs with its host thread's (round to nearest, no
// flush to zero, as on the device). A new fiber's stack is laid out so that the first
// switch to it "returns" into emu_fiber_start, which calls r13(r12).
extern "C" void emu_switch(void** save, void* load);
extern "C" void emu_fiber_start();
#if defined(__x86_64__)
asm(R"(
  .text
  .p2align 4
  .globl emu_switch
  .hidden emu_switch
  .type emu_switch, @function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch, .-emu_switch

  .p2align 4
  .globl emu_fiber_start
  .hidden emu_fiber_start
  .type emu_fiber_start, @function
emu_fiber_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size emu_fiber_start, .-emu_fiber_start
)");
#else
#error "the emulated device's fibers are written for x86-64"
#endif

// Defined by build.rs's dynamic_shared.cc, with each kernel's
// `extern __shared__` array as another name of it.
extern thread_local unsigned char dllm_emu_dynamic_shared[];

// ThreadSanitizer, when build.rs compiles the emulator with
// DLLM_EMU_SANITIZE=thread, sees each fiber as a thread of its own (the
// switches do not synchronise) and the barriers as the only synchronisation
// between a block's threads, so two threads of a block touching the same
// shared memory between barriers is reported as the race it is on a GPU.
// This file itself is not instrumented (build.rs defines DLLM_EMU_TSAN
// instead): its bookkeeping is what every fiber shares by design.
#if defined(DLLM_EMU_TSAN)
extern "C" {
void* __tsan_get_current_fiber();
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_acquire(void* address);
void __tsan_release(void* address);
}
namespace tsan {
constexpr unsigned NO_SYNC = 1;  // __tsan_switch_to_fiber_no_sync
inline void* current() { return __tsan_get_current_fiber(); }
inline void* create() { return __tsan_create_fiber(0); }
inline void destroy(void* fiber) { __tsan_destroy_fiber(fiber); }
inline void switch_to(void* fiber) { __tsan_switch_to_fiber(fiber, NO_SYNC); }
inline void acquire(void* token) { __tsan_acquire(token); }
inline void release(void* token) { __tsan_release(token); }
}  // namespace tsan
#else
namespace tsan {
inline void* current() { return nullptr; }
inline void* create() { return nullptr; }
inline void destroy(void*) {}
inline void switch_to(void*) {}
inline void acquire(void*) {}
inline void release(void*) {}
}  // namespace tsan
#endif

namespace emu {

namespace {

// Fresh dynamic shared memory holds all-ones bytes (NaN as floats) so that a
// read before any write shows; the canary after it is checked per block.
constexpr unsigned char UNWRITTEN = 0xFF, CANARY = 0xA5;

// Filled while the library loads, read by whichever thread loads modules:
// the mutex is what orders the two for ThreadSanitizer.
struct Registry {
  std::mutex mutex;
  std::vector<Kernel> kernels;
};

Registry& registry() {
  static Registry r;
  return r;
}

constexpr size_t PAGE = 4096;
constexpr size_t MAX_THREADS = MAX_THREADS_PER_BLOCK;
constexpr unsigned WARP = 32;

enum class State { Ready, AtBlockBarrier, AtWarpBarrier, Exited };

struct Fiber {
  ThreadIndex index;
  void* sp = nullptr;
  void** scheduler_sp = nullptr;
  Fiber* warp_end = nullptr;  // one past the last lane of this fiber's warp
  // ThreadSanitizer's view: this fiber, the scheduler's, and the addresses
  // whose release/acquire stand for the block's and the warp's barriers.
  void* tsan = nullptr;
  void* tsan_scheduler = nullptr;
  void* block_token = nullptr;
  void* warp_token = nullptr;
  char warp_barrier = 0;  // the token of the warp this fiber leads
  const Launch* launch = nullptr;
  State state = State::Ready;
  // A warp barrier's offer and what the lane received.
  unsigned mask = 0;
  uint64_t value = 0, received = 0;
  int source = 0;
};

// One host thread's fibers and their stacks, reused from block to block:
// MAX_THREADS aligned slots, each with a guard page at its bottom.
struct Worker {
  std::vector<Fiber> fibers;
  char* slots = nullptr;
  void* scheduler_sp = nullptr;
  const Launch* launch = nullptr;
  std::string error;
  // Addresses standing for synchronisation under ThreadSanitizer: the block's
  // setup before its threads start, its __syncthreads, its threads' ends.
  struct {
    char start, barrier, end;
  } tokens;

  char* slot(size_t i) {
    if (!slots) {
      const size_t bytes = MAX_THREADS * FIBER_STACK_BYTES;
      void* p = mmap(nullptr, bytes + FIBER_STACK_BYTES, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) {
        std::perror("dllm emulated device: fiber stacks");
        std::abort();
      }
      const uintptr_t aligned =
          (reinterpret_cast<uintptr_t>(p) + FIBER_STACK_BYTES - 1) & ~(FIBER_STACK_BYTES - 1);
      slots = reinterpret_cast<char*>(aligned);
      for (size_t t = 0; t < MAX_THREADS; ++t) mprotect(slots + t * FIBER_STACK_BYTES, PAGE, PROT_NONE);
    }
    return slots + i * FIBER_STACK_BYTES;
  }
};

thread_local Worker worker;

Fiber& running() { return *static_cast<Fiber*>(fiber_top().fiber); }

// Leaves `fiber` (at a barrier, or exited) for the next lane of its warp
// that can run, or for the scheduler: one switch per fiber per barrier.
void leave(Fiber& fiber, State state) {
  fiber.state = state;
  for (Fiber* next = &fiber + 1; next < fiber.warp_end; ++next) {
    if (next->state != State::Ready) continue;
    tsan::switch_to(next->tsan);
    return emu_switch(&fiber.sp, next->sp);
  }
  tsan::switch_to(fiber.tsan_scheduler);
  emu_switch(&fiber.sp, *fiber.scheduler_sp);
}

void fiber_main(Fiber* fiber) {
  // What the scheduler set up (this fiber's own record included) happens
  // before the thread runs; what it did, before what follows the block. The
  // tokens are the worker's, found without reading the record.
  tsan::acquire(&worker.tokens.start);
  fiber->launch->kernel->invoke(fiber->launch->kernel->function, fiber->launch->params);
  tsan::release(&worker.tokens.end);
  leave(*fiber, State::Exited);
}

// Lays out a fresh fiber in `slot`: the FiberTop record at the top, and
// below it what emu_switch pops: r15, r14, r13, r12, rbx, rbp and the return
// address, with sp % 16 == 8 so that the call in emu_fiber_start enters
// fiber_main with the ABI's alignment.
void* initial_stack(char* slot, Fiber* fiber) {
  FiberTop* top = reinterpret_cast<FiberTop*>(slot + FIBER_STACK_BYTES - sizeof(FiberTop));
  *top = FiberTop{&fiber->index, fiber};
  uint64_t* sp = reinterpret_cast<uint64_t*>(slot + FIBER_STACK_BYTES - 32 - 72);
  sp[0] = sp[1] = 0;                                      // r15, r14
  sp[2] = reinterpret_cast<uint64_t>(&fiber_main);        // r13
  sp[3] = reinterpret_cast<uint64_t>(fiber);              // r12
  sp[4] = sp[5] = 0;                                      // rbx, rbp
  sp[6] = reinterpret_cast<uint64_t>(&emu_fiber_start);  // return address
  return sp;
}

// Waits at a barrier: what this thread did before it happens before what
// every thread of the barrier does after it.
void yield(State state) {
  Fiber& fiber = running();
  void* token = state == State::AtBlockBarrier ? fiber.block_token : fiber.warp_token;
  tsan::release(token);
  leave(fiber, state);
  tsan::acquire(token);
}

std::string describe(const Fiber& f) {
  char text[96];
  std::snprintf(text, sizeof text, "thread (%u,%u,%u) of block (%u,%u,%u)", f.index.thread.x,
                f.index.thread.y, f.index.thread.z, f.index.block.x, f.index.block.y,
                f.index.block.z);
  return text;
}

// Releases the complete warp barriers of warp `w`: a group of lanes waiting
// with the same mask, once every lane of the mask is waiting with it.
// Returns an error for a barrier that can never complete.
std::string release_warp(std::vector<Fiber>& fibers, size_t w) {
  const size_t first = w * WARP, end = std::min(fibers.size(), first + WARP);
  for (size_t i = first; i < end; ++i) {
    const Fiber& f = fibers[i];
    if (f.state != State::AtWarpBarrier) continue;
    bool complete = true;
    for (unsigned lane = 0; lane < WARP; ++lane) {
      if (!(f.mask >> lane & 1)) continue;
      if (first + lane >= end || fibers[first + lane].state == State::Exited) {
        return describe(f) + ": warp-synchronous call whose mask names lane " +
               std::to_string(lane) + ", which " +
               (first + lane >= end ? "does not exist" : "has exited");
      }
      const Fiber& other = fibers[first + lane];
      if (other.state != State::AtWarpBarrier) {
        complete = false;
      } else if (other.mask != f.mask) {
        return describe(f) + " and " + describe(other) +
               ": warp-synchronous calls with different masks";
      }
    }
    if (!complete) continue;
    for (unsigned lane = 0; lane < WARP; ++lane) {
      if (!(f.mask >> lane & 1)) continue;
      Fiber& member = fibers[first + lane];
      const unsigned source = static_cast<unsigned>(member.source);
      if (!(f.mask >> source & 1)) {
        return describe(member) + ": shuffle reads lane " + std::to_string(source) +
               ", outside its mask";
      }
      member.received = fibers[first + source].value;
    }
    for (unsigned lane = 0; lane < WARP; ++lane)
      if (f.mask >> lane & 1) fibers[first + lane].state = State::Ready;
  }
  return {};
}

// Runs one block to completion; false (with worker.error set) if it cannot.
bool run_block(const Launch& launch, uint3 block) {
  const dim3 bd = launch.block;
  const size_t threads = (size_t)bd.x * bd.y * bd.z;
  std::vector<Fiber>& fibers = worker.fibers;
  fibers.assign(threads, Fiber{});
  for (size_t t = 0; t < threads; ++t) {
    Fiber& f = fibers[t];
    f.index = ThreadIndex{make_uint3(t % bd.x, t / bd.x % bd.y, t / ((size_t)bd.x * bd.y)), block,
                          bd, launch.grid, (unsigned)(t % WARP)};
    f.scheduler_sp = &worker.scheduler_sp;
    f.warp_end = fibers.data() + std::min(threads, (t / WARP + 1) * WARP);
    f.launch = &launch;
    f.sp = initial_stack(worker.slot(t), &f);
    f.tsan = tsan::create();
    f.tsan_scheduler = tsan::current();
    f.block_token = &worker.tokens.barrier;
    f.warp_token = &fibers[t / WARP * WARP].warp_barrier;
  }
  unsigned char* dynamic = dllm_emu_dynamic_shared;
  std::memset(dynamic, UNWRITTEN, launch.dynamic_shared);
  std::memset(dynamic + launch.dynamic_shared, CANARY, DYNAMIC_SHARED_CANARY);
  tsan::release(&worker.tokens.start);
  // However the block ends, what its threads did happens before what follows
  // the launch; a thread abandoned at a barrier (the launch failed) is
  // released on its behalf.
  struct Release {
    std::vector<Fiber>& fibers;
    ~Release() {
      void* scheduler = tsan::current();
      for (Fiber& f : fibers) {
        if (f.state == State::Exited) continue;
        tsan::switch_to(f.tsan);
        tsan::release(&worker.tokens.end);
      }
      tsan::switch_to(scheduler);
      tsan::acquire(&worker.tokens.end);
      for (Fiber& f : fibers) tsan::destroy(f.tsan);
    }
  } release{fibers};
  // Each warp runs until all its lanes wait at __syncthreads or have exited
  // (its shuffles complete within the warp); then the block barrier opens.
  const size_t warps = (threads + WARP - 1) / WARP;
  for (;;) {
    for (size_t w = 0; w < warps; ++w) {
      const size_t first = w * WARP, end = std::min(threads, first + WARP);
      for (bool progress = true; progress;) {
        // The first ready lane runs; each lane hands over to the next (leave).
        for (size_t t = first; t < end; ++t) {
          if (fibers[t].state != State::Ready) continue;
          tsan::switch_to(fibers[t].tsan);
          emu_switch(&worker.scheduler_sp, fibers[t].sp);
          break;
        }
        std::string error = release_warp(fibers, w);
        if (!error.empty()) {
          worker.error = std::move(error);
          return false;
        }
        progress = false;
        for (size_t t = first; t < end; ++t) progress |= fibers[t].state == State::Ready;
      }
    }
    size_t exited = 0, at_block = 0;
    for (const Fiber& f : fibers) {
      exited += f.state == State::Exited;
      at_block += f.state == State::AtBlockBarrier;
    }
    if (exited == threads) {
      for (size_t i = 0; i < DYNAMIC_SHARED_CANARY; ++i) {
        if (dynamic[launch.dynamic_shared + i] == CANARY) continue;
        worker.error = "block (" + std::to_string(block.x) + "," + std::to_string(block.y) + "," +
                       std::to_string(block.z) + ") wrote past its " +
                       std::to_string(launch.dynamic_shared) + " bytes of dynamic shared memory";
        return false;
      }
      return true;
    }
    if (at_block + exited < threads) {
      worker.error = "deadlock: " + std::to_string(at_block) +
                     " threads wait at __syncthreads while others wait at a warp barrier";
      return false;
    }
    for (Fiber& f : fibers)
      if (f.state == State::AtBlockBarrier) f.state = State::Ready;
  }
}

// Host threads that run the blocks of a launch with the launching thread.
class Pool {
 public:
  Pool() {
    unsigned n = std::thread::hardware_concurrency();
    if (const char* env = std::getenv("DLLM_EMU_THREADS")) n = (unsigned)std::atoi(env);
    for (unsigned i = 1; i < std::max(n, 1u); ++i) threads_.emplace_back([this] { serve(); });
  }

  std::string run(const Launch& launch) {
    std::lock_guard<std::mutex> one_launch(launching_);
    const size_t blocks = (size_t)launch.grid.x * launch.grid.y * launch.grid.z;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      launch_ = &launch;
      blocks_ = blocks;
      next_ = 0;
      busy_ = threads_.size();
      error_.clear();
      ++generation_;
    }
    wake_.notify_all();
    work();
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return busy_ == 0; });
    launch_ = nullptr;
    return error_;
  }

 private:
  void serve() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
      }
      work();
      std::lock_guard<std::mutex> lock(mutex_);
      if (--busy_ == 0) done_.notify_all();
    }
  }

  void work() {
    const Launch& launch = *launch_;
    worker.launch = &launch;
    const dim3 g = launch.grid;
    for (size_t b; (b = next_.fetch_add(1)) < blocks_;) {
      const uint3 block = make_uint3(b % g.x, b / g.x % g.y, b / ((size_t)g.x * g.y));
      if (!run_block(launch, block)) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (error_.empty()) error_ = worker.error;
        next_ = blocks_;  // stop handing out blocks
      }
    }
    worker.launch = nullptr;
  }

  std::vector<std::thread> threads_;
  std::mutex launching_, mutex_;
  std::condition_variable wake_, done_;
  const Launch* launch_ = nullptr;
  size_t blocks_ = 0;
  std::atomic<size_t> next_{0};
  size_t busy_ = 0;
  uint64_t generation_ = 0;
  std::string error_;
};

}  // namespace

void register_kernel(Kernel kernel) {
  std::lock_guard<std::mutex> lock(registry().mutex);
  registry().kernels.push_back(std::move(kernel));
}

const Kernel* find_kernel(const char* name) {
  std::lock_guard<std::mutex> lock(registry().mutex);
  for (const Kernel& k : registry().kernels)
    if (std::strcmp(k.name, name) == 0) return &k;
  return nullptr;
}

std::string run(const Launch& launch) {
  // Never destroyed: its threads outlive static destructors. std::call_once
  // (pthread_once) rather than a function-local static, whose fast path
  // ThreadSanitizer cannot see in this uninstrumented file.
  static std::once_flag once;
  static Pool* pool;
  std::call_once(once, [] { pool = new Pool; });
  return pool->run(launch);
}

const char* running_kernel() { return worker.launch ? worker.launch->kernel->name : nullptr; }

void sync_block() { yield(State::AtBlockBarrier); }

void sync_warp(unsigned mask) { exchange(mask, 0, (int)fiber_top().index->lane); }

uint64_t exchange(unsigned mask, uint64_t value, int source) {
  Fiber& fiber = running();
  fiber.mask = mask;
  fiber.value = value;
  fiber.source = source;
  yield(State::AtWarpBarrier);
  return fiber.received;
}

}  // namespace emu
