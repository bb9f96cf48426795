// The decode step's products with a quantized matrix:
//   y[m, n] (+)= x[m, k] · dequant(W)[n, k]ᵀ,   m ≤ MAX_ROWS
// with bf16 x (the GEMM inputs), f32 accumulation and an f32 y; with
// `accumulate` y keeps what it held and gains the product (the residual add,
// cuBLASLt's beta = 1), else it is overwritten.
//
// A decode step has a few rows, so the weights are the bytes that count: at
// int4 a 4096x4096 matrix is 8 MB against 0.5 MB of x for 64 rows. So each
// weight byte is read once per launch, in coalesced 16-byte loads, and x,
// which every column needs, is staged through shared memory:
// - a block owns COLS output columns (weight rows) and the whole k, so no
//   partial sums leave it (no split-K scratch, no atomics: the sum of each
//   output has one fixed order, whatever m is, so a row's result does not
//   depend on the rows launched with it);
// - k is walked in chunks of CHUNK inputs; x[:, chunk] goes to shared memory
//   (64 rows · 256 · 2 B = 32 KiB at most), and each column's chunk of
//   weights is one 16-byte segment for each of LANES lanes (8 lanes of 32
//   4-bit values, or 16 of 16 int8 ones): a warp reads 4 or 2 runs of 128 or
//   256 contiguous bytes;
// - a segment's load is issued before the chunk's x is staged, so its
//   latency overlaps the staging;
// - every lane keeps a partial sum per row of x (registers, MAX_ROWS), and
//   the LANES lanes of a column add theirs by a butterfly at the end.
// A 4096-column matrix makes 256 blocks (int4) or 512 (int8): 2-4 per SM of
// an H100. Untuned: nothing here has been timed on a GPU.
#include "quant.cuh"

constexpr int THREADS = 128;
// Rows of x a launch takes: the decode step's.
constexpr int MAX_ROWS = 64;
// Inputs of x staged in shared memory at a time.
constexpr int CHUNK = 256;

template <int BITS>
__device__ void dequant_gemm(const bf16* __restrict__ x, const uint4* __restrict__ w,
                             const float* __restrict__ scales, float* __restrict__ y, int m,
                             int n, int k, int group, int accumulate, uint4* staged) {
  constexpr int SEG = SEGMENT<BITS>;
  constexpr int LANES = CHUNK / SEG;  // lanes sharing a column: 8 or 16
  constexpr int COLS = THREADS / LANES;
  const int lane = threadIdx.x % LANES;
  const int col = blockIdx.x * COLS + threadIdx.x / LANES;
  // Threads of columns past n still stage x and join the butterfly.
  const bool live = col < n;
  const int row_segments = k / SEG;
  const uint4* w_row = w + (size_t)(live ? col : 0) * row_segments;
  const float* scale_row = scales + (size_t)(live ? col : 0) * (k / group);

  float acc[MAX_ROWS];
#pragma unroll
  for (int r = 0; r < MAX_ROWS; ++r) acc[r] = 0.f;

  for (int k0 = 0; k0 < k; k0 += CHUNK) {
    const int width = min(CHUNK, k - k0);
    const int first = k0 + lane * SEG;  // this lane's first input in the chunk
    const bool mine = live && lane * SEG < width;
    uint4 bytes = make_uint4(0, 0, 0, 0);
    float scale = 0.f;
    if (mine) {
      bytes = w_row[first / SEG];
      scale = scale_row[first / group];
    }
    __syncthreads();  // the previous chunk's x is no longer read
    const int row_vectors = width / 8;
    for (int i = threadIdx.x; i < m * row_vectors; i += THREADS) {
      const int r = i / row_vectors, v = i % row_vectors;
      staged[r * (CHUNK / 8) + v] = reinterpret_cast<const uint4*>(x + (size_t)r * k + k0)[v];
    }
    __syncthreads();
    if (!mine) continue;
    float wv[SEG];
    decode_segment<BITS>(bytes, scale, wv);
#pragma unroll
    for (int r = 0; r < MAX_ROWS; ++r) {
      if (r >= m) break;
      const uint4* xr = staged + r * (CHUNK / 8) + lane * (SEG / 8);
      float a = acc[r];
#pragma unroll
      for (int q = 0; q < SEG / 8; ++q) {
        const uint4 packed = xr[q];
        const bf16x2* pairs = reinterpret_cast<const bf16x2*>(&packed);
#pragma unroll
        for (int p = 0; p < 4; ++p) {
          const float2 xv = __bfloat1622float2(pairs[p]);
          a = fmaf(wv[8 * q + 2 * p], xv.x, a);
          a = fmaf(wv[8 * q + 2 * p + 1], xv.y, a);
        }
      }
      acc[r] = a;
    }
  }

  // Every lane of a column ends with the same sums (a butterfly adds the
  // same pairs in every lane); lane r % LANES writes row r.
#pragma unroll
  for (int r = 0; r < MAX_ROWS; ++r) {
    if (r >= m) break;
    float a = acc[r];
#pragma unroll
    for (int offset = LANES / 2; offset > 0; offset >>= 1) a += __shfl_xor_sync(FULL_WARP, a, offset);
    if (live && r % LANES == lane) {
      float* out = y + (size_t)r * n + col;
      *out = accumulate ? *out + a : a;
    }
  }
}

// x[:m, chunk], rows CHUNK apart, read in 16-byte vectors (dynamic shared
// memory starts 16-byte aligned). Declared here, in the kernels, as words:
// the host emulation reaches an `extern __shared__` array declared in a
// template, or of a class type such as uint4, through a thread-local
// initialiser it never defines.
#define STAGED                           \
  extern __shared__ unsigned staged_words[]; \
  uint4* staged = reinterpret_cast<uint4*>(staged_words)

extern "C" __global__ void __launch_bounds__(THREADS)
    dequant_gemm_int8(const bf16* x, const uint4* w, const float* scales, float* y, int m, int n,
                      int k, int accumulate) {
  STAGED;
  dequant_gemm<8>(x, w, scales, y, m, n, k, k, accumulate, staged);
}

extern "C" __global__ void __launch_bounds__(THREADS)
    dequant_gemm_int4(const bf16* x, const uint4* w, const float* scales, float* y, int m, int n,
                      int k, int group, int accumulate) {
  STAGED;
  dequant_gemm<4>(x, w, scales, y, m, n, k, group, accumulate, staged);
}
