// Decode routing in one launch: top-k gating of T <= kFusedMaxTokens tokens and the block
// alignment of their T * topk ids, in one thread block.
//
// Warp t gates token t (gate_token, the router kernel's code, so weights and ids are bit-identical
// to topk_gating). A token never picks an expert twice, so the alignment needs no sort: each
// expert's tokens form a bit mask (shared atomicOr of bit t), its count is the mask's popcount and
// token t's rank inside the expert's run is the popcount of the mask below bit t, which is the
// ascending-flat-index order of moe_align_block_size. One block scan over E gives the padded
// offsets. Four barriers in all: masks zeroed, masks complete, counts ready, offsets ready.
// Limits: T <= kFusedMaxTokens (one mask bit a token); E <= kMaxExperts; the block holds max(T, 4) warps.
#pragma once

#include "align.cuh"
#include "gating.cuh"

namespace moe_ext {

// One bit of a lane mask per token, and one warp per token in a block of at most 1024 threads.
constexpr int kFusedMaxTokens = kWarpSize < 1024 / kWarpSize ? kWarpSize : 1024 / kWarpSize;
constexpr int kFusedMinWarps = 4;

// Shared memory: masks [E] lane masks | offsets [E + 1] int | scan scratch [kWarpSize + 1] int,
// rounded to 16 bytes | grouped-top-k scratch, one per token (only when num_expert_group > 1).
MOE_HOST_DEVICE MOE_FORCEINLINE int fused_align_smem_bytes(int E) {
  return (E * int(sizeof(moe_lane_mask_t)) + (E + kWarpSize + 2) * 4 + 15) / 16 * 16;
}
MOE_HOST_DEVICE MOE_FORCEINLINE int fused_smem_bytes(int E, int G, int num_tokens) {
  return fused_align_smem_bytes(E) + (G > 1 ? num_tokens * grouped_smem_bytes(E, G) : 0);
}

template <typename T, int kPerLane>
__global__ void __launch_bounds__(kFusedMaxTokens* kWarpSize) fused_gating_align_kernel(
    const T* __restrict__ logits,             // [num_tokens, E], rows row_stride apart
    int64_t row_stride, int num_tokens, GatingParams p, int block_size,
    const int32_t* __restrict__ expert_map,   // [E] int32 or null
    int max_padded,
    float* __restrict__ weights,              // [num_tokens, topk] fp32
    int32_t* __restrict__ ids,                // [num_tokens, topk] int32
    int32_t* __restrict__ sorted,             // [max_padded] int32
    int32_t* __restrict__ expert_ids,         // [max_padded / block_size] int32
    int32_t* __restrict__ num_post_padded) {  // [1] int32
  extern __shared__ __align__(16) char fused_smem[];
  const int E = p.num_experts, topk = p.topk;
  moe_lane_mask_t* masks = reinterpret_cast<moe_lane_mask_t*>(fused_smem);
  int* offsets = reinterpret_cast<int*>(masks + E);
  int* scratch = offsets + E + 1;
  char* grouped = fused_smem + fused_align_smem_bytes(E);
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int warp = tid / kWarpSize, lane = lane_id();
  const int numel = num_tokens * topk;

  for (int s = tid; s < E; s += nthreads) masks[s] = 0;
  for (int i = tid; i < max_padded; i += nthreads) sorted[i] = numel;  // sentinel; ids overwrite below

  const bool holds_id = warp < num_tokens && lane < topk;
  float w = 0.0f;
  int id = -1;
  if (warp < num_tokens)  // warp-uniform
    gate_token<T, kPerLane>(logits + warp * row_stride, p, lane, grouped + warp * grouped_smem_bytes(E, p.num_expert_group),
                            w, id);
  if (holds_id) {
    weights[warp * topk + lane] = w;
    ids[warp * topk + lane] = id;
  }
  const int slot = holds_id ? align_slot_device(id, E, expert_map) : -1;
  __syncthreads();  // masks zeroed
  if (slot >= 0) atomicOr(&masks[slot], lane_bit(warp));
  __syncthreads();  // masks complete
  for (int s = tid; s < E; s += nthreads) offsets[s] = (popcount(masks[s]) + block_size - 1) / block_size * block_size;
  __syncthreads();  // padded counts ready
  const int total = block_exclusive_scan(offsets, E, scratch);  // ends with a barrier
  if (tid == 0) *num_post_padded = total;
  if (slot >= 0) sorted[offsets[slot] + popcount(masks[slot] & (lane_bit(warp) - 1))] = warp * topk + lane;
  write_expert_blocks(offsets, total, E, block_size, max_padded / block_size, expert_map, expert_ids);
}

}  // namespace moe_ext
