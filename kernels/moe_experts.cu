// LLaDA2's routed experts over a step's rows (LLADA2.md §3.3), grouped by
// expert so that each touched expert's weights are read once per step:
//
//   moe_sort     the router's [n, top_k] choices → per-expert row lists
//                (a counting sort: offsets, the token row of each sorted
//                entry, and where each (row, choice) landed)
//   moe_gemm     y[i] = a[row of i] · W_e[c] for the entries i of expert e:
//                a grouped GEMM, once for gate|up and once for down
//   moe_combine  x += shared + Σ weight · y over a row's experts, in
//                ascending expert order as the CPU reference sums them
//
// Every launch's grid depends on the step's row count only, never on the
// routing, which is data on the device: a step still captures into a CUDA
// graph, and nothing waits for the host. The price is blocks of untouched
// experts that exit at once.
//
// A step has at most a few hundred rows, so an expert gets a handful: a
// grouped GEMM over so few rows is bound by its weight reads, which this one
// does once per 16 rows, and f32 FMAs on CUDA cores cost no more than the
// reads they wait for. A row's sums run over k in index order whatever rows
// share its tile, so an expert's output for a row does not depend on the
// other rows sent to it: batched decoding stays batch-invariant.
#include "common.cuh"

// The sort keeps a count per expert in shared memory; the router holds as
// many experts (kernels/moe_router.cu).
constexpr int MAX_EXPERTS = 1024;
constexpr int SORT_THREADS = 256;

// Copies choices base .. base + SORT_THREADS into chunk for the whole block
// (after the block is done with the previous chunk); returns how many are real.
__device__ __forceinline__ int stage(unsigned* chunk, const unsigned* experts, int base,
                                     int slots) {
  __syncthreads();
  chunk[threadIdx.x] = base + (int)threadIdx.x < slots ? experts[base + threadIdx.x] : ~0u;
  __syncthreads();
  return min(SORT_THREADS, slots - base);
}

// Each thread owns experts tid, tid + SORT_THREADS, ...: it counts the
// choices of its experts, then writes their entries in slot order (so a
// row's place in its expert's list is stable), reading the choices in
// chunks staged through shared memory. One block: a step's n · top_k
// choices are a few thousand, each read SORT_THREADS times from shared
// memory — microseconds, against the GEMMs' weight reads.
extern "C" __global__ void __launch_bounds__(SORT_THREADS)
    moe_sort(const unsigned* __restrict__ experts, int slots, int top_k, int n_experts,
             unsigned* __restrict__ offsets, unsigned* __restrict__ sorted_rows,
             unsigned* __restrict__ positions) {
  __shared__ unsigned chunk[SORT_THREADS];
  __shared__ unsigned next[MAX_EXPERTS];
  const int tid = threadIdx.x;
  for (int e = tid; e < n_experts; e += SORT_THREADS) next[e] = 0;
  for (int base = 0; base < slots; base += SORT_THREADS) {
    const int len = stage(chunk, experts, base, slots);
    for (int e = tid; e < n_experts; e += SORT_THREADS)
      for (int i = 0; i < len; ++i) next[e] += chunk[i] == (unsigned)e;
  }
  __syncthreads();
  // Exclusive prefix sum of the counts, serially: at most MAX_EXPERTS adds.
  if (tid == 0) {
    unsigned at = 0;
    for (int e = 0; e < n_experts; ++e) {
      const unsigned count = next[e];
      offsets[e] = next[e] = at;
      at += count;
    }
    offsets[n_experts] = at;
  }
  for (int base = 0; base < slots; base += SORT_THREADS) {
    const int len = stage(chunk, experts, base, slots);
    for (int e = tid; e < n_experts; e += SORT_THREADS)
      for (int i = 0; i < len; ++i)
        if (chunk[i] == (unsigned)e) {
          const unsigned at = next[e]++;
          sorted_rows[at] = (base + i) / top_k;
          positions[base + i] = at;
        }
  }
}

// A block is one expert × TILE_COLS output columns; it walks the expert's
// entries TILE_ROWS at a time and k TILE_K at a time. Thread t computes
// column t % TILE_COLS for rows (t / TILE_COLS) · 4 ... + 3 of the tile.
constexpr int GEMM_THREADS = 256;
constexpr int TILE_COLS = 64;
constexpr int TILE_ROWS = 16;
constexpr int TILE_K = 32;
constexpr int ROWS_PER_THREAD = TILE_ROWS * TILE_COLS / GEMM_THREADS;

