// Probes of CUDA's execution model, not part of the model: tests/emulator.rs
// runs them on the emulated device and, where a GPU is present, on the GPU,
// so the emulation's meaning of each construct the kernels use is checked
// against the hardware's. The kernels named *_fault break a rule on purpose;
// only the emulated device runs them, to show it reports the breach.
#include "common.cuh"

// out[t] = the value lane t receives from a shuffle of `kind` (0 index, 1 up,
// 2 down, 3 xor) when every lane offers 1000 * warp + lane.
extern "C" __global__ void shuffle_lanes(int* out, int kind, int operand, int width) {
  const int t = threadIdx.x, lane = t % 32;
  const int mine = 1000 * (t / 32) + lane;
  int got;
  switch (kind) {
    case 0: got = __shfl_sync(FULL_WARP, mine, operand, width); break;
    case 1: got = __shfl_up_sync(FULL_WARP, mine, operand, width); break;
    case 2: got = __shfl_down_sync(FULL_WARP, mine, operand, width); break;
    default: got = __shfl_xor_sync(FULL_WARP, mine, operand, width); break;
  }
  out[t] = got;
}

// out[block][t] = the index written by the thread blockDim - 1 - t, read back
// after __syncthreads: only a real barrier gives the reversal.
extern "C" __global__ void reverse_through_shared(int* out) {
  __shared__ int seen[1024];
  const int n = blockDim.x, t = threadIdx.x;
  seen[t] = t + 10000 * blockIdx.x;
  __syncthreads();
  out[blockIdx.x * n + t] = seen[n - 1 - t];
}

// The same through the dynamic shared memory the launch sizes.
extern "C" __global__ void reverse_through_dynamic_shared(int* out) {
  extern __shared__ int dynamic[];
  const int n = blockDim.x, t = threadIdx.x;
  dynamic[t] = t;
  __syncthreads();
  out[t] = dynamic[n - 1 - t];
}

// Every thread's indices, packed, at its linear position in the grid.
extern "C" __global__ void thread_indices(unsigned* out) {
  const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
  out[block * threads + thread] = threadIdx.x | threadIdx.y << 8 | threadIdx.z << 16 |
                                  (blockIdx.x | blockIdx.y << 4 | blockIdx.z << 8) << 20;
}

// The sum of the warp's lanes through warp_sum (common.cuh).
extern "C" __global__ void warp_sums(const float* in, float* out) {
  out[threadIdx.x] = warp_sum(in[threadIdx.x]);
}

// Lanes 16..31 exit, then the rest shuffle with a full mask.
extern "C" __global__ void shuffle_after_exit_fault(int* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(FULL_WARP, (int)threadIdx.x, 1);
}

// Half the warp waits at __syncthreads, the other half at a shuffle that
// needs the first half.
extern "C" __global__ void divergent_barrier_fault(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_xor_sync(FULL_WARP, (int)threadIdx.x, 1);
  }
}

// Writes one int past blockDim.x ints of dynamic shared memory.
extern "C" __global__ void dynamic_shared_overrun_fault(int* out) {
  extern __shared__ int dynamic[];
  dynamic[threadIdx.x + 1] = (int)threadIdx.x;
  out[threadIdx.x] = 0;
}

// Thread 1 reads what thread 0 writes to shared memory, with no barrier
// between: a race, which the ThreadSanitizer build reports.
extern "C" __global__ void shared_race_fault(int* out) {
  __shared__ int value;
  if (threadIdx.x == 0) value = 42;
  if (threadIdx.x == 1) out[0] = value;
}

// Writes element n of an n-element buffer.
extern "C" __global__ void write_past_end_fault(float* buffer, int n) {
  if (threadIdx.x == 0) buffer[n] = 1.f;
}
