"""The policy layer: composes the ops into one MoE layer and makes its shape-based choices.

Only this file holds the layer's heuristics (the expert path by token count, the block size). Below
it each op returns one result; how its CUDA kernel gets there (the alignment's paths, the fused
routing's single block or grid) is the op's own choice by size.
"""

from __future__ import annotations

import torch

from . import ops

_HOPPER_TILES: dict[int, bool] = {}


@torch.compiler.assume_constant_result
def hopper_tiles(device_index: int) -> bool:
    """Whether CUDA device `device_index` is a cc 9.0 GPU, where the grouped GEMMs run the wgmma
    tiles at block_size >= 64 (a build with sm_90a code, the default; without it the launcher runs
    its mma.sync tiles, correct but slower there). Cached per device; a constant under
    torch.compile."""
    if device_index not in _HOPPER_TILES:
        _HOPPER_TILES[device_index] = torch.cuda.get_device_capability(device_index) == (9, 0)
    return _HOPPER_TILES[device_index]


# Hopper's 64-row wgmma blocks (weight tiles by TMA) stream an expert's weights faster than the 16-row
# mma.sync blocks once a hit expert expects more than half a row for experts of this many bytes (w13 + w2)
# or more, more than two rows for smaller ones (bench/NOTES.md, session 16: DeepSeek-V3's 88 MB and
# Mixtral's 352 MB experts gained 1-3% from about one row an expert, GPT-OSS's 50 MB and Qwen3's 9.4 MB
# lost 0.5-1% there).
LARGE_EXPERT_BYTES = 64 << 20


def choose_block_size(num_tokens: int, topk: int, num_experts: int, hopper: bool = False,
                      expert_bytes: int = 0) -> int:
    """Rows per grouped-GEMM block: the smallest of 16, 32, 64, 128 that holds the expected rows of
    one hit expert, T*k / min(E, T*k), so blocks are mostly full at decode and large at prefill
    (128-row tiles ran 20-29% faster than 64-row ones at T = 4096 on an H100: bench/NOTES.md).

    hopper (hopper_tiles): the wgmma tiles from a few rows an expert, whose blocks may be mostly
    empty: the tiles skip a block's empty 64-row groups, and weight tiles by TMA stream faster than
    the 16-row mma.sync tiles, which also read an expert's weights once per 16 rows. 16 while a hit
    expert expects at most two rows (at most half a row where expert_bytes, one expert's w13 + w2, is
    LARGE_EXPERT_BYTES or more), 64 below eight rows, 128 below 96 and 192 from 96: three warpgroups
    under one weight tile, so the weights pulled through L2 serve 192 rows instead of 128 (session
    15's ncu found the prefill tiles bound by the link between the two L2 partitions). H200, the
    layer (bench/results/h200-moe-block-threshold*.md): 16-row blocks at 16 rows an expert ran
    DeepSeek-V3 T=512 at 49% of the floor, 64- or 128-row ones at 88-91%; Mixtral T=4 89.5% -> 92.1%
    at 64 rows.

    Written as comparisons so a symbolic token count under torch.compile is guarded, not
    specialized."""
    rows = num_tokens * topk
    if hopper:
        few = 2 * rows <= num_experts if expert_bytes >= LARGE_EXPERT_BYTES else rows <= 2 * num_experts
        if few:
            return 16
        if rows < 8 * num_experts:
            return 64
        return 192 if rows >= 96 * num_experts else 128
    if rows <= 16 * num_experts:
        return 16
    if rows <= 32 * num_experts:
        return 32
    if rows <= 64 * num_experts:
        return 64
    return 128


def default_block_size(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk: int,
                       num_experts: int, hopper: bool | None = None) -> int:
    """fused_moe's block size when none is given: choose_block_size for hidden_states' token count, with
    the device's hopper_tiles (or `hopper`, where the caller has it already) and one expert's w13 + w2
    bytes."""
    if hopper is None:
        hopper = hidden_states.is_cuda and hopper_tiles(hidden_states.device.index)
    expert_bytes = (w13.shape[1] * w13.shape[2] + w2.shape[1] * w2.shape[2]) * w13.element_size()
    return choose_block_size(hidden_states.shape[0], topk, num_experts, hopper, expert_bytes)


# The decode expert GEMVs (moe_gemv_silu + moe_gemv_combine, straight from topk_ids: no alignment,
# no [T*k, H] intermediate, three launches with the router) read one expert's weights per token
# slot, so slots that share an expert read it again; the grouped GEMMs read each hit expert once.
# The GEMVs are used while T*k <= E'/4, E' the experts a token can reach (E, or for grouped top-k
# E * topk_group / num_expert_group): on an H100 they won there at all four model shapes (Qwen3 and
# DeepSeek-V3 T <= 4, GPT-OSS T <= 8, Mixtral T = 1) and tied or lost above
# (bench/results/h100-80gb-hbm3-moe-decode.md; DeepSeek-V3 at T = 8, 87.3% of the floor against
# 89.3% for the grouped GEMMs, is where the grouped reach mattered).
GEMV_EXPERTS_PER_SLOT = 4


