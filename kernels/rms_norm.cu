// RMSNorm of the f32 residual stream into a bf16 GEMM input:
//   out = w * (x * 1/sqrt(mean(x^2) + eps))
// in the CPU reference's order of operations (and IEEE sqrt and division, not
// rsqrtf), so the only difference from it is the final rounding to bf16.
//
// One block per row: a row is at most a few thousand floats, one coalesced
// sweep to sum the squares and a second, served from L1, to scale. There is no
// residual add to fuse here: the o and down projections accumulate into the
// residual stream inside the GEMM (beta = 1), so x is already up to date.
#include "common.cuh"

constexpr int THREADS = 256;

extern "C" __global__ void __launch_bounds__(THREADS)
    rms_norm(const float* __restrict__ x, const float* __restrict__ weight,
             bf16* __restrict__ out, int d, float eps) {
  __shared__ float warp_sums[THREADS / 32];
  const float* row = x + (size_t)blockIdx.x * d;

  float sum = 0.f;
  for (int i = threadIdx.x; i < d; i += THREADS) sum += row[i] * row[i];
  sum = warp_sum(sum);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sum;
  __syncthreads();
  sum = 0.f;
#pragma unroll
  for (int w = 0; w < THREADS / 32; ++w) sum += warp_sums[w];

  const float scale = 1.f / sqrtf(sum / d + eps);
  bf16* dst = out + (size_t)blockIdx.x * d;
  for (int i = threadIdx.x; i < d; i += THREADS) dst[i] = __float2bfloat16(weight[i] * (row[i] * scale));
}
