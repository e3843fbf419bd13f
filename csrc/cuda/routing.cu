// Launchers for router top-k gating, block alignment and the fused decode routing (kernels in
// csrc/kernels/gating.cuh, align.cuh and fused_routing.cuh).
#include <algorithm>
#include <type_traits>

#include "../core/static_switch.h"
#include "../kernels/align.cuh"
#include "../kernels/fused_routing.cuh"
#include "../kernels/gating.cuh"
#include "dispatch.cuh"
#include "launchers.h"

namespace moe_ext::cuda {
namespace {

// Experts per lane: the smallest power of two with 32 * kPerLane >= E.
template <typename F>
cudaError_t dispatch_per_lane(int E, F&& f) {
  if (E <= 32) return f(std::integral_constant<int, 1>{});
  if (E <= 64) return f(std::integral_constant<int, 2>{});
  if (E <= 128) return f(std::integral_constant<int, 4>{});
  if (E <= 256) return f(std::integral_constant<int, 8>{});
  if (E <= 512) return f(std::integral_constant<int, 16>{});
  if (E <= kMaxExperts) return f(std::integral_constant<int, 32>{});
  return cudaErrorInvalidValue;
}

// The gating's path (gate_path, csrc/kernels/gating.cuh): each kernel instance holds one.
template <typename F>
cudaError_t dispatch_gate_path(const GatingParams& p, F&& f) {
  return dispatch_value<GatePath::kScore, GatePath::kLogit, GatePath::kLogitRenorm>(gate_path(p), f);
}

// The paths below the cooperative grid (align_coop_plan, further down) are the automatic choice where it does
// not take the size: under kAlignCoopAutoMinIds ids, above kAlignCoopAutoMaxExperts experts, or more blocks
// than multiprocessors. One block (one launch) up to this many ids. The single block ranks each id within its
// expert's run, which costs O(run length) per id: cheap at decode, not at a thousand tokens (see bench/NOTES.md).
constexpr int64_t kAlignSingleBlockMaxIds = 1024;

bool align_small_fits(int64_t numel, int E) {
  return numel <= kAlignSingleBlockMaxIds && align_small_smem_ints(E, static_cast<int>(numel)) <= kAlignSmemInts;
}

// Above that, one block ranking by token bit masks while they fit in shared memory (a limit every
// sm_80+ part grants a block), up to 1536 ids: on the H100 it beat the one-launch grid at 1032 and
// 1536 ids (4.9 against 5.4 us, 5.2 against 5.3 at E=128, top-8) and lost at 2040 and above (5.1
// against 5.8; 6.4 against 9.0 at 4096 ids, E=256; bench/NOTES.md, align v9).
constexpr int64_t kMaxBlockSmem = 160 * 1024;
constexpr int64_t kAlignRowsMaxIds = 4096;  // what it takes when forced
constexpr int64_t kAlignRowsAutoMaxIds = 1536;

bool align_rows_fits(int64_t num_tokens, int topk, int E) {
  const int64_t numel = num_tokens * topk;
  return numel <= kAlignRowsMaxIds && align_rows_smem_bytes(E, static_cast<int>(num_tokens), numel) <= kMaxBlockSmem;
}

// One launch over a grid in which every block counts all the ids and scatters its own chunk
// (moe_align_grid_kernel), about 32 ids a thread in that count; chosen up to 4096 ids. Above, the two
// launches: on the H100 they beat it at 8192 and 32768 ids (7.8 against 8.1 us, 12.9 against 13.9
// alone, 18.7 against 22.9 behind the router at E=256, top-8), the grid's every block counting
// every id.
constexpr int64_t kAlignGridMaxIds = 32768;  // what it takes when forced
constexpr int64_t kAlignGridAutoMaxIds = 4096;
constexpr int64_t kAlignGridIdsPerThread = 32;
constexpr int kAlignGridMinWarps = 8;

bool align_grid_fits(int64_t numel, int E) {
  return numel <= kAlignGridMaxIds && numel <= kAlignGridIdsPerThread * kWarpSize * align_grid_warps(E) &&
         align_grid_smem_ints(E, align_grid_warps(E)) <= kAlignSmemInts;
}

// A warp-round of the chunk per warp; warps enough for about 32 ids a thread in the count.
struct AlignGridShape {
  int warps, chunk, blocks;
};
AlignGridShape align_grid_shape(int64_t numel, int E) {
  const int cap = align_grid_warps(E);
  const int64_t want = (numel + kAlignGridIdsPerThread * kWarpSize - 1) / (kAlignGridIdsPerThread * kWarpSize);
  const int warps = static_cast<int>(std::clamp<int64_t>(want, std::min(kAlignGridMinWarps, cap), cap));
  const int chunk = warps * kWarpSize;
  return {warps, chunk, static_cast<int>((numel + chunk - 1) / chunk)};
}

// The two launches (count, place) take any size: at least 256 ids a chunk, and at most as many
// chunks as keep each place block's read of the [E, chunks] table to about 16K ints.
struct AlignChunks {
  int chunk, chunks;
};
AlignChunks align_two_launch_chunks(int64_t numel, int E) {
  const int64_t max_chunks = std::clamp<int64_t>(16384 / E, 8, 64);
  const int64_t chunks = std::clamp<int64_t>((numel + 255) / 256, 1, max_chunks);
  const int64_t chunk = std::max<int64_t>(1, (numel + chunks - 1) / chunks);
  return {static_cast<int>(chunk), static_cast<int>((numel + chunk - 1) / chunk)};
}

// The cooperative grid (moe_align_coop_kernel): whole tokens a block, a warp each, at most
// kAlignCoopMaxBlockIds ids a block (a block's count of one expert is a byte), every block resident at
// once (at most one a multiprocessor). Tokens a block: 4, doubled up to 16 while there are more than 32
// blocks; more only where the blocks would outnumber the multiprocessors. H200, graph replay
// (results/h200-routing-coop-s18b-e256-A.md, -e128-A.md, forced 4-24 tokens a block), the alignment
// alone at E=256 top-8: T=128 4 a block 3.48 us, 16 3.73, 24 4.17; T=256 8: 3.62, 4: 3.85; T=1024 16:
// 4.38, 8: 4.98, 24: 4.68, 31 (the first form's cap): 5.21; E=128 top-4 T=1024 16: 4.04, 8: 4.36.
// Blocks of 32 warps measured ~1 us slower than of 16 at any T, likely because a grid behind (PDL)
// cannot become resident beside them. Chosen from kAlignCoopAutoMinIds ids, where it beat the one-block
// paths (E=256 top-8 T=64: 3.48 against 3.83 us; E=128 top-4 T=128: 3.31 against 3.67; at 256 ids the
// one block won: 3.04 against 3.25), for E <= kAlignCoopAutoMaxExperts (above, a thread an expert makes
// every block 32 warps: not measured).
constexpr int64_t kAlignCoopAutoMinIds = 512;
constexpr int kAlignCoopAutoMaxExperts = 512;
constexpr int kAlignCoopMinTokens = 4, kAlignCoopMaxTokens = 16, kAlignCoopFewBlocks = 32;

AlignPlan align_coop_plan(int64_t num_tokens, int topk, int E, int num_sms, int coop_tokens) {
  if (topk < 1 || topk > kWarpSize || num_tokens < 1 || num_sms < 1) return {AlignPath::kCoop};
  const int cap = std::min(kWarpSize, kAlignCoopMaxBlockIds / topk);
  int tokens = coop_tokens;
  if (tokens <= 0) {
    tokens = kAlignCoopMinTokens;
    while (tokens < kAlignCoopMaxTokens && tokens * int64_t(kAlignCoopFewBlocks) < num_tokens) tokens *= 2;
    tokens = static_cast<int>(std::max<int64_t>(tokens, (num_tokens + num_sms - 1) / num_sms));
  }
  tokens = std::min(tokens, cap);
  const int64_t blocks = (num_tokens + tokens - 1) / tokens;
  if (blocks > num_sms || align_coop_smem_bytes(E, tokens, topk) > kAlignSmemInts * 4) return {AlignPath::kCoop};
  return {AlignPath::kCoop, tokens, static_cast<int>(blocks)};
}

AlignPlan auto_align_plan(int64_t num_tokens, int topk, int E, int num_sms, int coop_tokens) {
  const int64_t numel = num_tokens * topk;
  if (numel >= kAlignCoopAutoMinIds && E <= kAlignCoopAutoMaxExperts) {
    const AlignPlan coop = align_coop_plan(num_tokens, topk, E, num_sms, coop_tokens);
    if (coop.coop_blocks > 0) return coop;
  }
  if (align_small_fits(numel, E)) return {AlignPath::kSmall};
  if (numel <= kAlignRowsAutoMaxIds && align_rows_fits(num_tokens, topk, E)) return {AlignPath::kRows};
  if (numel <= kAlignGridAutoMaxIds && align_grid_fits(numel, E)) return {AlignPath::kGrid};
  return {AlignPath::kTwoLaunch};
}

// log2(n) for a power of two n, else -1 (the fused kernels' block_shift).
int log2_if_power_of_two(int n) { return n > 0 && (n & (n - 1)) == 0 ? __builtin_ctz(static_cast<unsigned>(n)) : -1; }

// The fused kernel (csrc/kernels/fused_routing.cuh).
cudaError_t fused_launch(DType dtype, const void* logits, int64_t row_stride, int num_tokens, const GatingParams& p,
                         int block_size, const int32_t* expert_map, int64_t max_padded, float* weights, int32_t* ids,
                         int32_t* sorted, int32_t* expert_ids, int32_t* num_post_padded, bool pdl,
                         cudaStream_t stream) {
  const int E = p.num_experts;
  const size_t smem = static_cast<size_t>(fused_smem_bytes(E, p.num_expert_group, num_tokens));
  const int block_shift = log2_if_power_of_two(block_size);
  const auto launch = [&](auto tag, auto per_lane, auto path, auto rounds) {
    using T = decltype(tag);
    constexpr auto kernel = fused_gating_align_kernel<T, decltype(per_lane)::value, decltype(path)::value,
                                                      decltype(rounds)::value>;
    if (const cudaError_t err = allow_dynamic_smem<kernel>(smem); err != cudaSuccess) return err;
    return launch_kernel(kernel, dim3(1), dim3(fused_threads(E, num_tokens)), smem, stream, pdl,
                         static_cast<const T*>(logits), row_stride, num_tokens, p, block_size, block_shift, expert_map,
                         static_cast<int>(max_padded), weights, ids, sorted, expert_ids, num_post_padded);
  };
  const FusedRounds rounds = fused_rounds(num_tokens, p.topk, p.num_expert_group);
  return dispatch_dtype(dtype, [&](auto tag) {
    return dispatch_per_lane(E, [&](auto per_lane) {
      return dispatch_gate_path(p, [&](auto path) {
        return dispatch_value<FusedRounds::kExact, FusedRounds::kPacked, FusedRounds::kLookahead>(
            rounds, [&](auto r) { return launch(tag, per_lane, path, r); });
      });
    });
  });
}

}  // namespace

// Tokens a block of the fused grid path by default. Its cost has two parts (H200, bench/NOTES.md):
// the gating, which slows as warps share a multiprocessor (at E=256 top-8 T=256: 4 or 8 tokens a
// block 6.2 us in all, 16 7.2, 32 10.6), and the grid barrier plus every block's read of the count
// table, which grow with the blocks (T=512: 8 a block, 64 blocks, 6.6 us; 4 a block, 128 blocks,
// 7.2). Measured best (results/h200-fused-grid-s12b.md, the three routings): 4 a block to 256
// tokens, 8 to 1024, 16 to 2048, 32 above. So: 4 tokens a block, doubled until at most 64 blocks
// hold the tokens (128 above 512 tokens), and never more blocks than multiprocessors.
constexpr int kFusedGridMinTokens = 4;
constexpr int kFusedGridFewBlocks = 64;
constexpr int kFusedGridFewBlocksMaxTokens = 512;

// The router's selection rounds with lookahead (select_rounds) up to this many blocks (16 tokens);
// H200, bench/fused_ab.cu: E=256 top-8 T=16 2.61 against 2.87 us, T=1 2.56 against 2.59, E=128
// top-4 1.69 against 1.76. Larger grids keep the rounds with fewer instructions.
constexpr int kGateLookaheadMaxBlocks = 4;

cudaError_t topk_gating(DType dtype, const void* logits, int64_t row_stride, int num_tokens, const GatingParams& p,
                        float* weights, int32_t* ids, bool pdl, cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  const int blocks = (num_tokens + kGateGroupsPerBlock - 1) / kGateGroupsPerBlock;
  const int smem =
      p.num_expert_group > 1 ? kGateGroupsPerBlock * grouped_smem_bytes(p.num_experts, p.num_expert_group) : 0;
  const bool lookahead = blocks <= kGateLookaheadMaxBlocks;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_per_lane(p.num_experts, [&](auto per_lane) {
      return dispatch_gate_path(p, [&](auto path) {
        return BOOL_SWITCH(lookahead, kLookahead, [&] {
          return launch_kernel(topk_gating_kernel<T, decltype(per_lane)::value, decltype(path)::value, kLookahead>,
                               dim3(blocks), dim3(kGateGroupsPerBlock * kGateLanes), smem, stream, pdl,
                               static_cast<const T*>(logits), row_stride, num_tokens, p, weights, ids);
        });
      });
    });
  });
}

