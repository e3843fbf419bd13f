// Decode routing in one launch: top-k gating of T <= kFusedMaxTokens tokens and the block
// alignment of their T * topk ids, in one thread block.
//
// Gating: W warps per token (W = 1..8, as many as the block's 1024 threads allow), each holding
// kPerLane experts per lane, so a token's dependent chain is W times shorter than one warp's. The
// softmax maximum and denominator cross the warps through shared memory; the denominator is summed
// in exactly the single-warp order (lane-strided partial sums, then the xor butterfly), so weights
// stay bit-identical to topk_gating. Each warp takes its own top-k by warp arg-max rounds
// (gating.cuh); a candidate's global rank is its rank in its warp plus, for every other warp, the
// number of that warp's candidates above it (binary search of its sorted list).
// Alignment: a token never picks an expert twice, so no sort is needed: each expert's tokens form a
// bit mask (shared atomicOr of bit t), its count is the mask's popcount and token t's rank inside
// the expert's run is the popcount below bit t, which is moe_align_block_size's ascending flat-index
// order. One block scan over E gives the padded offsets.
// With no alignment outputs the kernel is the router alone (topk_gating at decode).
// Limits: T <= kFusedMaxTokens (one mask bit a token); the scratch must fit in shared memory (the
// launcher checks and otherwise runs the two kernels).
#pragma once

#include "align.cuh"
#include "gating.cuh"

namespace moe_ext {

// One bit of a lane mask per token, and at least one warp per token in a block of 1024 threads.
constexpr int kFusedMaxTokens = kWarpSize < 1024 / kWarpSize ? kWarpSize : 1024 / kWarpSize;
constexpr int kFusedMaxWarpsPerToken = 8;
constexpr int kFusedMinWarps = 4;

// Shared-memory layout of one token's gating scratch (byte offsets, 8-aligned); `bytes` is the
// token's stride.
struct FusedTokenLayout {
  int num, key, warp_max, cand, cand_score, final_rank, final_score, group, allowed, bytes;
  MOE_HOST_DEVICE FusedTokenLayout(int E, int G, int W, int topk) {
    int o = 0;
    auto take = [&o](int n) { const int at = o; o += (n + 7) / 8 * 8; return at; };
    num = take(W > 1 ? E * 4 : 0);             // softmax numerators [E] (several warps)
    key = take(G > 1 ? E * 4 : 0);             // keys [E] (grouped top-k)
    warp_max = take(W * 4);                    // each warp's logit maximum [W]
    cand = take(W > 1 ? W * topk * 8 : 0);     // each warp's winners, packed [W, topk]
    cand_score = take(W > 1 ? W * topk * 4 : 0);
    final_rank = take(W > 1 ? topk * 8 : 0);   // the token's winners in rank order [topk]
    final_score = take(W > 1 ? topk * 4 : 0);
    group = take(G > 1 ? G * 4 : 0);           // group scores [G]
    allowed = take(G > 1 ? G : 0);             // chosen groups [G]
    bytes = (o + 15) / 16 * 16;
  }
};

// Alignment scratch first: masks [E] lane masks | offsets [E + 1] int | scan scratch [kWarpSize + 1]
// int, rounded to 16 bytes; then the tokens' gating scratch.
MOE_HOST_DEVICE MOE_FORCEINLINE int fused_align_smem_bytes(int E) {
  return (E * int(sizeof(moe_lane_mask_t)) + (E + kWarpSize + 2) * 4 + 15) / 16 * 16;
}
MOE_HOST_DEVICE MOE_FORCEINLINE int fused_smem_bytes(int E, int G, int W, int topk, int num_tokens) {
  return fused_align_smem_bytes(E) + num_tokens * FusedTokenLayout(E, G, W, topk).bytes;
}

// Candidates of a descending list (zeros past its end) that rank above x.
MOE_DEVICE MOE_FORCEINLINE int count_above(const uint64_t* list, int n, uint64_t x) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (list[mid] > x) lo = mid + 1; else hi = mid;
  }
  return lo;
}

