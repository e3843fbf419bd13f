// Router top-k gating on the GPU: one 32-lane group (a warp on NVIDIA) per token.
//
// Lane l holds experts l, l + 32, l + 64, ... in registers (kPerLane of them, a template
// parameter: E <= 32 * kPerLane, other lanes' slots masked off), so the scores never leave
// registers. The math is gating_math.h's, in the same order as the CPU kernel: the softmax
// denominator is each lane's strided partial sum followed by an xor butterfly, which is exactly the
// CPU's kReduceLanes tree, so ids and weights are bit-identical to the CPU kernel's.
//
// Selection orders candidates by ranks_before (key desc, index asc) through (key, index) packed in
// one 64-bit integer: each of the topk rounds is a lane max over its slots and one warp arg-max
// (two warp max-reductions). (Sorting each lane's slots first, so a round only pops a list head,
// measured 0.1-0.2 us slower at decode: bench/NOTES.md.)
// Grouped top-k stages the keys in shared memory; 32 / G lanes score each group together (sum of
// the group's two best keys, merged across the lanes by shuffles), topk_group arg-max rounds pick
// the groups, and slots outside them leave the running.
#pragma once

#include <climits>
#include <cstdint>

#include "gating_math.h"
#include "routing_host.h"
#include "vec.cuh"

namespace moe_ext {

constexpr int kGateLanes = kReduceLanes;  // lanes per token; the butterfly width of the sum

// (key, index) packed into one integer whose unsigned order is ranks_before's: the key's bits mapped
// to an order-preserving uint32 above, the complement of the index below (lower index wins ties).
// 0 is below every real candidate (a -inf key still packs above 2^32).
MOE_DEVICE MOE_FORCEINLINE uint64_t pack_rank(float key, int idx) {
  const uint32_t u = __float_as_uint(key);
  const uint32_t ordered = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (uint64_t(ordered) << 32) | uint32_t(0xFFFFFFFFu - uint32_t(idx));
}
MOE_DEVICE MOE_FORCEINLINE int packed_index(uint64_t packed) { return int(0xFFFFFFFFu - uint32_t(packed)); }

// Arg-max over the 32 lanes; every lane returns the winner. Where the 32-lane group is the whole
// warp (NVIDIA), two warp max-reductions: the best key, then the best index among its holders.
MOE_DEVICE MOE_FORCEINLINE uint64_t group_argmax(uint64_t v) {
#if !defined(__HIP_PLATFORM_AMD__)
  static_assert(kGateLanes == kWarpSize, "one token per warp");
  const unsigned hi = warp_max_u32(unsigned(v >> 32));
  const unsigned lo = warp_max_u32(unsigned(v >> 32) == hi ? unsigned(v) : 0u);
  return (uint64_t(hi) << 32) | lo;
#else
#pragma unroll
  for (int offset = kGateLanes / 2; offset > 0; offset /= 2) {
    const uint64_t o = shfl_xor(v, offset, kGateLanes);
    v = o > v ? o : v;
  }
  return v;
#endif
}

// Max of a (non-NaN) float over the 32 lanes, exact: order-preserving uint32 keys and one warp
// max-reduction where the group is the warp.
MOE_DEVICE MOE_FORCEINLINE float group_max(float x) {
#if !defined(__HIP_PLATFORM_AMD__)
  const uint32_t u = __float_as_uint(x);
  const uint32_t m = warp_max_u32((u & 0x80000000u) ? ~u : (u | 0x80000000u));
  return __uint_as_float((m & 0x80000000u) ? (m & 0x7FFFFFFFu) : ~m);
#else
#pragma unroll
  for (int offset = kGateLanes / 2; offset > 0; offset /= 2) x = fmaxf(x, shfl_xor(x, offset, kGateLanes));
  return x;
#endif
}

// Shared memory of one token's grouped top-k: keys [E] floats, then group scores [G] floats, then
// group flags [G] bytes.
MOE_HOST_DEVICE MOE_FORCEINLINE int grouped_smem_bytes(int E, int G) { return (E + G) * 4 + ((G + 3) / 4) * 4; }

// Grouped top-k, step 1: stage this lane's keys in s_key [E] (slot j is expert lane + 32 * j).
template <int kPerLane>
MOE_DEVICE MOE_FORCEINLINE void stage_keys(const float (&key)[kPerLane], uint32_t avail, int lane, float* s_key) {
#pragma unroll
  for (int j = 0; j < kPerLane; ++j)
    if (avail >> j & 1) s_key[lane + j * kGateLanes] = key[j];
}

// Grouped top-k, step 2 (one warp, after every key is staged): group scores and the topk_group
// best groups, flagged in s_allowed [G] bytes; s_group: [G] floats of scratch.
MOE_DEVICE MOE_FORCEINLINE void pick_groups(const GatingParams& p, int lane, const float* s_key, float* s_group,
                                            unsigned char* s_allowed) {
  const int E = p.num_experts, G = p.num_expert_group;
  const int group_size = E / G;
  for (int g = lane; g < G; g += kGateLanes) s_allowed[g] = 0;
  // Group scores: `parts` lanes (a power of two) share a group, each taking every parts-th key;
  // their best two keys merge by xor shuffles. Exact: top1 + top2 of the group as a multiset.
  int parts = 1;
  while (G * parts * 2 <= kGateLanes) parts *= 2;
  for (int g0 = 0; g0 < G; g0 += kGateLanes / parts) {  // warp-uniform
    const int g = g0 + lane / parts, q = lane % parts;
    float top1 = -INFINITY, top2 = -INFINITY;
    if (g < G) {
      for (int i = g * group_size + q; i < (g + 1) * group_size; i += parts) {
        const float k = s_key[i];
        top2 = fmaxf(top2, fminf(top1, k));
        top1 = fmaxf(top1, k);
      }
    }
    for (int offset = parts / 2; offset > 0; offset /= 2) {
      const float o1 = shfl_xor(top1, offset, kGateLanes), o2 = shfl_xor(top2, offset, kGateLanes);
      top2 = fmaxf(fminf(top1, o1), fmaxf(top2, o2));
      top1 = fmaxf(top1, o1);
    }
    if (g < G && q == 0) s_group[g] = group_size >= 2 ? top1 + top2 : top1;
  }
  sync_warp();
  // topk_group rounds of arg-max over the groups; lane l owns groups l, l + 32, ... (bit m).
  uint32_t group_taken = 0;
  for (int r = 0; r < p.topk_group; ++r) {
    uint64_t best = 0;
    for (int m = 0, g = lane; g < G; ++m, g += kGateLanes) {
      const uint64_t v = (group_taken >> m & 1) ? 0 : pack_rank(s_group[g], g);
      best = v > best ? v : best;
    }
    const int best_g = packed_index(group_argmax(best));
    if (best_g % kGateLanes == lane) {
      group_taken |= 1u << (best_g / kGateLanes);
      s_allowed[best_g] = 1;
    }
  }
}

// Grouped top-k, step 3 (after step 2 is visible): slots outside the chosen groups leave the running.
template <int kPerLane>
MOE_DEVICE MOE_FORCEINLINE void mask_to_groups(const GatingParams& p, int lane,
                                               const unsigned char* s_allowed, uint32_t& avail) {
  // Group of expert i: floor((i + 0.5) / group_size) in fp32 is exact for E <= 1024 (the product's
  // error, under G * 2^-22, stays below the 0.5 / group_size margin to the next integer).
  const float inv_group = 1.0f / static_cast<float>(p.num_experts / p.num_expert_group);
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int g = static_cast<int>((static_cast<float>(lane + j * kGateLanes) + 0.5f) * inv_group);
    if ((avail >> j & 1) && !s_allowed[g]) avail &= ~(1u << j);
  }
}

