"""Router top-k gating and block alignment: eager call (CUDA events), CUDA-graph replay per call, and
kernel time alone (profiler), over E x topk x T. At T = 16384 also ids routed per second.

    python bench/bench_routing.py [--experts 8 128 256 512] [--topk 2 4 8] [--tokens ...] [--block-size 16]
                                  [--variants NAME:ENV=V,ENV=V ...]

--variants times every shape once per variant, with those environment variables set while it is
captured (e.g. `pdl-off:MOE_EXT_PDL=0`, `two-launch:MOE_EXT_ALIGN_PATH=3`; see
csrc/cuda/routing_cuda.cpp), so variants compare within one run.

Reference points (issue 3, vLLM 0.33 on one H100, graph replay): topk_softmax 3.7-4.0 µs at T <= 16
for E=256/topk 8 (2.4 µs for E=128/topk 4), 5.0 µs at T=1024; moe_align_block_size 4.5-4.7 µs at
T <= 16, 7.3 µs at T=1024; plain PyTorch 66-70 µs for the pair at T <= 16.
"""

from __future__ import annotations

import argparse

import torch

import moe_ext
from common import (Calibration, environment, markdown_table, parse_variant, time_events, time_graph, time_kernels,
                    write_results)
from moe_ext import reference as ref


def torch_pair(logits, topk, E, block_size):
    """Plain PyTorch routing: softmax + topk, then the reference alignment (not graph-capturable)."""
    w, ids = torch.softmax(logits.float(), dim=-1).topk(topk, dim=-1)
    return ref.moe_align_block_size_ref(ids.to(torch.int32), E, block_size)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--experts", type=int, nargs="+", default=[8, 128, 256, 512])
    p.add_argument("--topk", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64, 1024, 16384])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--no-kernel-time", action="store_true")
    p.add_argument("--stem", default="routing", help="results/<device>-<stem>.json/.md (a partial grid elsewhere)")
    p.add_argument("--variants", nargs="+", default=["default"], help="NAME:ENV=V,ENV=V (see the docstring)")
    args = p.parse_args()
    variants = [parse_variant(v) for v in args.variants]
    calib = Calibration()
    rows, fns = [], []
    for E in args.experts:
        for k in args.topk:
            if k > E:
                continue
            for T in args.tokens:
                logits = torch.randn(T, E, device="cuda", dtype=torch.bfloat16)
                _, ids = moe_ext.topk_gating(logits, k, renormalize=True)
                gate = lambda logits=logits, k=k: moe_ext.topk_gating(logits, k, renormalize=True)  # noqa: E731
                align = lambda ids=ids, E=E: moe_ext.moe_align_block_size(ids, E, args.block_size)  # noqa: E731
                both = lambda gate=gate, E=E: moe_ext.moe_align_block_size(gate()[1], E, args.block_size)  # noqa: E731
                for variant, env in variants:
                    r = dict(variant=variant, E=E, topk=k, T=T)
                    with environment(env):
                        for name, fn in (("gate", gate), ("align", align), ("pair", both)):
                            r[f"{name}_eager_us"] = time_events(fn, iters=200)
                            r[f"{name}_graph_us"] = time_graph(fn)
                    r["torch_pair_eager_us"] = time_events(lambda: torch_pair(logits, k, E, args.block_size),
                                                           iters=20) if T <= 1024 else float("nan")
                    r["ids_per_s"] = T * k / (r["pair_graph_us"] * 1e-6)
                    rows.append(r)
                    fns.append((gate, align, both, env))
                    print(f"{variant:>10s} E={E:4d} k={k} T={T:6d} | gate {r['gate_graph_us']:6.2f} us graph | "
                          f"align {r['align_graph_us']:6.2f} graph | pair {r['pair_graph_us']:6.2f} graph | "
                          f"torch pair {r['torch_pair_eager_us']:7.1f} eager", flush=True)
    # Kernel times last: the profiler leaves the driver slower for the launches that follow it, so it
    # must not run between the event and graph timings above.
    for r, (gate, align, both, env) in zip(rows, fns):
        with environment(env):
            for name, fn in (("gate", gate), ("align", align), ("pair", both)):
                r[f"{name}_kernel_us"] = float("nan") if args.no_kernel_time else time_kernels(fn)
        print(f"{r['variant']:>10s} E={r['E']:4d} k={r['topk']} T={r['T']:6d} | kernel: gate "
              f"{r['gate_kernel_us']:6.2f} us, align {r['align_kernel_us']:6.2f} us, pair {r['pair_kernel_us']:6.2f} us", flush=True)
    cols = ([("variant", "variant", "s")] if len(variants) > 1 else []) + [("E", "E", "d"), ("topk", "k", "d"),
                                                                          ("T", "T", "d")]
    for name in ("gate", "align", "pair"):
        cols += [(f"{name}_eager_us", f"{name} eager µs", ".2f"), (f"{name}_graph_us", f"{name} graph µs", ".2f"),
                 (f"{name}_kernel_us", f"{name} kernel µs", ".2f")]
    cols += [("torch_pair_eager_us", "torch pair eager µs", ".1f"), ("ids_per_s", "ids/s (pair, graph)", ".3g")]
    path = write_results(args.stem, {"block_size": args.block_size, "logits": "bf16", "routing": "softmax+renormalize",
                                     "variants": dict(variants),
                                     "calibration_1elem_add": calib.kernel_time(args.no_kernel_time)},
                         rows, markdown_table(rows, cols))
    print(f"\nwrote {path}.json/.md")


if __name__ == "__main__":
    main()