template <typename T, int kPerLane>
__global__ void __launch_bounds__(kFusedMaxTokens* kWarpSize) fused_gating_align_kernel(
    const T* __restrict__ logits,             // [num_tokens, E], rows row_stride apart
    int64_t row_stride, int num_tokens, GatingParams p,
    int warps_per_token,                      // W: a power of two, 32 * kPerLane * W >= E
    int block_size,
    const int32_t* __restrict__ expert_map,   // [E] int32 or null
    int max_padded,
    float* __restrict__ weights,              // [num_tokens, topk] fp32
    int32_t* __restrict__ ids,                // [num_tokens, topk] int32
    int32_t* __restrict__ sorted,             // [max_padded] int32, or null: gating only
    int32_t* __restrict__ expert_ids,         // [max_padded / block_size] int32
    int32_t* __restrict__ num_post_padded) {  // [1] int32
  extern __shared__ __align__(16) char fused_smem[];
  const int E = p.num_experts, topk = p.topk, W = warps_per_token;
  moe_lane_mask_t* masks = reinterpret_cast<moe_lane_mask_t*>(fused_smem);
  int* offsets = reinterpret_cast<int*>(masks + E);
  int* scratch = offsets + E + 1;
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int warp = tid / kWarpSize, lane = lane_id();
  const int t = warp / W, u = warp % W, row0 = u * kPerLane;  // token, its warp, the warp's first slot row
  const bool active = t < num_tokens;
  const FusedTokenLayout lay(E, p.num_expert_group, W, topk);
  char* mine = fused_smem + fused_align_smem_bytes(E) + (active ? t : 0) * lay.bytes;
  const int numel = num_tokens * topk;

  for (int s = tid; s < E; s += nthreads) masks[s] = 0;
  for (int i = tid; i < max_padded; i += nthreads) sorted[i] = numel;  // sentinel; ids overwrite below

  // Scores and keys of this warp's slots (inactive warps: nothing available).
  float score[kPerLane], bias[kPerLane], key[kPerLane];
  uint32_t avail = 0;
  if (active) {
    load_slots<T, kPerLane>(logits + t * row_stride, p, lane, row0, score, bias, avail);
  } else {
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) score[j] = bias[j] = -INFINITY;
  }
  if (p.scoring == ScoringFunc::kSoftmax) {
    float* warp_max = reinterpret_cast<float*>(mine + lay.warp_max);
    float lane_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) lane_max = fmaxf(lane_max, score[j]);
    float row_max = group_max(lane_max);
    if (W > 1) {
      if (active && lane == 0) warp_max[u] = row_max;
      __syncthreads();
      for (int v = 0; v < W; ++v) row_max = fmaxf(row_max, active ? warp_max[v] : -INFINITY);
    }
    float partial = 0.0f;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) score[j] = (avail >> j & 1) ? softmax_numerator(score[j], row_max) : 0.0f;
    if (W == 1) {
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) partial += score[j];  // + 0 for empty slots: exact
    } else {  // the same sum, in the same order, over every warp's numerators
      float* num = reinterpret_cast<float*>(mine + lay.num);
#pragma unroll
      for (int j = 0; j < kPerLane; ++j)
        if (avail >> j & 1) num[lane + (row0 + j) * kGateLanes] = score[j];
      __syncthreads();
      if (active)
        for (int i = lane; i < E; i += kGateLanes) partial += num[i];
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
    float* s_key = reinterpret_cast<float*>(mine + lay.key);
    if (active) stage_keys(key, avail, lane, row0, s_key);
    __syncthreads();
    if (active && u == 0)
      pick_groups(p, lane, s_key, reinterpret_cast<float*>(mine + lay.group),
                  reinterpret_cast<unsigned char*>(mine + lay.allowed));
    __syncthreads();
    if (active) mask_to_groups<kPerLane>(p, lane, row0, reinterpret_cast<unsigned char*>(mine + lay.allowed), avail);
  }
  uint64_t my_rank;
  float my_score, selected_sum;
  select_rounds(key, score, avail, topk, lane, row0, my_rank, my_score, selected_sum);
  if (W > 1) {  // merge the W warps' winners
    uint64_t* cand = reinterpret_cast<uint64_t*>(mine + lay.cand);
    float* cand_score = reinterpret_cast<float*>(mine + lay.cand_score);
    uint64_t* final_rank = reinterpret_cast<uint64_t*>(mine + lay.final_rank);
    float* final_score = reinterpret_cast<float*>(mine + lay.final_score);
    if (active && lane < topk) {
      cand[u * topk + lane] = my_rank;
      cand_score[u * topk + lane] = my_score;
    }
    __syncthreads();
    if (active && lane < topk && my_rank != 0) {
      int rank = lane;
      for (int v = 0; v < W; ++v)
        if (v != u) rank += count_above(cand + v * topk, topk, my_rank);
      if (rank < topk) {
        final_rank[rank] = my_rank;
        final_score[rank] = my_score;
      }
    }
    __syncthreads();
    my_rank = active && lane < topk ? final_rank[lane] : 0;
    my_score = active && lane < topk ? final_score[lane] : 0.0f;
    selected_sum = 0.0f;
    for (int r = 0; r < topk; ++r) selected_sum += shfl(my_score, r, kGateLanes);  // rank order, as on the CPU
  }
  const bool holds_id = active && u == 0 && lane < topk;
  const int id = packed_index(my_rank);
  if (holds_id) {
    weights[t * topk + lane] = finalize_weight(my_score, selected_sum, p.renormalize, topk, p.routed_scaling_factor);
    ids[t * topk + lane] = id;
  }

  if (sorted == nullptr) return;  // gating only (block-uniform)

  const int slot = holds_id ? align_slot_device(id, E, expert_map) : -1;
  __syncthreads();  // masks zeroed
  if (slot >= 0) atomicOr(&masks[slot], lane_bit(t));
  __syncthreads();  // masks complete
  for (int s = tid; s < E; s += nthreads) offsets[s] = (popcount(masks[s]) + block_size - 1) / block_size * block_size;
  __syncthreads();  // padded counts ready
  const int total = block_exclusive_scan(offsets, E, scratch);  // ends with a barrier
  if (tid == 0) *num_post_padded = total;
  if (slot >= 0) sorted[offsets[slot] + popcount(masks[slot] & (lane_bit(t) - 1))] = t * topk + lane;
  write_expert_blocks(offsets, total, E, block_size, max_padded / block_size, expert_map, expert_ids);
}

}  // namespace moe_ext
