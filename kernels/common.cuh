// Helpers shared by the kernels: bf16 conversion and warp reductions.
// Storage is bf16 (weights, key/value cache, GEMM inputs); arithmetic is f32.
#pragma once

#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;
typedef __nv_bfloat162 bf16x2;

constexpr unsigned FULL_WARP = 0xffffffffu;

// Butterfly reductions: every lane ends with the result, so no broadcast
// through shared memory is needed afterwards.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(FULL_WARP, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    v = fmaxf(v, __shfl_xor_sync(FULL_WARP, v, offset));
  return v;
}
