"""The CUDA grouped expert GEMM (csrc/kernels/grouped_gemm.cuh) against the fp32 reference.

Shapes exercise the tile edges (K and N not multiples of the tile, K % 8 != 0 for the unaligned
load path), every block size, empty experts, one expert with many blocks, experts of -1 (expert
parallelism and blocks marked -1), dropped ids, T = 0; both ways of zeroing unwritten rows; every
config of the launcher's table (forced through MOE_EXT_GROUPED_GEMM_CONFIG); CUDA-graph replay.
The SiLU-and-mul variant (moe_grouped_gemm_silu) gets the same shapes (N read as I), its own config
table (MOE_EXT_GROUPED_GEMM_SILU_CONFIG) and conftest.check_silu_gemm's tolerance.
Low-precision tolerance: relative L2 error <= 1e-2 against the fp32 reference and at most twice
the error of PyTorch's own eager product in that dtype on the same inputs.
"""

from __future__ import annotations

import re

import pytest
import torch

import moe_ext
from moe_ext import reference as ref

from conftest import (FIRST_WGMMA_CONFIG, FIRST_WGMMA_SILU_CONFIG, HAS_CUDA, capture_graph, check_silu_gemm,
                      covered_rows, nbytes, poison_allocator, rel_l2, require_kernel, routed_pairs)

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")

CONFIG_ENV = "MOE_EXT_GROUPED_GEMM_CONFIG"
SILU_CONFIG_ENV = "MOE_EXT_GROUPED_GEMM_SILU_CONFIG"
ZERO_ENV = "MOE_EXT_GROUPED_GEMM_ZERO"

SHAPES = [
    # T, topk, E, N, K
    (0, 2, 4, 32, 64),       # no tokens
    (1, 1, 1, 16, 16),
    (3, 2, 8, 77, 111),      # K % 8 != 0: unaligned loads; N not a multiple of 8
    (17, 4, 8, 130, 200),    # N, K past the tile, K % 8 == 0
    (16, 8, 64, 96, 128),    # most experts empty
    (64, 6, 16, 256, 264),   # K one 8-chunk past a 64 tile
    (40, 2, 4, 520, 72),     # several N-tiles, a partial last one
]


def make_ids(T, topk, E, g, mode):
    """topk_ids [T, topk] int32. modes: random (distinct per token), one_expert (every slot on expert
    E - 1, i.e. T * topk rows of one expert when topk == 1 -- otherwise repeats are allowed here:
    the GEMM does not care), dropped (a third of the slots -1: ids the alignment drops)."""
    if T == 0:
        return torch.empty(0, topk, dtype=torch.int32)
    if mode == "random":
        ids = torch.stack([torch.randperm(E, generator=g)[:topk] for _ in range(T)])
    elif mode == "one_expert":
        ids = torch.full((T, topk), E - 1)
    elif mode == "dropped":
        ids = torch.randint(0, E, (T, topk), generator=g)
        ids[torch.rand(T, topk, generator=g) < 0.33] = -1
    return ids.to(torch.int32)


