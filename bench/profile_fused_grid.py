"""fused_topk_align calls for ncu at mid token counts (its cooperative grid path; tokens a block from
MOE_EXT_FUSED_GRID_TOKENS), softmax E=256/topk 8 unless told:

    MOE_EXT_FUSED_GRID_TOKENS=8 ncu -k regex:grid_kernel --section SpeedOfLight --section WarpStateStats \\
        python bench/profile_fused_grid.py --tokens 1024
"""

import argparse

import torch

import moe_ext

p = argparse.ArgumentParser()
p.add_argument("--tokens", type=int, nargs="+", default=[1024])
p.add_argument("--experts", type=int, default=256)
p.add_argument("--topk", type=int, default=8)
args = p.parse_args()
for T in args.tokens:
    logits = torch.randn(T, args.experts, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):  # the second call is the warm one
        moe_ext.fused_topk_align(logits, args.topk, 16, renormalize=True)
torch.cuda.synchronize()
