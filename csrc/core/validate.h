// Argument checks shared by every backend's adapters. Each message names the op and the argument,
// so a bad call from Python reads like "moe_ext.topk_gating: router_logits must be ...".
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <type_traits>
#include <initializer_list>
#include <optional>
#include <string>

#include "../kernels/routing_host.h"

namespace moe_ext {

// Error messages are assembled here into one std::string (numbers through std::to_string) and only
// then handed to TORCH_CHECK: on the GPU image (torch 2.11, GCC 13) streaming integers through
// c10::str inside an extension crashed the process.
namespace detail {
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, c10::string_view v) { s.append(v.data(), v.size()); }
inline void append(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const c10::Device& v) { s += v.str(); }
inline void append(std::string& s, double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  s += buf;
}
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline void append(std::string& s, T v) {
  s += std::to_string(v);
}
}  // namespace detail

template <typename... Args>
std::string message(const Args&... args) {
  std::string s;
  (detail::append(s, args), ...);
  return s;
}

#define MOE_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, ::moe_ext::message(__VA_ARGS__))
#define MOE_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, ::moe_ext::message(__VA_ARGS__))

// "[4, 16]".
inline std::string dims(c10::IntArrayRef d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

inline std::string dtype_list(std::initializer_list<c10::ScalarType> dtypes) {
  std::string s;
  for (auto d : dtypes) s += (s.empty() ? "" : ", ") + std::string(c10::toString(d));
  return s;
}

// Checks rank, dtype, device and (optionally) contiguity of one tensor argument.
inline void check_arg(const char* op, const char* name, const at::Tensor& t, int64_t dim,
                      std::initializer_list<c10::ScalarType> dtypes, const at::Device& device,
                      bool contiguous = true) {
  MOE_CHECK_VALUE(dim < 0 || t.dim() == dim, "moe_ext.", op, ": ", name, " must be ", dim,
                    "-D, got a ", t.dim(), "-D tensor of shape ", dims(t.sizes()));
  bool dtype_ok = false;
  for (auto d : dtypes) dtype_ok |= t.scalar_type() == d;
  MOE_CHECK_TYPE(dtype_ok, "moe_ext.", op, ": ", name, " must have dtype ", dtype_list(dtypes),
                   ", got ", t.scalar_type());
  MOE_CHECK_VALUE(t.device() == device, "moe_ext.", op, ": ", name, " is on ", t.device(),
                    " but the op runs on ", device, " (all tensors must be on one device)");
  MOE_CHECK_VALUE(!contiguous || t.is_contiguous(), "moe_ext.", op, ": ", name,
                    " must be contiguous, got strides ", dims(t.strides()), " for shape ", dims(t.sizes()));
}

constexpr std::initializer_list<c10::ScalarType> kFloatTypes = {
    c10::ScalarType::Float, c10::ScalarType::BFloat16, c10::ScalarType::Half};

// router_logits [T, E] (last dim contiguous; rows may be strided), and the routing scalars.
// Returns the gating parameters with bias left null (the adapter fills in its pointer).
inline GatingParams check_gating_args(const char* op, const at::Tensor& logits, int64_t topk,
                                      c10::string_view scoring_func, bool renormalize,
                                      const std::optional<at::Tensor>& correction_bias,
                                      int64_t num_expert_group, int64_t topk_group,
                                      double routed_scaling_factor) {
  check_arg(op, "router_logits", logits, 2, kFloatTypes, logits.device(), /*contiguous=*/false);
  MOE_CHECK_VALUE(logits.size(1) == 1 || logits.stride(1) == 1, "moe_ext.", op,
                    ": router_logits must have a contiguous last dimension, got strides ",
                    dims(logits.strides()));
  const int64_t E = logits.size(1);
  MOE_CHECK_VALUE(E >= 1 && E <= kMaxExperts, "moe_ext.", op,
                    ": router_logits.size(1) (num_experts) must be in [1, ", kMaxExperts, "], got ", E);
  MOE_CHECK_VALUE(topk >= 1 && topk <= std::min<int64_t>(E, kMaxTopK), "moe_ext.", op,
                    ": topk must be in [1, min(num_experts, ", kMaxTopK, ")] = [1, ",
                    std::min<int64_t>(E, kMaxTopK), "], got ", topk);
  ScoringFunc scoring;
  if (scoring_func == "softmax") {
    scoring = ScoringFunc::kSoftmax;
  } else if (scoring_func == "sigmoid") {
    scoring = ScoringFunc::kSigmoid;
  } else {
    MOE_CHECK_VALUE(false, "moe_ext.", op, ": scoring_func must be \"softmax\" or \"sigmoid\", got \"",
                      std::string(scoring_func), "\"");
  }
  if (correction_bias.has_value()) {
    check_arg(op, "correction_bias", *correction_bias, 1, {c10::ScalarType::Float}, logits.device());
    MOE_CHECK_VALUE(correction_bias->size(0) == E, "moe_ext.", op,
                      ": correction_bias must have num_experts = ", E, " elements, got ",
                      correction_bias->size(0));
  }
  MOE_CHECK_VALUE(num_expert_group >= 1 && E % num_expert_group == 0, "moe_ext.", op,
                    ": num_expert_group must be >= 1 and divide num_experts = ", E, ", got ",
                    num_expert_group);
  MOE_CHECK_VALUE(topk_group >= 1 && topk_group <= num_expert_group, "moe_ext.", op,
                    ": topk_group must be in [1, num_expert_group = ", num_expert_group, "], got ",
                    topk_group);
  MOE_CHECK_VALUE(topk <= topk_group * (E / num_expert_group), "moe_ext.", op, ": topk = ", topk,
                    " exceeds the ", topk_group * (E / num_expert_group),
                    " experts in the topk_group best groups");
  MOE_CHECK_VALUE(std::isfinite(routed_scaling_factor), "moe_ext.", op,
                    ": routed_scaling_factor must be finite, got ", routed_scaling_factor);
  return GatingParams{static_cast<int>(E),
                      static_cast<int>(topk),
                      scoring,
                      renormalize,
                      nullptr,
                      static_cast<int>(num_expert_group),
                      static_cast<int>(topk_group),
                      static_cast<float>(routed_scaling_factor)};
}

// Checks the scalars of alignment. `numel` is T * topk; `device` is where topk_ids lives.
inline void check_align_args(const char* op, int64_t numel, int64_t num_experts,
                             int64_t block_size, const std::optional<at::Tensor>& expert_map,
                             const at::Device& device) {
  MOE_CHECK_VALUE(num_experts >= 1 && num_experts <= kMaxExperts, "moe_ext.", op,
                    ": num_experts must be in [1, ", kMaxExperts, "], got ", num_experts);
  MOE_CHECK_VALUE(block_size >= 1 && block_size <= 4096, "moe_ext.", op,
                    ": block_size must be in [1, 4096], got ", block_size);
  MOE_CHECK_VALUE(align_max_padded(numel, num_experts, block_size) < (int64_t{1} << 31), "moe_ext.",
                    op, ": T * topk = ", numel, " with block_size ", block_size,
                    " overflows int32 token indices");
  if (expert_map.has_value()) {
    check_arg(op, "expert_map", *expert_map, 1, {c10::ScalarType::Int}, device);
    MOE_CHECK_VALUE(expert_map->size(0) == num_experts, "moe_ext.", op,
                      ": expert_map must have num_experts = ", num_experts, " entries, got ",
                      expert_map->size(0));
  }
}

// Checks every argument of fused_topk_align before any work, so a bad alignment argument fails
// before gating runs.
inline GatingParams check_fused_topk_align_args(const at::Tensor& logits, int64_t topk, int64_t block_size,
                                                c10::string_view scoring_func, bool renormalize,
                                                const std::optional<at::Tensor>& correction_bias,
                                                int64_t num_expert_group, int64_t topk_group,
                                                double routed_scaling_factor,
                                                const std::optional<at::Tensor>& expert_map) {
  constexpr const char* op = "fused_topk_align";
  const GatingParams p = check_gating_args(op, logits, topk, scoring_func, renormalize, correction_bias,
                                           num_expert_group, topk_group, routed_scaling_factor);
  check_align_args(op, logits.size(0) * topk, logits.size(1), block_size, expert_map, logits.device());
  return p;
}

// x: [..., 2I], floating, contiguous.
inline void check_silu_and_mul_args(const at::Tensor& x) {
  check_arg("silu_and_mul", "x", x, -1, kFloatTypes, x.device());
  MOE_CHECK_VALUE(x.dim() >= 1 && x.size(-1) % 2 == 0,
                    "moe_ext.silu_and_mul: x.size(-1) must be even (gate half, then up half), got shape ",
                    dims(x.sizes()));
}

// x: [T, topk, H] floating; topk_weights: optional [T, topk] fp32.
inline void check_combine_args(const at::Tensor& x, const std::optional<at::Tensor>& topk_weights) {
  check_arg("moe_combine", "x", x, 3, kFloatTypes, x.device());
  if (topk_weights.has_value()) {
    check_arg("moe_combine", "topk_weights", *topk_weights, 2, {c10::ScalarType::Float}, x.device());
    MOE_CHECK_VALUE(topk_weights->size(0) == x.size(0) && topk_weights->size(1) == x.size(1),
                      "moe_ext.moe_combine: topk_weights must have shape [", x.size(0), ", ", x.size(1),
                      "], got ", dims(topk_weights->sizes()));
  }
}

// a: [M, K]; w: [E, N, K] of a's dtype; the alignment triple; topk >= 1; optional fp32 weights
// with M * topk elements. `op` and `w_name` name the op and its weight argument in the messages.
inline void check_grouped_gemm_args(const at::Tensor& a, const at::Tensor& w,
                                    const at::Tensor& sorted_token_ids, const at::Tensor& expert_ids,
                                    const at::Tensor& num_tokens_post_padded, int64_t topk,
                                    const std::optional<at::Tensor>& topk_weights,
                                    const char* op = "moe_grouped_gemm", const char* w_name = "w") {
  const auto dev = a.device();
  check_arg(op, "a", a, 2, kFloatTypes, dev);
  check_arg(op, w_name, w, 3, kFloatTypes, dev);
  MOE_CHECK_TYPE(w.scalar_type() == a.scalar_type(), "moe_ext.", op, ": ", w_name, " must have a's dtype ",
                 a.scalar_type(), ", got ", w.scalar_type());
  MOE_CHECK_VALUE(w.size(2) == a.size(1), "moe_ext.", op, ": ", w_name,
                  " must be [E, N, K] with K = a.size(1) = ", a.size(1), ", got shape ", dims(w.sizes()));
  check_arg(op, "sorted_token_ids", sorted_token_ids, 1, {c10::ScalarType::Int}, dev);
  check_arg(op, "expert_ids", expert_ids, 1, {c10::ScalarType::Int}, dev);
  check_arg(op, "num_tokens_post_padded", num_tokens_post_padded, 1, {c10::ScalarType::Int}, dev);
  MOE_CHECK_VALUE(num_tokens_post_padded.numel() == 1, "moe_ext.", op,
                  ": num_tokens_post_padded must have 1 element, got ", num_tokens_post_padded.numel());
  const int64_t num_blocks = expert_ids.numel();
  const int64_t P = sorted_token_ids.numel();
  MOE_CHECK_VALUE((num_blocks == 0 && P == 0) || (num_blocks > 0 && P % num_blocks == 0), "moe_ext.", op,
                  ": sorted_token_ids (", P, " elements) must hold a whole block_size per entry of expert_ids (",
                  num_blocks, ")");
  MOE_CHECK_VALUE(topk >= 1, "moe_ext.", op, ": topk must be >= 1, got ", topk);
  MOE_CHECK_VALUE(a.size(0) * topk < (int64_t{1} << 31), "moe_ext.", op,
                  ": a.size(0) * topk overflows int32 token indices");
  if (topk_weights.has_value()) {
    check_arg(op, "topk_weights", *topk_weights, -1, {c10::ScalarType::Float}, dev);
    MOE_CHECK_VALUE(topk_weights->numel() == a.size(0) * topk, "moe_ext.", op,
                    ": topk_weights must have a.size(0) * topk = ", a.size(0) * topk, " elements, got shape ",
                    dims(topk_weights->sizes()));
  }
}

// moe_grouped_gemm_silu: as check_grouped_gemm_args, with w13 [E, 2I, K] (gate rows, then up rows).
inline void check_grouped_gemm_silu_args(const at::Tensor& a, const at::Tensor& w13,
                                         const at::Tensor& sorted_token_ids, const at::Tensor& expert_ids,
                                         const at::Tensor& num_tokens_post_padded, int64_t topk) {
  check_grouped_gemm_args(a, w13, sorted_token_ids, expert_ids, num_tokens_post_padded, topk, std::nullopt,
                          "moe_grouped_gemm_silu", "w13");
  MOE_CHECK_VALUE(w13.size(1) % 2 == 0,
                  "moe_ext.moe_grouped_gemm_silu: w13.size(1) must be even (2I: gate rows, then up rows), "
                  "got shape ", dims(w13.sizes()));
}

// The expert GEMVs' routing: topk_ids [M, topk] int32 with topk >= 1; optional expert_map
// [E_route] int32 (global -> local expert or -1). Each op checks M against its own operand.
inline void check_gemv_routing_args(const char* op, const at::Tensor& topk_ids,
                                    const std::optional<at::Tensor>& expert_map, const at::Device& device) {
  check_arg(op, "topk_ids", topk_ids, 2, {c10::ScalarType::Int}, device);
  MOE_CHECK_VALUE(topk_ids.size(1) >= 1, "moe_ext.", op, ": topk_ids must have topk >= 1 columns, got shape ",
                  dims(topk_ids.sizes()));
  MOE_CHECK_VALUE(topk_ids.numel() < (int64_t{1} << 31), "moe_ext.", op, ": topk_ids has ", topk_ids.numel(),
                  " elements, more than int32 indices address");
  if (expert_map.has_value()) {
    check_arg(op, "expert_map", *expert_map, 1, {c10::ScalarType::Int}, device);
    MOE_CHECK_VALUE(expert_map->numel() >= 1, "moe_ext.", op, ": expert_map must not be empty");
  }
}

// moe_gemv_silu: a [M, K]; w13 [E, 2I, K] of a's dtype; topk_ids [M, topk]; optional expert_map.
inline void check_gemv_silu_args(const at::Tensor& a, const at::Tensor& w13, const at::Tensor& topk_ids,
                                 const std::optional<at::Tensor>& expert_map) {
  constexpr const char* op = "moe_gemv_silu";
  check_arg(op, "a", a, 2, kFloatTypes, a.device());
  check_arg(op, "w13", w13, 3, kFloatTypes, a.device());
  MOE_CHECK_TYPE(w13.scalar_type() == a.scalar_type(), "moe_ext.", op, ": w13 must have a's dtype ",
                 a.scalar_type(), ", got ", w13.scalar_type());
  MOE_CHECK_VALUE(w13.size(2) == a.size(1) && w13.size(1) % 2 == 0, "moe_ext.", op,
                  ": w13 must be [E, 2I, K] (gate rows, then up rows) with K = a.size(1) = ", a.size(1),
                  ", got shape ", dims(w13.sizes()));
  check_gemv_routing_args(op, topk_ids, expert_map, a.device());
  MOE_CHECK_VALUE(topk_ids.size(0) == a.size(0), "moe_ext.", op, ": topk_ids must have a.size(0) = ", a.size(0),
                  " rows, got shape ", dims(topk_ids.sizes()));
}

// moe_gemv_combine: h [M * topk, K]; w2 [E, H, K] of h's dtype; topk_ids [M, topk]; topk_weights
// [M, topk] fp32; optional expert_map.
inline void check_gemv_combine_args(const at::Tensor& h, const at::Tensor& w2, const at::Tensor& topk_ids,
                                    const at::Tensor& topk_weights, const std::optional<at::Tensor>& expert_map) {
  constexpr const char* op = "moe_gemv_combine";
  check_arg(op, "h", h, 2, kFloatTypes, h.device());
  check_arg(op, "w2", w2, 3, kFloatTypes, h.device());
  MOE_CHECK_TYPE(w2.scalar_type() == h.scalar_type(), "moe_ext.", op, ": w2 must have h's dtype ",
                 h.scalar_type(), ", got ", w2.scalar_type());
  MOE_CHECK_VALUE(w2.size(2) == h.size(1), "moe_ext.", op, ": w2 must be [E, H, K] with K = h.size(1) = ",
                  h.size(1), ", got shape ", dims(w2.sizes()));
  check_gemv_routing_args(op, topk_ids, expert_map, h.device());
  MOE_CHECK_VALUE(topk_ids.numel() == h.size(0), "moe_ext.", op,
                  ": topk_ids must be [M, topk] with M * topk = h.size(0) = ", h.size(0), ", got shape ",
                  dims(topk_ids.sizes()));
  check_arg(op, "topk_weights", topk_weights, 2, {c10::ScalarType::Float}, h.device());
  MOE_CHECK_VALUE(topk_weights.sizes() == topk_ids.sizes(), "moe_ext.", op,
                  ": topk_weights must have topk_ids' shape ", dims(topk_ids.sizes()), ", got ",
                  dims(topk_weights.sizes()));
}

}  // namespace moe_ext
