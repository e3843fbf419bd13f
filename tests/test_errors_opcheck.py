"""Bad input raises an error naming the argument; torch.library.opcheck passes on every op."""

from __future__ import annotations

import pytest
import torch

import moe_ext
from moe_ext import reference as ref

from conftest import DEVICES, FIRST_WGMMA_CONFIG, FIRST_WGMMA_SILU_CONFIG, HAS_CUDA, require_kernel

ERRORS = (RuntimeError, ValueError, TypeError)


def logits(T=4, E=16, dtype=torch.float32, device="cpu"):
    return torch.randn(T, E, dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "op,call,match",
    [
        ("topk_gating", lambda d: moe_ext.topk_gating(logits(device=d).to(torch.int32), 2), "router_logits must have dtype"),
        ("topk_gating", lambda d: moe_ext.topk_gating(logits(device=d).to(torch.float64), 2), "router_logits must have dtype"),
        ("topk_gating", lambda d: moe_ext.topk_gating(torch.randn(16, device=d), 2), "router_logits must be 2-D"),
        ("topk_gating", lambda d: moe_ext.topk_gating(logits(device=d).t(), 2), "router_logits must have a contiguous last"),
        ("topk_gating", lambda d: moe_ext.topk_gating(logits(E=8, device=d), 9), "topk must be in"),
        ("topk_gating", lambda d: moe_ext.topk_gating(logits(E=64, device=d), 33), "topk must be in"),
        ("topk_gating", lambda d: moe_ext.topk_gating(logits(E=8, device=d), 0), "topk must be in"),
        ("topk_gating", lambda d: moe_ext.topk_gating(logits(E=1025, device=d), 2), "num_experts"),
        ("topk_gating", lambda d: moe_ext.topk_gating(logits(device=d), 2, scoring_func="relu"), "scoring_func"),
        ("topk_gating", lambda d: moe_ext.topk_gating(logits(device=d), 2, correction_bias=torch.zeros(15, device=d)),
         "correction_bias must have num_experts"),
        ("topk_gating", lambda d: moe_ext.topk_gating(logits(device=d), 2, correction_bias=torch.zeros(16, device=d,
                                                                                       dtype=torch.bfloat16)),
         "correction_bias must have dtype"),
        ("topk_gating", lambda d: moe_ext.topk_gating(logits(device=d), 2, num_expert_group=3), "num_expert_group"),
        ("topk_gating", lambda d: moe_ext.topk_gating(logits(device=d), 2, num_expert_group=4, topk_group=5), "topk_group"),
        ("topk_gating", lambda d: moe_ext.topk_gating(logits(device=d), 9, num_expert_group=4, topk_group=2), "topk = 9 exceeds"),
        ("topk_gating", lambda d: moe_ext.topk_gating(logits(device=d), 2, routed_scaling_factor=float("inf")),
         "routed_scaling_factor"),
        ("moe_align_block_size", lambda d: moe_ext.moe_align_block_size(torch.zeros(4, 2, dtype=torch.int64, device=d), 8, 16),
         "topk_ids must have dtype"),
        ("moe_align_block_size", lambda d: moe_ext.moe_align_block_size(torch.zeros(8, dtype=torch.int32, device=d), 8, 16),
         "topk_ids must be 2-D"),
        ("moe_align_block_size", lambda d: moe_ext.moe_align_block_size(torch.zeros(2, 4, dtype=torch.int32, device=d).t(), 8, 16),
         "topk_ids must be contiguous"),
        ("moe_align_block_size", lambda d: moe_ext.moe_align_block_size(torch.zeros(4, 2, dtype=torch.int32, device=d), 8, 0),
         "block_size must be in"),
        ("moe_align_block_size", lambda d: moe_ext.moe_align_block_size(torch.zeros(4, 2, dtype=torch.int32, device=d), 8, -16),
         "block_size must be in"),
        ("moe_align_block_size", lambda d: moe_ext.moe_align_block_size(torch.zeros(4, 2, dtype=torch.int32, device=d), 0, 16),
         "num_experts must be in"),
        ("moe_align_block_size", lambda d: moe_ext.moe_align_block_size(torch.zeros(4, 2, dtype=torch.int32, device=d), 8, 16,
                                                torch.zeros(7, dtype=torch.int32, device=d)),
         "expert_map must have num_experts"),
        ("moe_align_block_size", lambda d: moe_ext.moe_align_block_size(torch.zeros(4, 2, dtype=torch.int32, device=d), 8, 16,
                                                torch.zeros(8, dtype=torch.int64, device=d)),
         "expert_map must have dtype"),
        ("fused_topk_align", lambda d: moe_ext.fused_topk_align(logits(device=d), 2, 0), "block_size must be in"),
        ("fused_topk_align", lambda d: moe_ext.fused_topk_align(logits(device=d), 17, 16), "topk must be in"),
        ("silu_and_mul", lambda d: moe_ext.silu_and_mul(torch.randn(4, 7, device=d)), "must be even"),
        ("silu_and_mul", lambda d: moe_ext.silu_and_mul(torch.randn(8, 4, device=d).t()), "x must be contiguous"),
        ("silu_and_mul", lambda d: moe_ext.silu_and_mul(torch.ones(4, 8, dtype=torch.int32, device=d)), "x must have dtype"),
        ("moe_combine", lambda d: moe_ext.moe_combine(torch.randn(4, 8, device=d)), "x must be 3-D"),
        ("moe_combine", lambda d: moe_ext.moe_combine(torch.randn(4, 2, 8, device=d), torch.rand(4, 3, device=d)),
         "topk_weights must have shape"),
    ],
)
def test_bad_input_names_argument(device, op, call, match):
    require_kernel(op, device)
    with pytest.raises(ERRORS, match=match):
        call(device)


