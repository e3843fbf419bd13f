"""Shared test helpers: devices, poisoning, tolerances and the tie-aware top-k comparison."""

from __future__ import annotations

import pytest
import torch

import moe_ext
from moe_ext import reference as ref

HAS_CUDA = torch.cuda.is_available()

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU"))]

# First index of the Hopper wgmma configs in each grouped-GEMM launcher table (csrc/cuda/grouped_gemm.cu:
# kNumMmaConfigs, kNumSiluMmaConfigs): the configs before it (mma.sync) agree bit for bit among themselves, the
# wgmma ones among themselves; across the two families only within the reference's tolerance (the tensor cores'
# k16 sums need not round alike). Off Hopper the wgmma indices run mma.sync fallbacks.
FIRST_WGMMA_CONFIG = 12
FIRST_WGMMA_SILU_CONFIG = 4


def require_kernel(op: str, device: str) -> None:
    """Skip when op has no kernel on device (a CUDA kernel not yet written, or a CPU-only build)."""
    if not moe_ext.has_kernel(op, device):
        pytest.skip(f"moe_ext.{op} has no {device} kernel in this build")


POISON_BYTE = 0x7F  # int32 2139062143, fp32 3.4e38, fp16 NaN, bf16 3.4e38: never a valid output


def poison_allocator(device: str, nbytes_list) -> None:
    """Fill blocks of these sizes with POISON_BYTE and free them, so the op's next allocations of
    the same sizes reuse poisoned memory: an element the op forgets to write then fails the test.
    Deterministic on CUDA's caching allocator; best effort on the CPU allocator."""
    blocks = [torch.full((max(int(n), 1),), POISON_BYTE, dtype=torch.uint8, device=device) for n in nbytes_list]
    del blocks


def capture_graph(fn, warmup: int = 1):
    """fn() run `warmup` times on a side stream (so lazy allocations and one-time setup happen outside
    the capture), then captured in a CUDA graph. Returns (graph, what the captured call returned)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def rel_l2(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return (torch.linalg.vector_norm(x - y) / torch.linalg.vector_norm(y).clamp_min(1e-30)).item()


def random_logits(T: int, E: int, dtype: torch.dtype, device: str, generator=None) -> torch.Tensor:
    return torch.randn(T, E, generator=generator, dtype=torch.float32).mul_(2.0).to(device=device, dtype=dtype)


def assert_valid_ids(ids: torch.Tensor, E: int) -> None:
    ids = ids.cpu().long()
    assert ids.dtype == torch.int64 and ((ids >= 0) & (ids < E)).all(), "id outside [0, E)"
    if ids.numel():
        s = ids.sort(dim=1).values
        assert (s[:, 1:] != s[:, :-1]).all(), "repeated id within a token"


def assert_gating_matches(weights, ids, logits, topk, **routing) -> None:
    """Compare kernel top-k against topk_gating_ref.

    ids must equal the reference's exactly, except in rows where the reference's own selection
    keys are tied within fp32 rounding (the kernel's exp differs from torch's by an ulp): there the
    kernel's chosen keys must equal the reference's chosen keys rank by rank within 1e-6."""
    T, E = logits.shape
    assert weights.shape == (T, topk) and weights.dtype == torch.float32
    assert ids.shape == (T, topk) and ids.dtype == torch.int32
    assert torch.isfinite(weights).all(), "non-finite weight"
    assert_valid_ids(ids, E)
    routing = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in routing.items()}
    ref_w, ref_ids = ref.topk_gating_ref(logits.cpu(), topk, **routing)
    ids, weights = ids.cpu(), weights.cpu()
    same = (ids == ref_ids).all(dim=1)
    if not same.all():
        keys = ref.selection_keys_ref(ref.gating_scores_ref(logits.cpu(), routing.get("scoring_func", "softmax")),
                                      routing.get("correction_bias"))
        rows = (~same).nonzero().flatten()
        got = keys[rows].gather(1, ids[rows].long())
        want = keys[rows].gather(1, ref_ids[rows].long())
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6,
                                   msg=lambda m: f"{len(rows)} rows pick different experts, not a near-tie: {m}")
        assert len(rows) <= max(1, T // 50), f"{len(rows)} of {T} rows differ from the reference"
    torch.testing.assert_close(weights[same], ref_w[same], rtol=1e-5, atol=1e-6)


def assert_align_matches(out, topk_ids, num_experts, block_size, expert_map=None) -> None:
    """Exact comparison with moe_align_block_size_ref (deterministic order is part of the contract),
    plus the layout's invariants checked independently of the reference."""
    sorted_ids, expert_ids, ntpp = (t.cpu() for t in out)
    r_sorted, r_experts, r_ntpp = ref.moe_align_block_size_ref(
        topk_ids.cpu(), num_experts, block_size, None if expert_map is None else expert_map.cpu())
    assert sorted_ids.dtype == expert_ids.dtype == ntpp.dtype == torch.int32
    assert sorted_ids.shape == r_sorted.shape and expert_ids.shape == r_experts.shape and ntpp.shape == (1,)
    assert torch.equal(ntpp, r_ntpp), f"num_tokens_post_padded {ntpp.item()} != {r_ntpp.item()}"
    assert torch.equal(expert_ids, r_experts), "expert_ids differ"
    assert torch.equal(sorted_ids, r_sorted), "sorted_token_ids differ"
    # Invariants: every kept flat index exactly once, the sentinel elsewhere, runs block-aligned.
    numel = topk_ids.numel()
    n = int(ntpp.item())
    assert n % block_size == 0
    real = sorted_ids[:n][sorted_ids[:n] != numel]
    assert real.unique().numel() == real.numel()
    assert (sorted_ids[n:] == numel).all()


