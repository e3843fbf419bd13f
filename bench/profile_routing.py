"""A few routing calls at decode size, for ncu: the gating kernel, the alignment kernel and the fused
decode kernel (softmax E=256/topk 8, and DeepSeek-V3's grouped sigmoid routing).

    ncu -k regex:"gating|moe_align" --set full --import-source yes -o prof python bench/profile_routing.py
    ncu -i prof.ncu-rep --page source --csv --print-source sass > src.csv   # stall samples per instruction
    python bench/top_sass.py src.csv                                         # the top ones
"""

import torch

import moe_ext

deepseek = dict(scoring_func="sigmoid", renormalize=True, num_expert_group=8, topk_group=4, routed_scaling_factor=2.5)
for E, k in ((256, 8), (128, 4)):
    logits = torch.randn(1, E, device="cuda", dtype=torch.bfloat16)
    w, ids = moe_ext.topk_gating(logits, k, renormalize=True)
    moe_ext.moe_align_block_size(ids, E, 16)
    moe_ext.fused_topk_align(logits, k, 16, renormalize=True)
    if E == 256:
        moe_ext.fused_topk_align(logits, k, 16, correction_bias=torch.randn(E, device="cuda"), **deepseek)
    ids = torch.randint(0, E, (1024, 8), device="cuda", dtype=torch.int32)
    moe_ext.moe_align_block_size(ids, E, 16)
torch.cuda.synchronize()
