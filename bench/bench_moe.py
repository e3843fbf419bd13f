"""One whole MoE layer (routing, both expert GEMMs, SiLU-and-mul, combine) at the four model presets'
shapes and routing, bf16, against the floor of what it must move or compute.

Paths, each on the same inputs:
  moe_ext      moe_ext.fused_moe (torch.ops.moe_ext); skipped if an op lacks a kernel on the device.
  moe_ext_grouped  the same with decode_gemv=False: the grouped GEMMs at every T (moe_ext takes the
               expert GEMVs moe_gemv_silu + moe_gemv_combine on CUDA while T * topk <= E / 4).
  moe_ext_unfused  decode_gemv=False and fuse_silu=False: moe_grouped_gemm + silu_and_mul for the
               first GEMM (moe_ext fuses them through moe_grouped_gemm_silu for bf16 on CUDA).
  moe_ext_fused_silu  decode_gemv=False and fuse_silu=True: moe_grouped_gemm_silu at every T (the
               default fuses only from block_size 32, and not on Hopper).
  moe_ext_bs128  block_size=128 wherever the default takes 192 (Hopper prefill where an expert expects
               96 rows or more; session 15), else the default: the previous prefill blocks, for A/B.
  moe_ext_block16, _block32, _block64, _block128, _block192  the grouped GEMMs (decode_gemv=False) at
               that block size whatever the default: to place choose_block_size's thresholds.
  eager_ref    moe_ext.reference.fused_moe_ref with bf16 compute: PyTorch's loop over the hit experts.
  compile_ref  torch.compile(fused_moe_ref, dynamic=False) of the same, compiled once per (model, T).
  grouped_mm   torch ops: top-k routing, tokens sorted by expert, torch._grouped_mm over w13 with
               per-expert row offsets, SiLU-and-mul, torch._grouped_mm over w2, weighted index_add_.

Floor per (model, T), from the routing of the benchmark's own inputs:
  memory  = (weights of the distinct experts hit, w13 [2I, H] + w2 [H, I] each, + hidden states in,
            output out and router logits) / read bandwidth (weights are only read);
  compute = 2 * T * topk * 3 * H * I FLOPs / bf16 matmul rate;
  floor = max of the two, and % of floor = floor / measured time * 100.
Ceilings are measured in the same run: copy bandwidth (read + write), read bandwidth (sum over a
2 GiB buffer) and the bf16 matmul rate (8192^3).

Variants of the moe_ext path: --variants NAME:ENV=V,ENV=V ... (bench_routing's form) adds a path moe_ext[NAME] per
variant, the moe_ext path run with those environment variables set while it is called and captured (the adapters
read MOE_EXT_* overrides such as MOE_EXT_GEMV_COMBINE_CONFIG on every call), on the same inputs as the others: a
tile or path choice A/B'd in one run. Inputs (hidden states, logits) are drawn from a seed of (model,
T), so runs with other --models / --tokens lists route the same tokens the same way.

Timing: CUDA-graph replay per call at T <= 16 for every path that captures (moe_ext must; the
reference loops read expert ids on the host and cannot), else the median of CUDA events; slow paths
run until about 1 s is spent, 3 runs at least. Calls rotate over up to 4 copies of the weights (as
many as fit) so L2 does not hold the hit experts between calls. Each row's relative L2 error is
against fused_moe_ref in fp32 on the same inputs.

    python bench/bench_moe.py [--models ...] [--tokens 1 4 16 128 1024 4096] [--paths ...] [--iters 100]
                              [--compile-timeout 120] [--stem moe]
    python bench/bench_moe.py --paths moe_ext --variants c1:MOE_EXT_GEMV_COMBINE_CONFIG=1 \
        c3:MOE_EXT_GEMV_COMBINE_CONFIG=3
    python bench/bench_moe.py --smoke          # tiny shapes, a few runs; on the CPU without a GPU
    python bench/plot_moe.py bench/results/<device>-moe.json [more JSON of a split run]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import math
import signal
import statistics
import sys
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.append(str(Path(__file__).resolve().parents[1]))  # moe_ext from this checkout when not installed

import moe_ext  # noqa: E402
from common import (copy_bandwidth, environment, markdown_table, parse_variant, time_events, time_graph,  # noqa: E402
                    write_results)
from moe_ext import reference as ref  # noqa: E402
from moe_ext.models import MODELS  # noqa: E402

FORCED_BLOCK = {f"moe_ext_block{b}": b for b in (16, 32, 64, 128, 192)}
PATHS = ["moe_ext", "moe_ext_grouped", "moe_ext_unfused", "moe_ext_fused_silu", "moe_ext_bs128", *FORCED_BLOCK,
         "eager_ref", "compile_ref", "grouped_mm"]
OPS = ["topk_gating", "moe_align_block_size", "fused_topk_align", "silu_and_mul", "moe_grouped_gemm", "moe_grouped_gemm_silu",
       "moe_combine"]
GRAPH_MAX_TOKENS = 16   # decode sizes, where the host's launch cost would hide the kernels
TIME_BUDGET_S = 1.0     # per path and size: runs until about this much is spent, 3 runs at least
MAX_WEIGHT_SETS = 4
REF_CHUNK = 1024        # tokens per call of the fp32 reference (routing is per token, so chunks are exact)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_wall(fn, device: str, iters: int, warmup: int) -> float:
    """Median µs of fn() by the host clock (the CPU smoke run)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def time_any(fn, device: str, iters: int, warmup: int) -> float:
    return time_events(fn, iters, warmup) if device == "cuda" else time_wall(fn, device, iters, warmup)


