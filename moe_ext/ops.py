"""Typed wrappers over torch.ops.moe_ext, one per op, with each op's fake (meta) kernel beside it.

Shapes use T = tokens, E = experts, k = topk, H = hidden size, I = intermediate size.
All ops size their outputs from input shapes only, so they trace under torch.compile and capture
in CUDA graphs.
"""

from __future__ import annotations

import torch

from .reference import align_max_padded as _align_max_padded_int

__all__ = [
    "topk_gating",
    "moe_align_block_size",
    "fused_topk_align",
    "silu_and_mul",
    "moe_grouped_gemm",
    "moe_grouped_gemm_silu",
    "moe_combine",
    "align_max_padded",
]


def _groups(num_expert_group: int | None, topk_group: int | None) -> tuple[int, int]:
    g = 1 if num_expert_group is None else num_expert_group
    return g, (g if topk_group is None else topk_group)


def align_max_padded(numel, num_experts: int, block_size: int):
    """Length of sorted_token_ids for numel = T * k ids (works on SymInts under torch.compile)."""
    if isinstance(numel, int):
        return _align_max_padded_int(numel, num_experts, block_size)
    raw = numel + torch.sym_min(num_experts, numel) * (block_size - 1)
    return (raw + block_size - 1) // block_size * block_size


