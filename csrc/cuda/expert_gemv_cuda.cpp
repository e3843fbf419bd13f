// CUDA adapter of the decode expert GEMVs: validate, allocate through PyTorch (no memset: the
// kernels write every element), launch on the current stream under a device guard.
//
// Environment (read on every call, so a tuner can switch within one process):
//   MOE_EXT_GEMV_SILU_CONFIG     index into moe_gemv_silu's tile-config table (csrc/cuda/expert_gemv.cu),
//                                -1 or unset for the default.
//   MOE_EXT_GEMV_COMBINE_CONFIG  the same for moe_gemv_combine.
//   MOE_EXT_PDL                  "0": launch without programmatic dependent launch (sm_90+ uses it).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../core/validate.h"
#include "adapter_utils.h"
#include "expert_gemv.h"

namespace moe_ext {
namespace {

// Largest output width the grid covers: 65535 column tiles of the narrowest config (4 warps x 1).
constexpr int64_t kMaxColumns = int64_t{65535} * 4;

const int32_t* map_ptr(const std::optional<at::Tensor>& expert_map) {
  return expert_map.has_value() ? expert_map->const_data_ptr<int32_t>() : nullptr;
}

}  // namespace

// a: [M, K]; w13: [E, 2I, K]; topk_ids: [M, topk] int32; expert_map: optional [E_route] int32.
// Returns [M * topk, I] in a's dtype.
at::Tensor moe_gemv_silu_cuda(const at::Tensor& a, const at::Tensor& w13, const at::Tensor& topk_ids,
                              const std::optional<at::Tensor>& expert_map) {
  constexpr const char* op = "moe_gemv_silu";
  check_gemv_silu_args(a, w13, topk_ids, expert_map);
  const int64_t M = a.size(0), K = a.size(1), E = w13.size(0), I = w13.size(1) / 2, topk = topk_ids.size(1);
  MOE_CHECK_VALUE(I <= kMaxColumns, "moe_ext.", op, ": I = w13.size(1) / 2 must be at most ", kMaxColumns,
                  ", got ", I);
  MOE_CHECK_VALUE(K < (int64_t{1} << 31) && E < (int64_t{1} << 31), "moe_ext.", op,
                  ": w13's dimensions must be below 2^31, got shape ", dims(w13.sizes()));
  const int config = config_override(op, "MOE_EXT_GEMV_SILU_CONFIG", cuda::moe_gemv_silu_num_configs());
  const c10::cuda::CUDAGuard guard(a.device());
  auto out = at::empty({M * topk, I}, a.options());
  const int64_t E_route = expert_map.has_value() ? expert_map->numel() : E;
  C10_CUDA_CHECK(cuda::moe_gemv_silu(to_dtype(a.scalar_type()), a.const_data_ptr(), w13.const_data_ptr(),
                                     topk_ids.const_data_ptr<int32_t>(), map_ptr(expert_map), out.data_ptr(), M, topk,
                                     I, K, E, E_route, config, use_pdl(a.device().index()),
                                     c10::cuda::getCurrentCUDAStream()));
  return out;
}

// h: [M * topk, K]; w2: [E, H, K]; topk_ids, topk_weights: [M, topk]; expert_map: optional.
// Returns [M, H] in h's dtype.
at::Tensor moe_gemv_combine_cuda(const at::Tensor& h, const at::Tensor& w2, const at::Tensor& topk_ids,
                                 const at::Tensor& topk_weights, const std::optional<at::Tensor>& expert_map) {
  constexpr const char* op = "moe_gemv_combine";
  check_gemv_combine_args(h, w2, topk_ids, topk_weights, expert_map);
  const int64_t M = topk_ids.size(0), topk = topk_ids.size(1), K = h.size(1), E = w2.size(0), H = w2.size(1);
  MOE_CHECK_VALUE(H <= kMaxColumns, "moe_ext.", op, ": H = w2.size(1) must be at most ", kMaxColumns, ", got ", H);
  MOE_CHECK_VALUE(K < (int64_t{1} << 31) && E < (int64_t{1} << 31), "moe_ext.", op,
                  ": w2's dimensions must be below 2^31, got shape ", dims(w2.sizes()));
  const int config = config_override(op, "MOE_EXT_GEMV_COMBINE_CONFIG", cuda::moe_gemv_combine_num_configs());
  const c10::cuda::CUDAGuard guard(h.device());
  auto out = at::empty({M, H}, h.options());
  const int64_t E_route = expert_map.has_value() ? expert_map->numel() : E;
  // The rows this call can read at most (every slot a distinct expert): prefetched ahead of h only
  // when they fit in 60% of L2, else they would evict each other before use (on an H100 a layer
  // then read its w2 twice: Mixtral T=1 +16 us).
  const bool prefetch = static_cast<double>(M * topk) * static_cast<double>(H) * static_cast<double>(K) *
                            static_cast<double>(h.element_size()) <=
                        0.6 * static_cast<double>(l2_bytes(h.device().index()));
  C10_CUDA_CHECK(cuda::moe_gemv_combine(to_dtype(h.scalar_type()), h.const_data_ptr(), w2.const_data_ptr(),
                                        topk_ids.const_data_ptr<int32_t>(), topk_weights.const_data_ptr<float>(),
                                        map_ptr(expert_map), out.data_ptr(), M, topk, H, K, E, E_route, config,
                                        use_pdl(h.device().index()), prefetch, c10::cuda::getCurrentCUDAStream()));
  return out;
}

TORCH_LIBRARY_IMPL(moe_ext, CUDA, m) {
  m.impl("moe_gemv_silu", &moe_gemv_silu_cuda);
  m.impl("moe_gemv_combine", &moe_gemv_combine_cuda);
}

}  // namespace moe_ext
