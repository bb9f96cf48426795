// Bidirectional flash attention for a batch of sequences, each over its own
// pages of the shared key/value cache.
//
// Queries are the batch's tokens (q rows of the fused qkv buffer, already
// rotated), sequence after sequence; the keys and values of a sequence are its
// cache slots [0, attend_len), bf16, already rotated and written by kv_update.
// Slot s of a sequence lives in physical slot
// page_table[pages + s / page_size] * page_size + s % page_size, so a sequence's
// pages may lie anywhere in the pool. No mask: every query sees every slot of
// its own sequence and nothing of the others. Scores never reach device
// memory: each block streams key/value tiles through shared memory and keeps
// an online softmax (running max m, running sum l, rescaled output) per query
// row, in f32.
//
// Shape: a block is 16 queries of one sequence and one head, 4 warps of 4
// query rows each; a tile is 64 keys, two per lane. The grid is (query tiles of
// every sequence) x heads x (the batch's most key splits): the host lists each
// tile's sequence and first query (`QueryTile`) and describes each sequence
// once (`Sequence`, src/cuda/ragged.rs), so sequences of any length share one
// launch. A cached step has few queries (a 32-token block), which would leave
// most of the GPU idle, so a sequence's key range is also split across
// blockIdx.z ("flash decoding"): each split writes its unnormalised output
// and (m, l) to the sequence's rows of a scratch buffer and attention_combine
// merges them; blocks past their sequence's split count exit at once. With one
// split the block writes the bf16 output directly. A sequence's splits depend
// only on its own shape, never on the rest of the batch, so its result is the
// same alone or batched. GQA: the blocks of the query heads sharing a
// key/value head read the same tiles, which stay in L2.
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

// One sequence of the batch (src/cuda/ragged.rs `SequenceDesc`).
struct Sequence {
  int q_begin;     // its first query row in the batch
  int queries;     // its query rows
  int attend_len;  // cache slots it attends over
  int pages;       // where its page table starts in page_table
  int chunk;       // keys per split, a multiple of BK
  int splits;      // key splits; 1: no scratch, no combine
  int scratch;     // its first scratch row: split z, query i, head h is
                   // scratch + (z * queries + i) * heads + h
};

