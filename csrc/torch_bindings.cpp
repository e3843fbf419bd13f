// The moe_ext operator library: every op's schema, in one place. Backends register their kernels
// with TORCH_LIBRARY_IMPL in csrc/cpu/ and csrc/cuda/; fake (meta) kernels live in moe_ext/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(moe_ext, m) {
  // Router top-k gating: [T, E] logits -> (topk_weights [T, topk] fp32, topk_ids [T, topk] int32),
  // descending score, ties to the lower expert; optional DeepSeek correction bias and grouped top-k.
  m.def(
      "topk_gating(Tensor router_logits, int topk, str scoring_func=\"softmax\", "
      "bool renormalize=False, Tensor? correction_bias=None, int num_expert_group=1, "
      "int topk_group=1, float routed_scaling_factor=1.0) -> (Tensor topk_weights, Tensor topk_ids)");

  // Block alignment by expert in vLLM's layout: flat ids (t * topk + j) grouped by expert in
  // ascending order, each expert padded to block_size with the sentinel T * topk.
  m.def(
      "moe_align_block_size(Tensor topk_ids, int num_experts, int block_size, "
      "Tensor? expert_map=None) -> (Tensor sorted_token_ids, Tensor expert_ids, "
      "Tensor num_tokens_post_padded)");

  // topk_gating followed by moe_align_block_size, as one op (one kernel for decode on CUDA).
  m.def(
      "fused_topk_align(Tensor router_logits, int topk, int block_size, "
      "str scoring_func=\"softmax\", bool renormalize=False, Tensor? correction_bias=None, "
      "int num_expert_group=1, int topk_group=1, float routed_scaling_factor=1.0, "
      "Tensor? expert_map=None) -> (Tensor topk_weights, Tensor topk_ids, "
      "Tensor sorted_token_ids, Tensor expert_ids, Tensor num_tokens_post_padded)");

  // silu(x[..., :I]) * x[..., I:] for x [..., 2I], fp32 math, output in x's dtype.
  m.def("silu_and_mul(Tensor x) -> Tensor");

  // Grouped expert GEMM with gather/scatter: out[id] = a[id // topk] @ w[e]^T (* topk_weights[id])
  // for each id of a block of expert e; [M * topk, N] in a's dtype, zero where no block writes
  // (left unwritten with zero_unwritten=False, for callers that never read those rows).
  m.def(
      "moe_grouped_gemm(Tensor a, Tensor w, Tensor sorted_token_ids, Tensor expert_ids, "
      "Tensor num_tokens_post_padded, int topk, Tensor? topk_weights=None, bool zero_unwritten=True) -> Tensor");

  // moe_grouped_gemm with w13 [E, 2I, K] fused with silu_and_mul: out[id] = silu(gate) * up, [M * topk, I],
  // the gate and up products in fp32 and rounded once (no [M * topk, 2I] intermediate).
  m.def(
      "moe_grouped_gemm_silu(Tensor a, Tensor w13, Tensor sorted_token_ids, Tensor expert_ids, "
      "Tensor num_tokens_post_padded, int topk, bool zero_unwritten=True) -> Tensor");

  // Decode expert GEMV with SiLU-and-mul, straight from topk_ids (no alignment): out[t * topk + j] =
  // silu(a[t] @ w13[e][:I]^T) * (a[t] @ w13[e][I:]^T), e = expert_map[id] (or id), zeros where the
  // slot has no local expert; [M * topk, I], fp32 products, one rounding.
  m.def("moe_gemv_silu(Tensor a, Tensor w13, Tensor topk_ids, Tensor? expert_map=None) -> Tensor");

  // Decode expert GEMV of w2 fused with the weighted top-k combine: out[t] = sum_j topk_weights[t, j]
  // * (h[t * topk + j] @ w2[e_j]^T) over the slots with a local expert; [M, H], fp32 sum, one rounding.
  m.def(
      "moe_gemv_combine(Tensor h, Tensor w2, Tensor topk_ids, Tensor topk_weights, "
      "Tensor? expert_map=None) -> Tensor");

  // Entries in a CUDA launcher's tile-config table, which the MOE_EXT_*_CONFIG overrides index (for
  // tuners and tests): op is "moe_grouped_gemm", "moe_grouped_gemm_silu", "moe_gemv_silu" or
  // "moe_gemv_combine". Registered by CUDA builds only.
  m.def("num_tile_configs(str op) -> int");

  // The config a grouped-GEMM launcher's heuristic takes for these shapes on a device of this compute
  // capability (major * 10 + minor) and multiprocessor count, 16-byte aligned bf16/fp16 operands: an index
  // into num_tile_configs(op)'s table, or -1 where no table serves them. op: "moe_grouped_gemm" or
  // "moe_grouped_gemm_silu" (N is then I). Registered by CUDA builds only; needs no GPU.
  m.def(
      "grouped_gemm_tile_config(str op, int rows, int N, int K, int num_experts, int num_blocks, int block_size, "
      "int compute_capability, int num_sms) -> int");

  // The bucket of csrc/cuda/grouped_gemm_table.h whose tuned config op's heuristic runs for these shapes (same
  // arguments as grouped_gemm_tile_config), or -1 where no bucket applies: for the tuner, which fills that table by
  // bucket. Registered by CUDA builds only; needs no GPU.
  m.def(
      "grouped_gemm_tile_bucket(str op, int rows, int N, int K, int num_experts, int num_blocks, int block_size, "
      "int compute_capability, int num_sms) -> int");

  // Top-k combine: [T, topk, H] -> [T, H], optionally weighted by topk_weights [T, topk], fp32 sum.
  m.def("moe_combine(Tensor x, Tensor? topk_weights=None) -> Tensor");
}