def use_decode_gemv(hidden_states: torch.Tensor, topk: int, num_experts: int, num_expert_group: int | None = None,
                    topk_group: int | None = None) -> bool:
    """fused_moe's default for decode_gemv: on CUDA while T * topk * 4 <= the experts a token can
    reach. Integer math, and E, topk and the groups are static under torch.compile, so a symbolic
    token count adds one guard."""
    reach = num_experts
    if num_expert_group and topk_group and num_expert_group > 1:
        reach = num_experts * topk_group // num_expert_group
    return hidden_states.is_cuda and hidden_states.shape[0] * topk * GEMV_EXPERTS_PER_SLOT <= reach


def use_fused_silu(hidden_states: torch.Tensor, block_size: int, hopper: bool = False) -> bool:
    """fused_moe's default for fuse_silu: the fused first GEMM where it is a tensor-core kernel of its
    own (bf16/fp16 on CUDA) and the blocks are prefill-sized (block_size >= 32), except on Hopper. On an
    H100 with the mma.sync tiles it was 1-6% faster from T = 1024 (Qwen3 T=4096 1428 against 1491 µs,
    Mixtral 10.13 against 10.81 ms) and 0.5-2% slower with the 16-row decode blocks (its grid has half
    the CTAs of the plain GEMM's: Mixtral T=16 1026 against 1005 µs;
    bench/results/h100-80gb-hbm3-moe-silu-epilogue.md). Elsewhere the op would compose the same two
    ops, or (CPU) run slower. hopper (hopper_tiles): never. Against the plain wgmma tiles with weights
    by TMA (128- and 192-row blocks) and silu_and_mul, the fused tiles were slower at 17 of the 19 layer
    rows measured on an H200 (session 23, bench/results/h200-moe-fuse-s23*.md: two runs at T = 512-4096
    and one where a hit expert expects 75 rows): by 2-10% where the two ops run on 192-row tiles
    (GPT-OSS T=4096 2339 against 2205 µs, Qwen3 T=4096 916 against 830), 3-8% on 128-row ones (Qwen3
    T=1200 453 against 418); DeepSeek-V3 T=2400 0.7% faster. (Before session 23 it fused above 64 rows an
    expert on Hopper.)"""
    if not (hidden_states.is_cuda and hidden_states.dtype in (torch.bfloat16, torch.float16) and block_size >= 32):
        return False
    return not hopper


def route(
    router_logits: torch.Tensor,
    topk: int,
    block_size: int,
    *,
    scoring_func: str = "softmax",
    renormalize: bool = False,
    correction_bias: torch.Tensor | None = None,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
    expert_map: torch.Tensor | None = None,
):
    """Gating + alignment by the fused op at every token count. On CUDA the op picks its kernels by T
    (csrc/cuda/routing_cuda.cpp): one block at decode, a cooperative grid with one barrier up to 32
    tokens a multiprocessor, the router and alignment kernels in turn above.
    The grid path measured faster than the two kernels at every T it takes (H200, E = 256 top-8,
    graph replay, session 18, the alignment on its cooperative grid: 5.62 against 6.19 us at T = 32,
    5.75 against 6.64 at T = 128, 7.81 against 8.96 at T = 1024; bench/results/h200-fused-routing.md),
    so no token count needs the separate ops and the choice adds no guard under torch.compile.

    Returns (topk_weights, topk_ids, sorted_token_ids, expert_ids, num_tokens_post_padded).
    """
    return ops.fused_topk_align(router_logits, topk, block_size, scoring_func=scoring_func, renormalize=renormalize,
                                correction_bias=correction_bias, num_expert_group=num_expert_group,
                                topk_group=topk_group, routed_scaling_factor=routed_scaling_factor,
                                expert_map=expert_map)