// BQ queries of one sequence (src/cuda/ragged.rs `QueryTile`).
struct QueryTile {
  int sequence;
  int q0;  // first query row in the batch
};

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
                                          float2* __restrict__ part_ml,
                                          const Sequence* __restrict__ sequences,
                                          const QueryTile* __restrict__ tiles,
                                          const unsigned* __restrict__ page_table, int page_size,
                                          int heads, int kv_heads) {
  // Output column pairs per lane; with HD = 32 only lanes 0..15 own a pair.
  constexpr int PAIRS = (HD / 2 + 31) / 32;
  const QueryTile tile = tiles[blockIdx.x];
  const Sequence seq = sequences[tile.sequence];
  if ((int)blockIdx.z >= seq.splits) return;  // the whole block: no barrier is left waiting
  __shared__ Tile<HD> t;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int q0 = tile.q0, q_end = seq.q_begin + seq.queries, head = blockIdx.y;
  const int kv_head = head / (heads / kv_heads);
  const int d = heads * HD, kv = kv_heads * HD;
  const int key_begin = blockIdx.z * seq.chunk;
  const int key_end = min(seq.attend_len, key_begin + seq.chunk);
  const unsigned* pages = page_table + seq.pages;
  const float scale_log2 = 1.4426950408889634f / sqrtf((float)HD);
  const auto owns = [](int lane, int j) { return owns_pair<HD>(lane, j); };

  for (int i = threadIdx.x; i < BQ * HD; i += THREADS) {
    const int r = i / HD, c = i % HD;
    t.q[r][c] = q0 + r < q_end ? qkv[(size_t)(q0 + r) * (d + 2 * kv) + head * HD + c] * scale_log2 : 0.f;
  }

  float m[ROWS], l[ROWS], o[ROWS][PAIRS][2];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int j = 0; j < PAIRS; ++j) o[r][j][0] = o[r][j][1] = 0.f;
  }

  for (int first = key_begin; first < key_end; first += BK) {
    __syncthreads();  // the previous tile is consumed (and, the first time, q is written)
    // 16-byte loads. Slots past key_end may hold anything (even NaN): they are
    // replaced by zeros so that 0 * v stays 0.
    for (int i = threadIdx.x; i < BK * HD / 8; i += THREADS) {
      const int key = i / (HD / 8), c = i % (HD / 8);
      uint4 kc = make_uint4(0, 0, 0, 0), vc = kc;
      const int slot = first + key;
      if (slot < key_end) {
        const size_t physical = (size_t)pages[slot / page_size] * page_size + slot % page_size;
        const size_t at = physical * kv + kv_head * HD + c * 8;
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

    const bool valid0 = first + lane < key_end, valid1 = first + lane + 32 < key_end;
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

    const int keys = min(BK, key_end - first);
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
    if (q >= q_end) continue;
    if (seq.splits == 1) {
      const float inv = 1.f / l[r];
      bf16x2* dst = reinterpret_cast<bf16x2*>(out + (size_t)q * d + head * HD);
#pragma unroll
      for (int j = 0; j < PAIRS; ++j)
        if (owns(lane, j)) dst[lane + 32 * j] = __floats2bfloat162_rn(o[r][j][0] * inv, o[r][j][1] * inv);
    } else {
      const size_t row =
          seq.scratch + ((size_t)blockIdx.z * seq.queries + (q - seq.q_begin)) * heads + head;
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
      float2* part_ml, const Sequence* sequences, const QueryTile* tiles,                    \
      const unsigned* page_table, int page_size, int heads, int kv_heads) {                 \
    attention<HD>(qkv, k_cache, v_cache, out, part_o, part_ml, sequences, tiles, page_table, \
                  page_size, heads, kv_heads);                                              \
  }

ATTENTION_KERNEL(32)  // the tiny golden test models
ATTENTION_KERNEL(64)
ATTENTION_KERNEL(128)

// Merges the key splits of each (query, head) of a tile whose sequence was
// split: outputs are rescaled to the largest running max, like two steps of
// the online softmax. One thread per column, the tile's queries in turn; no
// split is empty (the host sizes them), so every l is positive.
extern "C" __global__ void attention_combine(const float* __restrict__ part_o,
                                             const float2* __restrict__ part_ml,
                                             bf16* __restrict__ out,
                                             const Sequence* __restrict__ sequences,
                                             const QueryTile* __restrict__ tiles, int heads) {
  const QueryTile tile = tiles[blockIdx.x];
  const Sequence seq = sequences[tile.sequence];
  if (seq.splits == 1) return;  // attention wrote these rows itself
  const int head = blockIdx.y, head_dim = blockDim.x;
  const size_t stride = (size_t)seq.queries * heads;  // from one split to the next
  const int q_end = min(tile.q0 + BQ, seq.q_begin + seq.queries);
  for (int q = tile.q0; q < q_end; ++q) {
    const size_t first = seq.scratch + (size_t)(q - seq.q_begin) * heads + head;
    float max = -INFINITY;
    for (int s = 0; s < seq.splits; ++s) max = fmaxf(max, part_ml[first + s * stride].x);
    float sum = 0.f, acc = 0.f;
    for (int s = 0; s < seq.splits; ++s) {
      const size_t row = first + s * stride;
      const float2 ml = part_ml[row];
      const float w = exp2f(ml.x - max);
      sum += ml.y * w;
      acc += w * part_o[row * head_dim + threadIdx.x];
    }
    out[((size_t)q * heads + head) * head_dim + threadIdx.x] = __float2bfloat16(acc / sum);
  }
}
