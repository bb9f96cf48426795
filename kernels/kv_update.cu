// Turns each row of the fused q|k|v projection ([n, d + 2 kv] f32) into
// attention operands, in place in the key/value cache:
//   - adds the q/k/v bias (Dream; null otherwise),
//   - normalises each q and k head by RMSNorm with its weight (LLaDA2's
//     QK-norm; null otherwise),
//   - rotates q (in place, for the attention kernel) and k by RoPE at the
//     token's true position (rotate-half convention) over the first
//     rotary_dim dims of each head; the rest of the head passes through
//     (LLaDA2's partial rotary embedding; rotary_dim = head_dim otherwise),
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
// One block per token. With QK-norm, one warp per head first sums its squares
// into a per-head scale; then a thread handles rotation pairs (j, j + half)
// and the pass-through dims; q heads and k heads are adjacent in the row, so
// one loop covers both. Each value is read and written by one thread only.
// The inverse frequencies come from the host, computed like the CPU
// reference's, so angles agree with it bit for bit (pos * inv_freq is one
// f32 multiply); there are rotary_dim / 2 of them.
#include "common.cuh"

constexpr int THREADS = 256;
// Heads a row may hold when QK-norm is on (q heads plus k heads).
constexpr int MAX_NORMED_HEADS = 256;

extern "C" __global__ void __launch_bounds__(THREADS)
    kv_update(float* __restrict__ qkv, const float* __restrict__ bias,
              const float* __restrict__ q_norm, const float* __restrict__ k_norm,
              const unsigned* __restrict__ positions, const float* __restrict__ inv_freq,
              const unsigned* __restrict__ slots, bf16* __restrict__ k_cache,
              bf16* __restrict__ v_cache, int heads, int kv_heads, int head_dim,
              int rotary_dim, float eps) {
  __shared__ float scale[MAX_NORMED_HEADS];
  const int half = rotary_dim / 2;
  const int d = heads * head_dim, kv = kv_heads * head_dim;
  const int all_heads = heads + kv_heads;
  float* row = qkv + (size_t)blockIdx.x * (d + 2 * kv);
  const float pos = (float)positions[blockIdx.x];
  const size_t slot = (size_t)slots[blockIdx.x] * kv;

  auto biased = [&](int i) { return bias ? row[i] + bias[i] : row[i]; };
  if (q_norm) {
    const int lane = threadIdx.x % 32;
    for (int head = threadIdx.x / 32; head < all_heads; head += THREADS / 32) {
      float sum = 0.f;
      for (int i = lane; i < head_dim; i += 32) {
        const float x = biased(head * head_dim + i);
        sum += x * x;
      }
      sum = warp_sum(sum);
      if (lane == 0) scale[head] = 1.f / sqrtf(sum / head_dim + eps);
    }
    __syncthreads();
  }
  // Element i of the row (a q or k value) biased and normalised, in the CPU
  // reference's order: w * (x * scale).
  auto operand = [&](int head, int i) {
    const float x = biased(i);
    if (!q_norm) return x;
    const float* w = head < heads ? q_norm : k_norm;
    return w[i % head_dim] * (x * scale[head]);
  };
  auto store = [&](int head, int i, float y) {
    if (head < heads)
      row[i] = y;
    else
      k_cache[slot + i - d] = __float2bfloat16(y);
  };

  for (int p = threadIdx.x; p < all_heads * half; p += THREADS) {
    const int head = p / half, j = p % half;
    const int a = head * head_dim + j, b = a + half;
    const float x1 = operand(head, a), x2 = operand(head, b);
    float s, c;
    sincosf(pos * inv_freq[j], &s, &c);
    store(head, a, x1 * c - x2 * s);
    store(head, b, x2 * c + x1 * s);
  }
  const int kept = head_dim - rotary_dim;
  for (int p = threadIdx.x; p < all_heads * kept; p += THREADS) {
    const int head = p / kept, i = head * head_dim + rotary_dim + p % kept;
    store(head, i, operand(head, i));
  }
  for (int e = threadIdx.x; e < kv; e += THREADS) {
    const int col = d + kv + e;
    v_cache[slot + e] = __float2bfloat16(biased(col));
  }
}
