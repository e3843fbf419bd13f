// CPU adapters and kernels for SiLU-and-mul, the top-k combine and the grouped expert GEMM (plain
// and with SiLU-and-mul fused).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../core/validate.h"

namespace moe_ext {

at::Tensor silu_and_mul_cpu(const at::Tensor& x) {  // x: [..., 2 * I]
  check_silu_and_mul_args(x);
  const int64_t d = x.size(-1) / 2;
  auto out_shape = x.sizes().vec();
  out_shape.back() = d;
  auto out = at::empty(out_shape, x.options());  // [..., I]
  const int64_t rows = d == 0 ? 0 : x.numel() / (2 * d);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "silu_and_mul_cpu", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const scalar_t* gate = in + r * 2 * d;
        const scalar_t* up = gate + d;
        for (int64_t i = 0; i < d; ++i) {
          const float g = static_cast<float>(gate[i]);
          o[r * d + i] = static_cast<scalar_t>(g / (1.0f + std::exp(-g)) * static_cast<float>(up[i]));
        }
      }
    });
  });
  return out;
}

// x: [T, topk, H]; topk_weights: optional [T, topk] fp32. Returns [T, H] in x's dtype.
at::Tensor moe_combine_cpu(const at::Tensor& x, const std::optional<at::Tensor>& topk_weights) {
  check_combine_args(x, topk_weights);
  const int64_t T = x.size(0), K = x.size(1), H = x.size(2);
  const float* w = topk_weights.has_value() ? topk_weights->const_data_ptr<float>() : nullptr;
  auto out = at::empty({T, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "moe_combine_cpu", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, 1, [&](int64_t b, int64_t e) {
      std::vector<float> acc(H);
      for (int64_t t = b; t < e; ++t) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t j = 0; j < K; ++j) {
          const scalar_t* row = in + (t * K + j) * H;
          const float wj = w ? w[t * K + j] : 1.0f;
          for (int64_t h = 0; h < H; ++h) acc[h] += wj * static_cast<float>(row[h]);
        }
        for (int64_t h = 0; h < H; ++h) o[t * H + h] = static_cast<scalar_t>(acc[h]);
      }
    });
  });
  return out;
}

namespace {

// Calls fn(e, idx) for each run of consecutive blocks of one valid expert e (0 <= e < E), idx the
// [n] int64 output rows its slots name (slot order; sentinels, ids outside [0, rows) and slots past
// num_tokens_post_padded skipped; runs with no id skipped).
template <typename Fn>
void for_each_expert_run(const at::Tensor& sorted_token_ids, const at::Tensor& expert_ids,
                         const at::Tensor& num_tokens_post_padded, int64_t rows, int64_t E, Fn&& fn) {
  const int64_t num_blocks = expert_ids.numel();
  const int64_t P = sorted_token_ids.numel();
  if (num_blocks == 0 || rows == 0) return;
  const int64_t block_size = P / num_blocks;
  const int64_t valid = std::clamp<int64_t>(num_tokens_post_padded.const_data_ptr<int32_t>()[0], 0, P);
  const int32_t* sorted = sorted_token_ids.const_data_ptr<int32_t>();
  const int32_t* experts = expert_ids.const_data_ptr<int32_t>();
  const int64_t used_blocks = (valid + block_size - 1) / block_size;
  std::vector<int64_t> ids;
  for (int64_t b0 = 0; b0 < used_blocks;) {
    const int32_t e = experts[b0];
    int64_t b1 = b0 + 1;
    while (b1 < used_blocks && experts[b1] == e) ++b1;
    if (e >= 0 && e < E) {
      ids.clear();
      for (int64_t i = b0 * block_size; i < std::min(valid, b1 * block_size); ++i)
        if (sorted[i] >= 0 && sorted[i] < rows) ids.push_back(sorted[i]);
      if (!ids.empty()) fn(e, at::tensor(ids, at::TensorOptions().dtype(at::kLong)));
    }
    b0 = b1;
  }
}

}  // namespace