AlignPlan moe_align_plan(int64_t num_tokens, int topk, int num_experts, int num_sms, int forced, int coop_tokens) {
  const int64_t numel = num_tokens * topk;
  const int E = num_experts;
  switch (static_cast<AlignPath>(forced)) {  // a forced path that cannot take the size: the automatic one
    case AlignPath::kSmall: if (align_small_fits(numel, E)) return {AlignPath::kSmall}; break;
    case AlignPath::kRows: if (align_rows_fits(num_tokens, topk, E)) return {AlignPath::kRows}; break;
    case AlignPath::kGrid: if (align_grid_fits(numel, E)) return {AlignPath::kGrid}; break;
    case AlignPath::kTwoLaunch: if (numel > 0) return {AlignPath::kTwoLaunch}; break;
    case AlignPath::kCoop: {
      const AlignPlan coop = align_coop_plan(num_tokens, topk, E, num_sms, coop_tokens);
      if (coop.coop_blocks > 0) return coop;
      break;
    }
    default: break;
  }
  return auto_align_plan(num_tokens, topk, E, num_sms, coop_tokens);
}

int64_t moe_align_workspace(int64_t num_tokens, int topk, int num_experts, const AlignPlan& plan) {
  if (plan.path != AlignPath::kTwoLaunch && plan.path != AlignPath::kCoop) return 0;
  const int64_t two = int64_t(align_table_stride(align_two_launch_chunks(num_tokens * topk, num_experts).chunks)) *
                      num_experts;
  if (plan.path == AlignPath::kTwoLaunch) return two;
  const int64_t coop_bytes = int64_t(grid_table_stride(plan.coop_blocks)) * num_experts;
  return std::max(two, (coop_bytes + 3) / 4);
}

