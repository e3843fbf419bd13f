"""The moe_ext demo: one MoE layer at a real model's shape and routing, run through torch.ops.moe_ext,
checked against the eager fp32 reference, timed against eager PyTorch.

    python -m moe_ext [--model deepseek-v3|gpt-oss-120b|mixtral-8x7b|qwen3-30b-a3b] [--tokens N]
                      [--device cpu|cuda] [--ep-ranks N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

import moe_ext
from moe_ext import reference as ref
from moe_ext.models import MODELS

OPS = ["topk_gating", "moe_align_block_size", "fused_topk_align", "silu_and_mul", "moe_grouped_gemm",
       "moe_grouped_gemm_silu", "moe_combine"]


def best_device(requested: str | None) -> tuple[str, str]:
    """The device to run on, and why."""
    cuda_ready = torch.cuda.is_available() and all(moe_ext.has_kernel(op, "cuda") for op in OPS)
    if requested == "cuda" and not cuda_ready:
        missing = [op for op in OPS if not moe_ext.has_kernel(op, "cuda")]
        why = "no CUDA GPU is visible" if not torch.cuda.is_available() else f"no CUDA kernel yet for {', '.join(missing)}"
        sys.exit(f"moe_ext: cannot run on cuda: {why}")
    if requested:
        return requested, "requested"
    if cuda_ready:
        return "cuda", "CUDA GPU with every op's kernel"
    if torch.cuda.is_available():
        return "cpu", "this build lacks some CUDA kernels"
    return "cpu", "no CUDA GPU"


def memory_budget(device: str) -> int:
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return int(free * 0.6)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(total // 4, 4 << 30)


def timed(fn, device: str, iters: int) -> float:
    """Median wall time of fn in milliseconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m moe_ext", description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="qwen3-30b-a3b")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: the best device present")
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    p.add_argument("--ep-ranks", type=int, default=None,
                   help="hold 1/N of the experts (rank 0 of N, through expert_map); default: 1, or the "
                        "smallest N whose weights fit the device's memory budget")
    p.add_argument("--iters", type=int, default=None)
    args = p.parse_args(argv)

    device, why = best_device(args.device)
    dtype = getattr(torch, args.dtype)
    cfg = MODELS[args.model]
    E = cfg.num_experts
    ep = args.ep_ranks
    if ep is None:
        ep = 1
        while cfg.weight_bytes(E // ep) > memory_budget(device) and E % (2 * ep) == 0 and E // (2 * ep) >= cfg.topk:
            ep *= 2
    if E % ep:
        sys.exit(f"moe_ext: --ep-ranks {ep} must divide num_experts {E}")
    iters = args.iters or (20 if device == "cuda" else 3)

    expert_map = None
    if ep > 1:
        expert_map = torch.full((E,), -1, dtype=torch.int32)
        expert_map[: E // ep] = torch.arange(E // ep, dtype=torch.int32)

    torch.manual_seed(0)
    t0 = time.perf_counter()
    layer = moe_ext.MoE(cfg.hidden_size, cfg.intermediate_size, E, cfg.topk, use_correction_bias=cfg.correction_bias,
                        expert_map=expert_map, dtype=dtype, device=device, **cfg.routing).eval()
    x = torch.randn(args.tokens, cfg.hidden_size, device=device, dtype=dtype)
    build_s = time.perf_counter() - t0

    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"moe_ext demo: {cfg.name} MoE layer, T={args.tokens}, E={E} (local {layer.num_local_experts}"
          f"{f', expert_map: rank 0 of {ep}' if ep > 1 else ''}), topk={cfg.topk}, H={cfg.hidden_size}, "
          f"I={cfg.intermediate_size}, {args.dtype}")
    routing_desc = ", ".join(f"{k}={v}" for k, v in cfg.routing.items())
    print(f"routing: {routing_desc}{', correction_bias' if cfg.correction_bias else ''}")
    print(f"device: {device} [{name}] ({why}); torch {torch.__version__}; weights "
          f"{cfg.weight_bytes(layer.num_local_experts) / 2**30:.2f} GiB, built in {build_s:.1f} s")

    with torch.no_grad():
        logits = layer.router_logits(x)
        routing = dict(cfg.routing, correction_bias=layer.correction_bias, expert_map=layer.expert_map)
        w13, w2 = layer.w13, layer.w2

        def run_moe_ext():
            return layer(x)

        def run_ref_fp32():
            return ref.fused_moe_ref(x, w13, w2, logits, cfg.topk, **routing)

        def run_eager_lowp():
            return ref.fused_moe_ref(x, w13, w2, logits, cfg.topk, compute_dtype=dtype, **routing)

        want = run_ref_fp32()
        rows = []
        for label, fn in [("eager reference (fp32 math)", run_ref_fp32),
                          (f"eager PyTorch expert loop ({args.dtype})", run_eager_lowp),
                          ("moe_ext.MoE -> torch.ops.moe_ext", run_moe_ext)]:
            ms = timed(fn, device, iters)
            err = (torch.linalg.vector_norm((fn().float() - want.float()).double())
                   / torch.linalg.vector_norm(want.double()).clamp_min(1e-30)).item()
            rows.append((label, ms, err))

    base = rows[0][1]
    print()
    print(f"| {'path':<40} | {'time (ms)':>10} | {'speed-up':>8} | {'rel. L2 error':>13} |")
    print(f"|{'-' * 42}|{'-' * 11}:|{'-' * 9}:|{'-' * 14}:|")
    for label, ms, err in rows:
        print(f"| {label:<40} | {ms:>10.3f} | {base / ms:>7.2f}x | {err:>13.2e} |")
    ok = rows[-1][2] <= 1e-2
    print()
    print(f"check: moe_ext vs fp32 reference, relative L2 error {rows[-1][2]:.2e} "
          f"{'<=' if ok else '>'} 1e-2: {'PASS' if ok else 'FAIL'}  (median of {iters} runs after warm-up)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