def topk_gating(
    router_logits: torch.Tensor,
    topk: int,
    scoring_func: str = "softmax",
    renormalize: bool = False,
    correction_bias: torch.Tensor | None = None,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router top-k gating.

    Args:
        router_logits: [T, E] fp32, bf16 or fp16, last dim contiguous; 1 <= E <= 1024.
        topk: experts per token, 1 <= topk <= min(E, 32).
        scoring_func: "softmax" (over all E) or "sigmoid" (per expert).
        renormalize: divide the k selected scores by their sum. softmax + renormalize equals
            GPT-OSS/Mixtral's top-k-then-softmax over the selected logits.
        correction_bias: [E] fp32, added to the scores for *selection only* (DeepSeek-V3).
        num_expert_group, topk_group: group-limited routing: E splits into num_expert_group equal
            groups, a group scores the sum of its two best (biased) scores, and only the best
            topk_group groups compete. None means no grouping (topk_group defaults to all groups).
        routed_scaling_factor: multiplied into the final weights.

    Returns:
        topk_weights: [T, topk] fp32, the unbiased scores of the chosen experts (renormalized and
            scaled as asked), in descending selection-key order.
        topk_ids: [T, topk] int32 in [0, E), distinct per token; ties go to the lower index.

    NaN logits count as -inf and +inf as the largest float, so ids stay valid and distinct and
    weights stay finite whatever the logits hold.
    """
    g, tg = _groups(num_expert_group, topk_group)
    return torch.ops.moe_ext.topk_gating.default(
        router_logits, topk, scoring_func, renormalize, correction_bias, g, tg, float(routed_scaling_factor)
    )


@torch.library.register_fake("moe_ext::topk_gating")
def _topk_gating_fake(router_logits, topk, scoring_func="softmax", renormalize=False, correction_bias=None,
                      num_expert_group=1, topk_group=1, routed_scaling_factor=1.0):
    T = router_logits.shape[0]
    return (router_logits.new_empty((T, topk), dtype=torch.float32),
            router_logits.new_empty((T, topk), dtype=torch.int32))


def moe_align_block_size(
    topk_ids: torch.Tensor, num_experts: int, block_size: int, expert_map: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the flat ids f = t * k + j by expert, padded to blocks (vLLM's layout).

    Args:
        topk_ids: [T, k] int32. Ids outside [0, num_experts) (e.g. -1 padding rows) are skipped.
        num_experts: E, 1 <= E <= 1024.
        block_size: rows per block of the grouped GEMM, >= 1.
        expert_map: optional [E] int32, global expert -> local expert, or -1 for experts that are
            not on this rank (skipped).

    Returns:
        sorted_token_ids: [max_padded] int32, max_padded = T*k + min(E, T*k)*(block_size-1)
            rounded up to a multiple of block_size. Each expert with ids gets a run (in ascending
            global expert order) of its flat indices in ascending order, padded to a multiple of
            block_size with the sentinel T*k; the tail past the runs also holds the sentinel.
        expert_ids: [max_padded // block_size] int32, each block's (local) expert; -1 for unused
            tail blocks. Experts with no ids get no block.
        num_tokens_post_padded: [1] int32, total length of the runs (stays on the device).
    """
    return torch.ops.moe_ext.moe_align_block_size.default(topk_ids, num_experts, block_size, expert_map)


def _align_fake_outputs(ref: torch.Tensor, numel, num_experts: int, block_size: int):
    max_padded = align_max_padded(numel, num_experts, block_size)
    return (ref.new_empty((max_padded,), dtype=torch.int32),
            ref.new_empty((max_padded // block_size,), dtype=torch.int32),
            ref.new_empty((1,), dtype=torch.int32))


@torch.library.register_fake("moe_ext::moe_align_block_size")
def _moe_align_block_size_fake(topk_ids, num_experts, block_size, expert_map=None):
    return _align_fake_outputs(topk_ids, topk_ids.numel(), num_experts, block_size)


def fused_topk_align(
    router_logits: torch.Tensor,
    topk: int,
    block_size: int,
    scoring_func: str = "softmax",
    renormalize: bool = False,
    correction_bias: torch.Tensor | None = None,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
    expert_map: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_gating followed by moe_align_block_size (num_experts = E of router_logits), as one op.

    Returns (topk_weights [T, k] fp32, topk_ids [T, k] int32, sorted_token_ids, expert_ids,
    num_tokens_post_padded), identical to calling the two ops. On CUDA this is a single kernel
    for decode-sized T.
    """
    g, tg = _groups(num_expert_group, topk_group)
    return torch.ops.moe_ext.fused_topk_align.default(
        router_logits, topk, block_size, scoring_func, renormalize, correction_bias, g, tg,
        float(routed_scaling_factor), expert_map)


@torch.library.register_fake("moe_ext::fused_topk_align")
def _fused_topk_align_fake(router_logits, topk, block_size, scoring_func="softmax", renormalize=False,
                           correction_bias=None, num_expert_group=1, topk_group=1, routed_scaling_factor=1.0,
                           expert_map=None):
    T, E = router_logits.shape
    weights, ids = _topk_gating_fake(router_logits, topk, scoring_func, renormalize, correction_bias,
                                     num_expert_group, topk_group, routed_scaling_factor)
    return (weights, ids, *_align_fake_outputs(router_logits, T * topk, E, block_size))


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :I]) * x[..., I:] for x [..., 2I] (fp32, bf16, fp16; contiguous).

    Math in fp32; returns [..., I] in x's dtype. On CUDA, bf16 and fp16 inputs take approximate
    exp and reciprocal instructions (a few fp32 ulp, far under the output's rounding); fp32 inputs
    take expf and an IEEE division.
    """
    return torch.ops.moe_ext.silu_and_mul.default(x)


@torch.library.register_fake("moe_ext::silu_and_mul")
def _silu_and_mul_fake(x):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


def moe_grouped_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    sorted_token_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    num_tokens_post_padded: torch.Tensor,
    topk: int,
    topk_weights: torch.Tensor | None = None,
    zero_unwritten: bool = True,
) -> torch.Tensor:
    """Grouped expert GEMM with gather and scatter.

    Args:
        a: [M, K] activations (fp32, bf16 or fp16).
        w: [E_local, N, K] expert weights, a's dtype (w13 [E, 2I, H] or w2 [E, H, I]).
        sorted_token_ids, expert_ids, num_tokens_post_padded: from moe_align_block_size; the
            block size is sorted_token_ids.numel() // expert_ids.numel().
        topk: rows of the output per row of a. The first GEMM passes hidden states [T, H] with
            topk = k; the second passes activations [T*k, I] with topk = 1.
        topk_weights: optional fp32 with M*topk elements (e.g. [T, k]), multiplied into row id.
        zero_unwritten: False leaves the rows that no block of a valid expert names unwritten
            (whatever the allocator held) instead of zeroing them, which on CUDA saves a memset or
            a zero pass (one launch). For callers that never read those rows, or that know every
            row is named: fused_moe's first GEMM (the second gathers only named rows), and its second
            when every id is a valid local expert (no expert_map: the router's ids are in [0, E)).

    Returns:
        [M * topk, N] in a's dtype: row id = a[id // topk] @ w[e]^T (* topk_weights.flatten()[id])
        for each id < M*topk in the first num_tokens_post_padded slots, e its block's expert.
        Rows that no block of a valid expert (0 <= e < E_local) names are zero (zero_unwritten,
        the default) or unspecified.
    """
    return torch.ops.moe_ext.moe_grouped_gemm.default(
        a, w, sorted_token_ids, expert_ids, num_tokens_post_padded, topk, topk_weights, zero_unwritten)


@torch.library.register_fake("moe_ext::moe_grouped_gemm")
def _moe_grouped_gemm_fake(a, w, sorted_token_ids, expert_ids, num_tokens_post_padded, topk, topk_weights=None,
                           zero_unwritten=True):
    return a.new_empty((a.shape[0] * topk, w.shape[1]))


def moe_grouped_gemm_silu(
    a: torch.Tensor,
    w13: torch.Tensor,
    sorted_token_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    num_tokens_post_padded: torch.Tensor,
    topk: int,
    zero_unwritten: bool = True,
) -> torch.Tensor:
    """The first grouped GEMM of an MoE layer fused with SiLU-and-mul.

    Args:
        a: [M, K] activations (fp32, bf16 or fp16).
        w13: [E_local, 2I, K] expert weights, a's dtype: gate rows [0, I), then up rows [I, 2I).
        sorted_token_ids, expert_ids, num_tokens_post_padded, topk, zero_unwritten: as
            moe_grouped_gemm.

    Returns:
        [M * topk, I] in a's dtype: row id = silu(a[id // topk] @ w13[e, :I]^T) * (a[id // topk] @
        w13[e, I:]^T), e its block's expert; rows no block of a valid expert names are zero, or
        unspecified with zero_unwritten=False (same row semantics as moe_grouped_gemm). This is
        silu_and_mul(moe_grouped_gemm(a, w13, ...)) except that the gate and up products stay fp32
        until the single final rounding, where the two ops round the [M * topk, 2I] product to a's
        dtype first: the fused op is at least as accurate.
        (On CUDA fp32, and bf16/fp16 before sm_80, the op composes the two ops.)
    """
    return torch.ops.moe_ext.moe_grouped_gemm_silu.default(
        a, w13, sorted_token_ids, expert_ids, num_tokens_post_padded, topk, zero_unwritten)


@torch.library.register_fake("moe_ext::moe_grouped_gemm_silu")
def _moe_grouped_gemm_silu_fake(a, w13, sorted_token_ids, expert_ids, num_tokens_post_padded, topk,
                                zero_unwritten=True):
    return a.new_empty((a.shape[0] * topk, w13.shape[1] // 2))


def moe_combine(x: torch.Tensor, topk_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k combine: x [T, k, H] -> [T, H], sum over k in fp32, in x's dtype.

    topk_weights: optional [T, k] fp32, multiplied in (leave None when the second grouped GEMM
    already applied them).
    """
    return torch.ops.moe_ext.moe_combine.default(x, topk_weights)


@torch.library.register_fake("moe_ext::moe_combine")
def _moe_combine_fake(x, topk_weights=None):
    return x.new_empty((x.shape[0], x.shape[2]))


def moe_gemv_silu(
    a: torch.Tensor,
    w13: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode expert GEMV with SiLU-and-mul, straight from the router's ids (no alignment).

    Args:
        a: [M, K] activations (fp32, bf16 or fp16).
        w13: [E_local, 2I, K] expert weights, a's dtype: gate rows [0, I), then up rows [I, 2I).
        topk_ids: [M, topk] int32 routed experts.
        expert_map: optional [E] int32, routed (global) expert -> local expert or -1.

    Returns:
        [M * topk, I] in a's dtype: row t * topk + j = silu(a[t] @ w13[e, :I]^T) * (a[t] @ w13[e, I:]^T),
        e the local expert of topk_ids[t, j]; zero where there is none (an id outside [0, E), mapped
        to -1, or a local expert outside [0, E_local)). Products in fp32, one rounding. Each slot reads
        its expert's weights: meant for decode, where slots rarely share an expert.
    """
    return torch.ops.moe_ext.moe_gemv_silu.default(a, w13, topk_ids, expert_map)


@torch.library.register_fake("moe_ext::moe_gemv_silu")
def _moe_gemv_silu_fake(a, w13, topk_ids, expert_map=None):
    return a.new_empty((a.shape[0] * topk_ids.shape[1], w13.shape[1] // 2))


def moe_gemv_combine(
    h: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    expert_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode expert GEMV of the second projection fused with the weighted top-k combine.

    Args:
        h: [M * topk, K] activations (moe_gemv_silu's output), fp32, bf16 or fp16.
        w2: [E_local, H, K] expert weights, h's dtype.
        topk_ids: [M, topk] int32; topk_weights: [M, topk] fp32.
        expert_map: as in moe_gemv_silu.

    Returns:
        [M, H] in h's dtype: row t = sum_j topk_weights[t, j] * (h[t * topk + j] @ w2[e_j]^T) over the
        slots with a local expert (zero if none), summed over j in order in fp32, one rounding.
    """
    return torch.ops.moe_ext.moe_gemv_combine.default(h, w2, topk_ids, topk_weights, expert_map)


@torch.library.register_fake("moe_ext::moe_gemv_combine")
def _moe_gemv_combine_fake(h, w2, topk_ids, topk_weights, expert_map=None):
    return h.new_empty((topk_ids.shape[0], w2.shape[1]))


def num_tile_configs(op: str) -> int:
    """Entries in the CUDA launcher's tile-config table of op ("moe_grouped_gemm",
    "moe_grouped_gemm_silu", "moe_gemv_silu", "moe_gemv_combine"): the valid indices of its
    MOE_EXT_*_CONFIG override, for tuners and tests. CUDA builds only."""
    return torch.ops.moe_ext.num_tile_configs.default(op)


def grouped_gemm_tile_config(op: str, rows: int, N: int, K: int, num_experts: int, num_blocks: int, block_size: int,
                             compute_capability: int | None = None, num_sms: int | None = None) -> int:
    """The config index the CUDA launcher of op ("moe_grouped_gemm" or "moe_grouped_gemm_silu") takes by its
    heuristic for rows = M * topk output rows, N output columns (I for the SiLU variant), K, num_experts
    local experts and num_blocks blocks of block_size rows (as moe_align_block_size sizes them), with
    16-byte aligned bf16/fp16 operands: an index into num_tile_configs(op)'s table (the value
    MOE_EXT_GROUPED_GEMM[_SILU]_CONFIG would force), or -1 where no tensor-core table serves the shapes.
    compute_capability (major * 10 + minor) and num_sms default to the current CUDA device's; given both,
    no GPU is needed. CUDA builds only."""
    if compute_capability is None or num_sms is None:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        compute_capability = props.major * 10 + props.minor if compute_capability is None else compute_capability
        num_sms = props.multi_processor_count if num_sms is None else num_sms
    return torch.ops.moe_ext.grouped_gemm_tile_config.default(op, rows, N, K, num_experts, num_blocks, block_size,
                                                              compute_capability, num_sms)


def grouped_gemm_tile_bucket(op: str, rows: int, N: int, K: int, num_experts: int, num_blocks: int,
                             block_size: int, compute_capability: int, num_sms: int) -> int:
    """The bucket of csrc/cuda/grouped_gemm_table.h (MmaBucket then GemmBucket for "moe_grouped_gemm", MmaBucket then
    SiluBucket for "moe_grouped_gemm_silu") whose tuned config op's heuristic takes for these shapes (arguments as
    grouped_gemm_tile_config's), or -1 where the heuristic gives -1 or the unaligned config (K % 8 != 0). For
    bench/tile_table.py, which fills the tables by bucket from the tuner's timings. CUDA builds only; needs no
    GPU."""
    return torch.ops.moe_ext.grouped_gemm_tile_bucket.default(op, rows, N, K, num_experts, num_blocks, block_size,
                                                              compute_capability, num_sms)
