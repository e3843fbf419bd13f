"""The decode expert GEMVs (moe_gemv_silu, moe_gemv_combine) against the fp32 references."""

from __future__ import annotations

import os
import re

import pytest
import torch

import moe_ext
from moe_ext import reference as ref

from conftest import DEVICES, HAS_CUDA, capture_graph, nbytes, poison_allocator, require_kernel

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# One rounding of an fp32 result into the dtype plus accumulation-order slack; atol scales with
# the output (products of K terms cancel).
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}

# (M, topk, E, I or H, K): decode shapes of the four models (scaled down in E where the weights
# would be large on the CPU), and awkward ones: K off the vector width (scalar path), one column,
# a single expert, topk 1, M = 0.
SHAPES = [
    (1, 8, 16, 768, 2048),   # Qwen3-30B-A3B w13 / w2 sizes
    (3, 4, 8, 360, 2880),    # GPT-OSS widths
    (2, 2, 4, 96, 4096),
    (4, 8, 12, 64, 7168),    # DeepSeek-V3's hidden size as K
    (5, 3, 7, 33, 111),      # K % 8 != 0: scalar path; 33 columns: partial tiles
    (1, 1, 1, 1, 8),
    (2, 6, 9, 17, 1),
    (0, 4, 8, 16, 64),
]
MAP_MODES = ["none", "invalid_ids", "expert_map"]


def assert_close(out, want, dtype):
    out, want = out.float().cpu(), want.float().cpu()
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(out, want, rtol=RTOL[dtype], atol=1e-5 + 2e-3 * scale)


