// Embedding gather: row i of the f32 residual stream becomes the bf16
// embedding row of token i. Only n rows of the [vocab, d] table are read, which
// is why a step costs no 1 GB embedding read (DESIGN §4).
//
// One block per token. Each thread converts bf16 pairs, so a warp reads 128
// contiguous bytes and writes 256; d is even because head_dim is.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256)
    embed(const bf16* __restrict__ table, const unsigned* __restrict__ tokens,
          float* __restrict__ x, int d) {
  const bf16x2* row = reinterpret_cast<const bf16x2*>(table + (size_t)tokens[blockIdx.x] * d);
  float2* out = reinterpret_cast<float2*>(x + (size_t)blockIdx.x * d);
  for (int i = threadIdx.x; i < d / 2; i += blockDim.x) out[i] = __bfloat1622float2(row[i]);
}
