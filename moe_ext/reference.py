"""Plain-PyTorch references for every moe_ext op, in fp32 math.

These define the semantics the kernels are tested against; they favour clarity over speed. The
NaN/Inf policy and the exp flush thresholds match csrc/kernels/gating_math.h:
  * a NaN logit counts as -inf, +inf as the largest finite float;
  * a row whose logits are all -inf/NaN scores every expert equally (softmax);
  * softmax numerators e^(x - max) below e^-86 and sigmoid scores of x < -88 are exactly 0;
  * selection keys (score + correction bias) are NaN-free, ties go to the lower expert index; softmax
    without correction bias or expert groups ranks by the sanitized logit itself (the order of the exact
    softmax, which fp32 rounding and the e^-86 flush would otherwise turn into index-ordered ties);
  * renormalizing a zero sum gives equal weights 1/topk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FLT_MAX = torch.finfo(torch.float32).max
_NEG_INF = float("-inf")


def _stable_desc_order(x: torch.Tensor) -> torch.Tensor:
    """Indices sorting the last dim of x descending, equal values in ascending index order."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices


def _sanitize(x: torch.Tensor) -> torch.Tensor:
    """fp32 x under the NaN/Inf policy (gating_math.h sanitize_logit): NaN -> -inf, +inf -> FLT_MAX."""
    return torch.nan_to_num(x.float(), nan=_NEG_INF, posinf=FLT_MAX, neginf=_NEG_INF)


def gating_scores_ref(router_logits: torch.Tensor, scoring_func: str = "softmax") -> torch.Tensor:
    """Per-expert scores [T, E] fp32 under the NaN/Inf policy."""
    x = _sanitize(router_logits)
    if scoring_func == "softmax":
        row_max = x.amax(dim=-1, keepdim=True)
        shifted = x - row_max
        e = torch.where(shifted < -86.0, torch.zeros_like(shifted), torch.exp(shifted))
        e = torch.where(row_max == _NEG_INF, torch.ones_like(e), e)
        return e * (1.0 / e.sum(dim=-1, keepdim=True))
    if scoring_func == "sigmoid":
        return torch.where(x < -88.0, torch.zeros_like(x), torch.sigmoid(x))
    raise ValueError(f"scoring_func must be 'softmax' or 'sigmoid', got {scoring_func!r}")


def selection_keys_ref(scores: torch.Tensor, correction_bias: torch.Tensor | None) -> torch.Tensor:
    keys = scores if correction_bias is None else scores + correction_bias.float()
    return _sanitize(keys)


