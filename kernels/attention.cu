// Bidirectional flash attention for one forward pass.
//
// Queries are the pass's tokens (q rows of the fused qkv buffer, already
// rotated); keys and values are the layer's cache slots [0, attend_len), bf16,
// already rotated and written by kv_update. No mask: every query sees every
// slot. Scores never reach device memory: each block streams key/value tiles
// through shared memory and keeps an online softmax (running max m, running
// sum l, rescaled output) per query row, in f32.
//
// Shape: a block is 16 queries of one head, 4 warps of 4 query rows each; a
// tile is 64 keys, two per lane. A cached step has few queries (a 32-token
// block), which would leave most of the GPU idle, so the key range is also
// split across blockIdx.z ("flash decoding"): each split writes its unnormalised
// output and (m, l) to a scratch buffer and attention_combine merges them. With
// one split the block writes the bf16 output directly. GQA: the blocks of the
// query heads sharing a key/value head read the same tiles, which stay in L2.
//
// This runs on the CUDA cores (f32 FMA). It is the part of a full forward that
// would gain most from tensor cores (see docs/cuda.md); cached steps are
// dominated by the weight reads of the GEMMs instead.
#include "common.cuh"

#include <stdint.h>

constexpr int THREADS = 128;
constexpr int ROWS = 4;                      // query rows per warp
constexpr int BQ = ROWS * THREADS / 32;      // queries per block
constexpr int BK = 64;                       // keys per tile: two per lane

template <int HD>
struct __align__(16) Tile {
  float q[BQ][HD];            // queries, pre-scaled so that softmax is exp2 of a dot product
  bf16x2 k[BK][HD / 2 + 1];   // lanes read different keys at one column: the odd
                              // pitch (HD/2 + 1 words) puts them in distinct banks
  bf16x2 v[BK][HD / 2];       // lanes read consecutive columns of one key
  float p[BQ][BK];            // probabilities; each warp touches only its own rows
};

// Whether `lane` holds output column pair lane + 32 j (always, unless HD < 64).
template <int HD>
__device__ __forceinline__ bool owns_pair(int lane, int j) {
  return lane + 32 * j < HD / 2;
}

template <int HD>
__device__ __forceinline__ void attention(const float* __restrict__ qkv,
                                          const bf16* __restrict__ k_cache,
                                          const bf16* __restrict__ v_cache,
                                          bf16* __restrict__ out, float* __restrict__ part_o,
                                          float2* __restrict__ part_ml, int n, int attend_len,
                                          int chunk, int heads, int kv_heads) {
  // Output column pairs per lane; with HD = 32 only lanes 0..15 own a pair.
  constexpr int PAIRS = (HD / 2 + 31) / 32;
  __shared__ Tile<HD> t;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int q0 = blockIdx.x * BQ, head = blockIdx.y;
  const int kv_head = head / (heads / kv_heads);
  const int d = heads * HD, kv = kv_heads * HD;
  const int key_begin = blockIdx.z * chunk, key_end = min(attend_len, key_begin + chunk);
  const float scale_log2 = 1.4426950408889634f / sqrtf((float)HD);
  const auto owns = [](int lane, int j) { return owns_pair<HD>(lane, j); };

  for (int i = threadIdx.x; i < BQ * HD; i += THREADS) {
    const int r = i / HD, c = i % HD;
    t.q[r][c] = q0 + r < n ? qkv[(size_t)(q0 + r) * (d + 2 * kv) + head * HD + c] * scale_log2 : 0.f;
  }

  float m[ROWS], l[ROWS], o[ROWS][PAIRS][2];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int j = 0; j < PAIRS; ++j) o[r][j][0] = o[r][j][1] = 0.f;
  }

  for (int tile = key_begin; tile < key_end; tile += BK) {
    __syncthreads();  // the previous tile is consumed (and, the first time, q is written)
    // 16-byte loads. Slots past key_end may hold anything (even NaN): they are
    // replaced by zeros so that 0 * v stays 0.
    for (int i = threadIdx.x; i < BK * HD / 8; i += THREADS) {
      const int key = i / (HD / 8), c = i % (HD / 8);
      uint4 kc = make_uint4(0, 0, 0, 0), vc = kc;
      if (tile + key < key_end) {
        const size_t at = (size_t)(tile + key) * kv + kv_head * HD + c * 8;
        kc = *reinterpret_cast<const uint4*>(k_cache + at);
        vc = *reinterpret_cast<const uint4*>(v_cache + at);
      }
      uint32_t* kd = reinterpret_cast<uint32_t*>(&t.k[key][c * 4]);  // padded rows: 4-byte stores
      kd[0] = kc.x;
      kd[1] = kc.y;
      kd[2] = kc.z;
      kd[3] = kc.w;
      *reinterpret_cast<uint4*>(&t.v[key][c * 4]) = vc;
    }
    __syncthreads();

    float s[ROWS][2] = {};
#pragma unroll 8
    for (int c = 0; c < HD / 2; ++c) {
      const float2 k0 = __bfloat1622float2(t.k[lane][c]);
      const float2 k1 = __bfloat1622float2(t.k[lane + 32][c]);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const float2 q = *reinterpret_cast<const float2*>(&t.q[warp * ROWS + r][2 * c]);
        s[r][0] += q.x * k0.x + q.y * k0.y;
        s[r][1] += q.x * k1.x + q.y * k1.y;
      }
    }

    const bool valid0 = tile + lane < key_end, valid1 = tile + lane + 32 < key_end;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const float s0 = valid0 ? s[r][0] : -INFINITY, s1 = valid1 ? s[r][1] : -INFINITY;
      // Lane 0's key is always valid, so m_new is finite; exp2(-inf) = 0 on the first tile.
      const float m_new = fmaxf(m[r], warp_max(fmaxf(s0, s1)));
      const float correction = exp2f(m[r] - m_new);
      const float p0 = exp2f(s0 - m_new), p1 = exp2f(s1 - m_new);
      l[r] = l[r] * correction + warp_sum(p0 + p1);
      m[r] = m_new;
