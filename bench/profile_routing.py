"""A few routing calls at decode size, for ncu: the gating kernel and the alignment kernel.

    ncu -k regex:"topk_gating|moe_align" --section SpeedOfLight --section WarpStateStats \
        python bench/profile_routing.py
"""

import torch

import moe_ext

for E, k in ((256, 8), (128, 4)):
    logits = torch.randn(1, E, device="cuda", dtype=torch.bfloat16)
    w, ids = moe_ext.topk_gating(logits, k, renormalize=True)
    moe_ext.moe_align_block_size(ids, E, 16)
    ids = torch.randint(0, E, (1024, 8), device="cuda", dtype=torch.int32)
    moe_ext.moe_align_block_size(ids, E, 16)
torch.cuda.synchronize()
