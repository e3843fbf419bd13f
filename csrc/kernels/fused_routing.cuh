// Routing in one launch: top-k gating of T tokens and the block alignment of their T * topk ids, in
// one thread block for T <= kFusedMaxTokens (decode), or over a cooperative grid of such blocks with
// one grid barrier (fused_gating_align_grid_kernel, below) for up to kFusedMaxTokens a multiprocessor.
//
// Warp t gates token t with gate_token (the router kernel's code, so weights and ids are
// bit-identical to topk_gating). A token never picks an expert twice, so the alignment needs no
// sort: each expert's tokens form a bit mask (shared atomicOr of bit t), its count is the mask's
// popcount and token t's rank inside the expert's run is the popcount below bit t, which is
// moe_align_block_size's ascending flat-index order. One token needs none of that: one warp gates
// it and its topk lanes rank their experts among themselves by shuffles, with no shared memory and
// no barrier (H200, bench/fused_ab.cu: 0.04-0.06 us off at E=128 top-4 and DeepSeek-V3, none at E=256
// top-8, where the gating chain is the time). With no more tokens than block_size (decode),
// every hit expert's run is one block, so its offset is block_size times the hit experts below it:
// popcounts of a bit set over the experts, no scan, and after the gating the block writes only the
// ids and the hit experts' blocks, one barrier on (the sentinel fill comes before the gating; on the
// H100 the tail measured 0.2-0.3 us shorter than with the scan, bench/NOTES.md). Otherwise the block
// has a thread per expert, and the padded offsets are one warp scan plus one scan of the warp totals.
// Limits: T <= kFusedMaxTokens (one mask bit a token), E <= kMaxExperts (a thread per expert).
#pragma once

#include "align.cuh"
#include "gating.cuh"

