"""fused_topk_align's paths against each other at mid token counts, CUDA-graph replay per call: the
single block (T <= 32), the cooperative grid at several tokens a block, and the router and
alignment kernels in turn; with and without programmatic dependent launch. It places the paths'
crossovers and the grid's default tokens a block (csrc/cuda/routing.cu, kFusedGridMinTokens).

    python bench/sweep_fused_grid.py [--tokens 17 24 32 48 64 128 256 512 1024 2048 4096]
                                     [--per-block 0 1 2 4 8 16 32] [--configs ...] [--stem fused-grid]
                                     [--no-baselines]

--no-baselines: only the grid at the tokens a block given (not the pair, the automatic choice, the
single block or the variants without programmatic dependent launch).
"""

from __future__ import annotations

import argparse
import torch

import moe_ext
from bench_fused_routing import CONFIGS, config_inputs
from common import environment, markdown_table, time_graph, write_results


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--configs", nargs="+", default=list(CONFIGS))
    p.add_argument("--tokens", type=int, nargs="+", default=[17, 24, 32, 48, 64, 128, 256, 512, 1024, 2048, 4096])
    p.add_argument("--per-block", type=int, nargs="+", default=[0, 1, 2, 4, 8, 16, 32])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--stem", default="fused-grid")
    p.add_argument("--no-baselines", action="store_true", help="only the grid variants")
    args = p.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for name in args.configs:
        E, k, routing = config_inputs(name)
        for T in args.tokens:
            logits = torch.randn(T, E, device="cuda", dtype=torch.bfloat16)

            def fused(logits=logits, k=k, routing=routing):
                return moe_ext.fused_topk_align(logits, k, args.block_size, **routing)

            variants = [] if args.no_baselines else [("pair", {"MOE_EXT_FUSED_PATH": "2"}), ("auto", {})]
            if T <= 32 and not args.no_baselines:
                variants.append(("single", {"MOE_EXT_FUSED_PATH": "0"}))
            for n in args.per_block:
                if n == 0 or (T + n - 1) // n <= sms:
                    variants.append((f"grid/{n or 'auto'}", {"MOE_EXT_FUSED_PATH": "1",
                                                              "MOE_EXT_FUSED_GRID_TOKENS": str(n)}))
            if not args.no_baselines:
                variants.append(("grid/auto no-pdl", {"MOE_EXT_FUSED_PATH": "1", "MOE_EXT_PDL": "0"}))
                variants.append(("pair no-pdl", {"MOE_EXT_FUSED_PATH": "2", "MOE_EXT_PDL": "0"}))
            for variant, settings in variants:
                with environment(settings):
                    us = time_graph(fused)
                rows.append(dict(config=name, E=E, topk=k, T=T, variant=variant, graph_us=us))
                print(f"{name:20s} T={T:5d} {variant:18s} {us:7.2f} us", flush=True)
    cols = [("config", "config", ""), ("T", "T", "d"), ("variant", "variant", ""), ("graph_us", "graph µs", ".2f")]
    meta = {"block_size": args.block_size, "logits": "bf16", "sms": sms}
    path = write_results(args.stem, meta, rows, markdown_table(rows, cols))
    print(f"\nwrote {path}.json/.md")


if __name__ == "__main__":
    main()
