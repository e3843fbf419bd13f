// Torch-free launchers of the decode expert GEMVs (kernels in csrc/kernels/expert_gemv.cuh), called
// by the g++-compiled adapter csrc/cuda/expert_gemv_cuda.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../kernels/dtype.h"

namespace moe_ext::cuda {

// Entries in each launcher's tile-config table; `config` below indexes it, -1 for the default.
int moe_gemv_silu_num_configs();
int moe_gemv_combine_num_configs();

// out[t * topk + j] = silu(a[t] @ w13[e][:I]^T) * (a[t] @ w13[e][I:]^T), e the local expert of
// topk_ids[t, j] (zeros where it has none). a: [M, K]; w13: [E, 2I, K]; topk_ids: [M, topk];
// expert_map: [E_route] or null (then E_route = E); out: [M * topk, I]. pdl: launch with
// programmatic dependent launch (sm_90+): the kernel may start as the router ahead of it finishes,
// and it lets the combine kernel queued behind it start its weight prefetch early.
cudaError_t moe_gemv_silu(DType dtype, const void* a, const void* w13, const int32_t* topk_ids,
                          const int32_t* expert_map, void* out, int64_t M, int64_t topk, int64_t I, int64_t K,
                          int64_t E, int64_t E_route, int config, bool pdl, cudaStream_t stream);

// out[t] = sum_j topk_weights[t, j] * (h[t * topk + j] @ w2[e_j]^T) over the slots with a local
// expert, fp32 sum, one rounding. h: [M * topk, K]; w2: [E, H, K]; topk_weights: [M, topk] fp32;
// out: [M, H]. pdl: as above; with `prefetch` too the kernel asks L2 for its weight rows before it
// waits for h (for callers that know the rows fit in L2).
cudaError_t moe_gemv_combine(DType dtype, const void* h, const void* w2, const int32_t* topk_ids,
                             const float* topk_weights, const int32_t* expert_map, void* out, int64_t M,
                             int64_t topk, int64_t H, int64_t K, int64_t E, int64_t E_route, int config,
                             bool pdl, bool prefetch, cudaStream_t stream);

}  // namespace moe_ext::cuda
