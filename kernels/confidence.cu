// Fused confidence: everything a sampler reads from one row of logits, in one
// pass over the vocabulary (126464 for LLaDA, 152064 for Dream):
//   token        argmax, lowest id on ties
//   prob         softmax probability of token = 1 / S, S = sum exp(l - max)
//   neg_entropy  sum p ln(p + 1e-10)
//   margin       top-1 minus top-2 probability = (1 - exp(second - max)) / S
// Each thread keeps an online state (top-1 value and id, top-2 value, S and
// T = sum exp(l - max) (l - max), both relative to its running top-1) and the
// block merges the states. Then sum p ln p = T / S - ln S. The 1e-10 of the
// reference is dropped: sum p ln(1 + 1e-10/p) <= vocab * 1e-10 < 2e-5, far
// below the bf16 noise of the logits themselves.
//
// One block per row: the rows were just written by the head GEMM and sit in
// L2, and a step asks for tens of rows. Only 16 bytes per row go back to the
// host instead of 600 KB of logits.
#include "common.cuh"

constexpr int THREADS = 512;

struct State {
  float top, second;  // the two largest logits (second may equal top)
  int token;          // id of top
  float sum, moment;  // S and T relative to top
};

// What a thread holds before it has seen any logit.
__device__ __forceinline__ State empty() { return State{-INFINITY, -INFINITY, 0, 0.f, 0.f}; }

struct RowStats {
  unsigned token;
  float prob, neg_entropy, margin;
};

__device__ __forceinline__ void push(State& st, float logit, int id) {
  if (logit > st.top) {
    if (st.sum > 0.f) {  // rescale what was summed relative to the old top
      const float delta = st.top - logit, r = expf(delta);
      st.moment = r * (st.moment + delta * st.sum);
      st.sum *= r;
    }
    st.sum += 1.f;
    st.second = st.top;
    st.top = logit;
    st.token = id;
  } else {
    const float e = expf(logit - st.top);
    st.sum += e;
    st.moment += e * (logit - st.top);
    st.second = fmaxf(st.second, logit);
  }
}

__device__ __forceinline__ State merge(State a, State b) {
  if (b.sum == 0.f) return a;  // empty
  if (a.sum == 0.f) return b;
  const bool b_wins = b.top > a.top || (b.top == a.top && b.token < a.token);
  const State& w = b_wins ? b : a;
  const State& x = b_wins ? a : b;
  const float delta = x.top - w.top;  // <= 0
  const float r = expf(delta);
  State m;
  m.top = w.top;
  m.token = w.token;
  m.second = fmaxf(w.second, x.top);
  m.sum = w.sum + x.sum * r;
  m.moment = w.moment + r * (x.moment + delta * x.sum);
  return m;
}

__device__ __forceinline__ State shuffle(const State& s, int offset) {
  State o;
  o.top = __shfl_xor_sync(FULL_WARP, s.top, offset);
  o.second = __shfl_xor_sync(FULL_WARP, s.second, offset);
  o.token = __shfl_xor_sync(FULL_WARP, s.token, offset);
  o.sum = __shfl_xor_sync(FULL_WARP, s.sum, offset);
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
  if (threadIdx.x == 0) {
    const float inv = 1.f / st.sum;
    stats[blockIdx.x] = RowStats{(unsigned)st.token, inv, st.moment * inv - logf(st.sum),
                                 (1.f - expf(st.second - st.top)) * inv};
  }
}