#pragma unroll
      for (int j = 0; j < PAIRS; ++j) {
        o[r][j][0] *= correction;
        o[r][j][1] *= correction;
      }
      t.p[warp * ROWS + r][lane] = p0;
      t.p[warp * ROWS + r][lane + 32] = p1;
    }
    __syncwarp();

    const int keys = min(BK, key_end - tile);
    for (int key = 0; key < keys; ++key) {
      float2 v[PAIRS];
#pragma unroll
      for (int j = 0; j < PAIRS; ++j)
        v[j] = owns(lane, j) ? __bfloat1622float2(t.v[key][lane + 32 * j]) : make_float2(0.f, 0.f);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const float p = t.p[warp * ROWS + r][key];
#pragma unroll
        for (int j = 0; j < PAIRS; ++j) {
          o[r][j][0] += p * v[j].x;
          o[r][j][1] += p * v[j].y;
        }
      }
    }
  }

  // Lane `lane` owns columns 2w, 2w + 1 for w = lane + 32 j.
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int q = q0 + warp * ROWS + r;
    if (q >= n) continue;
    if (gridDim.z == 1) {
      const float inv = 1.f / l[r];
      bf16x2* dst = reinterpret_cast<bf16x2*>(out + (size_t)q * d + head * HD);
#pragma unroll
      for (int j = 0; j < PAIRS; ++j)
        if (owns(lane, j)) dst[lane + 32 * j] = __floats2bfloat162_rn(o[r][j][0] * inv, o[r][j][1] * inv);
    } else {
      const size_t row = ((size_t)blockIdx.z * n + q) * heads + head;
      float2* dst = reinterpret_cast<float2*>(part_o + row * HD);
#pragma unroll
      for (int j = 0; j < PAIRS; ++j)
        if (owns(lane, j)) dst[lane + 32 * j] = make_float2(o[r][j][0], o[r][j][1]);
      if (lane == 0) part_ml[row] = make_float2(m[r], l[r]);
    }
  }
}

#define ATTENTION_KERNEL(HD)                                                                  \
  extern "C" __global__ void __launch_bounds__(THREADS) attention_hd##HD(                     \
      const float* qkv, const bf16* k_cache, const bf16* v_cache, bf16* out, float* part_o, \
      float2* part_ml, int n, int attend_len, int chunk, int heads, int kv_heads) {         \
    attention<HD>(qkv, k_cache, v_cache, out, part_o, part_ml, n, attend_len, chunk, heads, \
                  kv_heads);                                                                \
  }

ATTENTION_KERNEL(32)  // the tiny golden test models
ATTENTION_KERNEL(64)
ATTENTION_KERNEL(128)

// Merges the key splits of one (query, head): outputs are rescaled to the
// largest running max, like two steps of the online softmax. One thread per
// column; no split is empty (the host sizes them), so every l is positive.
extern "C" __global__ void attention_combine(const float* __restrict__ part_o,
                                             const float2* __restrict__ part_ml,
                                             bf16* __restrict__ out, int n, int heads,
                                             int splits) {
  const int q = blockIdx.x, head = blockIdx.y, head_dim = blockDim.x;
  float max = -INFINITY;
  for (int s = 0; s < splits; ++s) max = fmaxf(max, part_ml[((size_t)s * n + q) * heads + head].x);
  float sum = 0.f, acc = 0.f;
  for (int s = 0; s < splits; ++s) {
    const size_t row = ((size_t)s * n + q) * heads + head;
    const float2 ml = part_ml[row];
    const float w = exp2f(ml.x - max);
    sum += ml.y * w;
    acc += w * part_o[row * head_dim + threadIdx.x];
  }
  out[((size_t)q * heads + head) * head_dim + threadIdx.x] = __float2bfloat16(acc / sum);
}