def ceilings(device: str, smoke: bool) -> dict:
    """Copy bandwidth (read + write), read bandwidth and bf16 matmul rate, measured now."""
    nbytes, n = (64 << 20, 512) if smoke else (2 << 30, 8192)
    if device == "cuda":
        copy = copy_bandwidth(nbytes)
    else:
        src = torch.ones(nbytes, dtype=torch.uint8)
        dst = torch.empty_like(src)
        copy = 2 * nbytes / (time_any(lambda: dst.copy_(src), device, 5, 1) * 1e-6) / 1e9
        del src, dst
    buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    read = nbytes / (time_any(lambda: buf.sum(), device, 20, 3) * 1e-6) / 1e9
    del buf
    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device=device) for _ in range(2))
    c = torch.empty_like(a)
    tflops = 2 * n**3 / (time_any(lambda: torch.matmul(a, b, out=c), device, 20, 5) * 1e-6) / 1e12
    del a, b, c
    if device == "cuda":
        torch.cuda.empty_cache()
    return dict(copy_gbps=copy, read_gbps=read, matmul_tflops=tflops)


def torch_route(logits, topk, *, scoring_func="softmax", renormalize=False, correction_bias=None,
                num_expert_group=None, topk_group=None, routed_scaling_factor=1.0):
    """Top-k routing in plain torch ops (no host syncs): ([T, k] fp32 weights, [T, k] int64 ids)."""
    x = logits.float()
    scores = x.softmax(dim=-1) if scoring_func == "softmax" else x.sigmoid()
    keys = scores if correction_bias is None else scores + correction_bias
    if num_expert_group is not None and num_expert_group > 1:
        T, E = keys.shape
        grouped = keys.view(T, num_expert_group, E // num_expert_group)
        group_scores = grouped.topk(min(2, E // num_expert_group), dim=-1).values.sum(dim=-1)
        best = group_scores.topk(topk_group, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        keys = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(T, E)
    ids = keys.topk(topk, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * routed_scaling_factor, ids


def grouped_mm_moe(x, w13, w2, logits, topk, **routing):
    """The MoE layer through torch._grouped_mm: rows sorted by expert, one grouped GEMM per weight."""
    T, H = x.shape
    E = w13.shape[0]
    weights, ids = torch_route(logits, topk, **routing)
    flat = ids.flatten()
    order = flat.argsort(stable=True)                                                   # rows by expert
    counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    offs = counts.cumsum(0).to(torch.int32)                                             # end row per expert
    token = order // topk
    h = torch._grouped_mm(x[token], w13.transpose(1, 2), offs=offs)                     # [T*k, 2I]
    gate, up = h.chunk(2, dim=-1)
    h = torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offs)             # [T*k, H]
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    out.index_add_(0, token, h.float() * weights.flatten()[order].unsqueeze(1))
    return out.to(x.dtype)


def reference_fp32(x, w13, w2, logits, topk, routing):
    return torch.cat([ref.fused_moe_ref(x[i:i + REF_CHUNK], w13, w2, logits[i:i + REF_CHUNK], topk, **routing)
                      for i in range(0, x.shape[0], REF_CHUNK)])


def rel_l2(out: torch.Tensor, want: torch.Tensor) -> float:
    diff = torch.linalg.vector_norm((out.float() - want).double())
    return (diff / torch.linalg.vector_norm(want.double()).clamp_min(1e-30)).item()


def capture_blocker(fn) -> str | None:
    """Why fn cannot go into a CUDA graph (a host sync), or None."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return None
    except RuntimeError as e:
        return str(e).splitlines()[0][:80]
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


def measure(fn, device: str, iters: int, try_graph: bool) -> tuple[float, str]:
    """µs per call of fn, and how it was timed."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    est = max(time.perf_counter() - t0, 1e-6)
    n = max(3, min(iters, int(TIME_BUDGET_S / est)))
    if device != "cuda":
        return time_wall(fn, device, n, 1), "wall"
    how = "events"
    if try_graph:
        blocker = capture_blocker(fn)
        if blocker is None:
            calls = max(1, min(20, n))
            try:
                return time_graph(fn, calls, max(3, min(50, int(TIME_BUDGET_S / (est * calls))))), "graph"
            except Exception as e:  # noqa: BLE001 - a failed capture falls back to events
                how = f"events (capture failed: {type(e).__name__})"
                torch.cuda.synchronize()
        else:
            how = "events (host sync)"
    return time_events(fn, iters=n, warmup=min(10, n)), how


class Timeout(Exception):
    pass


def call_with_timeout(fn, seconds: int):
    """fn() raising Timeout after seconds (SIGALRM: the main thread, between Python bytecodes)."""
    def on_alarm(signum, frame):
        raise Timeout(f"over {seconds} s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def progress(done: int, total: int, label: str) -> None:
    width = 30
    fill = width * done // max(total, 1)
    sys.stderr.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {done}/{total} {label:<44.44}")
    sys.stderr.flush()


def smoke_config(cfg):
    """The model's routing at a toy size: E a multiple of its expert groups, H = 128, I = 64."""
    return dataclasses.replace(cfg, num_experts=min(cfg.num_experts, 32), hidden_size=128, intermediate_size=64)


def layer_weights(cfg, device: str, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One random w13 [E, 2I, H] and w2 [E, H, I], scaled so activations stay O(1)."""
    E, H, I = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    w13 = torch.randn(E, 2 * I, H, dtype=dtype, device=device).mul_(H**-0.5)
    w2 = torch.randn(E, H, I, dtype=dtype, device=device).mul_(I**-0.5)
    return w13, w2


def make_weight_sets(cfg, device: str, dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Up to MAX_WEIGHT_SETS copies of w13 and w2, as many as fit in 45% of free memory."""
    per_set = cfg.weight_bytes(elem_bytes=torch.empty((), dtype=dtype).element_size())
    free = torch.cuda.mem_get_info()[0] if device == "cuda" else 8 << 30
    return [layer_weights(cfg, device, dtype) for _ in range(max(1, min(MAX_WEIGHT_SETS, int(0.45 * free / per_set))))]


def floor_of(cfg, x, logits, routing, ceil: dict) -> dict:
    """The row's floor from the routing of these inputs: distinct experts hit, bytes, FLOPs, µs."""
    T, k, H, I = x.shape[0], cfg.topk, cfg.hidden_size, cfg.intermediate_size
    _, ids = ref.topk_gating_ref(logits, k, **{key: v for key, v in routing.items() if v is not None})
    hit = ids.unique().numel()
    w_bytes = hit * 3 * H * I * x.element_size()
    act_bytes = 2 * x.numel() * x.element_size() + logits.numel() * logits.element_size()
    mem_us = (w_bytes + act_bytes) / (ceil["read_gbps"] * 1e9) * 1e6
    flops = 2 * T * k * 3 * H * I
    comp_us = flops / (ceil["matmul_tflops"] * 1e12) * 1e6
    return dict(hit_experts=hit, weight_bytes=w_bytes, act_bytes=act_bytes, flops=flops, mem_floor_us=mem_us,
                compute_floor_us=comp_us, floor_us=max(mem_us, comp_us),
                bound="memory" if mem_us >= comp_us else "compute")


def run_path(run, x, sets, logits, want, device: str, iters: int, first_call_timeout: int | None) -> dict:
    """One path at one size: its error on weight set 0 (the first call, which compiles where the path
    does), then its time per call with the calls rotating over the weight sets."""
    sync(device)
    t0 = time.perf_counter()
    first = lambda: run(x, *sets[0], logits)  # noqa: E731
    out = call_with_timeout(first, first_call_timeout) if first_call_timeout else first()
    sync(device)
    first_s = time.perf_counter() - t0
    err = rel_l2(out, want)
    del out
    cycle = itertools.cycle(sets)
    us, how = measure(lambda: run(x, *next(cycle), logits), device, iters, try_graph=x.shape[0] <= GRAPH_MAX_TOKENS)
    return dict(us=us, timing=how, err=err, first_call_s=first_s)


def with_environment(env: dict, fn):
    """fn with the variables of env set around every call (common.environment)."""
    def call(*args):
        with environment(env):
            return fn(*args)
    return call


def input_seed(model: str, T: int) -> int:
    """The seed of one row's hidden states and logits (T = -1: the model's correction bias): the same row
    draws the same inputs in every run."""
    return zlib.crc32(f"{model}:{T}".encode())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="default 1 4 16 128 1024 4096 (smoke: 1 4 64)")
    p.add_argument("--paths", nargs="+", choices=PATHS, default=[p for p in PATHS if p not in FORCED_BLOCK])
    p.add_argument("--iters", type=int, default=None, help="most timed runs per path and size (default 100, smoke 3)")
    p.add_argument("--compile-timeout", type=int, default=120,
                   help="seconds allowed for compile_ref's first call; past it, larger T of that model are skipped")
    p.add_argument("--smoke", action="store_true", help="tiny shapes and few runs: checks the script, not the kernels")
    p.add_argument("--stem", default="moe", help="results/<device>-<stem>.json/.md (to split a run over several calls)")
    p.add_argument("--variants", nargs="+", default=[], metavar="NAME:ENV=V,ENV=V",
                   help="add a moe_ext path per variant, run with those environment variables set")
    args = p.parse_args()
    variants = {f"moe_ext[{name}]": env for name, env in map(parse_variant, args.variants)}
    args.paths = [*args.paths, *variants]
    tokens = args.tokens or ([1, 4, 64] if args.smoke else [1, 4, 16, 128, 1024, 4096])
    iters = args.iters or (3 if args.smoke else 100)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        print("no CUDA GPU: the full-size run needs one (use --smoke to check the script on the CPU)", file=sys.stderr)
    dtype = torch.bfloat16
    missing = [op for op in OPS if not moe_ext.has_kernel(op, device)]
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(tokens))

    ceil = ceilings(device, args.smoke)
    print(f"{device}: copy {ceil['copy_gbps']:.0f} GB/s (read + write), read {ceil['read_gbps']:.0f} GB/s, "
          f"bf16 matmul {ceil['matmul_tflops']:.3g} TFLOP/s")
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size if device == "cuda" else 0

    rows, notes, weight_sets = [], {}, {}
    total, done = len(args.models) * len(tokens) * len(args.paths), 0
    ours = ("moe_ext", "moe_ext_grouped", "moe_ext_unfused", "moe_ext_fused_silu", "moe_ext_bs128", *FORCED_BLOCK,
            *variants)
    for name in args.models:
        cfg = smoke_config(MODELS[name]) if args.smoke else MODELS[name]
        E, k, H = cfg.num_experts, cfg.topk, cfg.hidden_size
        torch._dynamo.reset()  # drops the previous model's compiled code and what it holds
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        sets = make_weight_sets(cfg, device, dtype)
        weight_sets[name] = len(sets)
        bias_gen = torch.Generator(device=device).manual_seed(input_seed(name, -1))
        bias = (torch.randn(E, device=device, generator=bias_gen) * 0.1) if cfg.correction_bias else None
        routing = dict(cfg.routing, correction_bias=bias)
        compiled = torch.compile(ref.fused_moe_ref, dynamic=False)

        runners = {
            "moe_ext": lambda x, w13, w2, lg: moe_ext.fused_moe(x, w13, w2, lg, k, **routing),
            "moe_ext_grouped": lambda x, w13, w2, lg: moe_ext.fused_moe(x, w13, w2, lg, k, decode_gemv=False, **routing),
            "moe_ext_unfused": lambda x, w13, w2, lg: moe_ext.fused_moe(x, w13, w2, lg, k, decode_gemv=False,
                                                                        fuse_silu=False, **routing),
            "moe_ext_fused_silu": lambda x, w13, w2, lg: moe_ext.fused_moe(x, w13, w2, lg, k, decode_gemv=False,
                                                                           fuse_silu=True, **routing),
            # the default's block size, 128 where it would take 192
            "moe_ext_bs128": lambda x, w13, w2, lg: moe_ext.fused_moe(
                x, w13, w2, lg, k, block_size=min(128, moe_ext.default_block_size(x, w13, w2, k, E)), **routing),
            **{path: (lambda x, w13, w2, lg, bs=bs: moe_ext.fused_moe(x, w13, w2, lg, k, block_size=bs,
                                                                      decode_gemv=False, **routing))
               for path, bs in FORCED_BLOCK.items()},
            "eager_ref": lambda x, w13, w2, lg: ref.fused_moe_ref(x, w13, w2, lg, k, compute_dtype=dtype, **routing),
            "compile_ref": lambda x, w13, w2, lg: compiled(x, w13, w2, lg, k, compute_dtype=dtype, **routing),
            "grouped_mm": lambda x, w13, w2, lg: grouped_mm_moe(x, w13, w2, lg, k, **routing),
        }
        runners.update({path: with_environment(env, runners["moe_ext"]) for path, env in variants.items()})
        skip = {p: f"skipped: no {device} kernel for {', '.join(missing)}" for p in ours if missing}
        for T in tokens:
            gen = torch.Generator(device=device).manual_seed(input_seed(name, T))
            x = torch.randn(T, H, dtype=dtype, device=device, generator=gen)
            # fp32, as moe_ext.MoE's router gives
            logits = torch.randn(T, E, dtype=torch.float32, device=device, generator=gen)
            row = dict(model=name, T=T, E=E, topk=k, H=H, I=cfg.intermediate_size, weight_sets=len(sets),
                       **floor_of(cfg, x, logits, routing, ceil))
            row["l2_may_hold_weights"] = bool(l2 and len(sets) * row["weight_bytes"] < 2 * l2)
            want = reference_fp32(x, *sets[0], logits, k, routing)
            for path in args.paths:
                progress(done, total, f"{name} T={T} {path}")
                done += 1
                res = dict(us=math.nan, timing="", err=math.nan, first_call_s=math.nan)
                note = skip.get(path, "")
                if not note:
                    try:
                        res = run_path(runners[path], x, sets, logits, want, device, iters,
                                       args.compile_timeout if path == "compile_ref" else None)
                    except Exception as e:  # noqa: BLE001 - record the failure, keep benchmarking
                        sync(device)
                        why = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                        note = f"{'unsupported' if path == 'grouped_mm' else 'failed'}: {why}"
                        if isinstance(e, Timeout):
                            note = f"skipped: first call (compile) {e}"
                            skip[path] = f"skipped: compile at T={T} took {e}"
                            torch._dynamo.reset()
                        if device == "cuda":
                            torch.cuda.empty_cache()
                if note:
                    notes.setdefault(path, {})[f"{name} T={T}"] = note
                row.update({f"{path}_{key}": v for key, v in res.items()})
                row[f"{path}_pct"] = 100 * row["floor_us"] / res["us"] if res["us"] == res["us"] else math.nan
                row[f"{path}_note"] = note
            rows.append(row)
            sys.stderr.write("\r" + " " * 90 + "\r")
            print(f"{name:14s} T={T:5d} hit {row['hit_experts']:3d} floor {row['floor_us']:9.2f} us "
                  f"({row['bound']:7s}) | "
                  + " | ".join(f"{p} {row[p + '_us']:9.1f} us {row[p + '_pct']:5.1f}% err {row[p + '_err']:.1e}"
                               for p in args.paths), flush=True)
        del sets, want, x, logits, compiled, runners
    progress(total, total, "done")
    sys.stderr.write("\n")

    cols = [("model", "model", ""), ("T", "T", "d"), ("hit_experts", "hit", "d"), ("floor_us", "floor µs", ".1f"),
            ("bound", "bound", "")]
    for path in args.paths:
        cols += [(f"{path}_us", f"{path} µs", ".1f"), (f"{path}_pct", "% floor", ".1f"),
                 (f"{path}_err", "rel err", ".1e")]
    for r in rows:
        r["timing"] = ", ".join(f"{p}: {r[p + '_timing']}" for p in args.paths if r[p + "_timing"])
    cols.append(("timing", "timing", ""))
    table = markdown_table(rows, cols)
    if notes:
        table += "\n\nSkipped or failed:\n" + "\n".join(
            f"- {path}, {where}: {note}" for path, by in notes.items() for where, note in by.items())
    meta = dict(
        smoke=args.smoke, dtype="bfloat16", paths=args.paths, tokens=tokens,
        ceilings={key: round(v, 1) for key, v in ceil.items()},
        ceiling_method="copy: dst.copy_(src), bytes read + written; read: fp32 sum over the buffer, bytes read; "
                       f"matmul: torch.matmul bf16 {'512' if args.smoke else '8192'}^3",
        floor="memory = (hit experts' w13 + w2 bytes + hidden in + output + fp32 router logits) / read bandwidth "
              "(weights are only read, so the read ceiling, not copy); compute = 2*T*topk*3*H*I / matmul rate; "
              "floor = max; % of floor = floor / time * 100; hit experts = unique ids of the fp32 reference routing",
        timing=f"graph replay per call (common.time_graph) at T <= {GRAPH_MAX_TOKENS} where the path captures "
               "(checked first under torch.cuda.set_sync_debug_mode('error')), else median of CUDA events "
               f"(common.time_events); runs capped near {TIME_BUDGET_S} s per path and size, 3 at least; "
               "per-row method in <path>_timing" if device == "cuda" else "CPU smoke run: host clock median",
        cache=f"calls rotate over weight_sets copies of w13/w2 (up to {MAX_WEIGHT_SETS}, as fit in 45% of free "
              f"memory) so L2 ({l2 >> 20} MiB) cannot keep the hit experts between calls; DeepSeek-V3 (22.5 GB) "
              "fits once, but its hit experts (>= 8 x 88 MB) exceed L2; rows with l2_may_hold_weights=true are "
              "those where the rotated hit weights are under twice L2",
        weight_sets=weight_sets,
        inputs="hidden ~ N(0,1) bf16, router logits ~ N(0,1) fp32 (both from a seed of (model, T): the same in "
               "every run), w13 ~ N(0,1/H), w2 ~ N(0,1/I) bf16, DeepSeek correction bias ~ N(0, 0.1) fp32 (seeded "
               "per model); routing args from moe_ext.models",
        variants={path: f"moe_ext with {env}" for path, env in variants.items()},
        error="relative L2 vs moe_ext.reference.fused_moe_ref in fp32 on weight set 0",
        compile_ref=f"torch.compile(fused_moe_ref, dynamic=False), recompiled per T (first call limited to "
                    f"{args.compile_timeout} s, its time in compile_ref_first_call_s): the routing compiles to one "
                    "graph, the expert loop graph-breaks (unique, nonzero, tolist) and runs eagerly",
        grouped_mm="torch routing (softmax|sigmoid, group mask, topk), stable argsort by expert, "
                   "torch._grouped_mm(x[rows], w13^T, offs=int32 cumulative ends), silu*up, "
                   "torch._grouped_mm(., w2^T, offs), fp32 index_add_ of weighted rows",
        moe_ext="skipped: no kernel for " + ", ".join(missing) if missing else f"all ops have {device} kernels",
    )
    path = write_results(args.stem, meta, rows, table)
    print(f"\nwrote {path}.json/.md")


if __name__ == "__main__":
    main()
