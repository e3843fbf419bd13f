"""fused_topk_align calls at decode size for ncu, one token count a run (the single-block kernel):

    MOE_PROFILE_TOKENS=16 ncu -k regex:fused_gating_align_kernel --set full --import-source yes -o prof \\
        python bench/profile_fused.py [--experts 256 --topk 8] [--grouped]
    ncu -i prof.ncu-rep --page source --csv --print-source sass > src.csv  # executed instructions and
                                                                            # stall samples per SASS line

--grouped: DeepSeek-V3's routing (sigmoid, 8 groups, topk_group 4, correction bias).
"""

import argparse
import os

import torch

import moe_ext

p = argparse.ArgumentParser()
p.add_argument("--experts", type=int, default=256)
p.add_argument("--topk", type=int, default=8)
p.add_argument("--grouped", action="store_true")
args = p.parse_args()
T = int(os.environ.get("MOE_PROFILE_TOKENS", "1"))
E = args.experts
kw = dict(renormalize=True)
if args.grouped:
    kw.update(scoring_func="sigmoid", num_expert_group=8, topk_group=4, routed_scaling_factor=2.5,
              correction_bias=torch.randn(E, device="cuda"))
logits = torch.randn(T, E, device="cuda", dtype=torch.bfloat16)
for _ in range(3):  # the last call is the one a --launch-skip 2 profiles warm
    moe_ext.fused_topk_align(logits, args.topk, 16, **kw)
torch.cuda.synchronize()
