"""Where a decode MoE layer's time goes when its kernels overlap: the kernels of fused_moe calls replayed
in a CUDA graph (programmatic dependent launch on), timestamped on the device by the torch profiler
(CUPTI), so unlike ncu (which serializes kernels) the launches overlap as they do in serving.

For each model and token count: a graph of --calls calls rotating over weight copies (so L2 does not
keep the hit experts from call to call), replayed --replays times under the profiler; per call, each
kernel's start and end relative to the start of the call's first kernel, and the call's span (first
start to the next call's first start). Medians over the calls; writes a markdown table and JSON.

    python bench/timeline_decode.py [--models qwen3-30b-a3b gpt-oss-120b] [--tokens 1 4] [--stem timeline-decode]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile

import torch

import moe_ext
from bench_moe import make_weight_sets
from common import capture_calls, markdown_table, warm_up_device, write_results
from moe_ext.models import MODELS


def kernel_events(trace_path: str) -> list[tuple[float, float, str]]:
    """(start µs, end µs, name) of every device kernel in a chrome trace, by start."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    out = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in events if e.get("cat") == "kernel" and "dur" in e]
    return sorted(out)


def replay_kernels(graph: torch.cuda.CUDAGraph, replays: int) -> list[tuple[float, float, str]]:
    """(start µs, end µs, name) of every kernel of `replays` replays of graph, from the profiler's trace."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        return kernel_events(path)


def short(name: str) -> str:
    for key in ("fused_gating_align", "topk_gating", "moe_gemv_silu", "moe_gemv_combine", "moe_align",
                "grouped_gemm_silu", "grouped_gemm", "silu_and_mul", "moe_combine"):
        if key in name:
            return key
    if "FillFunctor" in name:
        return "torch fill"
    return name.split("(")[0][-40:]


def summary(row: dict) -> str:
    """'name start-end; ...' of a row's kernels, in launch order."""
    starts = sorted((k for k in row if k.endswith(" start")), key=lambda k: int(k.split(":")[0]))
    return "; ".join(f"{k.rsplit(' ', 1)[0].split(':', 1)[1]} {row[k]:.1f}-{row[k.replace(' start', ' end')]:.1f}"
                     for k in starts)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=["qwen3-30b-a3b", "gpt-oss-120b"])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 4])
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--replays", type=int, default=5)
    p.add_argument("--stem", default="timeline-decode")
    args = p.parse_args()
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    warm_up_device()
    rows = []
    for name in args.models:
        cfg = MODELS[name]
        sets = make_weight_sets(cfg, dev, dt)
        bias = torch.randn(cfg.num_experts, device=dev) * 0.1 if cfg.correction_bias else None
        for T in args.tokens:
            x = torch.randn(T, cfg.hidden_size, device=dev, dtype=dt)
            logits = torch.randn(T, cfg.num_experts, device=dev, dtype=dt)

            def call(i):
                w13, w2 = sets[i % len(sets)]
                return moe_ext.fused_moe(x, w13, w2, logits, cfg.topk, correction_bias=bias, **cfg.routing)

            order = itertools.count()  # the calls rotate over the weight copies, warm-up and captured ones
            graph = capture_calls(lambda: call(next(order)), args.calls)
            kernels = replay_kernels(graph, args.replays)
            # Calls: the kernel sequence repeats every len(kernels) / (calls * replays) kernels.
            per_call = len(kernels) // (args.calls * args.replays)
            if per_call == 0 or per_call * args.calls * args.replays != len(kernels):
                raise SystemExit(f"{name} T={T}: {len(kernels)} kernels do not split into "
                                 f"{args.calls * args.replays} calls")
            calls = [kernels[i:i + per_call] for i in range(0, len(kernels), per_call)]
            spans = [calls[i + 1][0][0] - calls[i][0][0] for i in range(len(calls) - 1)]
            row = dict(model=name, T=T, kernels_per_call=per_call, call_us=statistics.median(spans))
            for k in range(per_call):
                label = f"{k}:{short(calls[0][k][2])}"
                row[f"{label} start"] = statistics.median(c[k][0] - c[0][0] for c in calls)
                row[f"{label} end"] = statistics.median(c[k][1] - c[0][0] for c in calls)
                row[f"{label} dur"] = statistics.median(c[k][1] - c[k][0] for c in calls)
            rows.append(row)
            print(f"{name} T={T}: {per_call} kernels, {row['call_us']:.1f} us a call; {summary(row)}")
        del sets
        torch.cuda.empty_cache()
    for r in rows:
        r["kernels"] = summary(r)
    table = markdown_table(rows, [("model", "model", "s"), ("T", "T", "d"), ("call_us", "µs a call", ".1f"),
                                  ("kernels", "kernels: start-end µs from the call's first kernel start", "")])
    meta = dict(method="graph of --calls fused_moe calls (PDL on), replayed under torch.profiler (CUDA activity); "
                       "kernel times from CUPTI device timestamps; per-call offsets from the call's first kernel "
                       "start, medians over calls", calls=args.calls, replays=args.replays)
    print(write_results(args.stem, meta, rows, table))


if __name__ == "__main__":
    main()
