"""Where the routing pair's time goes when its kernels overlap: topk_gating then moe_align_block_size (or
either alone, or fused_topk_align), --calls calls captured in one CUDA graph (programmatic dependent launch
as configured), replayed under the torch profiler; CUPTI's device timestamps give each kernel's start and
end relative to the call's first kernel, and the call's span (first start to the next call's first start).
Medians over the calls. Variants set MOE_EXT_* variables while a graph is captured, as in bench_routing.py.

    python bench/timeline_routing.py [--experts 256] [--topk 8] [--tokens 64 1024] [--ops pair gate align]
                                     [--variants NAME:ENV=V,ENV=V ...] [--stem timeline-routing]
"""

from __future__ import annotations

import argparse
import statistics

import torch

import moe_ext
from common import capture_calls, environment, markdown_table, parse_variant, warm_up_device, write_results
from timeline_decode import replay_kernels, summary


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, nargs="+", default=[256])
    p.add_argument("--topk", type=int, nargs="+", default=[8])
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 1024])
    p.add_argument("--ops", nargs="+", choices=["pair", "gate", "align", "fused"], default=["pair", "gate", "align"])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--replays", type=int, default=5)
    p.add_argument("--variants", nargs="+", default=["default"], help="NAME:ENV=V,ENV=V")
    p.add_argument("--stem", default="timeline-routing")
    args = p.parse_args()
    torch.manual_seed(0)
    warm_up_device()
    rows = []
    for E in args.experts:
        for k in args.topk:
            for T in args.tokens:
                logits = torch.randn(T, E, device="cuda", dtype=torch.bfloat16)
                ids = moe_ext.topk_gating(logits, k, renormalize=True)[1]
                calls = {"pair": lambda: moe_ext.moe_align_block_size(
                             moe_ext.topk_gating(logits, k, renormalize=True)[1], E, args.block_size),
                         "gate": lambda: moe_ext.topk_gating(logits, k, renormalize=True),
                         "align": lambda: moe_ext.moe_align_block_size(ids, E, args.block_size),
                         "fused": lambda: moe_ext.fused_topk_align(logits, k, args.block_size, renormalize=True)}
                for op in args.ops:
                    for variant, env in map(parse_variant, args.variants):
                        with environment(env):
                            row = time_one(calls[op], args.calls, args.replays)
                        row = dict(variant=variant, op=op, E=E, topk=k, T=T, **row)
                        rows.append(row)
                        print(f"{variant:>8s} {op:>5s} E={E} k={k} T={T}: {row['call_us']:.2f} us a call; "
                              f"{summary(row)}")
    for r in rows:
        r["kernels"] = summary(r)
    table = markdown_table(rows, [("variant", "variant", "s"), ("op", "op", "s"), ("E", "E", "d"), ("topk", "k", "d"),
                                  ("T", "T", "d"), ("call_us", "µs a call", ".2f"),
                                  ("kernels", "kernels: start-end µs from the call's first kernel start", "")])
    meta = dict(method="graph of --calls calls, replayed under torch.profiler (CUDA activity); kernel times from "
                       "CUPTI device timestamps; per-call offsets from the call's first kernel start, medians over "
                       "calls", calls=args.calls, replays=args.replays, block_size=args.block_size,
                variants={name: env for name, env in map(parse_variant, args.variants)})
    print(write_results(args.stem, meta, rows, table))


def kernel_name(name: str) -> str:
    """'void moe_ext::moe_align_coop_kernel(int const*, ...)' -> 'moe_align_coop_kernel'."""
    return name.split("(")[0].split("<")[0].rsplit("::", 1)[-1]


def time_one(call, num_calls: int, replays: int) -> dict:
    """Per-call kernel offsets of `call` captured num_calls times in one graph (see the docstring)."""
    kernels = replay_kernels(capture_calls(call, num_calls), replays)
    per_call = len(kernels) // (num_calls * replays)
    if per_call == 0 or per_call * num_calls * replays != len(kernels):
        raise SystemExit(f"{len(kernels)} kernels do not split into {num_calls * replays} calls")
    calls = [kernels[i:i + per_call] for i in range(0, len(kernels), per_call)]
    spans = [calls[i + 1][0][0] - calls[i][0][0] for i in range(len(calls) - 1)]
    row = dict(kernels_per_call=per_call, call_us=statistics.median(spans))
    for j in range(per_call):
        label = f"{j}:{kernel_name(calls[0][j][2])}"
        row[f"{label} start"] = statistics.median(c[j][0] - c[0][0] for c in calls)
        row[f"{label} end"] = statistics.median(c[j][1] - c[0][0] for c in calls)
    return row


if __name__ == "__main__":
    main()
