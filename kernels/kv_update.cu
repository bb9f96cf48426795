// Turns each row of the fused q|k|v projection ([n, d + 2 kv] f32) into
// attention operands, in place in the key/value cache:
//   - adds the q/k/v bias (Dream; null for LLaDA),
//   - rotates q (in place, for the attention kernel) and k by RoPE at the
//     token's true position (rotate-half convention),
//   - writes k and v as bf16 into physical cache slot slots[i].
// Keys are cached already rotated, so attention never looks at positions: a
// pruned suffix is just a cache whose slots hold non-contiguous positions, and
// a DualCache step overwrites only its block's slots.
//
// The rows are a batch: several sequences' tokens concatenated, each sequence
// with its own pages of the shared cache. The host resolves every row's page
// table entry into `slots` (src/cuda/batch.rs), so this kernel needs no
// notion of sequences or pages, and a sequence's pages need not be adjacent.
//
// One block per token. A thread handles rotation pairs (j, j + head_dim/2); q
// heads and k heads are adjacent in the row, so one loop covers both. The
// inverse frequencies come from the host, computed like the CPU reference's,
// so angles agree with it bit for bit (pos * inv_freq is one f32 multiply).
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256)
    kv_update(float* __restrict__ qkv, const float* __restrict__ bias,
              const unsigned* __restrict__ positions, const float* __restrict__ inv_freq,
              const unsigned* __restrict__ slots, bf16* __restrict__ k_cache,
              bf16* __restrict__ v_cache, int heads, int kv_heads, int head_dim) {
  const int half = head_dim / 2;
  const int d = heads * head_dim, kv = kv_heads * head_dim;
  float* row = qkv + (size_t)blockIdx.x * (d + 2 * kv);
  const float pos = (float)positions[blockIdx.x];
  const size_t slot = (size_t)slots[blockIdx.x] * kv;

  for (int p = threadIdx.x; p < (heads + kv_heads) * half; p += blockDim.x) {
    const int head = p / half, j = p % half;
    const int a = head * head_dim + j, b = a + half;
    float x1 = row[a], x2 = row[b];
    if (bias) {
      x1 += bias[a];
      x2 += bias[b];
    }
    float s, c;
    sincosf(pos * inv_freq[j], &s, &c);
    const float y1 = x1 * c - x2 * s, y2 = x2 * c + x1 * s;
    if (head < heads) {
      row[a] = y1;
      row[b] = y2;
    } else {
      k_cache[slot + a - d] = __float2bfloat16(y1);
      k_cache[slot + b - d] = __float2bfloat16(y2);
    }
  }
  for (int e = threadIdx.x; e < kv; e += blockDim.x) {
    const int col = d + kv + e;
    v_cache[slot + e] = __float2bfloat16(bias ? row[col] + bias[col] : row[col]);
  }
}
