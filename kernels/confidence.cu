// Fused confidence: everything a sampler reads from one row of logits, in one
// pass over the vocabulary (126464 for LLaDA, 152064 for Dream). The kernel
// writes the row's sums; the host finishes them in f64 (src/cuda/kernels.rs,
// `From<RowStats> for TokenStats`):
//   token   argmax, lowest id on ties
//   rest    R = sum over every entry but the argmax of exp(l - top), so that
//           S = sum exp(l - top) = 1 + R and the top probability is 1 / (1 + R)
//   moment  T = sum exp(l - top) (l - top); then sum p ln p = T / S - ln S
//   gap     second-best logit minus the top one (<= 0); the margin, top-1 minus
//           top-2 probability, is (1 - exp(gap)) / S
// Why R and not p: for a confident row p is within 1e-9 of 1, which f32 rounds
// to exactly 1.0, and rows that differ only there would tie and be ranked by
// position. R is summed directly, never as S - 1, so it keeps its relative
// precision however small it is, and 1 / (1 + R) in f64 keeps the differences
// the f64 reference (TokenStats::from_logits) sees.
// Each thread keeps an online state (top-1 value and id, top-2 value, R and T,
// both relative to its running top-1) and the block merges the states. The
// 1e-10 of the reference's entropy is dropped: sum p ln(1 + 1e-10/p) <=
// vocab * 1e-10 < 2e-5, far below the bf16 noise of the logits themselves.
//
// One block per row: the rows were just written by the head GEMM and sit in
// L2, and a step asks for tens of rows. Only 16 bytes per row go back to the
// host instead of 600 KB of logits.
#include "common.cuh"

constexpr int THREADS = 512;

struct State {
  float top, second;  // the two largest logits (second may equal top)
  int token;          // id of top; -1 before any logit
  float rest, moment;  // R and T relative to top
};

// What a thread holds before it has seen any logit.
__device__ __forceinline__ State empty() { return State{-INFINITY, -INFINITY, -1, 0.f, 0.f}; }

struct RowStats {
  unsigned token;
  float rest, moment, gap;
};

__device__ __forceinline__ void push(State& st, float logit, int id) {
  if (logit > st.top) {
    if (st.token >= 0) {
      // The old top joins the rest; rescale everything to the new top:
      // exp(l - new) = exp(l - old) r and (l - new) = (l - old) + delta.
      const float delta = st.top - logit, r = expf(delta);
      st.moment = r * (st.moment + delta * (1.f + st.rest));
      st.rest = (1.f + st.rest) * r;
    }
    st.second = st.top;
    st.top = logit;
    st.token = id;
  } else {
    const float e = expf(logit - st.top);
    st.rest += e;
    st.moment += e * (logit - st.top);
    st.second = fmaxf(st.second, logit);
  }
}

__device__ __forceinline__ State merge(State a, State b) {
  if (b.token < 0) return a;  // empty
  if (a.token < 0) return b;
  const bool b_wins = b.top > a.top || (b.top == a.top && b.token < a.token);
  const State& w = b_wins ? b : a;
  const State& x = b_wins ? a : b;
  const float delta = x.top - w.top;  // <= 0
  const float r = expf(delta);
  State m;
  m.top = w.top;
  m.token = w.token;
  m.second = fmaxf(w.second, x.top);
  // x's top and its rest all join the winner's rest.
  m.rest = w.rest + (1.f + x.rest) * r;
  m.moment = w.moment + r * (x.moment + delta * (1.f + x.rest));
  return m;
}

__device__ __forceinline__ State shuffle(const State& s, int offset) {
  State o;
  o.top = __shfl_xor_sync(FULL_WARP, s.top, offset);
  o.second = __shfl_xor_sync(FULL_WARP, s.second, offset);
  o.token = __shfl_xor_sync(FULL_WARP, s.token, offset);
  o.rest = __shfl_xor_sync(FULL_WARP, s.rest, offset);
  o.moment = __shfl_xor_sync(FULL_WARP, s.moment, offset);
  return o;
}

__device__ __forceinline__ State warp_merge(State s) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) s = merge(s, shuffle(s, offset));
  return s;
}

extern "C" __global__ void __launch_bounds__(THREADS)
    confidence(const float* __restrict__ logits, RowStats* __restrict__ stats, int vocab) {
  __shared__ State warps[THREADS / 32];
  const float* row = logits + (size_t)blockIdx.x * vocab;
  State st = empty();

  // Ids increase along each thread's walk, so a tie keeps the lower id.
  // 16-byte loads when rows are 16-byte aligned, else the scalar loop does all.
  const int vec = vocab % 4 == 0 ? vocab / 4 : 0;
  for (int i = threadIdx.x; i < vec; i += THREADS) {
    const float4 x = reinterpret_cast<const float4*>(row)[i];
    push(st, x.x, 4 * i);
    push(st, x.y, 4 * i + 1);
    push(st, x.z, 4 * i + 2);
    push(st, x.w, 4 * i + 3);
  }
  for (int i = 4 * vec + threadIdx.x; i < vocab; i += THREADS) push(st, row[i], i);

  st = warp_merge(st);
  if (threadIdx.x % 32 == 0) warps[threadIdx.x / 32] = st;
  __syncthreads();
  if (threadIdx.x >= 32) return;
  st = warp_merge(threadIdx.x < THREADS / 32 ? warps[threadIdx.x] : empty());
  if (threadIdx.x == 0)
    stats[blockIdx.x] = RowStats{(unsigned)st.token, st.rest, st.moment, st.second - st.top};
}
