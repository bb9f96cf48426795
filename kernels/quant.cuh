// Weight-only quantized rows as the checkpoint stores them (src/quant.rs),
// read 16 bytes at a time: 16 int8 values, or 32 4-bit ones (low nibble
// first, each stored as q + 8). A 16-byte segment never straddles a scale
// group (groups are 32, 64 or 128 values: whole segments), so one scale
// serves a segment; int8's one scale a row is a group of the whole row.
#pragma once

#include "common.cuh"

// Values of one 16-byte segment.
template <int BITS>
constexpr int SEGMENT = 128 / BITS;

__device__ __forceinline__ float round_bf16(float v) {
  return __bfloat162float(__float2bfloat16(v));
}

// The weights of a segment, w[j] = q_j · scale rounded to bf16: exactly what
// dequantize.cu writes for cuBLASLt and what the CPU reference's
// Rounding::Device holds, so a row's product is the same whichever path
// (decode rows through dequant_gemm.cu, prefill through cuBLASLt) runs it.
template <int BITS>
__device__ __forceinline__ void decode_segment(uint4 bytes, float scale, float* w) {
  const unsigned words[4] = {bytes.x, bytes.y, bytes.z, bytes.w};
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const unsigned byte = (words[i / 4] >> (8 * (i % 4))) & 0xffu;
    if (BITS == 8) {
      w[i] = round_bf16(float(static_cast<signed char>(byte)) * scale);
    } else {
      w[2 * i] = round_bf16(float(int(byte & 15u) - 8) * scale);
      w[2 * i + 1] = round_bf16(float(int(byte >> 4) - 8) * scale);
    }
  }
}
