"""Routing, fused against unfused: moe_ext.fused_topk_align (one launch up to 32 tokens a
multiprocessor) against moe_ext.topk_gating followed by moe_ext.moe_align_block_size, each timed
three ways - one eager call (CUDA events), CUDA-graph replay per call, kernel time alone (profiler,
in a second pass) - with the three speed-ups, over T = 1 ... 64 (--tokens for more).

    python bench/bench_fused_routing.py [--tokens 1 2 4 8 12 16 ...] [--block-size 16]

Configurations: DeepSeek-R1 shape with softmax routing (E=256, topk 8, model dim 7168), GPT-OSS-120B
(E=128, topk 4, model dim 2880) and DeepSeek-V3's own routing (sigmoid, 8 groups, topk_group 4,
correction bias, scaling 2.5); bf16 logits. Issue 4's reference: vLLM 0.33's two kernels take
8.8-9.2 µs per call in graph replay for E=256/topk 8 and 7.4-7.7 µs for E=128/topk 4.
"""

from __future__ import annotations

import argparse

import torch

import moe_ext
from common import Calibration, markdown_table, time_events, time_graph, time_kernels, write_results

CONFIGS = {
    "deepseek-r1-softmax": dict(E=256, topk=8, dim=7168, routing=dict(renormalize=True)),
    "gpt-oss-120b": dict(E=128, topk=4, dim=2880, routing=dict(renormalize=True)),
    "deepseek-v3-grouped": dict(E=256, topk=8, dim=7168,
                                routing=dict(scoring_func="sigmoid", renormalize=True, num_expert_group=8,
                                             topk_group=4, routed_scaling_factor=2.5)),
}
PATHS = ("unfused", "fused")


def config_inputs(name):
    """(E, topk, routing arguments) of a configuration, with a random correction bias where it has one."""
    cfg = CONFIGS[name]
    routing = dict(cfg["routing"])
    if routing.get("scoring_func") == "sigmoid":
        routing["correction_bias"] = torch.randn(cfg["E"], device="cuda")
    return cfg["E"], cfg["topk"], routing


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--configs", nargs="+", default=list(CONFIGS))
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 33, 48, 64])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--no-kernel-time", action="store_true")
    p.add_argument("--stem", default="fused-routing",
                   help="results/<device>-<stem>.json/.md (a partial grid elsewhere)")
    args = p.parse_args()
    calib = Calibration()
    rows, fns = [], []
    for name in args.configs:
        E, k, routing = config_inputs(name)
        for T in args.tokens:
            logits = torch.randn(T, E, device="cuda", dtype=torch.bfloat16)

            def unfused(logits=logits, k=k, E=E, routing=routing):
                w, ids = moe_ext.topk_gating(logits, k, **routing)
                return w, ids, *moe_ext.moe_align_block_size(ids, E, args.block_size)

            def fused(logits=logits, k=k, routing=routing):
                return moe_ext.fused_topk_align(logits, k, args.block_size, **routing)

            r = dict(config=name, E=E, topk=k, T=T)
            for path, fn in zip(PATHS, (unfused, fused)):
                r[f"{path}_eager_us"] = time_events(fn, iters=200)
                r[f"{path}_graph_us"] = time_graph(fn)
            r["speedup_eager"] = r["unfused_eager_us"] / r["fused_eager_us"]
            r["speedup_graph"] = r["unfused_graph_us"] / r["fused_graph_us"]
            rows.append(r)
            fns.append((unfused, fused))
            print(f"{name:20s} T={T:3d} | graph: unfused {r['unfused_graph_us']:6.2f} us, fused "
                  f"{r['fused_graph_us']:6.2f} us ({r['speedup_graph']:.2f}x) | eager {r['unfused_eager_us']:6.2f} / "
                  f"{r['fused_eager_us']:6.2f} us", flush=True)
    # Kernel times last: the profiler slows the launches that follow it (see bench/NOTES.md).
    for r, (unfused, fused) in zip(rows, fns):
        for path, fn in zip(PATHS, (unfused, fused)):
            r[f"{path}_kernel_us"] = float("nan") if args.no_kernel_time else time_kernels(fn)
        r["speedup_kernel"] = r["unfused_kernel_us"] / r["fused_kernel_us"]
        print(f"{r['config']:20s} T={r['T']:3d} | kernel: unfused {r['unfused_kernel_us']:6.2f} us, fused "
              f"{r['fused_kernel_us']:6.2f} us ({r['speedup_kernel']:.2f}x)", flush=True)
    cols = [("config", "config", ""), ("T", "T", "d")]
    for kind in ("eager", "graph", "kernel"):
        cols += [(f"unfused_{kind}_us", f"unfused {kind} µs", ".2f"), (f"fused_{kind}_us", f"fused {kind} µs", ".2f"),
                 (f"speedup_{kind}", f"speed-up {kind}", ".2f")]
    meta = {"block_size": args.block_size, "logits": "bf16",
            "configs": {n: {k: (v if k != "routing" else str(v)) for k, v in CONFIGS[n].items()} for n in args.configs},
            "calibration_1elem_add": calib.kernel_time(args.no_kernel_time)}
    path = write_results(args.stem, meta, rows, markdown_table(rows, cols))
    print(f"\nwrote {path}.json/.md")


if __name__ == "__main__":
    main()