def fused_moe(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    router_logits: torch.Tensor,
    topk: int,
    *,
    scoring_func: str = "softmax",
    renormalize: bool = False,
    correction_bias: torch.Tensor | None = None,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
    expert_map: torch.Tensor | None = None,
    block_size: int | None = None,
    fuse_silu: bool | None = None,
    decode_gemv: bool | None = None,
) -> torch.Tensor:
    """One MoE layer: route, then for each chosen expert silu(x W_gate^T) * (x W_up^T) W_down^T,
    weighted and summed over the k experts.

    Args:
        hidden_states: [T, H] (bf16, fp16 or fp32).
        w13: [E_local, 2I, H], gate rows first then up rows, hidden_states' dtype.
        w2: [E_local, H, I], hidden_states' dtype.
        router_logits: [T, E] (E = E_local unless expert_map is given).
        topk: experts per token.
        scoring_func, renormalize, correction_bias, num_expert_group, topk_group,
            routed_scaling_factor: routing, as in moe_ext.topk_gating.
        expert_map: optional [E] int32, global -> local expert or -1 (expert parallelism: tokens
            routed to experts off this rank contribute nothing here).
        block_size: grouped-GEMM block rows; default from choose_block_size.
        fuse_silu: the first grouped GEMM and SiLU-and-mul as one op (moe_grouped_gemm_silu: no
            [T*k, 2I] intermediate, which is then not rounded to the dtype either) or as two.
            None: fused for bf16/fp16 on CUDA with block_size >= 32 except on Hopper, where the
            plain wgmma tiles and silu_and_mul measured faster (use_fused_silu); two ops otherwise.
        decode_gemv: run the experts as GEMVs straight from the router's ids (moe_gemv_silu, then
            moe_gemv_combine with the weighted sum fused in; no alignment) instead of the grouped
            GEMMs. None: on CUDA while T * topk <= E / 4 (use_decode_gemv; for grouped top-k, E
            counts the experts of the topk_group best groups only). block_size and
            fuse_silu do not apply then.

    Returns:
        [T, H] in hidden_states' dtype.
    """
    if hidden_states.dim() != 2:
        raise ValueError(f"fused_moe: hidden_states must be [T, H], got shape {tuple(hidden_states.shape)}")
    if router_logits.dim() != 2 or router_logits.shape[0] != hidden_states.shape[0]:
        raise ValueError(f"fused_moe: router_logits must be [T, E] with T = {hidden_states.shape[0]}, "
                         f"got shape {tuple(router_logits.shape)}")
    if w13.dim() != 3 or w2.dim() != 3 or w13.shape[0] != w2.shape[0]:
        raise ValueError(f"fused_moe: w13 [E, 2I, H] and w2 [E, H, I] must share E, got "
                         f"{tuple(w13.shape)} and {tuple(w2.shape)}")
    T, H = hidden_states.shape
    E = router_logits.shape[1]
    if expert_map is None and w13.shape[0] != E:
        raise ValueError(f"fused_moe: w13 has {w13.shape[0]} experts but router_logits has {E} "
                         "(pass expert_map for expert parallelism)")
    if w13.shape[2] != H or w2.shape[1] != H or w13.shape[1] != 2 * w2.shape[2]:
        raise ValueError(f"fused_moe: shapes disagree: hidden_states [T, {H}], w13 {tuple(w13.shape)} "
                         f"(expected [E, 2I, {H}]), w2 {tuple(w2.shape)} (expected [E, {H}, I])")
    if expert_map is not None and tuple(expert_map.shape) != (E,):
        raise ValueError(f"fused_moe: expert_map must be [E] = [{E}] (one entry per routed expert), got shape "
                         f"{tuple(expert_map.shape)}")
    if decode_gemv is None:
        decode_gemv = use_decode_gemv(hidden_states, topk, E, num_expert_group, topk_group)
    if decode_gemv:
        weights, ids = ops.topk_gating(
            router_logits, topk, scoring_func=scoring_func, renormalize=renormalize,
            correction_bias=correction_bias, num_expert_group=num_expert_group, topk_group=topk_group,
            routed_scaling_factor=routed_scaling_factor)
        h = ops.moe_gemv_silu(hidden_states, w13, ids, expert_map)       # [T*k, I]
        return ops.moe_gemv_combine(h, w2, ids, weights, expert_map)     # [T, H]
    hopper = hidden_states.is_cuda and hopper_tiles(hidden_states.device.index)
    if block_size is None:
        block_size = default_block_size(hidden_states, w13, w2, topk, E, hopper)
    weights, _, sorted_ids, expert_ids, num_post_padded = route(
        router_logits, topk, block_size, scoring_func=scoring_func, renormalize=renormalize,
        correction_bias=correction_bias, num_expert_group=num_expert_group, topk_group=topk_group,
        routed_scaling_factor=routed_scaling_factor, expert_map=expert_map)
    if fuse_silu is None:
        fuse_silu = use_fused_silu(hidden_states, block_size, hopper)
    # Rows the alignment leaves out (ids off this rank by expert_map) are never gathered by the second
    # GEMM, so the first leaves them unwritten; the second zeroes them for the combine only where some
    # can exist: without expert_map every id is named (the router's ids are always in [0, E)). Each
    # zeroing saved is a memset or a zero pass, one launch (about 1.5 us a call at decode on an H200).
    if fuse_silu:
        h = ops.moe_grouped_gemm_silu(hidden_states, w13, sorted_ids, expert_ids, num_post_padded, topk,
                                      zero_unwritten=False)  # [T*k, I]
    else:
        h = ops.moe_grouped_gemm(hidden_states, w13, sorted_ids, expert_ids, num_post_padded, topk,
                                 zero_unwritten=False)  # [T*k, 2I]
        h = ops.silu_and_mul(h)  # [T*k, I]
    h = ops.moe_grouped_gemm(h, w2, sorted_ids, expert_ids, num_post_padded, 1, weights,
                             zero_unwritten=expert_map is not None)  # [T*k, H]
    return ops.moe_combine(h.view(T, topk, H))  # [T, H]