cudaError_t moe_align(const int32_t* ids, int64_t num_tokens, int topk, int num_experts, int block_size,
                      const int32_t* expert_map, int64_t max_padded, int32_t* sorted, int32_t* expert_ids,
                      int32_t* num_post_padded, const AlignPlan& plan, int32_t* workspace, bool pdl,
                      cudaStream_t stream) {
  const int E = num_experts;
  const int64_t numel64 = num_tokens * topk;
  const int numel = static_cast<int>(numel64), padded = static_cast<int>(max_padded);
  switch (plan.path) {
    case AlignPath::kSmall: {
      const int threads = static_cast<int>(std::min<int64_t>(
          1024, std::max<int64_t>(128, ((std::max<int64_t>(numel64, E) + kWarpSize - 1) / kWarpSize) * kWarpSize)));
      const size_t smem = size_t(align_small_smem_ints(E, numel)) * sizeof(int);
      return launch_kernel(moe_align_small_kernel, dim3(1), dim3(threads), smem, stream, pdl, ids, numel, E,
                           block_size, expert_map, padded, sorted, expert_ids, num_post_padded);
    }
    case AlignPath::kRows: {
      const size_t smem = static_cast<size_t>(align_rows_smem_bytes(E, static_cast<int>(num_tokens), numel64));
      if (const cudaError_t err = allow_dynamic_smem<moe_align_rows_kernel>(smem); err != cudaSuccess) return err;
      return launch_kernel(moe_align_rows_kernel, dim3(1), dim3(1024), smem, stream, pdl, ids,
                           static_cast<int>(num_tokens), topk, E, block_size, expert_map, padded, sorted, expert_ids,
                           num_post_padded);
    }
    case AlignPath::kGrid: {
      const AlignGridShape g = align_grid_shape(numel64, E);
      const size_t smem = size_t(align_grid_smem_ints(E, g.warps)) * sizeof(int);
      return launch_kernel(moe_align_grid_kernel, dim3(g.blocks), dim3(g.warps * kWarpSize), smem, stream, pdl, ids,
                           numel, g.chunk, g.warps, E, block_size, expert_map, padded, sorted, expert_ids,
                           num_post_padded);
    }
    case AlignPath::kCoop: {
      const int threads = std::max(plan.coop_tokens, (E + kWarpSize - 1) / kWarpSize) * kWarpSize;
      const size_t smem = static_cast<size_t>(align_coop_smem_bytes(E, plan.coop_tokens, topk));
      const cudaError_t err = launch_kernel_ex(
          moe_align_coop_kernel, dim3(plan.coop_blocks), dim3(threads), smem, stream, pdl, /*cooperative=*/true, ids,
          static_cast<int>(num_tokens), topk, plan.coop_tokens, E, block_size, log2_if_power_of_two(block_size),
          expert_map, padded, reinterpret_cast<uint8_t*>(workspace), sorted, expert_ids, num_post_padded);
      if (err != cudaErrorCooperativeLaunchTooLarge) return err;
      (void)cudaGetLastError();  // not every block fits at once (a shared or partitioned GPU): two launches
      [[fallthrough]];
    }
    case AlignPath::kTwoLaunch: {
      const AlignChunks c = align_two_launch_chunks(numel64, E);
      const int count_threads =
          static_cast<int>(std::min<int64_t>(1024, (c.chunk + kWarpSize - 1) / kWarpSize * kWarpSize));
      if (const cudaError_t err = launch_kernel(moe_align_count_kernel, dim3(c.chunks), dim3(count_threads),
                                                2 * E * sizeof(int), stream, pdl, ids, numel, c.chunk, E, expert_map,
                                                workspace);
          err != cudaSuccess)
        return err;
      // A warp per 32 ids of the chunk (one match_any round each), 4 to align_place_warps(E): the
      // per-block work (the table, the scan, the fills) is spread over fewer warps than 32.
      const int warps = std::clamp((c.chunk + kWarpSize - 1) / kWarpSize, std::min(4, align_place_warps(E)),
                                   align_place_warps(E));
      return launch_kernel(moe_align_place_kernel, dim3(c.chunks), dim3(warps * kWarpSize),
                           size_t(align_place_smem_ints(E, warps)) * sizeof(int), stream, pdl, ids, numel, c.chunk, E,
                           block_size, expert_map, padded, static_cast<const int32_t*>(workspace), sorted, expert_ids,
                           num_post_padded);
    }
  }
  return cudaErrorInvalidValue;
}

