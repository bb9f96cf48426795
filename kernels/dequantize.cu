// A quantized matrix into bf16, for the products whose many rows (prefill)
// make cuBLASLt's tensor cores worth a pass over the weights: the backend
// dequantizes one matrix at a time into a reused scratch, then multiplies.
//
// A thread per 16-byte segment: the loads are coalesced 16-byte reads, the
// stores 32 or 64 contiguous bytes a thread.
#include "quant.cuh"

constexpr int THREADS = 256;

template <int BITS>
__device__ void dequantize(const uint4* __restrict__ w, const float* __restrict__ scales,
                           bf16* __restrict__ out, long long segments, int k, int group) {
  constexpr int SEG = SEGMENT<BITS>;
  const long long s = (long long)blockIdx.x * THREADS + threadIdx.x;
  if (s >= segments) return;
  const int row_segments = k / SEG;
  const long long row = s / row_segments;
  const int first = int(s % row_segments) * SEG;
  float v[SEG];
  decode_segment<BITS>(w[s], scales[row * (k / group) + first / group], v);
  uint4* dst = reinterpret_cast<uint4*>(out + row * k + first);
#pragma unroll
  for (int q = 0; q < SEG / 8; ++q) {
    uint4 packed;
    bf16x2* pairs = reinterpret_cast<bf16x2*>(&packed);
#pragma unroll
    for (int p = 0; p < 4; ++p) pairs[p] = __floats2bfloat162_rn(v[8 * q + 2 * p], v[8 * q + 2 * p + 1]);
    dst[q] = packed;
  }
}

extern "C" __global__ void __launch_bounds__(THREADS)
    dequantize_int8(const uint4* w, const float* scales, bf16* out, long long segments, int k) {
  dequantize<8>(w, scales, out, segments, k, k);
}

extern "C" __global__ void __launch_bounds__(THREADS)
    dequantize_int4(const uint4* w, const float* scales, bf16* out, long long segments, int k,
                    int group) {
  dequantize<4>(w, scales, out, segments, k, group);
}
