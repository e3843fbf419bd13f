// Launchers for router top-k gating, block alignment and the fused decode routing (kernels in
// csrc/kernels/gating.cuh, align.cuh and fused_routing.cuh).
#include <algorithm>
#include <type_traits>

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

// One block (one launch) up to this many ids; the count / scan / scatter launches above. The
// single block ranks each id within its expert's run, which costs O(run length) per id: cheap at
// decode, not at a thousand tokens (see bench/NOTES.md).
constexpr int64_t kAlignSingleBlockMaxIds = 1024;

bool align_single_launch(int64_t numel, int E) {
  return numel <= kAlignSingleBlockMaxIds && align_small_smem_ints(E, static_cast<int>(numel)) <= kAlignSmemInts;
}

// Above that, one block ranking by token bit masks while they fit in shared memory (a limit every
// sm_80+ part grants a block), up to 4096 ids: on the H100 it beat the three launches at 2048 ids,
// tied at 4096 and lost at 8192 (15.9 against 11.5 us), its cost growing with the ids of one block.
constexpr int64_t kMaxBlockSmem = 160 * 1024;
constexpr int64_t kAlignRowsMaxIds = 4096;

bool align_rows_launch(int64_t num_tokens, int topk, int E) {
  const int64_t numel = num_tokens * topk;
  return numel <= kAlignRowsMaxIds &&
         align_rows_smem_bytes(E, static_cast<int>(num_tokens), numel) <= kMaxBlockSmem;
}

// Above that (or where the masks do not fit), up to 32768 ids: one launch over a grid in which
// every block counts all the ids and scatters its own chunk (moe_align_grid_kernel). Its blocks'
// counting grows with all the ids (an estimated 0.1 us per 1000 ids: one shared atomic and about
// a dozen instructions an id over 1024 threads), while the three launches' blocks read only their
// chunk, so they win again at some size. 32768 ids (T = 4096 at top-8; ~3 us of counting against
// 11.6 us for the three launches at 8192 ids) keeps well inside that guess; the crossover is to be
// measured (bench/NOTES.md, v8).
constexpr int64_t kAlignGridMaxIds = 32768;
constexpr int kAlignGridMaxBlocks = 64;  // at most about half the multiprocessors of an H100 or A100

bool align_grid_launch(int64_t numel, int E) {
  return numel <= kAlignGridMaxIds && align_grid_smem_ints(E, align_grid_warps(E)) <= kAlignSmemInts;
}

// Chunks of whole warp-rounds of every scatter warp (one round each where the grid allows).
struct AlignGridShape {
  int warps, chunk, blocks;
};
AlignGridShape align_grid_shape(int64_t numel, int E) {
  const int warps = align_grid_warps(E);
  const int64_t round = int64_t(warps) * kWarpSize;
  const int64_t chunk = round * ((numel + round * kAlignGridMaxBlocks - 1) / (round * kAlignGridMaxBlocks));
  return {warps, static_cast<int>(chunk), static_cast<int>((numel + chunk - 1) / chunk)};
}

// Ids per block on the multi-block path: about one chunk per multiprocessor, 256 to 4096 ids.
int align_chunk(int64_t numel) {
  const int64_t per_sm = (numel + 131) / 132;
  return static_cast<int>(std::min<int64_t>(kAlignMaxChunk, std::max<int64_t>(256, (per_sm + 255) / 256 * 256)));
}

// The fused kernel (csrc/kernels/fused_routing.cuh).
cudaError_t fused_launch(DType dtype, const void* logits, int64_t row_stride, int num_tokens, const GatingParams& p,
                         int block_size, const int32_t* expert_map, int64_t max_padded, float* weights, int32_t* ids,
                         int32_t* sorted, int32_t* expert_ids, int32_t* num_post_padded, cudaStream_t stream) {
  const int E = p.num_experts;
  const size_t smem = static_cast<size_t>(fused_smem_bytes(E, p.num_expert_group, num_tokens));
  const int block_shift = (block_size & (block_size - 1)) == 0 ? __builtin_ctz(static_cast<unsigned>(block_size)) : -1;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_per_lane(E, [&](auto per_lane) {
      constexpr auto kernel = fused_gating_align_kernel<T, decltype(per_lane)::value>;
      if (const cudaError_t err = allow_dynamic_smem<kernel>(smem); err != cudaSuccess) return err;
      kernel<<<1, fused_threads(E, num_tokens), smem, stream>>>(
          static_cast<const T*>(logits), row_stride, num_tokens, p, block_size, block_shift, expert_map,
          static_cast<int>(max_padded), weights, ids, sorted, expert_ids, num_post_padded);
      return cudaGetLastError();
    });
  });
}

}  // namespace

cudaError_t topk_gating(DType dtype, const void* logits, int64_t row_stride, int num_tokens, const GatingParams& p,
                        float* weights, int32_t* ids, cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  const int blocks = (num_tokens + kGateGroupsPerBlock - 1) / kGateGroupsPerBlock;
  const int smem = p.num_expert_group > 1 ? kGateGroupsPerBlock * grouped_smem_bytes(p.num_experts, p.num_expert_group) : 0;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_per_lane(p.num_experts, [&](auto per_lane) {
      topk_gating_kernel<T, decltype(per_lane)::value><<<blocks, kGateGroupsPerBlock * kGateLanes, smem, stream>>>(
          static_cast<const T*>(logits), row_stride, num_tokens, p, weights, ids);
      return cudaGetLastError();
    });
  });
}