// Shared scratch of grouped top-k for one token: keys [E] floats | group scores [G] floats | flags [G] bytes.
struct GroupedScratch {
  float* key;
  float* group;
  unsigned char* allowed;
  MOE_DEVICE GroupedScratch(char* smem, int E, int G)
      : key(reinterpret_cast<float*>(smem)), group(key + E), allowed(reinterpret_cast<unsigned char*>(group + G)) {}
};

// Loads slot j = expert lane + 32 * j: the sanitized logit, the correction bias (0 without
// one) and the avail bit (expert < E). Every load is unconditional (clamped index) so all of them are
// in flight at once.
template <typename T, int kPerLane>
MOE_DEVICE MOE_FORCEINLINE void load_slots(const T* __restrict__ row, const GatingParams& p, int lane,
                                           float (&logit)[kPerLane], float (&bias)[kPerLane], uint32_t& avail) {
  const int E = p.num_experts;
  avail = 0;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int i = lane + j * kGateLanes;
    const float x = to_float(row[i < E ? i : E - 1]);
    logit[j] = i < E ? sanitize_logit(x) : -INFINITY;
    avail |= (i < E ? 1u : 0u) << j;
  }
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int i = lane + j * kGateLanes;
    bias[j] = p.bias ? p.bias[i < E ? i : E - 1] : 0.0f;
  }
}

// Selection keys of the available slots (-inf elsewhere).
template <int kPerLane>
MOE_DEVICE MOE_FORCEINLINE void slot_keys(const float (&score)[kPerLane], const float (&bias)[kPerLane], uint32_t avail,
                                          float (&key)[kPerLane]) {
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) key[j] = (avail >> j & 1) ? selection_key(score[j], bias[j]) : -INFINITY;
}

