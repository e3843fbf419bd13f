// Router top-k gating on the GPU: one 32-lane group (a warp on NVIDIA) per token.
//
// Lane l holds experts l, l + 32, l + 64, ... in registers (kPerLane of them, a template
// parameter: E <= 32 * kPerLane, other lanes' slots masked off), so the scores never leave
// registers. The math is gating_math.h's, in the same order as the CPU kernel: the softmax
// denominator is each lane's strided partial sum followed by an xor butterfly, which is exactly the
// CPU's kReduceLanes tree, so ids and weights are bit-identical to the CPU kernel's.
//
// Selection is topk rounds of a warp arg-max under ranks_before (key desc, index asc), done on
// (key, index) packed into one 64-bit integer so each butterfly step is two shuffles and a max. Grouped top-k stages the
// keys in shared memory, lets each lane score whole groups (sum of the group's two best keys) and
// picks topk_group groups by the same arg-max before the expert rounds.
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

// Shared memory of one token group for grouped top-k: keys [E] floats, then group scores [G]
// floats, then group flags [G] bytes.
MOE_HOST_DEVICE MOE_FORCEINLINE int grouped_smem_bytes(int E, int G) { return (E + G) * 4 + ((G + 3) / 4) * 4; }

// Gating of one token. `row` is the token's logits; `smem` is this group's grouped-top-k scratch
// (unused when num_expert_group == 1). Lane j < topk writes rank j's weight and id.
template <typename T, int kPerLane>
MOE_DEVICE MOE_FORCEINLINE void gate_token(const T* __restrict__ row, const GatingParams& p, int lane,
                                           char* smem, float* __restrict__ weights_out,
                                           int32_t* __restrict__ ids_out) {
  const int E = p.num_experts;
  float score[kPerLane];
  float key[kPerLane];
  uint32_t avail = 0;  // bit j: slot j holds an expert that may still be chosen

  // Every load is unconditional (clamped index) so all of them are in flight at once.
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int i = lane + j * kGateLanes;
    const float x = to_float(row[i < E ? i : E - 1]);
    score[j] = i < E ? sanitize_logit(x) : -INFINITY;
    avail |= (i < E ? 1u : 0u) << j;
  }
  float bias[kPerLane];
  if (p.bias) {
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int i = lane + j * kGateLanes;
      bias[j] = p.bias[i < E ? i : E - 1];
    }
  } else {
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) bias[j] = 0.0f;
  }

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
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) key[j] = (avail >> j & 1) ? selection_key(score[j], bias[j]) : -INFINITY;

  if (p.num_expert_group > 1) {
    const int G = p.num_expert_group;
    const int group_size = E / G;
    float* s_key = reinterpret_cast<float*>(smem);
    float* s_group = s_key + E;
    unsigned char* s_allowed = reinterpret_cast<unsigned char*>(s_group + G);
#pragma unroll
    for (int j = 0; j < kPerLane; ++j)
      if (avail >> j & 1) s_key[lane + j * kGateLanes] = key[j];
    for (int g = lane; g < G; g += kGateLanes) s_allowed[g] = 0;
    sync_warp();
    for (int g = lane; g < G; g += kGateLanes) {
      float top1 = -INFINITY, top2 = -INFINITY;
      for (int i = g * group_size; i < (g + 1) * group_size; ++i) {
        const float k = s_key[i];
        if (k > top1) {
          top2 = top1;
          top1 = k;
        } else if (k > top2) {
          top2 = k;
        }
      }
      s_group[g] = group_size >= 2 ? top1 + top2 : top1;
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
    sync_warp();
#pragma unroll
    for (int j = 0; j < kPerLane; ++j)
      if ((avail >> j & 1) && !s_allowed[(lane + j * kGateLanes) / group_size]) avail &= ~(1u << j);
    sync_warp();  // the scratch may be reused by the caller
  }

  // Expert rounds. rank[j] packs slot j's (key, expert); 0 once taken or never available.
  uint64_t rank[kPerLane];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) rank[j] = (avail >> j & 1) ? pack_rank(key[j], lane + j * kGateLanes) : 0;
  float my_weight = 0.0f, selected_sum = 0.0f;
  int my_id = 0;
  for (int r = 0; r < p.topk; ++r) {
    uint64_t best = 0;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) best = rank[j] > best ? rank[j] : best;
    const uint64_t winner = group_argmax(best);
    const int widx = packed_index(winner);
    float mine = 0.0f;  // the winner's score, on its owner lane; taken out of the running
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      if (rank[j] == winner) {
        mine = score[j];
        rank[j] = 0;
      }
    }
    const float w = shfl(mine, widx % kGateLanes, kGateLanes);
    selected_sum += w;  // rank order, as on the CPU
    if (lane == r) {
      my_weight = w;
      my_id = widx;
    }
  }
  if (lane < p.topk) {
    weights_out[lane] = finalize_weight(my_weight, selected_sum, p.renormalize, p.topk, p.routed_scaling_factor);
    ids_out[lane] = my_id;
  }
}

// One token per 32-lane group, kGroupsPerBlock groups per block.
constexpr int kGateGroupsPerBlock = 4;

template <typename T, int kPerLane>
__global__ void __launch_bounds__(kGateGroupsPerBlock* kGateLanes)
    topk_gating_kernel(const T* __restrict__ logits, int64_t row_stride, int num_tokens, GatingParams p,
                       float* __restrict__ weights, int32_t* __restrict__ ids) {
  extern __shared__ __align__(16) char gate_smem[];
  const int group = threadIdx.x / kGateLanes;
  const int lane = threadIdx.x % kGateLanes;
  const int t = blockIdx.x * kGateGroupsPerBlock + group;
  if (t >= num_tokens) return;  // a whole group leaves together
  char* smem = gate_smem + group * grouped_smem_bytes(p.num_experts, p.num_expert_group);
  gate_token<T, kPerLane>(logits + t * row_stride, p, lane, smem, weights + int64_t(t) * p.topk,
                          ids + int64_t(t) * p.topk);
}

}  // namespace moe_ext
