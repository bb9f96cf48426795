// SwiGLU activation: h = silu(g) * u, where row i of the fused gate|up
// projection holds g in its first f columns and u in the next f. The result is
// the bf16 input of the down projection.
//
// Elementwise and memory-bound: blockIdx.x is the row and the threads of
// blockIdx.y walk its columns, so reads and writes are coalesced and no index
// is divided. (Rows on x: y is limited to 65535, a full forward is not.)
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256)
    silu_gate(const float* __restrict__ gate_up, bf16* __restrict__ h, int f) {
  const int col = blockIdx.y * blockDim.x + threadIdx.x;
  if (col >= f) return;
  const float* row = gate_up + (size_t)blockIdx.x * 2 * f;
  const float g = row[col], u = row[f + col];
  h[(size_t)blockIdx.x * f + col] = __float2bfloat16(g / (1.f + expf(-g)) * u);
}
