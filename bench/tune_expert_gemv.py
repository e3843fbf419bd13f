"""Times every tile config of the decode expert GEMVs (csrc/cuda/expert_gemv.cu) at the model
shapes and small T, and reports achieved weight bandwidth, to pick the launchers' default config.

Configs are forced through MOE_EXT_GEMV_SILU_CONFIG / MOE_EXT_GEMV_COMBINE_CONFIG (read by the
adapter on every call). Each call takes the next of several routings whose expert sets are
disjoint where E allows, so the experts of one call are not left in L2 by the previous one. Times
are CUDA-graph replays (median µs per call); GB/s counts the weights of the distinct experts each
call reads plus activations in and out, over the measured read bandwidth for % of it.

    python bench/tune_expert_gemv.py                    # the four models of moe_ext.models, T = 1 2 4 8
    python bench/tune_expert_gemv.py --models qwen3-30b-a3b --tokens 1

Each op alone, back to back with itself: in the layer the combine starts under the SiLU GEMV's tail (programmatic
dependent launch) and the two share the multiprocessors, and the best config can differ (session 27: GPT-OSS's SiLU
GEMV, config 3 best alone, config 1 in the layer). Decide defaults on the layer: `bench_moe.py --paths moe_ext
--variants c0:MOE_EXT_GEMV_COMBINE_CONFIG=0 c1:MOE_EXT_GEMV_COMBINE_CONFIG=1 ...` times each config in it on the
same inputs.

Writes results/<device>-<stem>.{json,md} (stem: tune-expert-gemv unless --stem).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moe_ext  # noqa: E402
from common import markdown_table, time_graph, time_events, write_results  # noqa: E402
from moe_ext.models import MODELS  # noqa: E402

SILU_ENV, COMBINE_ENV = "MOE_EXT_GEMV_SILU_CONFIG", "MOE_EXT_GEMV_COMBINE_CONFIG"


def read_bandwidth() -> float:
    """GB/s of an fp32 sum over 2 GiB (bytes read only), as bench_moe measures it."""
    buf = torch.empty(1 << 29, dtype=torch.float32, device="cuda").uniform_()
    us = time_events(lambda: buf.sum(), iters=20, warmup=3)
    return buf.numel() * 4 / us / 1e3


def routings(T: int, k: int, E: int, n: int, g: torch.Generator):
    """n routings [T, k] int32; call i's experts come from a disjoint slice of a permutation where E allows."""
    out = []
    for i in range(n):
        perm = torch.randperm(E, generator=g)
        need = T * k
        base = (i * need) % E if need <= E else 0
        pool = torch.cat([perm[base:], perm[:base]])
        ids = torch.stack([pool[(t * k + torch.arange(k)) % E] if need <= E else torch.randperm(E, generator=g)[:k]
                           for t in range(T)])
        out.append(ids.to(torch.int32).cuda())
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--rotations", type=int, default=8, help="routings cycled through, one per call")
    p.add_argument("--stem", default="tune-expert-gemv", help="results/<device>-<stem>.json/.md")
    args = p.parse_args()
    dtype, esize = torch.bfloat16, 2
    read_gbps = read_bandwidth()
    print(f"read bandwidth {read_gbps:.0f} GB/s")
    rows, best = [], []
    for name in args.models:
        cfg = MODELS[name]
        E, k, H, I = cfg.num_experts, cfg.topk, cfg.hidden_size, cfg.intermediate_size
        g = torch.Generator().manual_seed(0)
        w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=dtype) / H**0.5
        w2 = torch.randn(E, H, I, device="cuda", dtype=dtype) / I**0.5
        for T in args.tokens:
            ids_sets = routings(T, k, E, args.rotations, g)
            x = torch.randn(T, H, device="cuda", dtype=dtype)
            h = torch.randn(T * k, I, device="cuda", dtype=dtype)
            tw = torch.rand(T, k, device="cuda")
            hit = sum(int(s.unique().numel()) for s in ids_sets) / len(ids_sets)
            ops = {
                "silu": (SILU_ENV, lambda ids: moe_ext.moe_gemv_silu(x, w13, ids),
                         (hit * 2 * I * H + T * H + T * k * I) * esize),
                "combine": (COMBINE_ENV, lambda ids: moe_ext.moe_gemv_combine(h, w2, ids, tw),
                            (hit * H * I + T * k * I + T * H) * esize),
            }
            for op, (env, fn, nbytes) in ops.items():
                state = {"i": 0}

                def call():
                    state["i"] = (state["i"] + 1) % len(ids_sets)
                    return fn(ids_sets[state["i"]])

                times = {}
                for c in range(moe_ext.ops.num_tile_configs(f"moe_gemv_{op}")):
                    os.environ[env] = str(c)
                    try:
                        us = time_graph(call, calls_per_graph=len(ids_sets), replays=30)
                    finally:
                        os.environ.pop(env, None)
                    times[c] = us
                    gbs = nbytes / us / 1e3
                    rows.append(dict(model=name, op=op, T=T, hit=hit, config=c, us=us, gbs=gbs,
                                     pct_read=100 * gbs / read_gbps))
                    print(f"{name:14s} {op:7s} T={T:2d} config {c}: {us:8.2f} us {gbs:6.0f} GB/s "
                          f"({100 * gbs / read_gbps:4.1f}% of read)")
                c_best = min(times, key=times.get)
                best.append(dict(model=name, op=op, T=T, hit=hit, best=c_best, best_us=times[c_best],
                                 default_us=times[0], pct_read=100 * nbytes / times[c_best] / 1e3 / read_gbps))
        del w13, w2
        torch.cuda.empty_cache()
    table = markdown_table(best, [("model", "model", ""), ("op", "op", ""), ("T", "T", "d"), ("hit", "experts hit", ".1f"),
                                  ("best", "best config", "d"), ("best_us", "best µs", ".2f"),
                                  ("default_us", "config 0 µs", ".2f"), ("pct_read", "% of read bw", ".1f")])
    print(table)
    path = write_results(args.stem, dict(read_gbps=read_gbps, rotations=args.rotations, best=best), rows,
                         table)
    print(f"wrote {path}.json / .md")


if __name__ == "__main__":
    main()