def gemm_args(device="cpu", T=4, topk=2, E=4, N=8, K=16, dtype=torch.float32):
    ids = torch.randint(0, E, (T, topk), dtype=torch.int32)
    sorted_ids, expert_ids, ntpp = ref.moe_align_block_size_ref(ids, E, 4)
    a, w = torch.randn(T, K, dtype=dtype), torch.randn(E, N, K, dtype=dtype)
    return [t.to(device) for t in (a, w, sorted_ids, expert_ids, ntpp)] + [topk]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.__setitem__(1, a[1].to(torch.bfloat16)), "w must have a's dtype"),
        (lambda a: a.__setitem__(1, a[1][:, :, :8].contiguous()), r"w must be \[E, N, K\]"),
        (lambda a: a.__setitem__(0, a[0].t()), "a must be 2-D|a must be contiguous"),
        (lambda a: a.__setitem__(0, a[0][:, ::2]), "a must be contiguous"),
        (lambda a: a.__setitem__(2, a[2].long()), "sorted_token_ids must have dtype"),
        (lambda a: a.__setitem__(2, torch.cat([a[2], a[2][:1]])), "whole block_size"),
        (lambda a: a.__setitem__(4, a[4].repeat(2)), "num_tokens_post_padded must have 1 element"),
        (lambda a: a.__setitem__(5, 0), "topk must be >= 1"),
        (lambda a: a.append(torch.rand(3, 2, device=a[0].device)), "topk_weights must have"),
    ],
)
def test_grouped_gemm_bad_input(device, mutate, match):
    require_kernel("moe_grouped_gemm", device)
    args = gemm_args(device)
    mutate(args)
    with pytest.raises(ERRORS, match=match):
        moe_ext.moe_grouped_gemm(*args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.__setitem__(1, a[1][:, :7].contiguous()), r"w13.size\(1\) must be even"),
        (lambda a: a.__setitem__(1, a[1].to(torch.bfloat16)), "moe_grouped_gemm_silu: w13 must have a's dtype"),
        (lambda a: a.__setitem__(1, a[1][:, :, :8].contiguous()), r"w13 must be \[E, N, K\]"),
        (lambda a: a.__setitem__(1, a[1][0]), "w13 must be 3-D"),
        (lambda a: a.__setitem__(2, a[2].long()), "moe_grouped_gemm_silu: sorted_token_ids must have dtype"),
        (lambda a: a.__setitem__(5, 0), "moe_grouped_gemm_silu: topk must be >= 1"),
    ],
)
def test_grouped_gemm_silu_bad_input(device, mutate, match):
    require_kernel("moe_grouped_gemm_silu", device)
    args = gemm_args(device)
    mutate(args)
    with pytest.raises(ERRORS, match=match):
        moe_ext.moe_grouped_gemm_silu(*args)