def grouped_gemm_eager_lowp(a, w, sorted_ids, expert_ids, ntpp, topk, tw):
    """PyTorch's own product in a's dtype (per expert a @ w[e].T, cuBLAS on CUDA), the weight applied
    in fp32 to the rounded product: the error bar for the kernel."""
    rows, N = a.shape[0] * topk, w.shape[1]
    out = torch.zeros(rows, N, dtype=torch.float32, device=a.device)
    ids, experts = routed_pairs(sorted_ids, expert_ids, ntpp, rows, w.shape[0])
    for e in torch.unique(experts).tolist():
        sel = ids[experts == e]
        y = (a[sel // topk] @ w[e].t()).float()
        if tw is not None:
            y = y * tw.flatten()[sel].unsqueeze(1)
        out[sel] = y.to(a.dtype).float()
    return out


def run_and_check(a, w, sorted_ids, expert_ids, ntpp, topk, tw, dtype=None):
    """Runs the CUDA op on CPU-built inputs and checks it against the fp32 reference (and the eager
    low-precision product); returns the output on the CPU."""
    dtype = dtype or a.dtype
    rows, N = a.shape[0] * topk, w.shape[1]
    want = ref.moe_grouped_gemm_ref(a, w, sorted_ids, expert_ids, ntpp, topk, tw)
    dev = [t.cuda() for t in (a, w, sorted_ids, expert_ids, ntpp)]
    tw_dev = None if tw is None else tw.cuda()
    poison_allocator("cuda", [nbytes((rows, N), dtype)])
    out = moe_ext.moe_grouped_gemm(*dev, topk, tw_dev)
    assert out.shape == (rows, N) and out.dtype == dtype and out.device.type == "cuda"
    out = out.cpu()
    cov = covered_rows(sorted_ids, expert_ids, ntpp, rows, w.shape[0])
    assert (out[~cov] == 0).all(), f"{int((out[~cov] != 0).any(dim=1).sum())} uncovered rows not zero"
    assert torch.isfinite(out.float()).all(), "non-finite output (unwritten poisoned rows?)"
    if rows == 0 or N == 0:
        return out
    if dtype == torch.float32:
        err = rel_l2(out, want)
        assert err < 1e-5, err
    else:
        err = rel_l2(out, want)
        err_lowp = rel_l2(grouped_gemm_eager_lowp(*dev, topk, tw_dev).cpu(), want)
        assert err <= 1e-2 and err <= 2 * err_lowp + 1e-6, (err, err_lowp)
    return out


def make_case(T, topk, E, N, K, block_size, dtype, mode, weighted, seed=0, expert_map=None, E_local=None):
    g = torch.Generator().manual_seed(seed + T * 7 + N + K + block_size)
    ids = make_ids(T, topk, E, g, mode)
    sorted_ids, expert_ids, ntpp = ref.moe_align_block_size_ref(ids, E, block_size, expert_map)
    E_w = E if E_local is None else E_local
    a = torch.randn(T, K, generator=g).to(dtype)
    w = (torch.randn(E_w, N, K, generator=g) / K**0.5).to(dtype)
    tw = torch.rand(T, topk, generator=g) if weighted else None
    return a, w, sorted_ids, expert_ids, ntpp, topk, tw


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.delenv(SILU_CONFIG_ENV, raising=False)
    monkeypatch.delenv(ZERO_ENV, raising=False)
    require_kernel("moe_grouped_gemm", "cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T,topk,E,N,K", SHAPES)
@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
@pytest.mark.parametrize("mode", ["random", "one_expert", "dropped"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("zero", ["memset", "flags"])
def test_shapes(monkeypatch, dtype, T, topk, E, N, K, block_size, mode, weighted, zero):
    if mode == "random" and topk > E:
        pytest.skip("topk > E")
    monkeypatch.setenv(ZERO_ENV, zero)
    run_and_check(*make_case(T, topk, E, N, K, block_size, dtype, mode, weighted))


@pytest.mark.parametrize("block_size", [1, 4, 8, 24, 48, 96, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("zero", ["memset", "flags"])
def test_other_block_sizes(monkeypatch, block_size, dtype, zero):
    """Block sizes off the 16/32/64/128 grid: tiles larger than a block (rows masked) or several
    tiles a block."""
    monkeypatch.setenv(ZERO_ENV, zero)
    run_and_check(*make_case(37, 4, 8, 144, 160, block_size, dtype, "dropped", True))


@pytest.mark.parametrize("block_size", [16, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_one_expert_many_blocks(dtype, block_size):
    """2000 rows on one expert: many consecutive blocks of one expert, a partial last block."""
    run_and_check(*make_case(1000, 2, 8, 256, 512, block_size, dtype, "one_expert", True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weighted", [False, True])
def test_large(dtype, weighted):
    """A prefill-sized layer (auto zero mode: the flags path at this size)."""
    run_and_check(*make_case(512, 8, 64, 1536, 2048, 64, dtype, "random", weighted))


@pytest.mark.parametrize("T", [1, 4])
def test_decode_shapes(T):
    """Decode: few tokens, N large (the heuristic's few-CTA configs)."""
    run_and_check(*make_case(T, 8, 64, 4096, 512, 16, torch.bfloat16, "random", True))
    run_and_check(*make_case(T, 2, 8, 1024, 1024, 16, torch.bfloat16, "random", True))


@pytest.mark.parametrize("zero", ["memset", "flags"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_expert_map_and_minus_one_blocks(monkeypatch, zero, dtype):
    """Experts off this rank (expert_map -1: absent from the blocks), a block marked -1, ids past
    num_tokens_post_padded: all those rows zero, all others as the reference."""
    monkeypatch.setenv(ZERO_ENV, zero)
    E, E_local = 16, 8
    expert_map = torch.full((E,), -1, dtype=torch.int32)
    expert_map[E // 2:] = torch.arange(E_local, dtype=torch.int32)
    a, w, sorted_ids, expert_ids, ntpp, topk, tw = make_case(300, 4, E, 136, 192, 16, dtype, "random", True,
                                                             expert_map=expert_map, E_local=E_local)
    out = run_and_check(a, w, sorted_ids, expert_ids, ntpp, topk, tw)
    ids = sorted_ids[sorted_ids < a.shape[0] * topk].long()
    off_rank = torch.ones(a.shape[0] * topk, dtype=torch.bool)
    off_rank[ids] = False
    assert off_rank.any() and (out[off_rank] == 0).all()
    expert_ids2 = expert_ids.clone()
    expert_ids2[0] = -1
    expert_ids2[3] = E_local  # out of range: treated as -1
    run_and_check(a, w, sorted_ids, expert_ids2, ntpp, topk, tw)
    # A smaller num_tokens_post_padded: the blocks past it do not run.
    run_and_check(a, w, sorted_ids, expert_ids, ntpp - 3 * 16, topk, tw)


def test_bad_sorted_ids():
    """Sentinels, negative and out-of-range ids in sorted_token_ids are skipped, never read."""
    a, w, sorted_ids, expert_ids, ntpp, topk, tw = make_case(20, 2, 4, 64, 64, 16, torch.bfloat16, "random", True)
    sorted_ids = sorted_ids.clone()
    sorted_ids[1] = -5
    sorted_ids[2] = 1 << 30
    run_and_check(a, w, sorted_ids, expert_ids, ntpp, topk, tw)


def num_configs(env: str = CONFIG_ENV, op=moe_ext.moe_grouped_gemm) -> int:
    """Size of op's config table (moe_ext.ops.num_tile_configs), checking that the override env
    refuses the first index past it with a message naming env and the table's range."""
    import os
    n = moe_ext.ops.num_tile_configs(op.__name__)
    a, w, s, e, ntpp, topk, _ = make_case(2, 1, 2, 16, 16, 16, torch.bfloat16, "random", False)
    os.environ[env] = str(n)
    try:
        with pytest.raises(ValueError, match=re.escape(f"{env} must be an integer in [-1, {n})")):
            op(*(t.cuda() for t in (a, w, s, e, ntpp)), topk)
    finally:
        del os.environ[env]
    return n


def check_config_families(outs: dict[int, torch.Tensor], first_wgmma: int, name: str):
    """outs: config index (-1: the heuristic) -> output. Within each family (mma.sync, wgmma) every
    config's output is bit-identical (each output's k-order of mma steps is the same); the
    heuristic's equals one of them."""
    for family in ([c for c in outs if 0 <= c < first_wgmma], [c for c in outs if c >= first_wgmma]):
        for c in family[1:]:
            assert torch.equal(outs[c], outs[family[0]]), f"{name} config {c} differs from config {family[0]}"
    assert any(torch.equal(outs[-1], o) for c, o in outs.items() if c >= 0), f"{name}: the heuristic matches no config"


# The last three run many k-tiles (more than any config's stages: the copy ring wraps) with N tails;
# the last has about 300 rows an expert at block size 128 (several full blocks of one expert, then a
# partial one).
@pytest.mark.parametrize("shape,block_size", [((17, 4, 8, 130, 200), 16), ((64, 8, 16, 384, 256), 64),
                                              ((100, 2, 4, 200, 136), 128), ((256, 4, 8, 392, 1032), 128),
                                              ((200, 2, 4, 300, 776), 64), ((600, 2, 4, 264, 520), 128),
                                              ((600, 2, 4, 264, 520), 192), ((300, 8, 16, 392, 1032), 192)])
def test_every_config_agrees(monkeypatch, shape, block_size):
    """Each config of the table gives the reference's answer; configs of one family agree bit for bit."""
    n = num_configs()
    assert n > FIRST_WGMMA_CONFIG
    case = make_case(*shape, block_size, torch.bfloat16, "random", True)
    outs = {}
    for cfg in range(-1, n):
        monkeypatch.setenv(CONFIG_ENV, str(cfg))
        outs[cfg] = run_and_check(*case)
    check_config_families(outs, FIRST_WGMMA_CONFIG, "grouped GEMM")


# Decode and prefill block sizes, few experts and many, so the pick ranges over the mma.sync and wgmma tiles.
@pytest.mark.parametrize("shape,block_size", [((4, 2, 8, 4096, 1024), 16), ((40, 8, 64, 1024, 512), 16),
                                              ((6, 2, 8, 512, 2048), 64), ((64, 8, 16, 384, 256), 128),
                                              ((600, 2, 4, 264, 520), 192)])
@pytest.mark.parametrize("silu", [False, True])
def test_tile_config_query_matches_launch(monkeypatch, shape, block_size, silu):
    """moe_ext.ops.grouped_gemm_tile_config names a config the launcher's heuristic runs: forcing that
    index gives the default call's bits. Configs of one family agree bit for bit, so this pins the family
    (mma.sync or wgmma); test_errors_opcheck pins the indices on the host."""
    T, topk, E, N, K = shape
    op, env = ((moe_ext.moe_grouped_gemm_silu, SILU_CONFIG_ENV) if silu else (moe_ext.moe_grouped_gemm, CONFIG_ENV))
    a, w, s, e, ntpp, _, tw = make_case(T, topk, E, 2 * N if silu else N, K, block_size, torch.bfloat16, "random",
                                        not silu)
    cfg = moe_ext.ops.grouped_gemm_tile_config(op.__name__, T * topk, N, K, E, e.numel(), block_size)
    assert 0 <= cfg < moe_ext.ops.num_tile_configs(op.__name__)
    args = [t.cuda() for t in (a, w, s, e, ntpp)] + [topk] + ([] if silu else [tw.cuda()])
    default = op(*args)
    monkeypatch.setenv(env, str(cfg))
    assert torch.equal(op(*args), default), f"{op.__name__}: the launch did not run config {cfg}"


@pytest.mark.parametrize("cfg", range(FIRST_WGMMA_CONFIG, 19))
@pytest.mark.parametrize("block_size", [128, 192])
def test_wgmma_configs_skip_blocks(monkeypatch, cfg, block_size):
    """The prefill tiles (cp.async and TMA weight loads) with blocks of expert -1 or out of range,
    one expert's blocks split by such a block, and num_tokens_post_padded cut short: skipped rows are
    zero, all others as the reference."""
    assert cfg < moe_ext.ops.num_tile_configs("moe_grouped_gemm")
    monkeypatch.setenv(CONFIG_ENV, str(cfg))
    a, w, s, e, ntpp, topk, tw = make_case(700, 2, 4, 264, 200, block_size, torch.bfloat16, "one_expert", True)
    run_and_check(a, w, s, e, ntpp, topk, tw)
    e2 = e.clone()
    e2[1], e2[4] = -1, 4  # 4 = E: out of range, skipped like -1
    run_and_check(a, w, s, e2, ntpp, topk, tw)
    run_and_check(a, w, s, e, ntpp - 3 * block_size, topk, tw)


def test_bad_env(monkeypatch):
    a, w, s, e, n, topk, _ = make_case(2, 1, 2, 16, 16, 16, torch.bfloat16, "random", False)
    args = [t.cuda() for t in (a, w, s, e, n)]
    monkeypatch.setenv(CONFIG_ENV, "x")
    with pytest.raises(ValueError, match=CONFIG_ENV):
        moe_ext.moe_grouped_gemm(*args, topk)
    monkeypatch.delenv(CONFIG_ENV)
    monkeypatch.setenv(ZERO_ENV, "nope")
    with pytest.raises(ValueError, match=ZERO_ENV):
        moe_ext.moe_grouped_gemm(*args, topk)


def test_unaligned_base():
    """a and w at odd element offsets (contiguous views): the guarded-load path, still correct."""
    a, w, s, e, n, topk, tw = make_case(33, 2, 4, 96, 128, 16, torch.bfloat16, "random", True)
    a_buf = torch.empty(a.numel() + 1, dtype=a.dtype)
    a_buf[1:] = a.flatten()
    w_buf = torch.empty(w.numel() + 1, dtype=w.dtype)
    w_buf[1:] = w.flatten()
    a_off = a_buf.cuda()[1:].view(a.shape)
    w_off = w_buf.cuda()[1:].view(w.shape)
    want = ref.moe_grouped_gemm_ref(a, w, s, e, n, topk, tw)
    out = moe_ext.moe_grouped_gemm(a_off, w_off, s.cuda(), e.cuda(), n.cuda(), topk, tw.cuda())
    assert rel_l2(out.cpu(), want) < 1e-2


@pytest.mark.parametrize("zero", ["memset", "flags"])
@pytest.mark.parametrize("cfg,T,bs", [(-1, 24, 16), (15, 300, 128)])
def test_cuda_graph_replay(monkeypatch, zero, cfg, T, bs):
    """Captured once, replayed on new routing of the same shapes: num_tokens_post_padded is read on
    the device only, so the replay follows the new routing (config 15: the TMA config's tensor map,
    a kernel parameter, is captured too)."""
    monkeypatch.setenv(ZERO_ENV, zero)
    monkeypatch.setenv(CONFIG_ENV, str(cfg))
    topk, E, N, K = 4, 8, 200, 136
    cases = [make_case(T, topk, E, N, K, bs, torch.bfloat16, mode, True, seed=s)
             for s, mode in enumerate(["random", "dropped", "one_expert"])]
    static = [t.cuda().clone() for t in (cases[0][:5] + (cases[0][6],))]
    graph, out = capture_graph(lambda: moe_ext.moe_grouped_gemm(*static[:5], topk, static[5]))
    for case in cases[1:] + cases[:1]:
        a, w, s, e, n, _, tw = case
        if s.numel() != static[2].numel():  # the padded length depends only on T * topk, E, bs
            pytest.fail("padded lengths differ")
        for dst, src in zip(static, (a, w, s, e, n, tw)):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        eager = moe_ext.moe_grouped_gemm(*(t.cuda() for t in (a, w, s, e, n)), topk, tw.cuda())
        assert torch.equal(out.cpu(), eager.cpu())
        want = ref.moe_grouped_gemm_ref(a, w, s, e, n, topk, tw)
        assert rel_l2(out.cpu(), want) < 1e-2


@pytest.mark.parametrize("zero", ["memset", "flags"])
def test_degenerate_shapes(monkeypatch, zero):
    """K = 0 (every product is 0), no local experts (w [0, N, K]: every row zero), N = 0."""
    monkeypatch.setenv(ZERO_ENV, zero)
    a, w, s, e, n, topk, tw = make_case(9, 2, 4, 24, 0, 16, torch.bfloat16, "random", True)
    out = run_and_check(a, w, s, e, n, topk, tw)
    assert (out == 0).all()
    a, w, s, e, n, topk, tw = make_case(9, 2, 4, 24, 32, 16, torch.bfloat16, "random", True)
    out = run_and_check(a, w[:0].contiguous(), s, e, n, topk, tw)
    assert (out == 0).all()
    out = moe_ext.moe_grouped_gemm(a.cuda(), w[:, :0].contiguous().cuda(), s.cuda(), e.cuda(), n.cuda(), topk)
    assert out.shape == (9 * topk, 0)


# ------------------------------------------------------------------------------------------------
# moe_grouped_gemm_silu


def make_silu_case(T, topk, E, I, K, block_size, dtype, mode, seed=0):
    """(a, w13 [E, 2I, K], sorted_ids, expert_ids, ntpp, topk) on the CPU."""
    a, w13, s, e, n, topk, _ = make_case(T, topk, E, 2 * I, K, block_size, dtype, mode, False, seed=seed)
    return a, w13, s, e, n, topk


def run_silu_and_check(a, w13, s, e, n, topk):
    """Runs the CUDA op on CPU-built inputs into a poisoned allocation, checks it; returns it on the CPU."""
    poison_allocator("cuda", [nbytes((a.shape[0] * topk, w13.shape[1] // 2), a.dtype)])
    dev = [t.cuda() for t in (a, w13, s, e, n)]
    out = moe_ext.moe_grouped_gemm_silu(*dev, topk)
    assert out.device.type == "cuda"
    check_silu_gemm(out, *dev, topk)
    return out.cpu()


@pytest.fixture
def _silu_kernel():
    require_kernel("moe_grouped_gemm_silu", "cuda")


@pytest.mark.usefixtures("_silu_kernel")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T,topk,E,I,K", SHAPES)
@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
@pytest.mark.parametrize("mode", ["random", "one_expert", "dropped"])
@pytest.mark.parametrize("zero", ["memset", "flags"])
def test_silu_shapes(monkeypatch, dtype, T, topk, E, I, K, block_size, mode, zero):
    if mode == "random" and topk > E:
        pytest.skip("topk > E")
    monkeypatch.setenv(ZERO_ENV, zero)
    run_silu_and_check(*make_silu_case(T, topk, E, I, K, block_size, dtype, mode))


@pytest.mark.usefixtures("_silu_kernel")
@pytest.mark.parametrize("block_size", [1, 24, 96, 192, 256])
def test_silu_other_block_sizes(block_size):
    run_silu_and_check(*make_silu_case(37, 4, 8, 144, 160, block_size, torch.bfloat16, "dropped"))


@pytest.mark.usefixtures("_silu_kernel")
@pytest.mark.parametrize("T,bs", [(1, 16), (4, 16), (256, 64), (512, 128)])
def test_silu_model_shapes(T, bs):
    """Qwen3-30B-A3B's first GEMM (E 128, k 8, I 768, H 2048) at decode and prefill block sizes."""
    run_silu_and_check(*make_silu_case(T, 8, 128, 768, 2048, bs, torch.bfloat16, "random"))


@pytest.mark.usefixtures("_silu_kernel")
@pytest.mark.parametrize("shape,block_size", [((17, 4, 8, 130, 200), 16), ((64, 8, 16, 200, 256), 64),
                                              ((100, 2, 4, 77, 136), 128), ((256, 4, 8, 200, 1032), 128),
                                              ((600, 2, 4, 136, 520), 128), ((600, 2, 4, 136, 520), 192),
                                              ((300, 8, 16, 200, 1032), 192)])
def test_silu_every_config_agrees(monkeypatch, shape, block_size):
    """Each SiLU config gives the reference's answer; configs of one family agree bit for bit."""
    n = num_configs(SILU_CONFIG_ENV, moe_ext.moe_grouped_gemm_silu)
    assert n > FIRST_WGMMA_SILU_CONFIG
    case = make_silu_case(*shape, block_size, torch.bfloat16, "random")
    outs = {}
    for cfg in range(-1, n):
        monkeypatch.setenv(SILU_CONFIG_ENV, str(cfg))
        outs[cfg] = run_silu_and_check(*case)
    check_config_families(outs, FIRST_WGMMA_SILU_CONFIG, "SiLU")


@pytest.mark.usefixtures("_silu_kernel")
def test_silu_unaligned_base():
    """a and w13 at odd element offsets: the guarded-load instance."""
    a, w13, s, e, n, topk = make_silu_case(33, 2, 4, 96, 128, 16, torch.bfloat16, "random")
    bufs = [torch.empty(t.numel() + 1, dtype=t.dtype) for t in (a, w13)]
    for b, t in zip(bufs, (a, w13)):
        b[1:] = t.flatten()
    a_off, w_off = (b.cuda()[1:].view(t.shape) for b, t in zip(bufs, (a, w13)))
    out = moe_ext.moe_grouped_gemm_silu(a_off, w_off, s.cuda(), e.cuda(), n.cuda(), topk)
    check_silu_gemm(out, a, w13, s, e, n, topk)


@pytest.mark.usefixtures("_silu_kernel")
@pytest.mark.parametrize("zero", ["memset", "flags"])
def test_silu_cuda_graph_replay(monkeypatch, zero):
    """Captured once, replayed on new routing of the same shapes: follows the new routing."""
    monkeypatch.setenv(ZERO_ENV, zero)
    cases = [make_silu_case(24, 4, 8, 100, 136, 16, torch.bfloat16, mode, seed=s)
             for s, mode in enumerate(["random", "dropped", "one_expert"])]
    static = [t.cuda().clone() for t in cases[0][:5]]
    topk = cases[0][5]
    graph, out = capture_graph(lambda: moe_ext.moe_grouped_gemm_silu(*static, topk))
    for case in cases[1:] + cases[:1]:
        for dst, src in zip(static, case[:5]):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        eager = moe_ext.moe_grouped_gemm_silu(*(t.cuda() for t in case[:5]), topk)
        assert torch.equal(out.cpu(), eager.cpu())
        check_silu_gemm(out, *case)


@pytest.mark.usefixtures("_silu_kernel")
def test_silu_degenerate_shapes():
    """K = 0 (every output 0), no local experts, I = 0."""
    a, w13, s, e, n, topk = make_silu_case(9, 2, 4, 24, 0, 16, torch.bfloat16, "random")
    assert (run_silu_and_check(a, w13, s, e, n, topk) == 0).all()
    a, w13, s, e, n, topk = make_silu_case(9, 2, 4, 24, 32, 16, torch.bfloat16, "random")
    assert (run_silu_and_check(a, w13[:0].contiguous(), s, e, n, topk) == 0).all()
    out = moe_ext.moe_grouped_gemm_silu(a.cuda(), w13[:, :0].contiguous().cuda(), s.cuda(), e.cuda(), n.cuda(), topk)
    assert out.shape == (9 * topk, 0)
