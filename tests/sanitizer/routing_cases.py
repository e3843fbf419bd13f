"""Routing kernels on a few shapes each, for compute-sanitizer (run by tests/sanitizer/run.sh):
the fused decode kernel over T = 1..32 with every routing variant, its grid path, and the alignment paths (one
block, token masks with and without repeated experts, the one-launch grid, the two launches, the
cooperative grid, also forced at small sizes). Exits non-zero on a mismatch."""

from __future__ import annotations

import os

import torch

import moe_ext

torch.manual_seed(0)
dev = "cuda"
variants = [dict(), dict(renormalize=True), dict(scoring_func="sigmoid", renormalize=True),
            dict(scoring_func="sigmoid", renormalize=True, num_expert_group=8, topk_group=4, routed_scaling_factor=2.5)]
for E, topk in [(256, 8), (128, 4), (1024, 32), (3, 2)]:
    for i, routing in enumerate(variants):
        routing = dict(routing)
        if "num_expert_group" in routing and E % 8:
            continue
        if routing.get("scoring_func") == "sigmoid":
            routing["correction_bias"] = torch.randn(E, device=dev)
        for T in (1, 2, 5, 16, 31, 32, 33):
            logits = torch.randn(T, E, device=dev, dtype=torch.bfloat16)
            emap = torch.where(torch.rand(E, device=dev) < 0.3, -1, torch.arange(E, device=dev)).to(torch.int32)
            fused = moe_ext.fused_topk_align(logits, topk, 16, expert_map=emap if i % 2 else None, **routing)
            w, ids = moe_ext.topk_gating(logits, topk, **routing)
            sep = (w, ids, *moe_ext.moe_align_block_size(ids, E, 16, emap if i % 2 else None))
            assert all(torch.equal(a, b) for a, b in zip(fused, sep)), (E, topk, T, routing)
for T, E, topk in [(100, 256, 8), (400, 256, 8), (1024, 256, 8), (1500, 64, 2), (20000, 256, 8)]:
    ids = torch.rand(T, E, device=dev).argsort(dim=1)[:, :topk].to(torch.int32).contiguous()  # distinct per row
    a = moe_ext.moe_align_block_size(ids, E, 16)
    ids[T // 2, -1] = ids[T // 2, 0]  # a repeated expert: the counting fallback
    b = moe_ext.moe_align_block_size(ids, E, 16)
    c = moe_ext.moe_align_block_size(ids.cpu(), E, 16)
    assert all(torch.equal(x.cpu(), y) for x, y in zip(b, c)), (T, E, topk)
# The one-launch grid path (4096 < ids <= 32768): a hot expert, invalid ids, an expert map, and ids
# starting 4 bytes past a 16-byte boundary (the scalar head before the vector loads).
for T, E, topk, bs in [(513, 256, 8, 16), (4096, 256, 8, 64), (3000, 1024, 8, 128), (4097, 8, 1, 1)]:
    ids = torch.randint(0, E, (T, topk), device=dev, dtype=torch.int32)
    ids[torch.rand(T, topk, device=dev) < 0.5] = E // 3
    ids[torch.rand(T, topk, device=dev) < 0.05] = -1
    emap = torch.where(torch.arange(E, device=dev) % 3 == 1, -1, torch.arange(E, device=dev)).to(torch.int32)
    buf = torch.empty(T * topk + 1, device=dev, dtype=torch.int32)
    buf[1:] = ids.flatten()
    for x, m in [(ids, None), (ids, emap), (buf[1:].view(T, topk), emap)]:
        a = moe_ext.moe_align_block_size(x, E, bs, m)
        c = moe_ext.moe_align_block_size(x.cpu(), E, bs, None if m is None else m.cpu())
        assert all(torch.equal(y.cpu(), z) for y, z in zip(a, c)), (T, E, topk, bs)
# The two launches (count, place) forced where another path would run, with and without programmatic
# dependent launch, the one-launch grid forced, and the cooperative grid forced (rows repeating E // 3:
# its counting fallback; with and without programmatic dependent launch).
for path, pdl in (("3", "1"), ("3", "0"), ("2", "1"), ("4", "1"), ("4", "0")):
    os.environ.update(MOE_EXT_ALIGN_PATH=path, MOE_EXT_PDL=pdl)
    for T, E, topk, bs in [(3, 256, 8, 16), (1024, 256, 8, 16), (4096, 1024, 8, 64), (9000, 8, 2, 1)]:
        ids = torch.randint(0, E, (T, topk), device=dev, dtype=torch.int32)
        ids[torch.rand(T, topk, device=dev) < 0.3] = E // 3
        ids[torch.rand(T, topk, device=dev) < 0.05] = E
        emap = torch.where(torch.arange(E, device=dev) % 3 == 1, -1, torch.arange(E, device=dev)).to(torch.int32)
        for m in (None, emap):
            a = moe_ext.moe_align_block_size(ids, E, bs, m)
            c = moe_ext.moe_align_block_size(ids.cpu(), E, bs, None if m is None else m.cpu())
            assert all(torch.equal(y.cpu(), z) for y, z in zip(a, c)), (T, E, topk, bs, path, pdl)
del os.environ["MOE_EXT_ALIGN_PATH"], os.environ["MOE_EXT_PDL"]
# The fused op's cooperative grid path (T = 33 above), more blocks and forced tokens a block.
for T, n in [(100, 1), (257, 3), (1024, 0), (1024, 32)]:
    os.environ["MOE_EXT_FUSED_GRID_TOKENS"] = str(n)
    for E, topk, routing in [(256, 8, variants[3]), (1024, 32, variants[1]), (3, 2, variants[0])]:
        routing = dict(routing)
        if routing.get("scoring_func") == "sigmoid":
            routing["correction_bias"] = torch.randn(E, device=dev)
        logits = torch.randn(T, E, device=dev, dtype=torch.bfloat16)
        emap = torch.where(torch.rand(E, device=dev) < 0.3, -1, torch.arange(E, device=dev)).to(torch.int32)
        fused = moe_ext.fused_topk_align(logits, topk, 16, expert_map=emap, **routing)
        w, ids = moe_ext.topk_gating(logits, topk, **routing)
        sep = (w, ids, *moe_ext.moe_align_block_size(ids, E, 16, emap))
        assert all(torch.equal(a, b) for a, b in zip(fused, sep)), (E, topk, T, n)
del os.environ["MOE_EXT_FUSED_GRID_TOKENS"]
torch.cuda.synchronize()
print("routing sanitizer cases: ok")