// a: [M, K]; w: [E, N, K]; sorted_token_ids: [num_blocks * block_size] int32;
// expert_ids: [num_blocks] int32; num_tokens_post_padded: [1] int32; topk_weights: optional fp32
// with M * topk elements. Returns [M * topk, N] in a's dtype. Each run of blocks of one expert is
// gathered and multiplied with one ATen matmul; rows no valid block names stay zero (also with
// zero_unwritten=False, which only permits leaving them unwritten: zeroing costs little here).
at::Tensor moe_grouped_gemm_cpu(const at::Tensor& a, const at::Tensor& w,
                                const at::Tensor& sorted_token_ids, const at::Tensor& expert_ids,
                                const at::Tensor& num_tokens_post_padded, int64_t topk,
                                const std::optional<at::Tensor>& topk_weights, bool /*zero_unwritten*/) {
  check_grouped_gemm_args(a, w, sorted_token_ids, expert_ids, num_tokens_post_padded, topk,
                          topk_weights);
  const int64_t rows = a.size(0) * topk;
  auto out = at::zeros({rows, w.size(1)}, a.options());
  auto flat_weights = topk_weights.has_value() ? topk_weights->reshape({-1}) : at::Tensor();
  for_each_expert_run(sorted_token_ids, expert_ids, num_tokens_post_padded, rows, w.size(0),
                      [&](int64_t e, const at::Tensor& idx) {
    // ATen's CPU GEMM accumulates bf16/fp16 products in fp32; converting the expert's whole
    // weight matrix to fp32 first would cost more than the product at decode sizes. With
    // topk_weights the low-precision product is rounded twice (before and after the weight).
    auto y = at::matmul(a.index_select(0, at::floor_divide(idx, topk)), w.select(0, e).t());  // [n, N]
    if (topk_weights.has_value())
      y = y.to(at::kFloat).mul_(flat_weights.index_select(0, idx).unsqueeze(1)).to(a.scalar_type());
    out.index_copy_(0, idx, y);
  });
  return out;
}

// a: [M, K]; w13: [E, 2I, K] (gate rows, then up rows); the alignment triple as above. Returns
// [M * topk, I] in a's dtype: silu(gate) * up from fp32 products, rounded once (the expert's w13 is
// converted to fp32: slower than moe_grouped_gemm_cpu at decode sizes, but without its rounding of
// the [n, 2I] product to a's dtype).
at::Tensor moe_grouped_gemm_silu_cpu(const at::Tensor& a, const at::Tensor& w13,
                                     const at::Tensor& sorted_token_ids, const at::Tensor& expert_ids,
                                     const at::Tensor& num_tokens_post_padded, int64_t topk,
                                     bool /*zero_unwritten*/) {
  check_grouped_gemm_silu_args(a, w13, sorted_token_ids, expert_ids, num_tokens_post_padded, topk);
  const int64_t rows = a.size(0) * topk, I = w13.size(1) / 2;
  auto out = at::zeros({rows, I}, a.options());
  for_each_expert_run(sorted_token_ids, expert_ids, num_tokens_post_padded, rows, w13.size(0),
                      [&](int64_t e, const at::Tensor& idx) {
    auto h = at::matmul(a.index_select(0, at::floor_divide(idx, topk)).to(at::kFloat),
                        w13.select(0, e).to(at::kFloat).t());  // [n, 2I] fp32
    out.index_copy_(0, idx, (at::silu(h.narrow(1, 0, I)) * h.narrow(1, I, I)).to(a.scalar_type()));
  });
  return out;
}