int64_t moe_align_workspace(int64_t num_tokens, int topk, int num_experts) {
  const int64_t numel = num_tokens * topk;
  if (align_single_launch(numel, num_experts) || align_rows_launch(num_tokens, topk, num_experts) ||
      align_grid_launch(numel, num_experts))
    return 0;
  const int chunk = align_chunk(numel);
  return (numel + chunk - 1) / chunk * num_experts;
}

cudaError_t moe_align(const int32_t* ids, int64_t num_tokens, int topk, int num_experts, int block_size,
                      const int32_t* expert_map, int64_t max_padded, int32_t* sorted, int32_t* expert_ids,
                      int32_t* num_post_padded, int32_t* workspace, cudaStream_t stream) {
  const int E = num_experts;
  const int64_t numel = num_tokens * topk;
  const int warps = align_warps(E);  // multi-block scatter
  const int scratch = kWarpSize + 1;
  if (align_single_launch(numel, E)) {
    const int threads = static_cast<int>(std::min<int64_t>(
        1024, std::max<int64_t>(128, ((std::max<int64_t>(numel, E) + kWarpSize - 1) / kWarpSize) * kWarpSize)));
    const size_t smem = size_t(align_small_smem_ints(E, static_cast<int>(numel))) * sizeof(int);
    moe_align_small_kernel<<<1, threads, smem, stream>>>(ids, static_cast<int>(numel), E, block_size, expert_map,
                                                         static_cast<int>(max_padded), sorted, expert_ids,
                                                         num_post_padded);
    return cudaGetLastError();
  }
  if (align_rows_launch(num_tokens, topk, E)) {
    const size_t smem = static_cast<size_t>(align_rows_smem_bytes(E, static_cast<int>(num_tokens), numel));
    if (const cudaError_t err = allow_dynamic_smem<moe_align_rows_kernel>(smem); err != cudaSuccess) return err;
    moe_align_rows_kernel<<<1, 1024, smem, stream>>>(ids, static_cast<int>(num_tokens), topk, E, block_size, expert_map,
                                                     static_cast<int>(max_padded), sorted, expert_ids, num_post_padded);
    return cudaGetLastError();
  }
  if (align_grid_launch(numel, E)) {
    const AlignGridShape g = align_grid_shape(numel, E);
    const size_t smem = size_t(align_grid_smem_ints(E, g.warps)) * sizeof(int);
    moe_align_grid_kernel<<<g.blocks, kAlignGridThreads, smem, stream>>>(
        ids, static_cast<int>(numel), g.chunk, g.warps, E, block_size, expert_map, static_cast<int>(max_padded), sorted,
        expert_ids, num_post_padded);
    return cudaGetLastError();
  }
  const int chunk = align_chunk(numel);
  const int chunks = static_cast<int>((numel + chunk - 1) / chunk);
  const int scatter_warps = std::max(1, std::min(warps, chunk / 128));  // about 128 ids per warp
  moe_align_count_kernel<<<chunks, 1024, E * sizeof(int), stream>>>(ids, static_cast<int>(numel), chunk, E,
                                                                     expert_map, static_cast<int>(max_padded), sorted,
                                                                     workspace);
  moe_align_scan_kernel<<<1, kAlignScanThreads, (E + 1 + scratch) * sizeof(int), stream>>>(
      chunks, E, block_size, expert_map, static_cast<int>(max_padded), workspace, expert_ids, num_post_padded);
  moe_align_scatter_kernel<<<chunks, scatter_warps * kWarpSize, size_t(scatter_warps) * E * sizeof(int), stream>>>(
      ids, static_cast<int>(numel), chunk, E, expert_map, workspace, sorted);
  return cudaGetLastError();
}


int fused_routing_max_tokens() { return kFusedMaxTokens; }

cudaError_t fused_topk_align(DType dtype, const void* logits, int64_t row_stride, int num_tokens,
                             const GatingParams& p, int block_size, const int32_t* expert_map, int64_t max_padded,
                             float* weights, int32_t* ids, int32_t* sorted, int32_t* expert_ids,
                             int32_t* num_post_padded, cudaStream_t stream) {
  if (num_tokens > kFusedMaxTokens) return cudaErrorInvalidValue;
  if (fused_smem_bytes(p.num_experts, p.num_expert_group, num_tokens) > kMaxBlockSmem) {  // the two kernels
    if (const cudaError_t err = topk_gating(dtype, logits, row_stride, num_tokens, p, weights, ids, stream);
        err != cudaSuccess)
      return err;
    return moe_align(ids, num_tokens, p.topk, p.num_experts, block_size, expert_map, max_padded, sorted, expert_ids,
                     num_post_padded, nullptr, stream);  // at most 32 * 32 ids: the single-block path
  }
  return fused_launch(dtype, logits, row_stride, num_tokens, p, block_size, expert_map, max_padded, weights, ids,
                      sorted, expert_ids, num_post_padded, stream);
}

}  // namespace moe_ext::cuda