def topk_gating_ref(
    router_logits: torch.Tensor,
    topk: int,
    scoring_func: str = "softmax",
    renormalize: bool = False,
    correction_bias: torch.Tensor | None = None,
    num_expert_group: int = 1,
    topk_group: int = 1,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router top-k: ([T, topk] fp32 weights, [T, topk] int32 ids), best first."""
    T, E = router_logits.shape
    scores = gating_scores_ref(router_logits, scoring_func)
    if scoring_func == "softmax" and correction_bias is None and num_expert_group == 1:
        keys = _sanitize(router_logits)
    else:
        keys = selection_keys_ref(scores, correction_bias)
    allowed = torch.ones_like(keys, dtype=torch.bool)
    if num_expert_group > 1:
        group_size = E // num_expert_group
        grouped = keys.view(T, num_expert_group, group_size)
        group_scores = grouped.topk(min(2, group_size), dim=-1).values.sum(dim=-1)
        best_groups = _stable_desc_order(group_scores)[:, :topk_group]
        group_mask = torch.zeros(T, num_expert_group, dtype=torch.bool, device=keys.device)
        group_mask.scatter_(1, best_groups, True)
        allowed = group_mask.repeat_interleave(group_size, dim=1)
    # Lexicographic (allowed desc, key desc, index asc) via two stable sorts.
    order = _stable_desc_order(keys)
    order = order.gather(1, _stable_desc_order(allowed.gather(1, order).to(torch.int8)))
    ids = order[:, :topk]
    weights = scores.gather(1, ids)
    if renormalize:
        total = weights.sum(dim=-1, keepdim=True)
        weights = torch.where(total > 0, weights / total, torch.full_like(weights, 1.0 / topk))
    return weights * routed_scaling_factor, ids.to(torch.int32)


def align_max_padded(numel: int, num_experts: int, block_size: int) -> int:
    """Length of sorted_token_ids: numel + min(E, numel) * (block_size - 1), rounded up."""
    raw = numel + min(num_experts, numel) * (block_size - 1)
    return (raw + block_size - 1) // block_size * block_size


def moe_align_block_size_ref(
    topk_ids: torch.Tensor, num_experts: int, block_size: int, expert_map: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted_token_ids, expert_ids, num_tokens_post_padded) in vLLM's layout, ascending flat
    index within each expert, skipped ids (outside [0, E) or mapped to -1) absent."""
    device = topk_ids.device
    flat = topk_ids.flatten().long()
    numel = flat.numel()
    valid = (flat >= 0) & (flat < num_experts)
    if expert_map is not None:
        valid &= expert_map.long()[flat.clamp(0, num_experts - 1)] >= 0
    slots = flat[valid]
    flat_idx = torch.arange(numel, device=device)[valid]
    order = torch.sort(slots, stable=True).indices
    slots, flat_idx = slots[order], flat_idx[order]

    counts = torch.bincount(slots, minlength=num_experts)
    padded = (counts + block_size - 1) // block_size * block_size
    offsets = torch.cumsum(padded, 0) - padded
    starts = torch.cumsum(counts, 0) - counts
    positions = offsets[slots] + torch.arange(slots.numel(), device=device) - starts[slots]

    max_padded = align_max_padded(numel, num_experts, block_size)
    sorted_ids = torch.full((max_padded,), numel, dtype=torch.int32, device=device)
    sorted_ids[positions] = flat_idx.to(torch.int32)
    expert_ids = torch.full((max_padded // block_size,), -1, dtype=torch.int32, device=device)
    local = torch.arange(num_experts, device=device) if expert_map is None else expert_map.long()
    block_experts = torch.repeat_interleave(local, padded // block_size)
    expert_ids[: block_experts.numel()] = block_experts.to(torch.int32)
    total = padded.sum().reshape(1).to(torch.int32)
    return sorted_ids, expert_ids, total


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def moe_grouped_gemm_ref(
    a: torch.Tensor,
    w: torch.Tensor,
    sorted_token_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    num_tokens_post_padded: torch.Tensor,
    topk: int,
    topk_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """[M * topk, N] fp32: row id = a[id // topk] @ w[e]^T (* topk_weights.flatten()[id])."""
    M, N, E = a.shape[0], w.shape[1], w.shape[0]
    rows = M * topk
    out = torch.zeros(rows, N, dtype=torch.float32, device=a.device)
    num_blocks = expert_ids.numel()
    if num_blocks == 0 or rows == 0:
        return out
    block_size = sorted_token_ids.numel() // num_blocks
    valid = min(max(int(num_tokens_post_padded.item()), 0), sorted_token_ids.numel())
    ids = sorted_token_ids[:valid].long()
    experts = expert_ids.long().repeat_interleave(block_size)[:valid]
    keep = (ids >= 0) & (ids < rows) & (experts >= 0) & (experts < E)
    ids, experts = ids[keep], experts[keep]
    for e in torch.unique(experts).tolist():
        sel = ids[experts == e]
        y = a[sel // topk].float() @ w[e].float().t()
        if topk_weights is not None:
            y = y * topk_weights.flatten()[sel].float().unsqueeze(1)
        out[sel] = y
    return out


def moe_grouped_gemm_silu_ref(
    a: torch.Tensor,
    w13: torch.Tensor,
    sorted_token_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    num_tokens_post_padded: torch.Tensor,
    topk: int,
) -> torch.Tensor:
    """[M * topk, I] fp32: row id = silu(a[id // topk] @ w13[e, :I]^T) * (a[id // topk] @ w13[e, I:]^T)."""
    gate, up = moe_grouped_gemm_ref(a, w13, sorted_token_ids, expert_ids, num_tokens_post_padded, topk).chunk(2, dim=-1)
    return F.silu(gate) * up


def _gemv_local_experts(topk_ids: torch.Tensor, num_local: int, expert_map: torch.Tensor | None) -> torch.Tensor:
    """[M * topk] int64 local expert of each slot, -1 where the slot has none."""
    ids = topk_ids.reshape(-1).long()
    routed = num_local if expert_map is None else expert_map.numel()
    ok = (ids >= 0) & (ids < routed)
    local = ids.clamp(0, routed - 1)
    if expert_map is not None:
        local = expert_map.long()[local]
    ok &= (local >= 0) & (local < num_local)
    return torch.where(ok, local, torch.full_like(local, -1))


def moe_gemv_silu_ref(
    a: torch.Tensor, w13: torch.Tensor, topk_ids: torch.Tensor, expert_map: torch.Tensor | None = None
) -> torch.Tensor:
    """[M * topk, I] fp32: row t * topk + j = silu(a[t] @ w13[e, :I]^T) * (a[t] @ w13[e, I:]^T), zero without e."""
    topk, I = topk_ids.shape[1], w13.shape[1] // 2
    local = _gemv_local_experts(topk_ids, w13.shape[0], expert_map)
    out = torch.zeros(local.numel(), I, dtype=torch.float32, device=a.device)
    for e in torch.unique(local[local >= 0]).tolist():
        slots = torch.nonzero(local == e).flatten()
        gate, up = (a[slots // topk].float() @ w13[e].float().t()).chunk(2, dim=-1)
        out[slots] = F.silu(gate) * up
    return out


def moe_gemv_combine_ref(
    h: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    expert_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """[M, H] fp32: row t = sum_j topk_weights[t, j] * (h[t * topk + j] @ w2[e_j]^T) over slots with a local expert."""
    M, topk = topk_ids.shape
    local = _gemv_local_experts(topk_ids, w2.shape[0], expert_map)
    y = torch.zeros(local.numel(), w2.shape[1], dtype=torch.float32, device=h.device)
    for e in torch.unique(local[local >= 0]).tolist():
        slots = torch.nonzero(local == e).flatten()
        y[slots] = (h[slots].float() @ w2[e].float().t()) * topk_weights.reshape(-1)[slots].float().unsqueeze(1)
    return y.view(M, topk, w2.shape[1]).sum(dim=1)


def moe_combine_ref(x: torch.Tensor, topk_weights: torch.Tensor | None = None) -> torch.Tensor:
    xf = x.float()
    if topk_weights is not None:
        xf = xf * topk_weights.float().unsqueeze(-1)
    return xf.sum(dim=1).to(x.dtype)


def fused_moe_ref(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    router_logits: torch.Tensor,
    topk: int,
    *,
    scoring_func: str = "softmax",
    renormalize: bool = False,
    correction_bias: torch.Tensor | None = None,
    num_expert_group: int = 1,
    topk_group: int = 1,
    routed_scaling_factor: float = 1.0,
    expert_map: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Eager MoE layer, a loop over the experts hit. Returns [T, H] in compute_dtype: fp32 is the
    reference; a low-precision compute_dtype gives PyTorch's own rounding error on the same data."""
    weights, ids = topk_gating_ref(router_logits, topk, scoring_func, renormalize, correction_bias,
                                   num_expert_group, topk_group, routed_scaling_factor)
    T, H = hidden_states.shape
    ids = ids.long()
    local = ids if expert_map is None else expert_map.long()[ids]
    x = hidden_states.to(compute_dtype)
    out = torch.zeros(T, H, dtype=torch.float32, device=hidden_states.device)
    for e in torch.unique(local[local >= 0]).tolist():
        tok, slot = torch.nonzero(local == e, as_tuple=True)
        h = x[tok] @ w13[e].to(compute_dtype).t()
        gate, up = h.chunk(2, dim=-1)
        h = (F.silu(gate.float()) * up.float()).to(compute_dtype) @ w2[e].to(compute_dtype).t()
        out.index_add_(0, tok, h.float() * weights[tok, slot].unsqueeze(1))
    return out.to(compute_dtype)
