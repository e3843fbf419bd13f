// Torch-free CUDA launchers: raw pointers, sizes and a stream in, an error code out. Compiled by
// nvcc in csrc/cuda/*.cu; called by the g++-compiled adapters in csrc/cuda/*_cuda.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../kernels/dtype.h"

namespace moe_ext::cuda {

// x: [rows, 2 * d]; out: [rows, d]; both of `dtype`, contiguous. pdl: launch with programmatic
// dependent launch (sm_90+; the kernel waits for the one ahead of it before its first load).
cudaError_t silu_and_mul(DType dtype, const void* x, void* out, int64_t rows, int64_t d, int num_sms, bool pdl,
                         cudaStream_t stream);

// x: [num_tokens, topk, h]; weights: [num_tokens, topk] fp32 or null; out: [num_tokens, h]. pdl: as above.
cudaError_t moe_combine(DType dtype, const void* x, const float* weights, void* out, int64_t num_tokens,
                        int topk, int64_t h, int num_sms, bool pdl, cudaStream_t stream);

}  // namespace moe_ext::cuda

#include "../kernels/routing_host.h"

namespace moe_ext::cuda {

// Every routing launcher takes `pdl`: launch with programmatic dependent launch (sm_90+; the
// kernels wait for the one ahead of them before touching global memory, and let the one behind
// them launch at once).

// logits: [num_tokens, E] rows `row_stride` elements apart; weights/ids: [num_tokens, topk].
// p.bias, if set, is a device pointer [E] fp32.
cudaError_t topk_gating(DType dtype, const void* logits, int64_t row_stride, int num_tokens, const GatingParams& p,
                        float* weights, int32_t* ids, bool pdl, cudaStream_t stream);

// How moe_align places the ids (csrc/kernels/align.cuh): one block ranking within runs, one block
// ranking by token masks, one launch over a grid, two launches (count, place) for any size, or one
// cooperative launch over a grid of blocks of whole tokens with one grid barrier.
enum class AlignPath : int { kSmall = 0, kRows = 1, kGrid = 2, kTwoLaunch = 3, kCoop = 4 };
constexpr int kAlignPaths = 5;

struct AlignPlan {
  AlignPath path;
  int coop_tokens = 0, coop_blocks = 0;  // kCoop: tokens a block, and blocks
};

// The plan for [num_tokens, topk] ids on a device of num_sms multiprocessors: `forced` (an AlignPath
// value) where it takes the size, else the automatic choice (forced = -1); coop_tokens > 0 sets the
// cooperative path's tokens a block (capped at what it takes), 0 leaves it automatic.
AlignPlan moe_align_plan(int64_t num_tokens, int topk, int num_experts, int num_sms, int forced, int coop_tokens);

// Int32 workspace elements moe_align needs for `plan` (0 on the paths that need none; the cooperative
// path's also holds the two launches' table, which it falls back to when its grid cannot be resident).
int64_t moe_align_workspace(int64_t num_tokens, int topk, int num_experts, const AlignPlan& plan);

// ids: [num_tokens, topk] int32; expert_map: [E] int32 or null; sorted: [max_padded]; expert_ids:
// [max_padded / block_size]; num_post_padded: [1]; workspace: moe_align_workspace(...) ints.
cudaError_t moe_align(const int32_t* ids, int64_t num_tokens, int topk, int num_experts, int block_size,
                      const int32_t* expert_map, int64_t max_padded, int32_t* sorted, int32_t* expert_ids,
                      int32_t* num_post_padded, const AlignPlan& plan, int32_t* workspace, bool pdl,
                      cudaStream_t stream);

// Most tokens fused_topk_align takes in its single launch.
int fused_routing_max_tokens();

// Gating and alignment of num_tokens <= fused_routing_max_tokens() tokens in one launch: the
// outputs of topk_gating followed by moe_align on its ids, bit for bit.
cudaError_t fused_topk_align(DType dtype, const void* logits, int64_t row_stride, int num_tokens,
                             const GatingParams& p, int block_size, const int32_t* expert_map, int64_t max_padded,
                             float* weights, int32_t* ids, int32_t* sorted, int32_t* expert_ids,
                             int32_t* num_post_padded, bool pdl, cudaStream_t stream);

// The cooperative grid path of fused_topk_align (fused_gating_align_grid_kernel): tokens_per_block
// tokens a block (at most fused_routing_max_tokens()), every block resident at once.
struct FusedGridShape {
  int tokens_per_block, blocks;  // blocks == 0: the path cannot take the tokens
};

// The shape for num_tokens on a device of num_sms multiprocessors: tokens_per_block as given, or
// the automatic choice for 0; at most num_sms blocks.
FusedGridShape fused_grid_shape(int num_tokens, int num_sms, int tokens_per_block);

// Workspace bytes of the grid path (the per-block counts).
int64_t fused_grid_workspace_bytes(int num_experts, const FusedGridShape& g);

// The outputs of fused_topk_align over the grid g; cudaErrorCooperativeLaunchTooLarge when the
// device cannot hold every block at once (other work, a partitioned GPU): nothing is launched then.
cudaError_t fused_topk_align_grid(DType dtype, const void* logits, int64_t row_stride, int num_tokens,
                                  const GatingParams& p, int block_size, const int32_t* expert_map,
                                  int64_t max_padded, float* weights, int32_t* ids, int32_t* sorted,
                                  int32_t* expert_ids, int32_t* num_post_padded, const FusedGridShape& g,
                                  uint8_t* workspace, bool pdl, cudaStream_t stream);

}  // namespace moe_ext::cuda
