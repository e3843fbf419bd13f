"""SiLU-and-mul and the top-k combine against the measured HBM copy bandwidth.

Floor: (bytes read + bytes written) / copy bandwidth. silu_and_mul reads [T*k, 2I] and writes
[T*k, I]; combine reads [T, k, H] and writes [T, H]. Inputs rotate over more than L2 holds, so the
cache does not flatter small sizes. For scale, each row also times a device copy that moves the same
bytes (half read, half written) the same way, graph-replayed: what a copy kernel reaches at this size,
its launch ramp and tail included (the floor's bandwidth comes from a 2 GiB copy).

    python bench/bench_elementwise.py [--tokens 1 16 1024 4096 16384] [--variants NAME:ENV=V ...]
        [--ops silu_and_mul moe_combine] [--models deepseek-v3 ...]

--variants as in bench_routing.py (e.g. `pdl-off:MOE_EXT_PDL=0`): each case is timed once per variant.
"""

from __future__ import annotations

import argparse

import torch

import moe_ext
from common import (copy_bandwidth, environment, markdown_table, parse_variant, time_events, time_graph, warm_up_device,
                    write_results)
from moe_ext.models import MODELS


def rotating(make, nbytes_each: int, min_total: int = 256 << 20):
    n = max(1, min(64, -(-min_total // max(nbytes_each, 1))))
    bufs = [make() for _ in range(n)]
    state = {"i": 0}

    def next_buf():
        state["i"] = (state["i"] + 1) % n
        return bufs[state["i"]]
    return next_buf


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 1024, 4096, 16384])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--variants", nargs="+", default=["default"], help="NAME:ENV=V,ENV=V")
    p.add_argument("--stem", default="elementwise")
    p.add_argument("--ops", nargs="+", default=["silu_and_mul", "moe_combine"])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    args = p.parse_args()
    variants = [parse_variant(v) for v in args.variants]
    dtype = getattr(torch, args.dtype)
    warm_up_device()
    bw = copy_bandwidth()
    print(f"copy bandwidth (read + write): {bw:.0f} GB/s on {torch.cuda.get_device_name()}")
    rows = []
    for cfg in (MODELS[m] for m in args.models):
        k, H, I = cfg.topk, cfg.hidden_size, cfg.intermediate_size
        for T in args.tokens:
            cases = {
                "silu_and_mul": ((T * k, 2 * I), lambda x: moe_ext.silu_and_mul(x), 3 * T * k * I),
                "moe_combine": ((T, k, H), lambda x: moe_ext.moe_combine(x), (T * k * H + T * H)),
            }
            for op, (shape, fn, elems) in ((op, cases[op]) for op in args.ops):
                nbytes = elems * torch.empty((), dtype=dtype).element_size()
                calls = 20 if nbytes < (64 << 20) else 4
                floor = nbytes / (bw * 1e9) * 1e6
                # A device copy of the same bytes (half read, half written), once per case.
                half = nbytes // 2
                src_of = rotating(lambda: torch.empty(half, device="cuda", dtype=torch.uint8).random_(0, 255), half)
                dst = torch.empty(half, device="cuda", dtype=torch.uint8)
                copy = time_graph(lambda: dst.copy_(src_of()), calls_per_graph=calls)
                del src_of, dst
                get = rotating(lambda: torch.randn(shape, device="cuda", dtype=dtype), nbytes)
                for variant, env in variants:
                    with environment(env):
                        eager = time_events(lambda: fn(get()), iters=200)
                        # Graph replay removes the host's launch cost (about 25 µs per eager call on the
                        # device image), so it measures the kernel at every size.
                        graph = time_graph(lambda: fn(get()), calls_per_graph=calls)
                    rows.append(dict(variant=variant, op=op, model=cfg.name, T=T, shape=str(list(shape)), bytes=nbytes,
                                     eager_us=eager, graph_us=graph, floor_us=floor, same_bytes_copy_us=copy,
                                     gbps=nbytes / (graph * 1e-6) / 1e9, pct_of_copy=100 * floor / graph,
                                     pct_of_same_copy=100 * copy / graph))
                    r = rows[-1]
                    print(f"{variant:>8s} {op:13s} {cfg.name:14s} T={T:6d} {eager:9.2f} us (graph {graph:7.2f}) "
                          f"{r['gbps']:7.0f} GB/s  {r['pct_of_copy']:5.1f}% of copy BW  "
                          f"(same-bytes copy {copy:7.2f} us)")
    first = [("variant", "variant", "")] if len(variants) > 1 else []
    table = markdown_table(rows, first + [
        ("op", "op", ""), ("model", "model", ""), ("T", "T", "d"), ("shape", "input", ""),
        ("eager_us", "event µs", ".2f"), ("graph_us", "graph µs/call", ".2f"), ("gbps", "GB/s (graph)", ".0f"),
        ("pct_of_copy", "% of copy BW (graph)", ".1f"), ("same_bytes_copy_us", "same-bytes copy µs (graph)", ".2f"),
        ("pct_of_same_copy", "% of same-bytes copy", ".1f")])
    path = write_results(args.stem, {"copy_bandwidth_gbps": round(bw, 1), "dtype": args.dtype,
                                     "variants": dict(variants)}, rows, table)
    print(f"\nwrote {path}.json/.md")


if __name__ == "__main__":
    main()
