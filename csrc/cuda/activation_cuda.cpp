// CUDA adapters for SiLU-and-mul and the top-k combine: validate, allocate through PyTorch, launch
// on the current stream under a device guard. MOE_EXT_PDL="0" launches without programmatic
// dependent launch (sm_90+ uses it; read on every call).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../core/validate.h"
#include "adapter_utils.h"
#include "launchers.h"

namespace moe_ext {

at::Tensor silu_and_mul_cuda(const at::Tensor& x) {  // x: [..., 2 * I]
  check_silu_and_mul_args(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t d = x.size(-1) / 2;
  auto out_shape = x.sizes().vec();
  out_shape.back() = d;
  auto out = at::empty(out_shape, x.options());  // [..., I]
  const int64_t rows = d == 0 ? 0 : x.numel() / (2 * d);
  C10_CUDA_CHECK(cuda::silu_and_mul(to_dtype(x.scalar_type()), x.const_data_ptr(), out.data_ptr(), rows, d,
                                    num_sms(x.device().index()), use_pdl(x.device().index()),
                                    c10::cuda::getCurrentCUDAStream()));
  return out;
}

// x: [T, topk, H]; topk_weights: optional [T, topk] fp32. Returns [T, H].
at::Tensor moe_combine_cuda(const at::Tensor& x, const std::optional<at::Tensor>& topk_weights) {
  check_combine_args(x, topk_weights);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({x.size(0), x.size(2)}, x.options());
  const float* w = topk_weights.has_value() ? topk_weights->const_data_ptr<float>() : nullptr;
  C10_CUDA_CHECK(cuda::moe_combine(to_dtype(x.scalar_type()), x.const_data_ptr(), w, out.data_ptr(), x.size(0),
                                   static_cast<int>(x.size(1)), x.size(2), num_sms(x.device().index()),
                                   use_pdl(x.device().index()), c10::cuda::getCurrentCUDAStream()));
  return out;
}

TORCH_LIBRARY_IMPL(moe_ext, CUDA, m) {
  m.impl("silu_and_mul", &silu_and_mul_cuda);
  m.impl("moe_combine", &moe_combine_cuda);
}

}  // namespace moe_ext
