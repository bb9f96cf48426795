// LLaDA2's MoE router (LLADA2.md §3.3), from the router GEMM's f32 logits
// [n, experts] to each token's experts and weights [n, top_k]:
//   s = sigmoid(logit); b = s + expert_bias (selection only);
//   groups of experts/groups contiguous experts, scored by the sum of their
//   two best b; the groups_per_token best groups stay in the running;
//   the top_k best b among their experts, by descending b;
//   weights s[e], divided by their sum + 1e-20 when top_k > 1, times scaling.
// Ties go to the lower index everywhere, as in the CPU reference
// (src/cpu/ffn.rs), and the weights are summed in the same order, so the two
// agree exactly but for the last bit of expf.
//
// One warp per token. Lane g scores group g; each round of selection is a
// warp argmax (by value, then lower index) over lanes' best candidates.
#include <climits>

#include "common.cuh"

// Groups are at most 32: one lane each.
constexpr int MAX_EXPERTS = 1024;
constexpr int MAX_TOP_K = 32;

// The best (value, index) of the warp: larger value, then lower index.
__device__ __forceinline__ void warp_argmax(float& value, int& index) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float v = __shfl_xor_sync(FULL_WARP, value, offset);
    const int i = __shfl_xor_sync(FULL_WARP, index, offset);
    if (v > value || (v == value && i < index)) {
      value = v;
      index = i;
    }
  }
}

extern "C" __global__ void __launch_bounds__(32)
    moe_router(const float* __restrict__ logits, const float* __restrict__ expert_bias,
               unsigned* __restrict__ experts, float* __restrict__ weights, int n_experts,
               int groups, int groups_per_token, int top_k, float scaling) {
  __shared__ float score[MAX_EXPERTS], biased[MAX_EXPERTS];
  __shared__ int chosen[MAX_TOP_K];
  const int lane = threadIdx.x;
  const float* row = logits + (size_t)blockIdx.x * n_experts;
  for (int e = lane; e < n_experts; e += 32) {
    score[e] = 1.f / (1.f + expf(-row[e]));
    biased[e] = score[e] + expert_bias[e];
  }
  __syncwarp();

  const int size = n_experts / groups;
  float group_score = -INFINITY;
  if (lane < groups) {
    float first = -INFINITY, second = -INFINITY;
    for (int e = lane * size; e < (lane + 1) * size; ++e) {
      if (biased[e] > first) {
        second = first;
        first = biased[e];
      } else if (biased[e] > second) {
        second = biased[e];
      }
    }
    group_score = first + second;
  }
  unsigned kept_groups = 0;
  for (int r = 0; r < groups_per_token; ++r) {
    float value = (lane < groups && !(kept_groups >> lane & 1u)) ? group_score : -INFINITY;
    int index = lane < groups ? lane : INT_MAX;
    warp_argmax(value, index);
    kept_groups |= 1u << index;
  }

  for (int r = 0; r < top_k; ++r) {
    float value = -INFINITY;
    int index = INT_MAX;
    for (int e = lane; e < n_experts; e += 32) {
      bool taken = !(kept_groups >> (e / size) & 1u);
      for (int c = 0; c < r; ++c) taken |= chosen[c] == e;
      if (!taken && (biased[e] > value || index == INT_MAX)) {
        value = biased[e];
        index = e;
      }
    }
    warp_argmax(value, index);
    if (lane == 0) chosen[r] = index;
    __syncwarp();
  }

  if (lane == 0) {
    float sum = 0.f;
    for (int r = 0; r < top_k; ++r) sum += score[chosen[r]];
    const float norm = top_k > 1 ? sum + 1e-20f : 1.f;
    for (int r = 0; r < top_k; ++r) {
      const size_t out = (size_t)blockIdx.x * top_k + r;
      experts[out] = chosen[r];
      weights[out] = top_k > 1 ? score[chosen[r]] / norm * scaling : score[chosen[r]] * scaling;
    }
  }
}
