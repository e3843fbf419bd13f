"""One model GEMM of the MoE layer (tune_grouped_gemm.py's shapes: random routing, the heuristic's
config unless MOE_EXT_GROUPED_GEMM_CONFIG forces one), called a few times, for ncu:

    ncu -k regex:grouped_gemm --launch-skip 2 --launch-count 1 --section SpeedOfLight \\
        --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats \\
        python bench/profile_gemm.py --shape "deepseek-v3 w13" --tokens 4096

--silu profiles moe_grouped_gemm_silu on the shape's first GEMM instead.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moe_ext  # noqa: E402
from tune_grouped_gemm import shapes_from_models  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="deepseek-v3 w13", help="'<model> w13' or '<model> w2'")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--block-size", type=int, default=None, help="default: moe_ext.choose_block_size")
    p.add_argument("--silu", action="store_true")
    p.add_argument("--calls", type=int, default=3)
    args = p.parse_args()
    shapes = {s[0]: s for s in shapes_from_models([args.tokens])}
    if args.shape not in shapes:
        p.error(f"--shape must be one of {sorted(shapes)}")
    _, T, k, E, N, K, second, expert_bytes = shapes[args.shape]
    if args.silu and second:
        p.error("--silu takes a w13 shape")
    g = torch.Generator(device="cuda").manual_seed(0)
    dt = torch.bfloat16
    a = torch.randn(T * k if second else T, K, device="cuda", dtype=dt, generator=g)
    w = torch.randn(E, N, K, device="cuda", dtype=dt, generator=g) / K**0.5
    ids = torch.rand(T, E, device="cuda", generator=g).topk(k, dim=1).indices.to(torch.int32)
    bs = args.block_size or moe_ext.choose_block_size(T, k, E, moe_ext.hopper_tiles(a.device.index), expert_bytes)
    s, e, n = moe_ext.moe_align_block_size(ids, E, bs)
    topk = 1 if second else k
    for _ in range(args.calls):
        if args.silu:
            moe_ext.moe_grouped_gemm_silu(a, w, s, e, n, topk)
        else:
            moe_ext.moe_grouped_gemm(a, w, s, e, n, topk)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
