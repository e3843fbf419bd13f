// Launch-side switches from runtime values to template instances (nvcc only).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../kernels/dtype.h"

namespace moe_ext::cuda {

// Calls f with a value of the element type named by dtype: f(float{}), f(__half{}) or
// f(__nv_bfloat16{}).
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace moe_ext::cuda