// y[i, c] = Σ_k a[r(i), k] · w[e, c, k] for i in offsets[e] .. offsets[e+1],
// where r(i) = a_rows[i], or i itself when a_rows is null (a already sorted).
// w is [experts, m, k] bf16, y [entries, m] f32.
extern "C" __global__ void __launch_bounds__(GEMM_THREADS)
    moe_gemm(const bf16* __restrict__ a, const unsigned* __restrict__ a_rows,
             const bf16* __restrict__ w, const unsigned* __restrict__ offsets,
             float* __restrict__ y, int k, int m) {
  __shared__ float a_tile[TILE_ROWS][TILE_K];
  __shared__ float w_tile[TILE_COLS][TILE_K + 1];  // +1: columns fall in distinct banks
  const int expert = blockIdx.x, col0 = blockIdx.y * TILE_COLS;
  const unsigned first = offsets[expert], end = offsets[expert + 1];
  if (first == end) return;  // the whole block: no barrier is left waiting
  const int tid = threadIdx.x;
  const int col = tid % TILE_COLS, row0 = tid / TILE_COLS * ROWS_PER_THREAD;
  const bf16* weights = w + (size_t)expert * m * k;

  for (unsigned rows = first; rows < end; rows += TILE_ROWS) {
    float acc[ROWS_PER_THREAD] = {};
    for (int k0 = 0; k0 < k; k0 += TILE_K) {
      __syncthreads();
      for (int i = tid; i < TILE_ROWS * TILE_K; i += GEMM_THREADS) {
        const int r = i / TILE_K, kk = k0 + i % TILE_K;
        const unsigned entry = rows + r;
        float v = 0.f;
        if (entry < end && kk < k) {
          const size_t row = a_rows ? a_rows[entry] : entry;
          v = __bfloat162float(a[row * k + kk]);
        }
        a_tile[r][i % TILE_K] = v;
      }
      for (int i = tid; i < TILE_COLS * TILE_K; i += GEMM_THREADS) {
        const int c = col0 + i / TILE_K, kk = k0 + i % TILE_K;
        w_tile[i / TILE_K][i % TILE_K] =
            c < m && kk < k ? __bfloat162float(weights[(size_t)c * k + kk]) : 0.f;
      }
      __syncthreads();
      // Past k the tiles hold zeros: adding them changes no sum.
      for (int kk = 0; kk < TILE_K; ++kk) {
        const float wv = w_tile[col][kk];
#pragma unroll
        for (int r = 0; r < ROWS_PER_THREAD; ++r) acc[r] += a_tile[row0 + r][kk] * wv;
      }
    }
    if (col0 + col < m)
#pragma unroll
      for (int r = 0; r < ROWS_PER_THREAD; ++r) {
        const unsigned entry = rows + row0 + r;
        if (entry < end) y[(size_t)entry * m + col0 + col] = acc[r];
      }
  }
}

// x[row] += shared[row] + Σ weight · y[entry] over the row's top_k choices
// by ascending expert (the CPU reference adds experts in index order into
// zeros, then the shared expert's output, then the residual). Row on grid x,
// columns on y, like silu_gate.
constexpr int COMBINE_THREADS = 256;

extern "C" __global__ void __launch_bounds__(COMBINE_THREADS)
    moe_combine(const float* __restrict__ y, const unsigned* __restrict__ positions,
                const unsigned* __restrict__ experts, const float* __restrict__ weights,
                const float* __restrict__ shared, float* __restrict__ x, int d, int top_k) {
  const int col = blockIdx.y * blockDim.x + threadIdx.x;
  if (col >= d) return;
  const size_t row = blockIdx.x, choices = row * top_k;
  float routed = 0.f;
  // A row's experts are distinct: take them smallest first, top_k² compares.
  long previous = -1;
  for (int r = 0; r < top_k; ++r) {
    int pick = -1;
    for (int j = 0; j < top_k; ++j) {
      const long e = experts[choices + j];
      if (e > previous && (pick < 0 || e < (long)experts[choices + pick])) pick = j;
    }
    previous = experts[choices + pick];
    routed += weights[choices + pick] * y[(size_t)positions[choices + pick] * d + col];
  }
  x[row * d + col] += shared[row * d + col] + routed;
}
