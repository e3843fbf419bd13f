"""SiLU-and-mul and combine calls for ncu, at one model's shape and the token counts given.

    ncu -k regex:"silu_and_mul|moe_combine" --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        --section Occupancy --section LaunchStats --section WarpStateStats \\
        python bench/profile_elementwise.py --model gpt-oss-120b --tokens 1024
"""

import argparse

import torch

import moe_ext
from moe_ext.models import MODELS

p = argparse.ArgumentParser()
p.add_argument("--model", default="gpt-oss-120b", choices=sorted(MODELS))
p.add_argument("--tokens", type=int, nargs="+", default=[1024])
args = p.parse_args()
cfg = MODELS[args.model]
for T in args.tokens:
    x = torch.randn(T * cfg.topk, 2 * cfg.intermediate_size, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(T, cfg.topk, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):  # the second call is the warm one
        moe_ext.silu_and_mul(x)
        moe_ext.moe_combine(y)
torch.cuda.synchronize()
