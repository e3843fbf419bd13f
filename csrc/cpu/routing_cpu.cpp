// CPU adapters for router top-k gating, expert alignment and the fused pair.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <vector>

#include "../core/validate.h"
#include "../kernels/routing_host.h"

namespace moe_ext {
namespace {

// The kernels below take validated arguments; the op entry points check them once.
std::tuple<at::Tensor, at::Tensor> topk_gating_impl(const at::Tensor& logits, int64_t topk, GatingParams p,
                                                    const std::optional<at::Tensor>& correction_bias) {
  if (correction_bias.has_value()) p.bias = correction_bias->data_ptr<float>();
  const int64_t T = logits.size(0);
  const int64_t E = p.num_experts;
  auto weights = at::empty({T, topk}, logits.options().dtype(at::kFloat));  // [T, topk] fp32
  auto ids = at::empty({T, topk}, logits.options().dtype(at::kInt));        // [T, topk] int32
  float* w_ptr = weights.data_ptr<float>();
  int32_t* id_ptr = ids.data_ptr<int32_t>();
  const int64_t row_stride = logits.stride(0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "topk_gating_cpu", [&] {
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      GatingScratch scratch;
      scratch.resize(static_cast<int>(E), p.num_expert_group);
      std::vector<float> row(E);
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* src = x + t * row_stride;
        for (int64_t i = 0; i < E; ++i) row[i] = static_cast<float>(src[i]);
        gating_row(row.data(), p, scratch, w_ptr + t * topk, id_ptr + t * topk);
      }
    });
  });
  return {weights, ids};
}

// Counting sort in three passes over chunks of the flat ids (see routing_host.h).
std::tuple<at::Tensor, at::Tensor, at::Tensor> align_impl(const at::Tensor& topk_ids, int64_t num_experts,
                                                          int64_t block_size,
                                                          const std::optional<at::Tensor>& expert_map) {
  const int64_t numel = topk_ids.numel();
  const int64_t max_padded = align_max_padded(numel, num_experts, block_size);
  const int64_t num_blocks = max_padded / block_size;
  auto opts = topk_ids.options();
  auto sorted = at::full({max_padded}, numel, opts);         // [max_padded] int32, sentinel-filled
  auto expert_ids = at::full({num_blocks}, -1, opts);        // [max_padded / block_size] int32
  auto num_post_padded = at::empty({1}, opts);               // [1] int32

  const int32_t* ids = topk_ids.const_data_ptr<int32_t>();
  const int32_t* map = expert_map.has_value() ? expert_map->const_data_ptr<int32_t>() : nullptr;
  const int E = static_cast<int>(num_experts);
  constexpr int64_t kChunk = 1 << 14;
  const int64_t num_chunks = std::max<int64_t>(1, (numel + kChunk - 1) / kChunk);

  // counts[c * E + e]: ids of expert e in chunk c; turned in place into each chunk's write cursor.
  std::vector<int32_t> counts(num_chunks * E, 0);
  at::parallel_for(0, num_chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      int32_t* cnt = counts.data() + c * E;
      for (int64_t f = c * kChunk; f < std::min(numel, (c + 1) * kChunk); ++f) {
        const int slot = align_slot(ids[f], E, map);
        if (slot >= 0) ++cnt[slot];
      }
    }
  });

  int32_t* expert_out = expert_ids.data_ptr<int32_t>();
  int64_t offset = 0;
  for (int e = 0; e < E; ++e) {
    const int64_t start = offset;
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int32_t n = counts[c * E + e];
      counts[c * E + e] = static_cast<int32_t>(offset);
      offset += n;
    }
    if (offset == start) continue;
    offset = (offset + block_size - 1) / block_size * block_size;
    const int32_t local = map ? map[e] : e;
    for (int64_t b = start / block_size; b < offset / block_size; ++b) expert_out[b] = local;
  }
  num_post_padded.data_ptr<int32_t>()[0] = static_cast<int32_t>(offset);

  int32_t* sorted_out = sorted.data_ptr<int32_t>();
  at::parallel_for(0, num_chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      int32_t* cursor = counts.data() + c * E;
      for (int64_t f = c * kChunk; f < std::min(numel, (c + 1) * kChunk); ++f) {
        const int slot = align_slot(ids[f], E, map);
        if (slot >= 0) sorted_out[cursor[slot]++] = static_cast<int32_t>(f);
      }
    }
  });
  return {sorted, expert_ids, num_post_padded};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_gating_cpu(const at::Tensor& router_logits, int64_t topk,
                                                   c10::string_view scoring_func, bool renormalize,
                                                   const std::optional<at::Tensor>& correction_bias,
                                                   int64_t num_expert_group, int64_t topk_group,
                                                   double routed_scaling_factor) {
  const GatingParams p = check_gating_args("topk_gating", router_logits, topk, scoring_func, renormalize,
                                           correction_bias, num_expert_group, topk_group, routed_scaling_factor);
  return topk_gating_impl(router_logits, topk, p, correction_bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_block_size_cpu(
    const at::Tensor& topk_ids, int64_t num_experts, int64_t block_size,
    const std::optional<at::Tensor>& expert_map) {
  check_arg("moe_align_block_size", "topk_ids", topk_ids, 2, {at::kInt}, topk_ids.device());
  check_align_args("moe_align_block_size", topk_ids.numel(), num_experts, block_size, expert_map, topk_ids.device());
  return align_impl(topk_ids, num_experts, block_size, expert_map);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_topk_align_cpu(
    const at::Tensor& router_logits, int64_t topk, int64_t block_size, c10::string_view scoring_func,
    bool renormalize, const std::optional<at::Tensor>& correction_bias, int64_t num_expert_group,
    int64_t topk_group, double routed_scaling_factor, const std::optional<at::Tensor>& expert_map) {
  const GatingParams p = check_fused_topk_align_args(router_logits, topk, block_size, scoring_func, renormalize,
                                                     correction_bias, num_expert_group, topk_group,
                                                     routed_scaling_factor, expert_map);
  auto [weights, ids] = topk_gating_impl(router_logits, topk, p, correction_bias);
  auto [sorted, expert_ids, num_post_padded] = align_impl(ids, router_logits.size(1), block_size, expert_map);
  return {weights, ids, sorted, expert_ids, num_post_padded};
}

TORCH_LIBRARY_IMPL(moe_ext, CPU, m) {
  m.impl("topk_gating", &topk_gating_cpu);
  m.impl("moe_align_block_size", &moe_align_block_size_cpu);
  m.impl("fused_topk_align", &fused_topk_align_cpu);
}

}  // namespace moe_ext