def gemv_args(device):
    """[a, w13, topk_ids, expert_map, h, w2, topk_weights] for the expert GEMVs (M=3, topk=2, E=4, I=8, K=16)."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(3, 16, generator=g).to(device)
    w13 = torch.randn(4, 16, 16, generator=g).to(device)
    ids = torch.tensor([[0, 1], [2, 3], [1, 2]], dtype=torch.int32).to(device)
    emap = torch.tensor([0, 1, 2, 3, -1], dtype=torch.int32).to(device)
    h = torch.randn(6, 8, generator=g).to(device)
    w2 = torch.randn(4, 16, 8, generator=g).to(device)
    return [a, w13, ids, emap, h, w2, torch.rand(3, 2, generator=g).to(device)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "op,mutate,match",
    [
        ("silu", lambda a: a.__setitem__(1, a[1][:, :7].contiguous()), r"moe_gemv_silu: w13 must be \[E, 2I, K\]"),
        ("silu", lambda a: a.__setitem__(1, a[1][:, :, :8].contiguous()), r"w13 must be \[E, 2I, K\] .* K = a.size\(1\)"),
        ("silu", lambda a: a.__setitem__(1, a[1].to(torch.bfloat16)), "moe_gemv_silu: w13 must have a's dtype"),
        ("silu", lambda a: a.__setitem__(0, a[0].double()), "moe_gemv_silu: a must have dtype"),
        ("silu", lambda a: a.__setitem__(2, a[2].long()), "moe_gemv_silu: topk_ids must have dtype"),
        ("silu", lambda a: a.__setitem__(2, a[2][:2]), "moe_gemv_silu: topk_ids must have a.size"),
        ("silu", lambda a: a.__setitem__(2, a[2].t()), "moe_gemv_silu: topk_ids must"),
        ("silu", lambda a: a.__setitem__(2, a[2][:, :0]), "topk >= 1"),
        ("silu", lambda a: a.__setitem__(3, a[3].long()), "moe_gemv_silu: expert_map must have dtype"),
        ("silu", lambda a: a.__setitem__(3, a[3][:0]), "moe_gemv_silu: expert_map must not be empty"),
        ("combine", lambda a: a.__setitem__(5, a[5][:, :, :4].contiguous()), r"moe_gemv_combine: w2 must be \[E, H, K\]"),
        ("combine", lambda a: a.__setitem__(5, a[5].half()), "moe_gemv_combine: w2 must have h's dtype"),
        ("combine", lambda a: a.__setitem__(4, a[4][:5]), r"topk_ids must be \[M, topk\] with M \* topk = h.size\(0\)"),
        ("combine", lambda a: a.__setitem__(6, a[6][:, :1].contiguous()), "topk_weights must have topk_ids' shape"),
        ("combine", lambda a: a.__setitem__(6, a[6].double()), "moe_gemv_combine: topk_weights must have dtype"),
        ("combine", lambda a: a.__setitem__(2, a[2].float()), "moe_gemv_combine: topk_ids must have dtype"),
    ],
)
def test_gemv_bad_input(device, op, mutate, match):
    require_kernel("moe_gemv_silu", device)
    args = gemv_args(device)
    mutate(args)
    a, w13, ids, emap, h, w2, weights = args
    with pytest.raises(ERRORS, match=match):
        if op == "silu":
            moe_ext.moe_gemv_silu(a, w13, ids, emap)
        else:
            moe_ext.moe_gemv_combine(h, w2, ids, weights, emap)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
def test_mixed_devices():
    require_kernel("topk_gating", "cuda")
    require_kernel("moe_align_block_size", "cuda")
    with pytest.raises(ERRORS, match="correction_bias is on cpu"):
        moe_ext.topk_gating(logits(device="cuda"), 2, correction_bias=torch.zeros(16))
    with pytest.raises(ERRORS, match="expert_map is on cpu"):
        moe_ext.moe_align_block_size(torch.zeros(4, 2, dtype=torch.int32, device="cuda"), 8, 16,
                                     torch.zeros(8, dtype=torch.int32))
    with pytest.raises(ERRORS, match="topk_weights is on cpu"):
        moe_ext.moe_combine(torch.randn(4, 2, 8, device="cuda"), torch.rand(4, 2))
    if moe_ext.has_kernel("moe_grouped_gemm", "cuda"):
        args = gemm_args("cuda")
        args[1] = args[1].cpu()
        with pytest.raises(ERRORS, match="w is on cpu"):
            moe_ext.moe_grouped_gemm(*args)
    if moe_ext.has_kernel("moe_grouped_gemm_silu", "cuda"):
        args = gemm_args("cuda")
        args[1] = args[1].cpu()
        with pytest.raises(ERRORS, match="w13 is on cpu"):
            moe_ext.moe_grouped_gemm_silu(*args)
    if moe_ext.has_kernel("moe_gemv_silu", "cuda"):
        a, w13, ids, emap, h, w2, weights = gemv_args("cuda")
        with pytest.raises(ERRORS, match="moe_gemv_silu: expert_map is on cpu"):
            moe_ext.moe_gemv_silu(a, w13, ids, emap.cpu())
        with pytest.raises(ERRORS, match="moe_gemv_combine: topk_weights is on cpu"):
            moe_ext.moe_gemv_combine(h, w2, ids, weights.cpu(), emap)


def test_fused_moe_bad_input():
    x, w13, w2, lg = torch.randn(4, 16), torch.randn(8, 32, 16), torch.randn(8, 16, 16), torch.randn(4, 8)
    with pytest.raises(ValueError, match="hidden_states must be"):
        moe_ext.fused_moe(x[0], w13, w2, lg, 2)
    with pytest.raises(ValueError, match="router_logits must be"):
        moe_ext.fused_moe(x, w13, w2, lg[:3], 2)
    with pytest.raises(ValueError, match="w13 has 8 experts but router_logits has 6"):
        moe_ext.fused_moe(x, w13, w2, torch.randn(4, 6), 2)
    with pytest.raises(ValueError, match="shapes disagree"):
        moe_ext.fused_moe(x, w13, torch.randn(8, 16, 8), lg, 2)
    with pytest.raises(ERRORS, match="topk must be in"):
        moe_ext.fused_moe(x, w13, w2, lg, 9)
    for decode_gemv in (False, True):  # both expert paths refuse a map of the wrong length
        with pytest.raises(ValueError, match=r"expert_map must be \[E\] = \[8\]"):
            moe_ext.fused_moe(x, w13, w2, lg, 2, expert_map=torch.arange(7, dtype=torch.int32), decode_gemv=decode_gemv)


# ------------------------------------------------------------------------------------------------
# opcheck: schema, fake kernel, dynamic shapes under AOT dispatch


def opcheck_cases(device):
    g = torch.Generator().manual_seed(0)
    lg = torch.randn(5, 64, generator=g).to(device)
    bias = torch.randn(64, generator=g).to(device)
    emap = torch.where(torch.arange(64) % 2 == 0, torch.arange(64) // 2, -1).to(torch.int32).to(device)
    ids = torch.randint(0, 64, (5, 4), generator=g, dtype=torch.int32).to(device)
    a, w, sorted_ids, expert_ids, ntpp, topk = gemm_args(device)
    return [
        ("topk_gating", (lg, 4, "softmax", True, None, 1, 1, 1.0)),
        ("topk_gating", (lg.bfloat16(), 4, "sigmoid", True, bias, 8, 2, 2.5)),
        ("moe_align_block_size", (ids, 64, 16, None)),
        ("moe_align_block_size", (ids, 64, 8, emap)),
        ("fused_topk_align", (lg, 4, 16, "sigmoid", True, bias, 8, 2, 2.5, emap)),
        ("silu_and_mul", (torch.randn(3, 2, 64, generator=g).to(device),)),
        ("moe_grouped_gemm", (a, w, sorted_ids, expert_ids, ntpp, topk, None)),
        ("moe_grouped_gemm", (a, w, sorted_ids, expert_ids, ntpp, topk, torch.rand(4, 2, device=device))),
        ("moe_grouped_gemm_silu", (a, w, sorted_ids, expert_ids, ntpp, topk)),
        ("moe_grouped_gemm_silu", (a.bfloat16(), w.bfloat16(), sorted_ids, expert_ids, ntpp, topk)),
        # Every id valid, so every row is named and zero_unwritten=False still gives a defined output.
        ("moe_grouped_gemm", (a, w, sorted_ids, expert_ids, ntpp, topk, torch.rand(4, 2, device=device), False)),
        ("moe_grouped_gemm_silu", (a.bfloat16(), w.bfloat16(), sorted_ids, expert_ids, ntpp, topk, False)),
        ("moe_combine", (torch.randn(4, 2, 24, generator=g).to(device), None)),
        ("moe_combine", (torch.randn(4, 2, 24, generator=g).to(device), torch.rand(4, 2, generator=g).to(device))),
        ("moe_gemv_silu", tuple(gemv_args(device)[:3]) + (None,)),
        ("moe_gemv_silu", tuple(x.bfloat16() if x.is_floating_point() else x for x in gemv_args(device)[:4])),
        ("moe_gemv_combine", tuple(gemv_args(device)[i] for i in (4, 5, 2, 6, 3))),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(17))
def test_opcheck(device, case):
    name, args = opcheck_cases(device)[case]
    require_kernel(name, device)
    torch.library.opcheck(getattr(torch.ops.moe_ext, name).default, args)


def test_num_tile_configs():
    """The launchers' table sizes that the MOE_EXT_*_CONFIG overrides index; a bad op name is refused."""
    require_kernel("moe_gemv_silu", "cuda")  # the tables exist in CUDA builds only
    for op in ("moe_grouped_gemm", "moe_grouped_gemm_silu", "moe_gemv_silu", "moe_gemv_combine"):
        assert moe_ext.ops.num_tile_configs(op) >= 1, op
    with pytest.raises(ValueError, match='num_tile_configs: op must be .* got "silu_and_mul"'):
        moe_ext.ops.num_tile_configs("silu_and_mul")


