// Torch-free CUDA launchers: raw pointers, sizes and a stream in, an error code out. Compiled by
// nvcc in csrc/cuda/*.cu; called by the g++-compiled adapters in csrc/cuda/*_cuda.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../kernels/dtype.h"

namespace moe_ext::cuda {

// x: [rows, 2 * d]; out: [rows, d]; both of `dtype`, contiguous.
cudaError_t silu_and_mul(DType dtype, const void* x, void* out, int64_t rows, int64_t d, int num_sms,
                         cudaStream_t stream);

// x: [num_tokens, topk, h]; weights: [num_tokens, topk] fp32 or null; out: [num_tokens, h].
cudaError_t moe_combine(DType dtype, const void* x, const float* weights, void* out, int64_t num_tokens,
                        int topk, int64_t h, int num_sms, cudaStream_t stream);

}  // namespace moe_ext::cuda