// topk rounds of warp arg-max over this warp's available slots (experts lane + 32 * j; at
// least topk of them). Lane r < topk returns round r's winner, packed, and its score; other lanes 0.
// Every lane returns the sum of the winners' scores in round order.
template <int kPerLane>
MOE_DEVICE MOE_FORCEINLINE void select_rounds(const float (&key)[kPerLane], const float (&score)[kPerLane], uint32_t avail,
                                              int topk, int lane, uint64_t& my_rank, float& my_score,
                                              float& selected_sum) {
  uint64_t rank[kPerLane];  // rank[j] packs slot j's (key, expert); 0 once taken or never available
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) rank[j] = (avail >> j & 1) ? pack_rank(key[j], lane + j * kGateLanes) : 0;
  my_rank = 0;
  my_score = 0.0f;
  selected_sum = 0.0f;
  for (int r = 0; r < topk; ++r) {
    uint64_t best = 0;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) best = rank[j] > best ? rank[j] : best;
    const uint64_t winner = group_argmax(best);
    float mine = 0.0f;  // the winner's score, on its owner lane; taken out of the running
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      if (rank[j] == winner) {
        mine = score[j];
        rank[j] = 0;
      }
    }
    const float w = shfl(mine, packed_index(winner) % kGateLanes, kGateLanes);
    selected_sum += w;  // round order, as on the CPU
    if (lane == r) {
      my_rank = winner;
      my_score = w;
    }
  }
}

// Gating of one token by one warp. `row` is the token's logits; `smem` is this token's grouped-top-k
// scratch, grouped_smem_bytes(E, G) (unused when num_expert_group == 1). Lane r < topk returns rank
// r's final weight and expert id.
template <typename T, int kPerLane>
MOE_DEVICE MOE_FORCEINLINE void gate_token(const T* __restrict__ row, const GatingParams& p, int lane, char* smem,
                                           float& out_weight, int& out_id) {
  float score[kPerLane], bias[kPerLane], key[kPerLane];
  uint32_t avail;  // bit j: slot j holds an expert that may still be chosen
  load_slots<T, kPerLane>(row, p, lane, score, bias, avail);
  if (p.scoring == ScoringFunc::kSoftmax) {
    float lane_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) lane_max = fmaxf(lane_max, score[j]);
    const float row_max = group_max(lane_max);
    float partial = 0.0f;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      score[j] = (avail >> j & 1) ? softmax_numerator(score[j], row_max) : 0.0f;
      partial += score[j];  // + 0 for empty slots: exact
    }
#pragma unroll
    for (int offset = kGateLanes / 2; offset > 0; offset /= 2) partial = partial + shfl_xor(partial, offset, kGateLanes);
    const float inv_denom = 1.0f / partial;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) score[j] = score[j] * inv_denom;
  } else {
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) score[j] = moe_sigmoidf(score[j]);
  }
  slot_keys(score, bias, avail, key);
  if (p.num_expert_group > 1) {
    GroupedScratch g(smem, p.num_experts, p.num_expert_group);
    stage_keys(key, avail, lane, g.key);
    sync_warp();
    pick_groups(p, lane, g.key, g.group, g.allowed);
    sync_warp();
    mask_to_groups<kPerLane>(p, lane, g.allowed, avail);
    sync_warp();  // the scratch may be reused by the caller
  }
  uint64_t my_rank;
  float my_score, selected_sum;
  select_rounds(key, score, avail, p.topk, lane, my_rank, my_score, selected_sum);
  out_weight = finalize_weight(my_score, selected_sum, p.renormalize, p.topk, p.routed_scaling_factor);
  out_id = packed_index(my_rank);
}

// One token per 32-lane group, kGroupsPerBlock groups per block.
constexpr int kGateGroupsPerBlock = 4;

template <typename T, int kPerLane>
__global__ void __launch_bounds__(kGateGroupsPerBlock* kGateLanes)
    topk_gating_kernel(const T* __restrict__ logits, int64_t row_stride, int num_tokens, GatingParams p,
                       float* __restrict__ weights, int32_t* __restrict__ ids) {
  extern __shared__ __align__(16) char gate_smem[];
  // A kernel queued behind this one with programmatic dependent launch (the expert GEMVs) may start
  // now and wait there for these results; kernels launched without it are unaffected.
  grid_dependents_launch();
  const int group = threadIdx.x / kGateLanes;
  const int lane = threadIdx.x % kGateLanes;
  const int t = blockIdx.x * kGateGroupsPerBlock + group;
  if (t >= num_tokens) return;  // a whole group leaves together
  char* smem = gate_smem + group * grouped_smem_bytes(p.num_experts, p.num_expert_group);
  float w;
  int id;
  gate_token<T, kPerLane>(logits + t * row_stride, p, lane, smem, w, id);
  if (lane < p.topk) {
    weights[int64_t(t) * p.topk + lane] = w;
    ids[int64_t(t) * p.topk + lane] = id;
  }
}

}  // namespace moe_ext
