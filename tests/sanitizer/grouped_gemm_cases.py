"""The grouped GEMMs (moe_grouped_gemm with routed weights, moe_grouped_gemm_silu) on small edge
shapes for compute-sanitizer (run by tests/sanitizer/run.sh): every config of each table, the
unaligned-load instance (K % 8 != 0), odd N and I, partial N-tiles and blocks, both zeroing paths;
each output checked against the CPU op. Exits non-zero on a mismatch."""

from __future__ import annotations

import os

import torch

import moe_ext
from moe_ext import reference as ref

torch.manual_seed(0)
ZERO = "MOE_EXT_GROUPED_GEMM_ZERO"
OPS = [("moe_grouped_gemm", "MOE_EXT_GROUPED_GEMM_CONFIG"),
       ("moe_grouped_gemm_silu", "MOE_EXT_GROUPED_GEMM_SILU_CONFIG")]
for T, topk, E, N, K, bs in [(3, 2, 4, 77, 111, 16), (17, 4, 8, 130, 200, 16), (40, 2, 4, 33, 72, 64),
                             (9, 8, 16, 64, 128, 128), (1, 1, 1, 8, 16, 32), (6, 2, 2, 24, 296, 16)]:
    ids = torch.stack([torch.randperm(E)[:topk] for _ in range(T)]).to(torch.int32)
    ids[torch.rand(T, topk) < 0.2] = -1
    routing = ref.moe_align_block_size_ref(ids, E, bs)
    a = torch.randn(T, K).bfloat16()
    tw = torch.rand(T, topk)
    for name, env in OPS:
        op = getattr(moe_ext, name)
        w = (torch.randn(E, 2 * N if name.endswith("silu") else N, K) / K**0.5).bfloat16()
        extra = () if name.endswith("silu") else (tw,)
        want = op(a, w, *routing, topk, *extra).float()
        for zero in ("memset", "flags"):
            os.environ[ZERO] = zero
            for cfg in range(-1, moe_ext.ops.num_tile_configs(name)):
                os.environ[env] = str(cfg)
                dev = (a.cuda(), w.cuda(), *(t.cuda() for t in routing), topk, *(t.cuda() for t in extra))
                got = op(*dev).float().cpu()
                err = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
                uncovered = (want == 0).all(dim=1)
                assert err < 1e-2 and (got[uncovered] == 0).all(), (name, T, topk, E, N, K, bs, zero, cfg, err)
            del os.environ[env]
torch.cuda.synchronize()
print("grouped GEMM sanitizer cases: ok")