def _tile_config(op, T, topk, E, N, K, block_size, cc=90, sms=132):
    """The launcher's pick for a model GEMM: rows = T * topk, blocks as the alignment sizes them."""
    rows = T * topk
    blocks = moe_ext.ops.align_max_padded(rows, E, block_size) // block_size
    return moe_ext.ops.grouped_gemm_tile_config(op, rows, N, K, E, blocks, block_size, cc, sms)


def test_grouped_gemm_tile_config():
    """The grouped-GEMM heuristics' picks, host arithmetic only (no GPU). Both ops' picks come from their tuned tables
    by bucket (tests/test_tile_table.py checks the buckets); here what holds whatever the tables: no tensor-core table
    before sm_80, the unaligned instance for K % 8 != 0, mma.sync configs off Hopper and in the mma buckets."""
    require_kernel("moe_gemv_silu", "cuda")  # the tables exist in CUDA builds only
    g, s = "moe_grouped_gemm", "moe_grouped_gemm_silu"
    for op in (g, s):
        assert _tile_config(op, 4, 2, 8, 4096, 14336, 16, cc=75, sms=40) == -1  # no tensor-core table before sm_80
    assert _tile_config(g, 3, 2, 8, 77, 111, 16) == 1  # K % 8 != 0: the unaligned instance
    assert _tile_config(s, 3, 2, 8, 77, 111, 16) == 0
    first_wgmma = {g: FIRST_WGMMA_CONFIG, s: FIRST_WGMMA_SILU_CONFIG}  # the launchers' mma.sync configs come first
    for op in (g, s):
        assert 0 <= _tile_config(op, 1024, 8, 128, 768, 2048, 128, cc=80, sms=108) < first_wgmma[op]
    if _tile_config(s, 4096, 8, 256, 2048, 7168, 192) < first_wgmma[s]:
        pytest.skip("a build without sm_90a code: no Hopper tiles")
    # Hopper (cc 9.0, 132 multiprocessors): 16-row SiLU blocks take an mma bucket (no 16-row wgmma SiLU tile).
    assert 0 <= _tile_config(s, 16, 8, 128, 768, 2048, 16) < first_wgmma[s]
    assert _tile_config(g, 4, 2, 8, 4096, 14336, 16) in range(moe_ext.ops.num_tile_configs(g))
    with pytest.raises(ValueError, match='op must be moe_grouped_gemm or moe_grouped_gemm_silu, got "moe_combine"'):
        moe_ext.ops.grouped_gemm_tile_config("moe_combine", 8, 64, 64, 2, 1, 16, 90, 132)
    with pytest.raises(ValueError, match="block_size, compute_capability and num_sms must be positive"):
        moe_ext.ops.grouped_gemm_tile_config(g, 8, 64, 64, 2, 1, 0, 90, 132)
