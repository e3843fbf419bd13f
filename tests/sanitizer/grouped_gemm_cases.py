"""The SiLU-and-mul grouped GEMM (moe_grouped_gemm_silu) on small edge shapes for compute-sanitizer
(run by tests/sanitizer/run.sh): every config of its table, the unaligned-load instance (K % 8 != 0),
odd I, partial N-tiles and blocks, both zeroing paths; each output checked against the CPU op.
Exits non-zero on a mismatch."""

from __future__ import annotations

import os

import torch

import moe_ext
from moe_ext import reference as ref

torch.manual_seed(0)
ENV, ZERO = "MOE_EXT_GROUPED_GEMM_SILU_CONFIG", "MOE_EXT_GROUPED_GEMM_ZERO"
n_cfg = moe_ext.ops.num_tile_configs("moe_grouped_gemm_silu")
for T, topk, E, I, K, bs in [(3, 2, 4, 77, 111, 16), (17, 4, 8, 130, 200, 16), (40, 2, 4, 33, 72, 64),
                             (9, 8, 16, 64, 128, 128), (1, 1, 1, 8, 16, 32)]:
    ids = torch.stack([torch.randperm(E)[:topk] for _ in range(T)]).to(torch.int32)
    ids[torch.rand(T, topk) < 0.2] = -1
    routing = ref.moe_align_block_size_ref(ids, E, bs)
    a = torch.randn(T, K).bfloat16()
    w13 = (torch.randn(E, 2 * I, K) / K**0.5).bfloat16()
    want = moe_ext.moe_grouped_gemm_silu(a, w13, *routing, topk).float()
    for zero in ("memset", "flags"):
        os.environ[ZERO] = zero
        for cfg in range(-1, n_cfg):
            os.environ[ENV] = str(cfg)
            got = moe_ext.moe_grouped_gemm_silu(a.cuda(), w13.cuda(), *(t.cuda() for t in routing), topk).float().cpu()
            err = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
            uncovered = (want == 0).all(dim=1)
            assert err < 1e-2 and (got[uncovered] == 0).all(), (T, topk, E, I, K, bs, zero, cfg, err)
torch.cuda.synchronize()
print("grouped GEMM sanitizer cases: ok")
