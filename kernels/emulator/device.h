// CUDA's execution model given its CPU meaning, so that kernels/*.cu compile
// unchanged with a host C++17 compiler (build.rs force-includes this header).
//
//   - A launch runs every block of the grid; a block's threads are fibers on
//     one host thread, switched at every barrier, so __syncthreads is a true
//     barrier and a warp shuffle sees every lane's value at that point.
//   - __shared__ variables are thread_local: a host thread runs one block at a
//     time, so a block's threads share them and other blocks do not.
//   - threadIdx, blockIdx, blockDim and gridDim read the running fiber.
//   - bf16 conversions are NVIDIA's own host implementations from cuda_bf16.h
//     (round to nearest even, like the device's cvt.rn.bf16.f32).
//
// Whatever a kernel needs beyond this is a defect of this header, never an
// #ifdef in the kernel. runtime.cc implements the functions declared here.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>  // host implementations, and uint3/float2/... with make_*

// Kernel qualifiers. A __global__ function goes into its own section so that
// build.rs can list the kernels of each file from the object it compiled.
#undef __global__
#undef __device__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#define __global__ __attribute__((section(".text.dllm_kernel"), noinline, used))
#define __device__
#define __forceinline__ inline __attribute__((always_inline))
#define __shared__ thread_local
#define __launch_bounds__(...)

// Device math that <cmath> spells differently.
using std::max;
using std::min;

namespace emu {

// What a running CUDA thread sees of itself and its launch.
struct ThreadIndex {
  uint3 thread, block;
  dim3 block_dim, grid_dim;
  unsigned lane;  // the thread's lane in its warp (threads are numbered x fastest)
};

// Each fiber's stack is a FIBER_STACK_BYTES-aligned slot whose top holds
// this record, so a thread finds itself from its stack pointer: a mask and a
// load, where a thread-local in a shared library would cost a call.
constexpr uintptr_t FIBER_STACK_BYTES = 64 * 1024;
struct FiberTop {
  const ThreadIndex* index;
  void* fiber;  // the runtime's Fiber
};

inline const FiberTop& fiber_top() {
  char here;
  const uintptr_t slot = reinterpret_cast<uintptr_t>(&here) & ~(FIBER_STACK_BYTES - 1);
  return *reinterpret_cast<const FiberTop*>(slot + FIBER_STACK_BYTES - sizeof(FiberTop));
}

void sync_block();
void sync_warp(unsigned mask);
// Exchanges 8 bytes with the lanes of `mask`: every lane of the mask must
// arrive; each receives the value that lane `source` offered.
uint64_t exchange(unsigned mask, uint64_t value, int source);

// The lane a shuffle reads, by CUDA's rules for a `width`-lane segment; a
// lane whose source falls outside its segment reads its own value.
enum class Shuffle { Index, Up, Down, Xor };
inline int shuffle_source(Shuffle kind, int lane, int operand, int width) {
  const int segment = lane / width * width;
  switch (kind) {
    case Shuffle::Index:
      return segment + operand % width;
    case Shuffle::Up:
      return lane - operand >= segment ? lane - operand : lane;
    case Shuffle::Down:
      return lane + operand < segment + width ? lane + operand : lane;
    case Shuffle::Xor:
      break;
  }
  const int source = lane ^ operand;
  return source < segment + width ? source : lane;
}

template <class T>
T shuffle(Shuffle kind, unsigned mask, T value, int operand, int width) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "a shuffle moves at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = exchange(mask, bits, shuffle_source(kind, (int)fiber_top().index->lane, operand, width));
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

}  // namespace emu

#define threadIdx (::emu::fiber_top().index->thread)
#define blockIdx (::emu::fiber_top().index->block)
#define blockDim (::emu::fiber_top().index->block_dim)
#define gridDim (::emu::fiber_top().index->grid_dim)

inline void __syncthreads() { ::emu::sync_block(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::emu::sync_warp(mask); }

template <class T>
T __shfl_sync(unsigned mask, T value, int lane, int width = 32) {
  return ::emu::shuffle(::emu::Shuffle::Index, mask, value, lane, width);
}
template <class T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  return ::emu::shuffle(::emu::Shuffle::Up, mask, value, (int)delta, width);
}
template <class T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  return ::emu::shuffle(::emu::Shuffle::Down, mask, value, (int)delta, width);
}
template <class T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  return ::emu::shuffle(::emu::Shuffle::Xor, mask, value, lane_mask, width);
}
