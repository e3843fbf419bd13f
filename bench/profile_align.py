"""Alignment calls for ncu, on the path MOE_EXT_ALIGN_PATH forces (csrc/cuda/routing_cuda.cpp):
E=256, topk 8, block 16, router-like ids, at the token counts given (default 1 and 1024).

    MOE_EXT_ALIGN_PATH=3 ncu -k regex:moe_align --section SpeedOfLight --section WarpStateStats \\
        python bench/profile_align.py --tokens 1 1024
"""

import argparse

import torch

import moe_ext

p = argparse.ArgumentParser()
p.add_argument("--tokens", type=int, nargs="+", default=[1, 1024])
p.add_argument("--experts", type=int, default=256)
p.add_argument("--topk", type=int, default=8)
args = p.parse_args()
for T in args.tokens:
    ids = torch.rand(T, args.experts, device="cuda").argsort(dim=1)[:, :args.topk].to(torch.int32).contiguous()
    for _ in range(2):  # the second call is the warm one
        moe_ext.moe_align_block_size(ids, args.experts, 16)
torch.cuda.synchronize()
