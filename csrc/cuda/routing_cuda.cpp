// CUDA adapters for router top-k gating, block alignment and the fused pair (one block up to
// fused_single_max_tokens(G), a cooperative grid up to fused_routing_max_tokens() tokens a
// multiprocessor, the two kernels in turn above): validate, allocate through PyTorch, launch on the
// current stream under a device guard. Nothing here synchronizes with the host.
// Environment, read on every call (for A/B timing in one process):
//   MOE_EXT_PDL                "0": launch without programmatic dependent launch (sm_90+ uses it).
//   MOE_EXT_ALIGN_PATH         0-4: force moe_align's path (cuda::AlignPath) where it takes the size.
//   MOE_EXT_ALIGN_COOP_TOKENS  1-32: tokens a block on moe_align's cooperative path (capped at 255 ids).
//   MOE_EXT_FUSED_PATH         0-2: force fused_topk_align's path (FusedPath) where it takes the size.
//   MOE_EXT_FUSED_GRID_TOKENS  1-32: tokens a block on fused_topk_align's grid path.
#include <algorithm>
#include <utility>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../core/validate.h"
#include "adapter_utils.h"
#include "launchers.h"

namespace moe_ext {
namespace {

GatingParams with_bias(GatingParams p, const std::optional<at::Tensor>& correction_bias) {
  if (correction_bias.has_value()) p.bias = correction_bias->const_data_ptr<float>();
  return p;
}

std::tuple<at::Tensor, at::Tensor> gating_outputs(const at::Tensor& logits, int64_t topk) {
  const int64_t T = logits.size(0);
  return {at::empty({T, topk}, logits.options().dtype(at::kFloat)),  // weights [T, topk] fp32
          at::empty({T, topk}, logits.options().dtype(at::kInt))};   // ids [T, topk] int32
}

std::tuple<at::Tensor, at::Tensor> gating_launch(const at::Tensor& logits, int64_t topk, const GatingParams& p,
                                                 const std::optional<at::Tensor>& correction_bias) {
  auto [weights, ids] = gating_outputs(logits, topk);
  C10_CUDA_CHECK(cuda::topk_gating(to_dtype(logits.scalar_type()), logits.const_data_ptr(), logits.stride(0),
                                   static_cast<int>(logits.size(0)), with_bias(p, correction_bias),
                                   weights.data_ptr<float>(), ids.data_ptr<int32_t>(), use_pdl(logits.device().index()),
                                   c10::cuda::getCurrentCUDAStream()));
  return {weights, ids};
}

struct AlignOutputs {
  at::Tensor sorted, expert_ids, num_post_padded;
};

AlignOutputs align_outputs(const at::Tensor& like, int64_t numel, int64_t num_experts, int64_t block_size) {
  const int64_t max_padded = align_max_padded(numel, num_experts, block_size);
  auto opts = like.options().dtype(at::kInt);
  return {at::empty({max_padded}, opts),                // [max_padded] int32
          at::empty({max_padded / block_size}, opts),   // [max_padded / block_size] int32
          at::empty({1}, opts)};                        // [1] int32
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> align_launch(const at::Tensor& topk_ids, int64_t num_experts,
                                                            int64_t block_size,
                                                            const std::optional<at::Tensor>& expert_map) {
  const int64_t T = topk_ids.size(0), k = topk_ids.size(1);
  AlignOutputs out = align_outputs(topk_ids, T * k, num_experts, block_size);
  const int forced = config_override("moe_align_block_size", "MOE_EXT_ALIGN_PATH", cuda::kAlignPaths);
  const int coop_tokens = config_override("moe_align_block_size", "MOE_EXT_ALIGN_COOP_TOKENS",
                                          cuda::fused_routing_max_tokens() + 1);  // a warp a token, as there
  const cuda::AlignPlan plan = cuda::moe_align_plan(T, static_cast<int>(k), static_cast<int>(num_experts),
                                                    num_sms(topk_ids.device().index()), forced, coop_tokens);
  const int64_t ws = cuda::moe_align_workspace(T, static_cast<int>(k), static_cast<int>(num_experts), plan);
  at::Tensor workspace = ws ? at::empty({ws}, topk_ids.options()) : at::Tensor();
  C10_CUDA_CHECK(cuda::moe_align(topk_ids.const_data_ptr<int32_t>(), T, static_cast<int>(k),
                                 static_cast<int>(num_experts), static_cast<int>(block_size),
                                 expert_map.has_value() ? expert_map->const_data_ptr<int32_t>() : nullptr,
                                 out.sorted.numel(), out.sorted.data_ptr<int32_t>(), out.expert_ids.data_ptr<int32_t>(),
                                 out.num_post_padded.data_ptr<int32_t>(), plan,
                                 ws ? workspace.data_ptr<int32_t>() : nullptr, use_pdl(topk_ids.device().index()),
                                 c10::cuda::getCurrentCUDAStream()));
  return {out.sorted, out.expert_ids, out.num_post_padded};
}

// How fused_topk_align runs: one block (takes up to fused_routing_max_tokens() tokens, chosen up to
// fused_single_max_tokens(G)), a cooperative grid with one barrier (up to that many tokens a
// multiprocessor), or the router and alignment kernels in turn.
enum class FusedPath : int { kSingle = 0, kGrid = 1, kPair = 2 };
constexpr int kFusedPaths = 3;

// Tokens a block on the grid path: MOE_EXT_FUSED_GRID_TOKENS (1..32) when set, else automatic.
cuda::FusedGridShape fused_grid_shape_for(int64_t T, int sms) {
  const int forced =
      config_override("fused_topk_align", "MOE_EXT_FUSED_GRID_TOKENS", cuda::fused_routing_max_tokens() + 1);
  return cuda::fused_grid_shape(static_cast<int>(T), sms, std::max(forced, 0));
}

// The single block up to here, the grid above: the single block's one multiprocessor gates every
// token, the grid's barrier costs ~0.8 us. H200, graph replay, session 22 (bench/results/h200-fr-single-s22.md
// and -grid-s22.md, MOE_EXT_FUSED_PATH forcing each): E=256 top-8 at 16 tokens 3.51 against 4.51 us, at 20 4.44
// against 4.53, at 24 4.91 against 4.55; E=128 top-4 at 20 3.51 against 3.93, at 24 3.90 against 3.94;
// DeepSeek-V3's grouped routing at 16 4.92 against 5.08, at 20 6.30 against 5.13. (Past block_size tokens, 16
// here, the single block places the ids by a scan over the experts instead of by its hit bits.)
int fused_single_max_tokens(int64_t G) { return G > 1 ? 16 : 20; }

// The path for T tokens, and the grid's shape when it is the grid (computed only when the grid is
// a candidate: not at decode sizes). A forced path that cannot take T gives the automatic one.
std::pair<FusedPath, cuda::FusedGridShape> fused_path(int64_t T, int64_t G, int sms) {
  const auto forced = static_cast<FusedPath>(config_override("fused_topk_align", "MOE_EXT_FUSED_PATH", kFusedPaths));
  const bool single = T <= cuda::fused_routing_max_tokens();
  if (forced == FusedPath::kPair) return {FusedPath::kPair, {}};
  if (single && (forced == FusedPath::kSingle || (forced != FusedPath::kGrid && T <= fused_single_max_tokens(G))))
    return {FusedPath::kSingle, {}};
  const cuda::FusedGridShape shape =
      T <= int64_t(sms) * cuda::fused_routing_max_tokens() ? fused_grid_shape_for(T, sms) : cuda::FusedGridShape{};
  if (shape.blocks > 0) return {FusedPath::kGrid, shape};
  return {single ? FusedPath::kSingle : FusedPath::kPair, {}};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_gating_cuda(const at::Tensor& router_logits, int64_t topk,
                                                    c10::string_view scoring_func, bool renormalize,
                                                    const std::optional<at::Tensor>& correction_bias,
                                                    int64_t num_expert_group, int64_t topk_group,
                                                    double routed_scaling_factor) {
  const GatingParams p = check_gating_args("topk_gating", router_logits, topk, scoring_func, renormalize,
                                           correction_bias, num_expert_group, topk_group, routed_scaling_factor);
  const c10::cuda::CUDAGuard guard(router_logits.device());
  return gating_launch(router_logits, topk, p, correction_bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_block_size_cuda(const at::Tensor& topk_ids,
                                                                         int64_t num_experts, int64_t block_size,
                                                                         const std::optional<at::Tensor>& expert_map) {
  check_arg("moe_align_block_size", "topk_ids", topk_ids, 2, {at::kInt}, topk_ids.device());
  check_align_args("moe_align_block_size", topk_ids.numel(), num_experts, block_size, expert_map, topk_ids.device());
  const c10::cuda::CUDAGuard guard(topk_ids.device());
  return align_launch(topk_ids, num_experts, block_size, expert_map);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_topk_align_cuda(
    const at::Tensor& router_logits, int64_t topk, int64_t block_size, c10::string_view scoring_func,
    bool renormalize, const std::optional<at::Tensor>& correction_bias, int64_t num_expert_group,
    int64_t topk_group, double routed_scaling_factor, const std::optional<at::Tensor>& expert_map) {
  const GatingParams checked = check_fused_topk_align_args(router_logits, topk, block_size, scoring_func, renormalize,
                                                           correction_bias, num_expert_group, topk_group,
                                                           routed_scaling_factor, expert_map);
  const c10::cuda::CUDAGuard guard(router_logits.device());
  const int64_t T = router_logits.size(0), E = router_logits.size(1);
  const c10::DeviceIndex dev = router_logits.device().index();
  const auto [path, g] = fused_path(T, checked.num_expert_group, num_sms(dev));
  if (path == FusedPath::kGrid) {
    auto [weights, ids] = gating_outputs(router_logits, topk);
    AlignOutputs out = align_outputs(router_logits, T * topk, E, block_size);
    at::Tensor workspace = at::empty({cuda::fused_grid_workspace_bytes(static_cast<int>(E), g)},
                                     router_logits.options().dtype(at::kByte));
    const cudaError_t err = cuda::fused_topk_align_grid(
        to_dtype(router_logits.scalar_type()), router_logits.const_data_ptr(), router_logits.stride(0),
        static_cast<int>(T), with_bias(checked, correction_bias), static_cast<int>(block_size),
        expert_map.has_value() ? expert_map->const_data_ptr<int32_t>() : nullptr, out.sorted.numel(),
        weights.data_ptr<float>(), ids.data_ptr<int32_t>(), out.sorted.data_ptr<int32_t>(),
        out.expert_ids.data_ptr<int32_t>(), out.num_post_padded.data_ptr<int32_t>(), g,
        workspace.data_ptr<uint8_t>(), use_pdl(dev), c10::cuda::getCurrentCUDAStream());
    if (err != cudaErrorCooperativeLaunchTooLarge) {
      C10_CUDA_CHECK(err);
      return {weights, ids, out.sorted, out.expert_ids, out.num_post_padded};
    }
    (void)cudaGetLastError();  // not every block fits at once (a shared or partitioned GPU): the two ops
  }
  if (path != FusedPath::kSingle) {  // the router and alignment kernels in turn
    auto [weights, ids] = gating_launch(router_logits, topk, checked, correction_bias);
    auto [sorted, expert_ids, num_post_padded] = align_launch(ids, E, block_size, expert_map);
    return {weights, ids, sorted, expert_ids, num_post_padded};
  }
  auto [weights, ids] = gating_outputs(router_logits, topk);
  AlignOutputs out = align_outputs(router_logits, T * topk, E, block_size);
  C10_CUDA_CHECK(cuda::fused_topk_align(
      to_dtype(router_logits.scalar_type()), router_logits.const_data_ptr(), router_logits.stride(0),
      static_cast<int>(T), with_bias(checked, correction_bias), static_cast<int>(block_size),
      expert_map.has_value() ? expert_map->const_data_ptr<int32_t>() : nullptr, out.sorted.numel(),
      weights.data_ptr<float>(), ids.data_ptr<int32_t>(), out.sorted.data_ptr<int32_t>(),
      out.expert_ids.data_ptr<int32_t>(), out.num_post_padded.data_ptr<int32_t>(), use_pdl(dev),
      c10::cuda::getCurrentCUDAStream()));
  return {weights, ids, out.sorted, out.expert_ids, out.num_post_padded};
}

TORCH_LIBRARY_IMPL(moe_ext, CUDA, m) {
  m.impl("topk_gating", &topk_gating_cuda);
  m.impl("moe_align_block_size", &moe_align_block_size_cuda);
  m.impl("fused_topk_align", &fused_topk_align_cuda);
}

}  // namespace moe_ext
