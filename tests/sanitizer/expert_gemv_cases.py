"""The decode expert GEMVs (moe_gemv_silu, moe_gemv_combine) on small edge shapes for compute-sanitizer
(run by tests/sanitizer/run.sh): every config of both tables, the vector and scalar instances (K % 8),
partial column tiles, invalid ids and an expert_map; each output checked against the CPU op.
Exits non-zero on a mismatch."""

from __future__ import annotations

import os

import torch

import moe_ext

torch.manual_seed(0)
ENVS = ("MOE_EXT_GEMV_SILU_CONFIG", "MOE_EXT_GEMV_COMBINE_CONFIG")
OPS = ("moe_gemv_silu", "moe_gemv_combine")


for M, topk, E, N, K in [(3, 2, 4, 77, 111), (2, 8, 16, 130, 200), (1, 1, 1, 5, 8), (4, 4, 8, 33, 64)]:
    ids = torch.stack([torch.randperm(E)[:topk] for _ in range(M)]).to(torch.int32)
    ids[torch.rand(M, topk) < 0.2] = -1
    ids[0, 0] = E + 3  # outside [0, E): mapped to -1 below
    emap = torch.arange(E + 4, dtype=torch.int32)
    emap[E:] = -1
    a = torch.randn(M, K).bfloat16()
    w13 = (torch.randn(E, 2 * N, K) / K**0.5).bfloat16()
    h = torch.randn(M * topk, K).bfloat16()
    w2 = (torch.randn(E, N, K) / K**0.5).bfloat16()
    weights = torch.rand(M, topk)
    want_silu = moe_ext.moe_gemv_silu(a, w13, ids, emap).float()
    want_combine = moe_ext.moe_gemv_combine(h, w2, ids, weights, emap).float()
    cu = [t.cuda() for t in (a, w13, ids, emap, h, w2, weights)]
    calls = (lambda: moe_ext.moe_gemv_silu(cu[0], cu[1], cu[2], cu[3]),
             lambda: moe_ext.moe_gemv_combine(cu[4], cu[5], cu[2], cu[6], cu[3]))
    for env, op, call, want in zip(ENVS, OPS, calls, (want_silu, want_combine)):
        for cfg in range(moe_ext.ops.num_tile_configs(op)):
            os.environ[env] = str(cfg)
            got = call().float().cpu()
            del os.environ[env]
            if not torch.allclose(got, want, rtol=2e-2, atol=2e-2):
                raise SystemExit(f"{env}={cfg} M={M} topk={topk} E={E} N={N} K={K}: mismatch "
                                 f"(max abs diff {(got - want).abs().max().item():.3g})")
torch.cuda.synchronize()
print("ok")
