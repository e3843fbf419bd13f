"""The MoE layer at decode size, for ncu: per-kernel time and DRAM throughput of each launch of
fused_moe (router, SiLU GEMV, combine GEMV) for one model and token count.

    ncu --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed \\
        python bench/profile_decode.py --model qwen3-30b-a3b --tokens 1

ncu serializes kernels, so programmatic dependent launch does not overlap them here: the sum of the
kernel times is an upper bound on the layer's graph-replay time, and each kernel's DRAM throughput
is what it reaches alone.
"""

import argparse

import torch

import moe_ext
from bench_moe import layer_weights
from moe_ext.models import MODELS


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(MODELS), default="qwen3-30b-a3b")
    p.add_argument("--tokens", type=int, default=1)
    p.add_argument("--calls", type=int, default=3)
    args = p.parse_args()
    cfg = MODELS[args.model]
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    E, H = cfg.num_experts, cfg.hidden_size
    w13, w2 = layer_weights(cfg, dev, dt)
    x = torch.randn(args.tokens, H, device=dev, dtype=dt)
    logits = torch.randn(args.tokens, E, device=dev, dtype=dt)
    bias = torch.randn(E, device=dev) * 0.1 if cfg.correction_bias else None
    for _ in range(args.calls):
        moe_ext.fused_moe(x, w13, w2, logits, cfg.topk, correction_bias=bias, **cfg.routing)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
