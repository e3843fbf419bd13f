"""Times every config of the grouped-GEMM launcher's table (csrc/cuda/grouped_gemm.cu) on given
shapes and reports the fastest; --emit-table writes the tuned tables, csrc/cuda/grouped_gemm_table.h
(moe_grouped_gemm's, and moe_grouped_gemm_silu's from --silu results), from such results
(bench/tile_table.py: the rule and the buckets).

Each config is forced through MOE_EXT_GROUPED_GEMM_CONFIG (read by the adapter on every call);
config -1 is the current heuristic. Model shapes are routed as the layer benchmark routes them (the
model's own routing of random logits, DeepSeek-V3's correction bias N(0, 0.1)), --shape ones by
uniform random top-k (so is everything with --uniform-routing); aligned by moe_ext's own op. Times are
CUDA-graph replays (median µs per call) with weights rotated over more than L2 holds where they
fit in memory; TFLOP/s counts 2 * (T*k) * N * K, GB/s the weights of the experts hit plus A and out.

    python bench/tune_grouped_gemm.py                       # both GEMMs of each model in models.py
    python bench/tune_grouped_gemm.py --shape 512,8,64,1536,2048 --tokens 1 16 --block-size 16 64
    python bench/tune_grouped_gemm.py --silu --rounds 3     # moe_grouped_gemm_silu's table, w13 GEMMs only
    python bench/tune_grouped_gemm.py --emit-table results/<device>-<stem>.json ...  # no GPU needed

Writes results/<device>-tune-grouped-gemm[-silu].{json,md}: every timing, and per shape the best config.
With --silu, N is w13's 2I rows and the op writes [T*k, I] (MOE_EXT_GROUPED_GEMM_SILU_CONFIG).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moe_ext  # noqa: E402
from common import markdown_table, time_graph, write_results  # noqa: E402
from moe_ext.models import MODELS  # noqa: E402
from tile_table import HEADER, ROOT, emit_table, op_bucket_of  # noqa: E402

ENV = "MOE_EXT_GROUPED_GEMM_CONFIG"
SILU_ENV = "MOE_EXT_GROUPED_GEMM_SILU_CONFIG"


def shapes_from_models(tokens, models=tuple(MODELS), esize=2):
    """(name, T, topk, E, N, K, second, expert_bytes) for both GEMMs of each model layer; second: the op
    runs as fused_moe's second GEMM (a is [T * topk, K], op topk 1), else as its first (a is [T, K]);
    expert_bytes: one expert's w13 + w2, as fused_moe passes it to choose_block_size."""
    out = []
    for cfg in (MODELS[m] for m in models):
        H, I = cfg.hidden_size, cfg.intermediate_size
        eb = 3 * H * I * esize
        for T in tokens:
            out.append((f"{cfg.name} w13", T, cfg.topk, cfg.num_experts, 2 * I, H, False, eb))
            out.append((f"{cfg.name} w2", T, cfg.topk, cfg.num_experts, H, I, True, eb))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 1024, 4096])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--shape", action="append", default=[], help="T,topk,E,N,K (repeatable); replaces --models")
    p.add_argument("--block-size", type=int, nargs="+", default=None,
                   help="default: moe_ext.choose_block_size for each shape")
    p.add_argument("--generic-blocks", action="store_true",
                   help="the default block sizes as fused_moe picks them off Hopper (hopper=False), to time the "
                        "mma.sync table's rows on a Hopper GPU")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-weight-gib", type=float, default=24.0, help="skip shapes whose weights exceed this")
    p.add_argument("--silu", action="store_true", help="tune moe_grouped_gemm_silu (first GEMMs; N = 2I)")
    p.add_argument("--configs", type=int, nargs="+", default=None, help="only these config indices (default: all)")
    p.add_argument("--rounds", type=int, default=1,
                   help="time every config this many times, in interleaved rounds, and keep each one's least "
                        "(clock drift between configs averages out)")
    p.add_argument("--stem", default=None, help="results/<device>-<stem>.json/.md (default tune-grouped-gemm[-silu])")
    p.add_argument("--uniform-routing", action="store_true", help="route model shapes by uniform random top-k too")
    p.add_argument("--emit-table", nargs="+", metavar="JSON", default=None,
                   help="write csrc/cuda/grouped_gemm_table.h from these results (paths from the current directory; "
                        "--silu ones fill the SiLU table, the others the plain GEMM's) and exit; no tuning, no GPU")
    args = p.parse_args()
    if args.emit_table:
        sources = []
        for src in args.emit_table:
            path = Path(src) if Path(src).is_absolute() else (Path.cwd() / src)
            sources.append(str(path.resolve().relative_to(ROOT)))
        HEADER.write_text(emit_table(sources, HEADER.read_text(), op_bucket_of()))
        print(f"wrote {HEADER} from {' '.join(sources)}")
        return
    dtype = getattr(torch, args.dtype)
    esize = torch.empty((), dtype=dtype).element_size()
    env = SILU_ENV if args.silu else ENV
    if args.silu:
        def op(a, w, s, e, n, topk, tw):  # noqa: ARG001 - no routed weight in the fused first GEMM
            return moe_ext.moe_grouped_gemm_silu(a, w, s, e, n, topk)
    else:
        op = moe_ext.moe_grouped_gemm
    n_cfg = moe_ext.ops.num_tile_configs("moe_grouped_gemm_silu" if args.silu else "moe_grouped_gemm")
    if args.shape:
        shapes = []
        for s in args.shape:
            T, k, E, N, K = (int(x) for x in s.split(","))
            shapes.append((s, T, k, E, N, K, False, 0))
    else:
        shapes = shapes_from_models(args.tokens, args.models, esize)
    if args.silu:
        shapes = [sh for sh in shapes if not sh[6]]

    rows, best = [], []
    stem = args.stem or ("tune-grouped-gemm-silu" if args.silu else "tune-grouped-gemm")
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    run_meta = dict(compute_capability=props.major * 10 + props.minor, num_sms=props.multi_processor_count,
                    generic_blocks=args.generic_blocks,
                    routing="uniform" if args.uniform_routing else "model (uniform for --shape)")
    for name, T, k, E, N, K, second, expert_bytes in shapes:
        if E * N * K * esize > args.max_weight_gib * 2**30:
            print(f"skip {name} T={T}: weights over --max-weight-gib")
            continue
        g = torch.Generator(device="cuda").manual_seed(T + N + K)
        a = torch.randn(T * k if second else T, K, device="cuda", dtype=dtype, generator=g)
        op_topk = 1 if second else k
        # Rotate weight copies so each call streams its experts from HBM, not L2 (as many as fit).
        w_bytes = E * N * K * esize
        copies = max(1, min(4, int((args.max_weight_gib * 2**30) // max(w_bytes, 1)), -(-(256 << 20) // w_bytes)))
        ws = [torch.randn(E, N, K, device="cuda", dtype=dtype, generator=g) / K**0.5 for _ in range(copies)]
        model = MODELS.get(name.split()[0])
        if model is None or args.uniform_routing:
            ids = torch.rand(T, E, device="cuda", generator=g).topk(k, dim=1).indices.to(torch.int32)
        else:  # as bench_moe.py routes the layer
            routing = dict(model.routing)
            if model.correction_bias:
                routing["correction_bias"] = torch.randn(E, device="cuda", generator=g) * 0.1
            logits = torch.randn(T, E, device="cuda", generator=g)
            ids = moe_ext.topk_gating(logits, k, **routing)[1]
        tw = torch.rand(T, k, device="cuda", generator=g)
        hit = int(ids.unique().numel())
        flops = 2 * T * k * N * K
        nbytes = (hit * N * K + a.numel() + T * k * (N // 2 if args.silu else N)) * esize
        hopper = moe_ext.hopper_tiles(a.device.index) and not args.generic_blocks
        for bs in args.block_size or [moe_ext.choose_block_size(T, k, E, hopper, expert_bytes)]:
            s, e, n = moe_ext.moe_align_block_size(ids, E, bs)
            times = {}
            baseline = op(a, ws[0], s, e, n, op_topk, tw)  # the heuristic's answer
            # The heuristic (-1) is timed last: timed first, right after a shape's allocation, it
            # read up to 17% high on the H100 (bench/NOTES.md).
            cfgs = [*(args.configs if args.configs is not None else range(n_cfg)), -1]
            for cfg in [c for _ in range(args.rounds) for c in cfgs]:
                os.environ[env] = str(cfg)
                # Every config must give the heuristic's answer: bit for bit within one family of
                # configs (same k-order of mma steps), to bf16 rounding across mma.sync and wgmma.
                # A config that does not is reported and never chosen.
                got = op(a, ws[0], s, e, n, op_topk, tw)
                err = ((got.float() - baseline.float()).norm() / baseline.float().norm().clamp_min(1e-30)).item()
                if err > 1e-2:
                    print(f"  config {cfg}: output differs from the heuristic's (relative L2 {err:.2e}); skipped")
                    os.environ.pop(env, None)
                    continue
                state = {"i": 0}

                def call():
                    state["i"] = (state["i"] + 1) % len(ws)
                    return op(a, ws[state["i"]], s, e, n, op_topk, tw)

                try:
                    us = time_graph(call, calls_per_graph=max(1, len(ws)), replays=30)
                except RuntimeError as err:  # a config the launcher refuses for this shape
                    print(f"  config {cfg}: {err}")
                    continue
                finally:
                    os.environ.pop(env, None)
                if cfg in times:  # a later round: keep the least, one row per config
                    if us >= times[cfg]:
                        continue
                    rows[:] = [r for r in rows if not (r["shape"] == name and r["T"] == T
                                                       and r["block_size"] == bs and r["config"] == cfg)]
                times[cfg] = us
                rows.append(dict(shape=name, T=T, topk=k, E=E, N=N, K=K, block_size=bs, num_blocks=e.numel(),
                                 rows=T * k, config=cfg, us=us, tflops=flops / us / 1e6, gbs=nbytes / us / 1e3))
                print(f"{name} T={T} bs={bs} config {cfg:2d}: {us:9.2f} us  {flops / us / 1e6:7.1f} TFLOP/s  "
                      f"{nbytes / us / 1e3:7.0f} GB/s")
            tuned = {c: t for c, t in times.items() if c >= 0}
            if tuned:
                c_best = min(tuned, key=tuned.get)
                best.append(dict(shape=name, T=T, topk=k, E=E, N=N, K=K, block_size=bs, rows=T * k, best=c_best,
                                 best_us=tuned[c_best], heuristic_us=times.get(-1, float("nan")),
                                 speedup=times.get(-1, float("nan")) / tuned[c_best]))
        del ws, a  # the next shape's weights (up to --max-weight-gib) must not coexist with these
        torch.cuda.empty_cache()
        write_results(stem, dict(silu=args.silu, dtype=args.dtype, configs=n_cfg, partial=True, **run_meta), rows,
                      "(partial)")
    table = markdown_table(best, [("shape", "shape", ""), ("T", "T", "d"), ("block_size", "block", "d"),
                                  ("best", "best config", "d"), ("best_us", "best µs", ".2f"),
                                  ("heuristic_us", "heuristic µs", ".2f"), ("speedup", "heuristic µs / best µs", ".2f")])
    # Per block size, the config with the least total time over all shapes that ran every config (a summary; the
    # tables are written by --emit-table, by bucket).
    suggested = {}
    for bs in sorted({r["block_size"] for r in rows}):
        totals, count = {}, {}
        for r in rows:
            if r["block_size"] == bs and r["config"] >= 0:
                totals[r["config"]] = totals.get(r["config"], 0.0) + r["us"]
                count[r["config"]] = count.get(r["config"], 0) + 1
        full = {c: t for c, t in totals.items() if count[c] == max(count.values())}
        if full:
            suggested[bs] = min(full, key=full.get)
            print(f"block_size {bs}: least total time with config {suggested[bs]} "
                  f"({full[suggested[bs]]:.1f} µs over {count[suggested[bs]]} shapes)")
    table += "\n\nLeast total time per block size: " + ", ".join(f"{b}: config {c}" for b, c in suggested.items())
    print(table)
    meta = dict(silu=args.silu, dtype=args.dtype, configs=n_cfg, best=best, suggested=suggested, **run_meta)
    path = write_results(stem, meta, rows, table)
    print(f"wrote {path}.json / .md")


if __name__ == "__main__":
    main()
