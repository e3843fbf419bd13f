// Torch-free launcher of the grouped expert GEMM (kernels in csrc/kernels/grouped_gemm.cuh), called
// by the g++-compiled adapter csrc/cuda/grouped_gemm_cuda.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../kernels/dtype.h"

namespace moe_ext::cuda {

// Entries in the launcher's tensor-core config table; `config` below is an index into it, or -1
// for the launcher's own choice.
int grouped_gemm_num_configs();
// Entries in the SiLU-and-mul variant's config table (0 without tensor cores in the build).
int grouped_gemm_silu_num_configs();
// The config the launcher runs with `config` -1 for these shapes (rows = M * topk; N is I for the SiLU-and-mul
// variant) and 16-byte aligned bf16/fp16 operands on a device of this compute capability and multiprocessor
// count: an index into that op's table, or -1 where no table serves them (cc < 80, a build without tensor-core
// code, empty shapes). Host arithmetic only, the same the launchers call.
int grouped_gemm_heuristic_config(bool silu, int64_t rows, int64_t N, int64_t K, int64_t E, int64_t num_blocks,
                                  int64_t block_size, int compute_capability, int num_sms);
// The bucket of grouped_gemm_table.h (a MmaBucket, else a GemmBucket; silu: a SiluBucket) whose config the op's
// heuristic runs for these shapes (N is I for the SiLU-and-mul variant), or -1 where grouped_gemm_heuristic_config
// gives -1 or the unaligned config (K % 8 != 0). For the tuner, which fills the tables by bucket.
int grouped_gemm_heuristic_bucket(bool silu, int64_t rows, int64_t K, int64_t E, int64_t N, int64_t num_blocks,
                                  int64_t block_size, int compute_capability, int num_sms);
// Entries of grouped_gemm_table.h's table for the op (buckets); 0 in a build without tensor-core code.
int grouped_gemm_num_buckets(bool silu);

// a: [M, K]; w: [E, N, K] (a's dtype); sorted_ids: [num_blocks * block_size]; expert_ids:
// [num_blocks]; num_post_padded: [1] (device, never read on the host); topk_weights: [M * topk]
// fp32 or null; out: [M * topk, N]. covered: null when out was zeroed beforehand, else
// [M * topk] uint8 zeroed beforehand: the launch then also zeroes every row no valid block writes.
// compute_capability: the device's, major * 10 + minor (bf16/fp16 take tensor-core tiles from 80;
// at 90 the Hopper wgmma tiles too, when the build has sm_90a code).
cudaError_t moe_grouped_gemm(DType dtype, const void* a, const void* w, const int32_t* sorted_ids,
                             const int32_t* expert_ids, const int32_t* num_post_padded, const float* topk_weights,
                             void* out, uint8_t* covered, int64_t M, int64_t topk, int64_t N, int64_t K, int64_t E,
                             int64_t num_blocks, int64_t block_size, int config, int compute_capability, int num_sms,
                             cudaStream_t stream);

// out[id] = silu(a[id // topk] @ w13[e][:I]^T) * (a[id // topk] @ w13[e][I:]^T), both products in
// fp32, one rounding. w13: [E, 2I, K]; out: [M * topk, I]; the rest as moe_grouped_gemm. bf16 and
// fp16 on sm_80+ only (tensor cores; cudaErrorInvalidValue otherwise: the caller composes
// moe_grouped_gemm and silu_and_mul there).
cudaError_t moe_grouped_gemm_silu(DType dtype, const void* a, const void* w13, const int32_t* sorted_ids,
                                  const int32_t* expert_ids, const int32_t* num_post_padded, void* out,
                                  uint8_t* covered, int64_t M, int64_t topk, int64_t I, int64_t K, int64_t E,
                                  int64_t num_blocks, int64_t block_size, int config, int compute_capability,
                                  int num_sms, cudaStream_t stream);

}  // namespace moe_ext::cuda