namespace moe_ext {

// One bit of a lane mask per token, and a warp per token in a block of at most 1024 threads.
constexpr int kFusedMaxTokens = kWarpSize < 1024 / kWarpSize ? kWarpSize : 1024 / kWarpSize;
constexpr int kFusedMinWarps = 4;
// Packed selection rounds (select_rounds) up to this many tokens in the single block, without grouped
// top-k: H200, bench/fused_ab.cu, E=256 top-8: T=1-8 0.05-0.13 us faster, T=12 0.03 slower, T=16 0.19
// slower (16 warps share the issue slots); DeepSeek-V3 grouped T=1 no faster (0.0-0.07 slower); in
// the grid kernel (8-32 warps a multiprocessor) up to 0.9 us slower. At topk >= kSelectThresholdMinTopk
// the other instance's threshold selection is faster from 5 tokens (bench/fused_ab.cu, E=256 top-8: T=4
// 3.50 against 3.40 us, T=5 3.70 / 3.83, T=6 3.73 / 3.75, T=8 3.83 / 4.07), so packed rounds stop at 4.
// Below topk 8 the router's lookahead rounds beat the packed ones there (H200, bench/fused_ab.cu, session 21:
// E=128 top-4 T=1 / 4 / 8 1.99 / 2.00 / 2.21 against 2.11 / 2.13 / 2.35 us); at topk 8 they lose (E=256 top-8 T=1
// 2.66 against 2.38).
constexpr int kFusedPackedMaxTokens = 8;
constexpr int kFusedPackedMaxTokensTop8 = 4;
// The selection an instance of the single block runs (its template parameter): kExact passes each warp a
// threshold scratch (select_threshold at topk >= 8, exact rounds below), kPacked the packed rounds, kLookahead
// the router's lookahead rounds. A runtime choice inside one instance slowed the others (bench/NOTES.md).
enum class FusedRounds : int { kExact = 0, kPacked = 1, kLookahead = 2 };
MOE_HOST_DEVICE MOE_FORCEINLINE FusedRounds fused_rounds(int num_tokens, int topk, int num_expert_group) {
  if (num_expert_group > 1) return FusedRounds::kExact;
  if (topk >= kSelectThresholdMinTopk)
    return num_tokens <= kFusedPackedMaxTokensTop8 ? FusedRounds::kPacked : FusedRounds::kExact;
  return num_tokens <= kFusedPackedMaxTokens ? FusedRounds::kLookahead : FusedRounds::kExact;
}

// Alignment scratch: masks [E] lane masks | offsets [E] int | warp totals [kWarpSize] int, rounded
// to 16 bytes; then one grouped-top-k scratch per token (only when num_expert_group > 1).
MOE_HOST_DEVICE MOE_FORCEINLINE int fused_align_smem_bytes(int E) {
  return (E * int(sizeof(moe_lane_mask_t)) + (E + kWarpSize) * 4 + 15) / 16 * 16;
}
// That scratch in a kernel's dynamic shared memory (the grid kernel's offsets hold each expert's
// offset plus its ids in earlier blocks).
struct FusedSmemParts {
  moe_lane_mask_t* masks;  // [E]
  int* offsets;            // [E]
  int* warp_total;         // [kWarpSize]
  char* grouped;           // a fused_grouped_stride(E, G) slice a token
};
MOE_DEVICE MOE_FORCEINLINE FusedSmemParts fused_smem_parts(char* smem, int E) {
  moe_lane_mask_t* masks = reinterpret_cast<moe_lane_mask_t*>(smem);
  int* offsets = reinterpret_cast<int*>(masks + E);
  return {masks, offsets, offsets + E, smem + fused_align_smem_bytes(E)};
}
MOE_HOST_DEVICE MOE_FORCEINLINE int fused_grouped_stride(int E, int G) {
  return (grouped_smem_bytes(E, G) + 15) / 16 * 16;
}
MOE_HOST_DEVICE MOE_FORCEINLINE int fused_smem_bytes(int E, int G, int num_tokens) {
  return fused_align_smem_bytes(E) + (G > 1 ? num_tokens * fused_grouped_stride(E, G) : 0);
}

// Threads of the fused kernel: a warp per token and a thread per expert, at least kFusedMinWarps warps;
// one warp for one token.
MOE_HOST_DEVICE MOE_FORCEINLINE int fused_threads(int E, int num_tokens) {
  if (num_tokens == 1) return kWarpSize;
  const int warps = (E + kWarpSize - 1) / kWarpSize;
  const int w = warps > num_tokens ? warps : num_tokens;
  return (w > kFusedMinWarps ? w : kFusedMinWarps) * kWarpSize;
}

// Both kernels' gating step: warp `warp` of the block gates token t when it has one (warp-uniform),
// with its grouped top-k scratch in `grouped` (a fused_grouped_stride slice a warp), and its first
// topk lanes store their weight and id (`packed_rounds`: see select_rounds). Returns the lane's
// expert slot in the alignment's space (-1: no id here, or an expert the map leaves out).
template <typename T, int kPerLane, GatePath kPath, bool kLookahead = false>
MOE_DEVICE MOE_FORCEINLINE int gate_and_store(const T* __restrict__ logits, int64_t row_stride, bool has_token, int t,
                                              const GatingParams& p, int warp, int lane, char* grouped,
                                              const int32_t* __restrict__ expert_map, float* __restrict__ weights,
                                              int32_t* __restrict__ ids, bool packed_rounds,
                                              SelectScratch* select) {
  float w = 0.0f;
  int id = -1;
  if (has_token)
    gate_token<T, kPerLane, kPath, kLookahead>(
        logits + int64_t(t) * row_stride, p, lane,
        [&] { return grouped + warp * fused_grouped_stride(p.num_experts, p.num_expert_group); }, packed_rounds,
        select, w, id);
  const bool holds_id = has_token && lane < p.topk;
  if (holds_id) {
    weights[t * p.topk + lane] = w;
    ids[t * p.topk + lane] = id;
  }
  return holds_id ? align_slot_device(id, p.num_experts, expert_map) : -1;
}

// kRounds: the gating's selection (the launcher's choice, fused_rounds); an instance each, since a runtime
// choice in one instance slowed the exact rounds' path (DeepSeek-V3 grouped T=1 0.12 us, bench/fused_ab.cu).
template <typename T, int kPerLane, GatePath kPath, FusedRounds kRounds = FusedRounds::kExact>
__global__ void __launch_bounds__(1024) fused_gating_align_kernel(
    const T* __restrict__ logits,             // [num_tokens, E], rows row_stride apart
    int64_t row_stride, int num_tokens, GatingParams p,
    int block_size, int block_shift,          // block_shift = log2(block_size), or -1 if not a power of two
    const int32_t* __restrict__ expert_map,   // [E] int32 or null
    int max_padded,
    float* __restrict__ weights,              // [num_tokens, topk] fp32
    int32_t* __restrict__ ids,                // [num_tokens, topk] int32
    int32_t* __restrict__ sorted,             // [max_padded] int32
    int32_t* __restrict__ expert_ids,         // [max_padded / block_size] int32
    int32_t* __restrict__ num_post_padded) {  // [1] int32
  extern __shared__ __align__(16) char fused_smem[];
  __shared__ SelectScratch s_select[kFusedMaxTokens];  // a token's warp each
  const int E = p.num_experts, topk = p.topk;
  const auto [masks, offsets, warp_total, grouped] = fused_smem_parts(fused_smem, E);
  const int tid = threadIdx.x, warp = tid / kWarpSize, lane = lane_id();
  const int numel = num_tokens * topk;

  // A token never picks an expert twice, so with no more tokens than block_size every expert's run
  // fits one block: the run of expert s starts at block_size * (experts below s that were hit),
  // which a bit set over the experts (hit, in the offsets' space) gives with no scan. Block-uniform.
  const bool one_block_each = num_tokens <= block_size;
  uint32_t* hit = reinterpret_cast<uint32_t*>(offsets);  // [ceil(E / 32)] words, one_block_each only
  const int hit_words = (E + 31) / 32;

  const bool one_token = num_tokens == 1;  // one warp: the token's lanes rank their experts by shuffles
  grid_dependents_launch();  // programmatic dependent launch: see topk_gating_kernel
  if (!one_token) {
    if (tid < E) masks[tid] = 0;
    if (one_block_each && tid < hit_words) hit[tid] = 0;
  }
  grid_dependency_wait();
  if (!one_token) {
    for (int i = tid; i < max_padded; i += blockDim.x) sorted[i] = numel;  // sentinel; ids overwrite below
    __syncthreads();  // masks zeroed (every warp arrives before its gating work)
  }

  constexpr bool kExact = kRounds == FusedRounds::kExact;
  const int slot = gate_and_store<T, kPerLane, kPath, kRounds == FusedRounds::kLookahead>(
      logits, row_stride, warp < num_tokens, warp, p, warp, lane, grouped, expert_map, weights, ids,
      /*packed_rounds=*/kRounds == FusedRounds::kPacked, kExact ? &s_select[warp % kFusedMaxTokens] : nullptr);
  if (one_token) {  // each hit expert's run is one block, in slot order: the hit slots below its own
    if (warp > 0) return;
    int below = 0;
#pragma unroll 8
    for (int q = 0; q < topk; ++q) {  // independent shuffles, eight in flight
      const int s = shfl(slot, q);
      below += (s >= 0) & (s < slot);
    }
    const int hits = popcount(ballot(slot >= 0));
    for (int i = lane; i < max_padded; i += kWarpSize) sorted[i] = numel;  // sentinel
    for (int b = hits + lane; b < blocks_of(max_padded, block_size, block_shift); b += kWarpSize) expert_ids[b] = -1;
    sync_warp();  // the sentinels before the ids that overwrite some of them
    if (slot >= 0) {
      sorted[below * block_size] = lane;
      expert_ids[below] = expert_map ? expert_map[slot] : slot;
    }
    if (lane == 0) *num_post_padded = hits * block_size;
    return;
  }
  if (slot >= 0) {
    atomicOr(&masks[slot], lane_bit(warp));
    if (one_block_each) atomicOr(&hit[slot / 32], 1u << (slot % 32));
  }
  __syncthreads();  // masks complete

  if (one_block_each) {  // each id's lane writes it, the first token's lane its expert's block
    // Hit experts below this lane's slot, and in all: lane v holds hit word v (E <= 1024, so at most 32 words, one
    // a lane), a warp scan counts the hits up to each word, and a lane takes its slot's word by shuffles. A loop
    // over the words in every lane was ~90 instructions a warp at E=256 (ncu, T=16), the scan ~20.
    const uint32_t word = lane < hit_words ? hit[lane] : 0u;
    const int through = warp_inclusive_scan(__popc(word));  // hits in words 0..lane
    const int hits = shfl(through, hit_words - 1);
    const int w = slot >= 0 ? slot / 32 : 0;
    const int below = shfl(through, w) - __popc(shfl(word, w) >> (slot & 31));  // minus the word's bits >= slot's
    if (slot >= 0) {
      const int rank = popcount(masks[slot] & (lane_bit(warp) - 1));
      sorted[below * block_size + rank] = warp * topk + lane;
      if (rank == 0) expert_ids[below] = expert_map ? expert_map[slot] : slot;
    }
    for (int b = hits + tid; b < blocks_of(max_padded, block_size, block_shift); b += blockDim.x) expert_ids[b] = -1;
    if (tid == 0) *num_post_padded = hits * block_size;
    return;
  }

  // Thread s owns expert s: its padded count, scanned across the block (one warp scan, the warp totals).
  const int count = tid < E ? popcount(masks[tid]) : 0;
  const int padded = pad_to_blocks(count, block_size, block_shift);
  int total;
  const int offset = block_scan_one(padded, warp_total, total);
  if (tid < E) offsets[tid] = offset;
  if (tid == 0) *num_post_padded = total;
  if (tid < E && padded > 0) {  // this expert's blocks (one or two at decode)
    const int32_t e = expert_map ? expert_map[tid] : tid;
    const int b0 = blocks_of(offset, block_size, block_shift), b1 = blocks_of(offset + padded, block_size, block_shift);
    for (int b = b0; b < b1; ++b) expert_ids[b] = e;
  }
  for (int b = blocks_of(total, block_size, block_shift) + tid; b < blocks_of(max_padded, block_size, block_shift);
       b += blockDim.x)
    expert_ids[b] = -1;
  __syncthreads();  // offsets ready
  if (slot >= 0) sorted[offsets[slot] + popcount(masks[slot] & (lane_bit(warp) - 1))] = warp * topk + lane;
}

// Mid token counts: the same gating and ranking over a cooperative grid of blocks of at most
// kFusedMaxTokens tokens (a warp a token), and one grid barrier in place of the alignment's launches.
// Block b holds tokens [b * tokens_per_block, ...): a contiguous run of the flat ids, so an id's
// place is its expert's padded offset + the expert's ids in blocks before b + its rank inside b
// (the popcount of its expert's token mask below its own bit, as above). Each block's per-expert
// counts (at most kFusedMaxTokens: a byte) go through the byte table and the grid barrier of
// grid_place (align.cuh), which moe_align_coop_kernel shares. The sentinel fill of sorted comes
// before the barrier, so the ids written after it land over it. Limits:
// gridDim.x blocks all resident (the launcher caps it at the multiprocessor count: one block of at
// most 1024 threads, 64 registers a thread, fits each), blockDim.x >= E (a thread an expert) and >=
// a warp a token.
template <typename T, int kPerLane, GatePath kPath>
__global__ void __launch_bounds__(1024) fused_gating_align_grid_kernel(
    const T* __restrict__ logits,             // [num_tokens, E], rows row_stride apart
    int64_t row_stride, int num_tokens, int tokens_per_block, GatingParams p,
    int block_size, int block_shift,          // block_shift = log2(block_size), or -1 if not a power of two
    const int32_t* __restrict__ expert_map,   // [E] int32 or null
    int max_padded,
    uint8_t* __restrict__ table,              // E x grid_table_stride(gridDim.x) bytes, workspace
    float* __restrict__ weights,              // [num_tokens, topk] fp32
    int32_t* __restrict__ ids,                // [num_tokens, topk] int32
    int32_t* __restrict__ sorted,             // [max_padded] int32
    int32_t* __restrict__ expert_ids,         // [max_padded / block_size] int32
    int32_t* __restrict__ num_post_padded) {  // [1] int32
  extern __shared__ __align__(16) char fused_smem[];
  __shared__ SelectScratch s_select[kFusedMaxTokens];  // a token's warp each
  const int E = p.num_experts, topk = p.topk, b = blockIdx.x, nb = gridDim.x;
  const auto [masks, base, warp_total, grouped] = fused_smem_parts(fused_smem, E);  // base: the offsets
  const int tid = threadIdx.x, warp = tid / kWarpSize, lane = lane_id();
  const int numel = num_tokens * topk, t = b * tokens_per_block + warp;
  const int tokens = min(tokens_per_block, num_tokens - b * tokens_per_block);

  // Programmatic dependent launch: see kGridEarlyTriggerBlocks (align.cuh).
  if (nb <= kGridEarlyTriggerBlocks) grid_dependents_launch();
  if (tid < E) masks[tid] = 0;
  grid_dependency_wait();
  for (int i = b * blockDim.x + tid; i < max_padded; i += nb * blockDim.x) sorted[i] = numel;  // sentinel
  __syncthreads();  // masks zeroed

  const int slot =
      gate_and_store<T, kPerLane, kPath>(logits, row_stride, warp < tokens, t, p, warp, lane, grouped, expert_map,
                                         weights, ids, /*packed_rounds=*/false, &s_select[warp % kFusedMaxTokens]);
  if (slot >= 0) atomicOr(&masks[slot], lane_bit(warp));
  __syncthreads();  // masks complete
  const int count = tid < E ? popcount(masks[tid]) : 0;
  moe_lane_mask_t* const token_masks = masks;  // a lambda may not capture a structured binding before C++20
  const auto rank = [&] { return popcount(token_masks[slot] & (lane_bit(warp) - 1)); };
  grid_place(table, count, slot, rank, t * topk + lane, E, block_size, block_shift, expert_map, max_padded, base,
             warp_total, sorted, expert_ids, num_post_padded);
}

}  // namespace moe_ext