int fused_routing_max_tokens() { return kFusedMaxTokens; }

FusedGridShape fused_grid_shape(int num_tokens, int num_sms, int tokens_per_block) {
  if (tokens_per_block <= 0) {  // a power of two from kFusedGridMinTokens up for the block count
    const int want_blocks = num_tokens <= kFusedGridFewBlocksMaxTokens ? kFusedGridFewBlocks : 2 * kFusedGridFewBlocks;
    tokens_per_block = kFusedGridMinTokens;
    while (tokens_per_block < kFusedMaxTokens && tokens_per_block * want_blocks < num_tokens) tokens_per_block *= 2;
    tokens_per_block = std::max(tokens_per_block, (num_tokens + num_sms - 1) / std::max(num_sms, 1));
  }
  tokens_per_block = std::min(tokens_per_block, kFusedMaxTokens);
  const int blocks = (num_tokens + tokens_per_block - 1) / tokens_per_block;
  return {tokens_per_block, num_tokens > 0 && blocks <= num_sms ? blocks : 0};
}

int64_t fused_grid_workspace_bytes(int num_experts, const FusedGridShape& g) {
  return int64_t(num_experts) * grid_table_stride(g.blocks);
}

cudaError_t fused_topk_align_grid(DType dtype, const void* logits, int64_t row_stride, int num_tokens,
                                  const GatingParams& p, int block_size, const int32_t* expert_map,
                                  int64_t max_padded, float* weights, int32_t* ids, int32_t* sorted,
                                  int32_t* expert_ids, int32_t* num_post_padded, const FusedGridShape& g,
                                  uint8_t* workspace, bool pdl, cudaStream_t stream) {
  if (g.blocks <= 0 || g.tokens_per_block > kFusedMaxTokens) return cudaErrorInvalidValue;
  const int E = p.num_experts;
  const size_t smem = static_cast<size_t>(fused_smem_bytes(E, p.num_expert_group, g.tokens_per_block));
  if (smem > kMaxBlockSmem) return cudaErrorInvalidValue;
  const int warps = std::max(g.tokens_per_block, (E + kWarpSize - 1) / kWarpSize);
  const int block_shift = log2_if_power_of_two(block_size);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_per_lane(E, [&](auto per_lane) {
      return dispatch_gate_path(p, [&](auto path) {
        constexpr auto kernel =
            fused_gating_align_grid_kernel<T, decltype(per_lane)::value, decltype(path)::value>;
        if (const cudaError_t err = allow_dynamic_smem<kernel>(smem); err != cudaSuccess) return err;
        return launch_kernel_ex(kernel, dim3(g.blocks), dim3(warps * kWarpSize), smem, stream, pdl,
                                /*cooperative=*/true, static_cast<const T*>(logits), row_stride, num_tokens,
                                g.tokens_per_block, p, block_size, block_shift, expert_map,
                                static_cast<int>(max_padded), workspace, weights, ids, sorted, expert_ids,
                                num_post_padded);
      });
    });
  });
}