# Grouped GEMM helpers (moe_grouped_gemm and moe_grouped_gemm_silu tests).


def routed_pairs(sorted_ids, expert_ids, ntpp, rows, E):
    """(ids, experts) of the slots the op must compute: within num_tokens_post_padded, a real id, a
    valid expert (the contract's selection, as moe_grouped_gemm_ref applies it)."""
    if expert_ids.numel() == 0 or rows == 0:
        return sorted_ids[:0].long(), expert_ids[:0].long()
    bs = sorted_ids.numel() // expert_ids.numel()
    valid = min(max(int(ntpp.item()), 0), sorted_ids.numel())
    ids = sorted_ids[:valid].long()
    experts = expert_ids.long().repeat_interleave(bs)[:valid]
    keep = (ids >= 0) & (ids < rows) & (experts >= 0) & (experts < E)
    return ids[keep], experts[keep]


def covered_rows(sorted_ids, expert_ids, ntpp, rows, E):
    """Bool [rows]: the rows some block of a valid expert names (all others must be exactly 0)."""
    cov = torch.zeros(rows, dtype=torch.bool)
    cov[routed_pairs(sorted_ids, expert_ids, ntpp, rows, E)[0]] = True
    return cov


def grouped_gemm_silu_eager_lowp(a, w13, sorted_ids, expert_ids, ntpp, topk):
    """The unfused path in PyTorch: per expert a @ w13[e].T in a's dtype (rounded), then SiLU-and-mul
    in fp32 and one more rounding. Its error against the fp32 reference is the error bar."""
    h = grouped_gemm_eager_2i(a, w13, sorted_ids, expert_ids, ntpp, topk)
    return ref.silu_and_mul_ref(h).float()


def grouped_gemm_eager_2i(a, w, sorted_ids, expert_ids, ntpp, topk):
    """[M * topk, 2I] in a's dtype: per expert a @ w[e].T as PyTorch computes it in that dtype."""
    out = torch.zeros(a.shape[0] * topk, w.shape[1], dtype=a.dtype, device=a.device)
    ids, experts = routed_pairs(sorted_ids, expert_ids, ntpp, a.shape[0] * topk, w.shape[0])
    for e in torch.unique(experts).tolist():
        sel = ids[experts == e]
        out[sel] = a[sel // topk] @ w[e].t()
    return out


def check_silu_gemm(out, a, w13, sorted_ids, expert_ids, ntpp, topk):
    """out against the fp32 reference (on the CPU): shape, dtype, zero uncovered rows, and rel L2 <= 1e-2
    and <= 2x the unfused eager error for bf16/fp16 (1e-5 for fp32). The eager error is PyTorch's
    product on the inputs' own device (cuBLAS on CUDA)."""
    on_device = (a, w13, sorted_ids, expert_ids, ntpp)
    a, w13, sorted_ids, expert_ids, ntpp = (t.cpu() for t in on_device)
    rows, I = a.shape[0] * topk, w13.shape[1] // 2
    assert out.shape == (rows, I) and out.dtype == a.dtype
    out = out.cpu().float()
    want = ref.moe_grouped_gemm_silu_ref(a, w13, sorted_ids, expert_ids, ntpp, topk)
    assert torch.isfinite(out).all(), "non-finite output (unwritten poisoned rows?)"
    covered = covered_rows(sorted_ids, expert_ids, ntpp, rows, w13.shape[0])
    assert (out[~covered] == 0).all(), "rows no block names must be zero"
    if rows == 0 or I == 0 or not want.abs().max() > 0:
        assert (out == want).all()
        return
    err = rel_l2(out, want)
    if a.dtype == torch.float32:
        assert err < 1e-5, err
    else:
        err_lowp = rel_l2(grouped_gemm_silu_eager_lowp(*on_device, topk).cpu(), want)
        assert err <= 1e-2 and err <= 2 * err_lowp + 1e-6, (err, err_lowp)