def routing(M, topk, E, mode, device, seed):
    """topk_ids [M, topk] int32 (distinct experts per row, as a router gives), with mode
    "invalid_ids": some ids outside [0, E) (-1, E, large); "expert_map": ids over 2E routed experts
    mapped to E local ones with half of them -1 (expert parallelism). Returns ids, weights, map."""
    g = torch.Generator().manual_seed(seed)
    routed = 2 * E if mode == "expert_map" else E
    ids = torch.stack([torch.randperm(max(routed, topk), generator=g)[:topk] for _ in range(M)]) if M else \
        torch.zeros(0, topk, dtype=torch.long)
    ids = ids.to(torch.int32)
    expert_map = None
    if mode == "invalid_ids" and M:
        bad = torch.rand(M, topk, generator=g) < 0.3
        choices = torch.tensor([-1, E, E + 5, 2**30], dtype=torch.int32)
        ids = torch.where(bad, choices[torch.randint(0, 4, (M, topk), generator=g)], ids)
    if mode == "expert_map":
        local = torch.randperm(routed, generator=g)[:E]  # E of the 2E routed experts live here
        expert_map = torch.full((routed,), -1, dtype=torch.int32)
        expert_map[local] = torch.arange(E, dtype=torch.int32)
        expert_map = expert_map.to(device)
    weights = torch.rand(M, topk, generator=g)
    return ids.to(device), weights.to(device), expert_map


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,topk,E,I,K", SHAPES)
@pytest.mark.parametrize("mode", MAP_MODES)
def test_gemv_silu(device, dtype, M, topk, E, I, K, mode):
    require_kernel("moe_gemv_silu", device)
    g = torch.Generator().manual_seed(M * 1000 + K)
    a = torch.randn(M, K, generator=g).to(device=device, dtype=dtype)
    w13 = (torch.randn(E, 2 * I, K, generator=g) / K**0.5).to(device=device, dtype=dtype)
    ids, _, emap = routing(M, topk, E, mode, device, seed=K + I)
    poison_allocator(device, [nbytes((M * topk, I), dtype)])
    out = moe_ext.moe_gemv_silu(a, w13, ids, emap)
    assert out.shape == (M * topk, I) and out.dtype == dtype
    assert torch.isfinite(out).all(), "non-finite output (an unwritten poisoned element?)"
    assert_close(out, ref.moe_gemv_silu_ref(a.cpu(), w13.cpu(), ids.cpu(), None if emap is None else emap.cpu()), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,topk,E,H,K", SHAPES)
@pytest.mark.parametrize("mode", MAP_MODES)
def test_gemv_combine(device, dtype, M, topk, E, H, K, mode):
    require_kernel("moe_gemv_combine", device)
    g = torch.Generator().manual_seed(M * 1000 + K + 1)
    h = torch.randn(M * topk, K, generator=g).to(device=device, dtype=dtype)
    w2 = (torch.randn(E, H, K, generator=g) / K**0.5).to(device=device, dtype=dtype)
    ids, weights, emap = routing(M, topk, E, mode, device, seed=K + H + 1)
    poison_allocator(device, [nbytes((M, H), dtype)])
    out = moe_ext.moe_gemv_combine(h, w2, ids, weights, emap)
    assert out.shape == (M, H) and out.dtype == dtype
    assert torch.isfinite(out).all(), "non-finite output (an unwritten poisoned element?)"
    want = ref.moe_gemv_combine_ref(h.cpu(), w2.cpu(), ids.cpu(), weights.cpu(), None if emap is None else emap.cpu())
    assert_close(out, want, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_gemv_no_local_expert_gives_zeros(device):
    """Every slot off this rank (or invalid): zero rows, zero output, no read of a weight."""
    require_kernel("moe_gemv_silu", device)
    a = torch.randn(3, 64, device=device, dtype=torch.bfloat16)
    w13 = torch.randn(4, 2 * 40, 64, device=device, dtype=torch.bfloat16)
    w2 = torch.randn(4, 64, 40, device=device, dtype=torch.bfloat16)
    ids = torch.tensor([[0, 1], [2, 3], [-1, 9]], dtype=torch.int32, device=device)
    emap = torch.full((10,), -1, dtype=torch.int32, device=device)
    emap[9] = 7  # maps to a local expert past E_local = 4: skipped too
    poison_allocator(device, [nbytes((6, 40), torch.bfloat16), nbytes((3, 64), torch.bfloat16)])
    h = moe_ext.moe_gemv_silu(a, w13, ids, emap)
    assert torch.equal(h, torch.zeros_like(h))
    out = moe_ext.moe_gemv_combine(torch.randn_like(h), w2, ids, torch.rand(3, 2, device=device), emap)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("device", DEVICES)
def test_gemv_unaligned_views(device):
    """Contiguous operands at odd storage offsets take the scalar path and stay correct."""
    require_kernel("moe_gemv_silu", device)
    dtype = torch.bfloat16
    M, topk, E, I, K = 2, 4, 8, 24, 64
    buf = torch.randn(1 + M * K, device=device, dtype=dtype)
    a = buf[1:].view(M, K)
    w13 = torch.randn(E, 2 * I, K, device=device, dtype=dtype) / 8
    ids, weights, _ = routing(M, topk, E, "none", device, seed=3)
    assert_close(moe_ext.moe_gemv_silu(a, w13, ids), ref.moe_gemv_silu_ref(a.cpu(), w13.cpu(), ids.cpu()), dtype)
    hbuf = torch.randn(1 + M * topk * I, device=device, dtype=dtype)
    h = hbuf[1:].view(M * topk, I)
    w2 = torch.randn(E, K, I, device=device, dtype=dtype) / 5
    assert_close(moe_ext.moe_gemv_combine(h, w2, ids, weights),
                 ref.moe_gemv_combine_ref(h.cpu(), w2.cpu(), ids.cpu(), weights.cpu()), dtype)


def _num_configs(env: str, op: str, call) -> int:
    """Entries of op's config table (moe_ext.ops.num_tile_configs), checking that the override env
    refuses the first index past it."""
    n = moe_ext.ops.num_tile_configs(op)
    os.environ[env] = str(n)
    try:
        with pytest.raises(ValueError, match=re.escape(f"{env} must be an integer in [-1, {n})")):
            call()
    finally:
        del os.environ[env]
    return n


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("K", [2048, 100])
def test_gemv_every_config_bit_identical(dtype, K):
    """Each lane sums the same elements in the same order whatever the tile config, so every config
    gives the same bits (and each matches the reference)."""
    require_kernel("moe_gemv_silu", "cuda")
    M, topk, E, N = 3, 8, 16, 200
    a = torch.randn(M, K, device="cuda", dtype=dtype)
    w13 = torch.randn(E, 2 * N, K, device="cuda", dtype=dtype) / K**0.5
    w2 = torch.randn(E, N, K, device="cuda", dtype=dtype) / K**0.5
    h = torch.randn(M * topk, K, device="cuda", dtype=dtype)
    ids, weights, _ = routing(M, topk, E, "invalid_ids", "cuda", seed=K)
    silu = lambda: moe_ext.moe_gemv_silu(a, w13, ids)  # noqa: E731
    combine = lambda: moe_ext.moe_gemv_combine(h, w2, ids, weights)  # noqa: E731
    for env, op, call in (("MOE_EXT_GEMV_SILU_CONFIG", "moe_gemv_silu", silu),
                          ("MOE_EXT_GEMV_COMBINE_CONFIG", "moe_gemv_combine", combine)):
        base = call()
        for cfg in range(_num_configs(env, op, call)):
            os.environ[env] = str(cfg)
            try:
                assert torch.equal(call(), base), (env, cfg)
            finally:
                del os.environ[env]
    assert_close(silu(), ref.moe_gemv_silu_ref(a.cpu(), w13.cpu(), ids.cpu()), dtype)
    assert_close(combine(), ref.moe_gemv_combine_ref(h.cpu(), w2.cpu(), ids.cpu(), weights.cpu()), dtype)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("topk", [1, 3, 5, 8, 33])
@pytest.mark.parametrize("K", [768, 100])
def test_gemv_combine_split_configs_bit_identical(topk, K):
    """The split configs (two warps a column, each half of the passes, handing partials over through
    shared memory) give the bits of the unsplit ones: odd pass counts, a share with no pass (topk 1),
    a last CTA with a column group past N (N odd), invalid ids, and topk 33 (past the hand-off: the
    launcher runs the unsplit tile)."""
    require_kernel("moe_gemv_combine", "cuda")
    M, E, N = 2, 40, 37
    w2 = torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
    h = torch.randn(M * topk, K, device="cuda", dtype=torch.bfloat16)
    ids, weights, _ = routing(M, topk, E, "invalid_ids", "cuda", seed=topk + K)
    env = "MOE_EXT_GEMV_COMBINE_CONFIG"
    outs = {}
    for cfg in range(moe_ext.ops.num_tile_configs("moe_gemv_combine")):
        os.environ[env] = str(cfg)
        try:
            outs[cfg] = moe_ext.moe_gemv_combine(h, w2, ids, weights)
        finally:
            del os.environ[env]
    for cfg, out in outs.items():
        assert torch.equal(out, outs[0]), cfg
    assert_close(outs[0], ref.moe_gemv_combine_ref(h.cpu(), w2.cpu(), ids.cpu(), weights.cpu()), torch.bfloat16)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
def test_gemv_cuda_matches_cpu():
    """CUDA and CPU kernels agree (bf16: within one rounding of the same fp32 result)."""
    require_kernel("moe_gemv_silu", "cuda")
    M, topk, E, I, K = 4, 8, 32, 96, 256
    a = torch.randn(M, K, dtype=torch.bfloat16)
    w13 = torch.randn(E, 2 * I, K, dtype=torch.bfloat16) / 16
    w2 = torch.randn(E, K, I, dtype=torch.bfloat16) / 10
    ids, weights, emap = routing(M, topk, E, "expert_map", "cpu", seed=11)
    h_cpu = moe_ext.moe_gemv_silu(a, w13, ids, emap)
    h_cuda = moe_ext.moe_gemv_silu(a.cuda(), w13.cuda(), ids.cuda(), emap.cuda())
    torch.testing.assert_close(h_cuda.cpu(), h_cpu, rtol=1.6e-2, atol=1e-3)
    o_cpu = moe_ext.moe_gemv_combine(h_cpu, w2, ids, weights, emap)
    o_cuda = moe_ext.moe_gemv_combine(h_cpu.cuda(), w2.cuda(), ids.cuda(), weights.cuda(), emap.cuda())
    torch.testing.assert_close(o_cuda.cpu(), o_cpu, rtol=1.6e-2, atol=1e-3)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
def test_gemv_cuda_graph_and_determinism():
    """Captured and replayed on new inputs, equal to eager; two runs bit-identical."""
    require_kernel("moe_gemv_silu", "cuda")
    M, topk, E, I, H = 2, 8, 64, 128, 256
    x = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
    w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) / 16
    w2 = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) / 11
    ids, weights, _ = routing(M, topk, E, "none", "cuda", seed=5)
    run = lambda: moe_ext.moe_gemv_combine(moe_ext.moe_gemv_silu(x, w13, ids), w2, ids, weights)  # noqa: E731
    assert torch.equal(run(), run())
    graph, out = capture_graph(run)
    for seed in range(3):
        new_ids, new_weights, _ = routing(M, topk, E, "invalid_ids", "cuda", seed=50 + seed)
        x.copy_(torch.randn_like(x))
        ids.copy_(new_ids)
        weights.copy_(new_weights)
        graph.replay()
        assert torch.equal(out, run())


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("E, topk, K", [(64, 8, 256), (16, 2, 1024)])
def test_gemv_combine_right_behind_the_router(E, topk, K):
    """The combine reads topk_ids before its programmatic-launch wait (to ask L2 for the weight rows), and the
    router triggers its dependents at its start at decode sizes: launched right behind the router that writes
    the ids, into memory the allocator hands back from the previous call (old ids in it), the combine must still
    use the final ids. Each call's rows differ from the last, so stale ids would show."""
    require_kernel("moe_gemv_combine", "cuda")
    require_kernel("topk_gating", "cuda")
    M, N = 2, 96
    w2 = torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
    h = torch.randn(M * topk, K, device="cuda", dtype=torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(E + K)
    for _ in range(20):
        logits = torch.randn(M, E, device="cuda", generator=g)
        weights, ids = moe_ext.topk_gating(logits, topk, renormalize=True)
        out = moe_ext.moe_gemv_combine(h, w2, ids, weights)
        want = ref.moe_gemv_combine_ref(h.cpu(), w2.cpu(), ids.cpu(), weights.cpu())
        assert_close(out, want, torch.bfloat16)