cudaError_t fused_topk_align(DType dtype, const void* logits, int64_t row_stride, int num_tokens,
                             const GatingParams& p, int block_size, const int32_t* expert_map, int64_t max_padded,
                             float* weights, int32_t* ids, int32_t* sorted, int32_t* expert_ids,
                             int32_t* num_post_padded, bool pdl, cudaStream_t stream) {
  if (num_tokens > kFusedMaxTokens) return cudaErrorInvalidValue;
  if (fused_smem_bytes(p.num_experts, p.num_expert_group, num_tokens) > kMaxBlockSmem) {  // the two kernels
    if (const cudaError_t err = topk_gating(dtype, logits, row_stride, num_tokens, p, weights, ids, pdl, stream);
        err != cudaSuccess)
      return err;
    return moe_align(ids, num_tokens, p.topk, p.num_experts, block_size, expert_map, max_padded, sorted, expert_ids,
                     num_post_padded, moe_align_plan(num_tokens, p.topk, p.num_experts, 0, -1, 0), nullptr, pdl,
                     stream);  // at most 32 * 32 ids; num_sms 0 rules the cooperative grid (it needs a
                               // workspace) out: a single-launch path with none
  }
  return fused_launch(dtype, logits, row_stride, num_tokens, p, block_size, expert_map, max_padded, weights, ids,
                      sorted, expert_ids, num_post_padded, pdl, stream);
}

}  // namespace moe_ext::cuda