namespace {

// Calls fn(e, slots) for each local expert e with routed slots (slots: [n] int64 flat indices
// t * topk + j, ascending); slots without a local expert are skipped (as the CUDA kernels do).
template <typename Fn>
void for_each_gemv_expert(const at::Tensor& topk_ids, const std::optional<at::Tensor>& expert_map, int64_t E,
                          Fn&& fn) {
  const int32_t* ids = topk_ids.const_data_ptr<int32_t>();
  const int32_t* map = expert_map.has_value() ? expert_map->const_data_ptr<int32_t>() : nullptr;
  const int64_t routed = map ? expert_map->numel() : E;
  std::vector<std::vector<int64_t>> slots(E);
  for (int64_t s = 0; s < topk_ids.numel(); ++s) {
    const int64_t id = ids[s];
    if (id < 0 || id >= routed) continue;
    const int64_t e = map ? map[id] : id;
    if (e >= 0 && e < E) slots[e].push_back(s);
  }
  for (int64_t e = 0; e < E; ++e)
    if (!slots[e].empty()) fn(e, at::tensor(slots[e], at::TensorOptions().dtype(at::kLong)));
}

}  // namespace

// a: [M, K]; w13: [E, 2I, K]; topk_ids: [M, topk] int32; expert_map: optional [E_route] int32.
// Returns [M * topk, I] in a's dtype, fp32 products rounded once; zero rows for slots without a
// local expert.
at::Tensor moe_gemv_silu_cpu(const at::Tensor& a, const at::Tensor& w13, const at::Tensor& topk_ids,
                             const std::optional<at::Tensor>& expert_map) {
  check_gemv_silu_args(a, w13, topk_ids, expert_map);
  const int64_t topk = topk_ids.size(1), I = w13.size(1) / 2;
  auto out = at::zeros({a.size(0) * topk, I}, a.options());
  for_each_gemv_expert(topk_ids, expert_map, w13.size(0), [&](int64_t e, const at::Tensor& slots) {
    auto h = at::matmul(a.index_select(0, at::floor_divide(slots, topk)).to(at::kFloat),
                        w13.select(0, e).to(at::kFloat).t());  // [n, 2I] fp32
    out.index_copy_(0, slots, (at::silu(h.narrow(1, 0, I)) * h.narrow(1, I, I)).to(a.scalar_type()));
  });
  return out;
}

// h: [M * topk, K]; w2: [E, H, K]; topk_ids, topk_weights: [M, topk]; expert_map: optional.
// Returns [M, H] in h's dtype: the weighted products summed over j in fp32, rounded once.
at::Tensor moe_gemv_combine_cpu(const at::Tensor& h, const at::Tensor& w2, const at::Tensor& topk_ids,
                                const at::Tensor& topk_weights, const std::optional<at::Tensor>& expert_map) {
  check_gemv_combine_args(h, w2, topk_ids, topk_weights, expert_map);
  const int64_t M = topk_ids.size(0), topk = topk_ids.size(1), H = w2.size(1);
  auto y = at::zeros({M * topk, H}, h.options().dtype(at::kFloat));
  const auto flat_weights = topk_weights.reshape({-1});
  for_each_gemv_expert(topk_ids, expert_map, w2.size(0), [&](int64_t e, const at::Tensor& slots) {
    auto p = at::matmul(h.index_select(0, slots).to(at::kFloat), w2.select(0, e).to(at::kFloat).t());  // [n, H]
    y.index_copy_(0, slots, p.mul_(flat_weights.index_select(0, slots).unsqueeze(1)));
  });
  return y.view({M, topk, H}).sum(1).to(h.scalar_type());
}

TORCH_LIBRARY_IMPL(moe_ext, CPU, m) {
  m.impl("silu_and_mul", &silu_and_mul_cpu);
  m.impl("moe_combine", &moe_combine_cpu);
  m.impl("moe_grouped_gemm", &moe_grouped_gemm_cpu);
  m.impl("moe_grouped_gemm_silu", &moe_grouped_gemm_silu_cpu);
  m.impl("moe_gemv_silu", &moe_gemv_silu_cpu);
  m.impl("moe_gemv_combine", &moe_gemv_combine_cpu);
}

}  // namespace moe_ext
