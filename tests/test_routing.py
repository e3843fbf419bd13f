"""Router top-k gating, block alignment and the fused pair, against the fp32 references."""

from __future__ import annotations

import math

import pytest
import torch

import moe_ext
from moe_ext import reference as ref

from conftest import (DEVICES, assert_align_matches, assert_gating_matches, capture_graph, nbytes,
                      poison_allocator, random_logits, require_kernel)

TOKENS = [0, 1, 3, 16, 17, 1000]
EXPERTS = [1, 3, 8, 64, 128, 257, 512, 1024]
TOPKS = [1, 2, 8, 32]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def topks_for(E):
    return [k for k in TOPKS if k <= E]


def gating_call(logits, topk, **routing):
    poison_allocator(logits.device.type, [nbytes((logits.shape[0], topk), torch.float32)] * 2)
    return moe_ext.topk_gating(logits, topk, **routing)


# ------------------------------------------------------------------------------------------------
# topk_gating


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E", EXPERTS)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("scoring_func", ["softmax", "sigmoid"])
def test_topk_gating_shapes(device, dtype, E, T, scoring_func):
    require_kernel("topk_gating", device)
    g = torch.Generator().manual_seed(1000 * E + T)
    logits = random_logits(T, E, dtype, device, g)
    for topk in topks_for(E):
        for renormalize in (False, True):
            routing = dict(scoring_func=scoring_func, renormalize=renormalize)
            w, ids = gating_call(logits, topk, **routing)
            assert w.device == logits.device and ids.device == logits.device
            assert_gating_matches(w, ids, logits, topk, **routing)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_gating_every_e_and_topk(device):
    """Every E from 1 to 1024 (each with a random topk) and every topk from 1 to 32 at E = 257."""
    require_kernel("topk_gating", device)
    g = torch.Generator().manual_seed(7)
    for E in range(1, 1025):
        topk = int(torch.randint(1, min(E, 32) + 1, (1,), generator=g))
        scoring = "softmax" if E % 2 else "sigmoid"
        logits = random_logits(3, E, torch.float32, device, g)
        w, ids = gating_call(logits, topk, scoring_func=scoring, renormalize=bool(E % 3))
        assert_gating_matches(w, ids, logits, topk, scoring_func=scoring, renormalize=bool(E % 3))
    for E in (32, 257):
        logits = random_logits(17, E, torch.bfloat16, device, g)
        for topk in range(1, 33):
            w, ids = gating_call(logits, topk, renormalize=True)
            assert_gating_matches(w, ids, logits, topk, renormalize=True)


DEEPSEEK = dict(scoring_func="sigmoid", renormalize=True, num_expert_group=8, topk_group=4,
                routed_scaling_factor=2.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize(
    "E,topk,G,TG,scoring",
    [(256, 8, 8, 4, "sigmoid"), (256, 8, 8, 4, "softmax"), (64, 6, 4, 2, "sigmoid"), (96, 8, 3, 2, "softmax"),
     (257, 4, 257, 5, "sigmoid"), (8, 2, 8, 8, "softmax"), (1024, 32, 16, 3, "sigmoid"), (30, 5, 5, 5, "sigmoid")],
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_topk_gating_grouped_and_bias(device, T, E, topk, G, TG, scoring, with_bias):
    require_kernel("topk_gating", device)
    g = torch.Generator().manual_seed(E * 31 + T)
    logits = random_logits(T, E, torch.bfloat16, device, g)
    bias = (torch.randn(E, generator=g) * 0.5).to(device) if with_bias else None
    routing = dict(scoring_func=scoring, renormalize=True, correction_bias=bias, num_expert_group=G,
                   topk_group=TG, routed_scaling_factor=2.5)
    w, ids = gating_call(logits, topk, **routing)
    assert_gating_matches(w, ids, logits, topk, **routing)
    # The chosen experts come from at most topk_group groups.
    if T:
        groups = (ids.cpu().long() // (E // G)).sort(dim=1).values
        distinct = 1 + (groups[:, 1:] != groups[:, :-1]).sum(dim=1)
        assert (distinct <= TG).all()


@pytest.mark.parametrize("device", DEVICES)
def test_topk_gating_bias_changes_choice_not_weights(device):
    require_kernel("topk_gating", device)
    E, topk = 64, 4
    logits = random_logits(5, E, torch.float32, device, torch.Generator().manual_seed(3))
    bias = torch.zeros(E, device=device)
    bias[E - 4:] = 10.0  # forces the last four experts
    w, ids = moe_ext.topk_gating(logits, topk, scoring_func="sigmoid", correction_bias=bias)
    ids = ids.cpu().long()
    assert (ids.sort(dim=1).values == torch.arange(E - 4, E)).all()
    torch.testing.assert_close(w.cpu(), torch.sigmoid(logits.cpu()).gather(1, ids), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_softmax_renormalize_equals_topk_then_softmax(device):
    """GPT-OSS/Mixtral route with softmax over the top-k logits: the same as softmax + renormalize."""
    require_kernel("topk_gating", device)
    logits = random_logits(64, 128, torch.float32, device, torch.Generator().manual_seed(5))
    w, ids = moe_ext.topk_gating(logits, 4, renormalize=True)
    top_vals, top_ids = logits.cpu().topk(4, dim=-1)
    assert torch.equal(ids.cpu().long(), top_ids)
    torch.testing.assert_close(w.cpu(), torch.softmax(top_vals, dim=-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("renormalize", [False, True])
def test_softmax_ranks_by_logit_under_the_flush(device, renormalize):
    """Softmax without bias or groups ranks by logit: behind one dominant logit every other expert's
    probability flushes to 0 (e^-86), yet the rest of the top-k still follows the logits (descending),
    not the expert index; their weights are exactly 0 and the leader's 1."""
    require_kernel("topk_gating", device)
    g = torch.Generator().manual_seed(11)
    T, E, topk = 8, 64, 8
    logits = torch.randn(T, E, generator=g)  # distinct, far below the leader
    leader = torch.randint(0, E, (T,), generator=g)
    logits[torch.arange(T), leader] = 500.0
    w, ids = moe_ext.topk_gating(logits.to(device), topk, renormalize=renormalize)
    want = logits.topk(topk, dim=-1).indices
    assert torch.equal(ids.cpu().long(), want)
    assert torch.equal(w.cpu()[:, 0], torch.ones(T)) and torch.equal(w.cpu()[:, 1:], torch.zeros(T, topk - 1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scoring_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_topk_gating_nan_inf(device, dtype, scoring_func, renormalize):
    """NaN counts as -inf, +inf as the largest float; ties go to the lower index; outputs stay valid."""
    require_kernel("topk_gating", device)
    E, topk = 16, 4
    nan, inf = float("nan"), float("inf")
    rows = torch.randn(8, E)
    rows[0] = nan                                   # all NaN
    rows[1] = -inf                                  # all -inf
    rows[2, 5] = inf                                # one +inf
    rows[3, [2, 9]] = inf                           # two +inf share the mass
    rows[4, ::2] = nan                              # NaNs never beat finite logits
    rows[5] = 0.0                                   # all tied
    rows[6, :] = -inf
    rows[6, 11] = nan
    rows[6, 13] = 1.0                               # one finite among -inf/NaN
    rows[7, ::3] = inf
    rows[7, 1::3] = nan
    logits = rows.to(device=device, dtype=dtype)
    routing = dict(scoring_func=scoring_func, renormalize=renormalize)
    w, ids = moe_ext.topk_gating(logits, topk, **routing)
    assert_gating_matches(w, ids, logits, topk, **routing)
    ids = ids.cpu()
    assert ids[0].tolist() == [0, 1, 2, 3] and ids[1].tolist() == [0, 1, 2, 3] and ids[5].tolist() == [0, 1, 2, 3]
    assert ids[2, 0] == 5 and ids[3, :2].tolist() == [2, 9] and ids[6, 0] == 13
    assert set(ids[4].tolist()) <= set(range(1, E, 2))
    if scoring_func == "softmax":
        w = w.cpu()
        assert w[2, 0] == 1.0 and (w[2, 1:] == 0).all()
        assert torch.allclose(w[1], torch.full((topk,), 1.0 / topk if renormalize else 1.0 / E))


@pytest.mark.parametrize("device", DEVICES)
def test_topk_gating_strided_rows(device):
    """Rows may be strided (e.g. a slice of a wider projection); the last dim must be contiguous."""
    require_kernel("topk_gating", device)
    wide = random_logits(9, 200, torch.float32, device, torch.Generator().manual_seed(9))
    logits = wide[:, 10:138]
    w, ids = moe_ext.topk_gating(logits, 8, renormalize=True)
    assert_gating_matches(w, ids, logits.contiguous(), 8, renormalize=True)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_gating_deterministic(device):
    require_kernel("topk_gating", device)
    logits = random_logits(1000, 256, torch.bfloat16, device, torch.Generator().manual_seed(11))
    a = moe_ext.topk_gating(logits, 8, **DEEPSEEK)
    b = moe_ext.topk_gating(logits, 8, **DEEPSEEK)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ------------------------------------------------------------------------------------------------
# moe_align_block_size


def random_ids(T, topk, E, g, invalid_frac=0.0):
    ids = torch.stack([torch.randperm(E, generator=g)[:topk] for _ in range(T)]) if T else torch.empty(0, topk)
    ids = ids.to(torch.int32).reshape(T, topk)
    if invalid_frac and T:
        bad = torch.rand(T, topk, generator=g) < invalid_frac
        junk = torch.tensor([-1, E, E + 7, -5, 2**31 - 1], dtype=torch.int32)
        ids[bad] = junk[torch.randint(0, len(junk), (int(bad.sum()),), generator=g)]
    return ids


ALIGN_CASES = [(T, E, k) for T in TOKENS for E in (1, 3, 8, 64, 257, 1024) for k in (1, 2, 8) if k <= E]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,E,topk", ALIGN_CASES)
@pytest.mark.parametrize("block_size", [1, 7, 16, 64])
def test_align(device, T, E, topk, block_size):
    require_kernel("moe_align_block_size", device)
    g = torch.Generator().manual_seed(T * 7 + E)
    ids = random_ids(T, topk, E, g).to(device)
    max_padded = ref.align_max_padded(T * topk, E, block_size)
    poison_allocator(device, [max_padded * 4, max_padded // block_size * 4, 4])
    out = moe_ext.moe_align_block_size(ids, E, block_size)
    assert_align_matches(out, ids, E, block_size)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [1, 16, 513, 1000, 4096, 9000])
@pytest.mark.parametrize("block_size", [16, 64])
def test_align_invalid_ids_and_expert_map(device, T, block_size):
    require_kernel("moe_align_block_size", device)
    E, topk = 64, 8
    g = torch.Generator().manual_seed(T)
    ids = random_ids(T, topk, E, g, invalid_frac=0.1).to(device)
    out = moe_ext.moe_align_block_size(ids, E, block_size)
    assert_align_matches(out, ids, E, block_size)
    # Expert parallelism: this rank holds every third expert, local ids 0, 1, 2, ...
    expert_map = torch.full((E,), -1, dtype=torch.int32)
    expert_map[::3] = torch.arange(len(range(0, E, 3)), dtype=torch.int32)
    expert_map = expert_map.to(device)
    out = moe_ext.moe_align_block_size(ids, E, block_size, expert_map)
    assert_align_matches(out, ids, E, block_size, expert_map)
    local_blocks = out[1].cpu()
    assert ((local_blocks == -1) | ((local_blocks >= 0) & (local_blocks < 22))).all()


@pytest.mark.parametrize("device", DEVICES)
def test_align_skewed(device):
    """All tokens on one expert, and every id invalid."""
    require_kernel("moe_align_block_size", device)
    E = 32
    ids = torch.full((300, 2), 5, dtype=torch.int32, device=device)
    ids[:, 1] = 17
    assert_align_matches(moe_ext.moe_align_block_size(ids, E, 16), ids, E, 16)
    ids = torch.full((40, 4), -1, dtype=torch.int32, device=device)
    out = moe_ext.moe_align_block_size(ids, E, 16)
    assert_align_matches(out, ids, E, 16)
    assert out[2].item() == 0 and (out[1] == -1).all()


def test_align_max_padded_formula():
    assert ref.align_max_padded(0, 8, 16) == 0
    assert ref.align_max_padded(1 * 8, 256, 16) == 8 + 8 * 15 == 128
    assert ref.align_max_padded(1000 * 8, 256, 16) == math.ceil((8000 + 256 * 15) / 16) * 16
    assert ref.align_max_padded(3, 2, 5) == 15  # 3 + 2 * 4 = 11, rounded up to blocks


# ------------------------------------------------------------------------------------------------
# fused_topk_align


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [0, 1, 3, 16, 17, 64])
@pytest.mark.parametrize(
    "E,topk,routing",
    [(256, 8, DEEPSEEK), (128, 4, dict(renormalize=True)), (8, 2, dict(renormalize=True)),
     (257, 8, dict(scoring_func="sigmoid")), (1024, 32, dict()), (3, 3, dict(renormalize=True))],
    ids=["deepseek", "gpt-oss", "mixtral", "e257", "e1024", "e3"],
)
@pytest.mark.parametrize("use_map", [False, True])
def test_fused_topk_align_equals_separate_ops(device, T, E, topk, routing, use_map):
    require_kernel("fused_topk_align", device)
    g = torch.Generator().manual_seed(T * 13 + E)
    logits = random_logits(T, E, torch.bfloat16, device, g)
    routing = dict(routing)
    if routing.get("scoring_func") == "sigmoid" and "num_expert_group" in routing:
        routing["correction_bias"] = torch.randn(E, generator=g).to(device)
    expert_map = None
    if use_map:
        expert_map = torch.where(torch.rand(E, generator=g) < 0.5, -1, torch.arange(E)).to(torch.int32).to(device)
    block_size = 16
    fused = moe_ext.fused_topk_align(logits, topk, block_size, expert_map=expert_map, **routing)
    w, ids = moe_ext.topk_gating(logits, topk, **routing)
    aligned = moe_ext.moe_align_block_size(ids, E, block_size, expert_map)
    for got, want in zip(fused, (w, ids, *aligned)):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)
    assert_gating_matches(fused[0], fused[1], logits, topk, **routing)
    assert_align_matches(fused[2:], fused[1], E, block_size, expert_map)


# ------------------------------------------------------------------------------------------------
# CUDA against the CPU kernel (bit-identical), large T, graph capture, determinism

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def routing_variant(variant, E, g, device="cpu"):
    """Routing arguments of a named variant for E experts (grouped: the largest of 8, 4, 3, 2 that
    divides E, half of the groups kept)."""
    bias = lambda: torch.randn(E, generator=g).to(device)  # noqa: E731
    routing = {
        "softmax": lambda: dict(),
        "softmax-renorm": lambda: dict(renormalize=True),
        "sigmoid-bias": lambda: dict(scoring_func="sigmoid", renormalize=True, correction_bias=bias()),
        "grouped": lambda: dict(scoring_func="sigmoid", renormalize=True, correction_bias=bias(),
                                num_expert_group=next(d for d in (8, 4, 3, 2, 1) if E % d == 0),
                                routed_scaling_factor=2.5),
        "grouped-softmax": lambda: dict(num_expert_group=next(d for d in (8, 4, 3, 2, 1) if E % d == 0)),
        "scaled": lambda: dict(renormalize=True, routed_scaling_factor=0.37),
    }[variant]()
    G = routing.get("num_expert_group", 1)
    if G > 1:
        routing["topk_group"] = max(1, G // 2)
    max_k = min(E, 32, routing.get("topk_group", 1) * (E // G)) if G > 1 else min(E, 32)
    return routing, max_k


@cuda_only
@pytest.mark.parametrize("E", EXPERTS + [2, 31, 33, 100, 255, 300, 777])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["softmax", "softmax-renorm", "sigmoid-bias", "grouped", "grouped-softmax",
                                     "scaled"])
@pytest.mark.parametrize("T", [16, 257])
def test_topk_gating_cuda_bit_identical_to_cpu(E, dtype, variant, T):
    require_kernel("topk_gating", "cuda")
    g = torch.Generator().manual_seed(E * 7 + len(variant) + T)
    logits = random_logits(T, E, dtype, "cpu", g)
    logits[::17, ::3] = float("nan")
    logits[5::23, E // 2] = float("inf")
    logits[7::29] = float("-inf")
    logits[3] = 0.5  # a row of ties
    routing, max_k = routing_variant(variant, E, g)
    for topk in sorted({1, min(2, max_k), max(1, max_k // 2), max_k}):
        cpu = moe_ext.topk_gating(logits, topk, **routing)
        cuda_routing = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in routing.items()}
        gpu = moe_ext.topk_gating(logits.cuda(), topk, **cuda_routing)
        assert torch.equal(gpu[1].cpu(), cpu[1]), f"ids differ (E={E}, topk={topk})"
        assert torch.equal(gpu[0].cpu(), cpu[0]), f"weights differ (E={E}, topk={topk})"


def assert_cuda_routing_equals_cpu(logits, topk, kw, kw_cuda, where):
    """Router and fused op on CUDA against the CPU kernels, bit for bit (kw_cuda: kw with tensors on CUDA;
    `where` names the case in the messages)."""
    cpu = moe_ext.topk_gating(logits, topk, **kw)
    gpu = moe_ext.topk_gating(logits.cuda(), topk, **kw_cuda)
    assert torch.equal(gpu[1].cpu(), cpu[1]), f"router ids differ ({where})"
    assert torch.equal(gpu[0].cpu(), cpu[0]), f"router weights differ ({where})"
    want = moe_ext.fused_topk_align(logits, topk, 16, **kw)
    fused = moe_ext.fused_topk_align(logits.cuda(), topk, 16, **kw_cuda)
    for name, a, b in zip(["weights", "ids", "sorted", "expert_ids", "ntpp"], fused, want):
        assert torch.equal(a.cpu(), b), f"fused {name} differs ({where})"


@cuda_only
@pytest.mark.parametrize("E", [32, 64, 100, 128, 256, 512, 1024])
@pytest.mark.parametrize("scoring_func", ["softmax", "sigmoid"])
def test_routing_cuda_keys_equal_but_for_low_bits(E, scoring_func):
    """The fused kernel's single block at decode (packed rounds) first compares keys without their low
    bits (the expert index takes them) and redoes the rounds exactly when two lanes' candidates agree
    in the rest; the router's rounds are exact throughout. Here the leading
    logits (fp32) differ by single ulps, higher experts higher, so their scores agree in all but the
    low bits and the index order is the wrong order: router (small and large grids) and fused op,
    bit for bit against the CPU kernel. Some rows keep a plain random lead, where no redo happens."""
    require_kernel("topk_gating", "cuda")
    g = torch.Generator().manual_seed(E + len(scoring_func))
    base = 8.0 if scoring_func == "softmax" else 0.5  # sigmoid: where a logit ulp still moves the score
    for T in (1, 4, 64):
        logits = random_logits(T, E, torch.float32, "cpu", g)
        if scoring_func == "sigmoid":
            logits = logits / 8  # under base
        n = min(E, 40)
        for t in range(0, T, 2):  # odd rows: no near ties
            experts = torch.randperm(E, generator=g)[:n].sort().values
            logits[t, experts[0]] = base
            for j in range(1, n):  # base, base + 1 ulp, + 2 ulps, ... in index order
                logits[t, experts[j]] = torch.nextafter(logits[t, experts[j - 1]], torch.tensor(math.inf))
        kw = dict(scoring_func=scoring_func, renormalize=True)
        for topk in sorted({1, 2, min(E, 8), min(E, 32)}):
            assert_cuda_routing_equals_cpu(logits, topk, kw, kw, f"T={T}, topk={topk}")


# E, topk, grouped (DeepSeek-V3: sigmoid, correction bias, 8 groups, top 4 groups): the decode shapes, up to
# 8 slots a lane and topk 8, and one past them.
TIE_SHAPES = [(256, 8, False), (128, 4, False), (128, 8, False), (64, 2, False), (32, 1, False), (20, 5, False),
              (256, 8, True), (512, 8, False)]


@cuda_only
@pytest.mark.parametrize("E,topk,grouped", TIE_SHAPES)
@pytest.mark.parametrize("levels", [3, 12, 64])
def test_routing_cuda_exact_ties(E, topk, grouped, levels):
    """bf16 logits drawn from `levels` values, so many experts tie exactly inside the top k and across its
    boundary: the decode selection (the router's lookahead rounds, the fused single block's packed rounds,
    which compare keys without their low bits; session 19's merge network, not merged, was tested here too)
    must still pick by key, then by lower index, as the CPU kernel does. Router and fused op, T = 1..8, bit
    for bit."""
    require_kernel("topk_gating", "cuda")
    g = torch.Generator().manual_seed(E * 31 + topk + levels)
    kw = dict(renormalize=True)
    if grouped:
        kw.update(scoring_func="sigmoid", num_expert_group=8, topk_group=4,
                  correction_bias=(torch.randint(0, 3, (E,), generator=g) * 0.125).float(), routed_scaling_factor=2.5)
    kw_cuda = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in kw.items()}
    for T in (1, 2, 3, 8):
        values = torch.randn(levels, generator=g)
        logits = values[torch.randint(0, levels, (T, E), generator=g)].to(torch.bfloat16)
        assert_cuda_routing_equals_cpu(logits, topk, kw, kw_cuda, f"T={T}")


@cuda_only
@pytest.mark.parametrize("E,topk", [(256, 8), (128, 8), (32, 8), (256, 16), (200, 9)])
@pytest.mark.parametrize("tied", [31, 32, 33, 40])
@pytest.mark.parametrize("scoring_func", ["softmax", "sigmoid"])
def test_routing_cuda_threshold_capacity(E, topk, tied, scoring_func):
    """The threshold selection (select_threshold: topk >= 8, the router's grids of more than 16 tokens, the
    fused op from 5 tokens) keeps every slot at or above a bound taken from the lanes' best keys, up to 32 of
    them, and leaves more to the selection rounds. Here `tied` experts share the top logit (spread over the
    lanes, so the bound is that logit): 31 and 32 candidates take the threshold path, ranked by index among
    equal keys; 33 and 40 the rounds. Router and fused op, T = 1, 5, 24, 40, bit for bit with the CPU."""
    require_kernel("topk_gating", "cuda")
    g = torch.Generator().manual_seed(E + tied + topk)
    for T in (1, 5, 24, 40):
        logits = random_logits(T, E, torch.float32, "cpu", g)  # |x| well under 20
        for t in range(T):
            logits[t, torch.randperm(E, generator=g)[:min(tied, E)]] = 25.0
        kw = dict(scoring_func=scoring_func, renormalize=True)
        assert_cuda_routing_equals_cpu(logits.to(torch.bfloat16), topk, kw, kw, f"T={T}")


@cuda_only
@pytest.mark.parametrize("E", [40, 64, 100, 256, 1024])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scoring_func", ["softmax", "sigmoid"])
def test_topk_gating_cuda_one_lane_holds_the_topk(E, dtype, scoring_func):
    """The CUDA router keeps each lane's best two experts and re-ranks a lane's remaining ones on
    every second win. Here one lane (experts 5, 37, 69, ...) holds every top logit, in pairs of
    equal values (rotated per row), so that lane wins round after round and its re-ranks must
    break ties by index as the CPU kernel does."""
    require_kernel("topk_gating", "cuda")
    g = torch.Generator().manual_seed(E)
    T = 8
    logits = random_logits(T, E, torch.float32, "cpu", g)  # |x| well under 20
    lane = torch.arange(5, E, 32)
    pairs = 20.0 + torch.arange(len(lane)).div(2, rounding_mode="floor").float()  # 20, 20, 21, 21, ...
    for t in range(T):
        logits[t, lane] = pairs.roll(2 * t)
    logits = logits.to(dtype)  # small integers: exact in every dtype
    for topk in sorted({1, 2, 3, min(len(lane), 32), min(E, 32)}):
        cpu = moe_ext.topk_gating(logits, topk, scoring_func=scoring_func, renormalize=True)
        gpu = moe_ext.topk_gating(logits.cuda(), topk, scoring_func=scoring_func, renormalize=True)
        assert torch.equal(gpu[1].cpu(), cpu[1]), f"ids differ (E={E}, topk={topk})"
        assert torch.equal(gpu[0].cpu(), cpu[0]), f"weights differ (E={E}, topk={topk})"
        top = min(topk, len(lane))
        assert set(cpu[1][:, :top].flatten().tolist()) <= set(lane.tolist()), "the lane's experts lead"


@cuda_only
def test_topk_gating_cuda_sigmoid_sweep_bit_identical():
    """The CUDA router's sigmoid writes out the fast path of the correctly rounded reciprocal (no
    branch) and divides only from 1 + e^-x >= 2^126: over a dense sweep of fp32 logits (every
    bf16 value, a fine grid over [-100, 100] with the cut near x = -87.3, random bit patterns,
    +-inf and NaN) every score, returned as a weight with topk = E, equals the CPU kernel's."""
    require_kernel("topk_gating", "cuda")
    g = torch.Generator().manual_seed(11)
    every_bf16 = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    grid = torch.linspace(-100.0, 100.0, 400001)
    cut = torch.linspace(-88.0, -86.5, 100001)
    bits = torch.randint(-(2**31), 2**31 - 1, (400000,), generator=g, dtype=torch.int64).to(torch.int32)
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 3.4e38, -3.4e38, 1e-45])
    x = torch.cat([every_bf16, grid, cut, bits.view(torch.float32), special])
    E = 32
    x = torch.cat([x, torch.zeros((-x.numel()) % E)]).view(-1, E)
    cpu = moe_ext.topk_gating(x, E, scoring_func="sigmoid")
    gpu = moe_ext.topk_gating(x.cuda(), E, scoring_func="sigmoid")
    assert torch.equal(gpu[1].cpu(), cpu[1])
    assert torch.equal(gpu[0].cpu(), cpu[0])


@cuda_only
@pytest.mark.parametrize("E,G", [(64, 2), (96, 3), (128, 4), (192, 6), (256, 8), (512, 16), (256, 16)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scoring_func", ["softmax", "sigmoid"])
def test_topk_gating_cuda_groups_of_one_slot(E, G, dtype, scoring_func):
    """E == 32 * G (DeepSeek-V3's 256 experts in 8 groups): the CUDA router scores each group in
    registers (a group is one slot of every lane; the lowest lane holding the group's best key gives
    it up for the second best) and ranks the groups in lanes. Logits on a coarse grid make equal keys
    inside a group and equal group scores across groups, so both tie rules are exercised; every
    topk_group, with and without a correction bias, and the fused kernel at decode sizes too, all
    bit-identical to the CPU kernel. E=512 and 256-in-16 take the shared-memory path, as control."""
    require_kernel("topk_gating", "cuda")
    g = torch.Generator().manual_seed(E * 5 + G)
    T = 40
    logits = (random_logits(T, E, torch.float32, "cpu", g) * 2).round() / 2  # steps of 0.5: ties
    logits[3] = 1.0  # one row of equal logits
    logits[7, ::5] = float("nan")
    logits[9, E // 3] = float("inf")
    logits[11] = float("-inf")
    logits = logits.to(dtype)
    group_size = E // G
    for with_bias in (False, True):
        bias = ((torch.randint(-2, 3, (E,), generator=g)).float() / 4) if with_bias else None
        for topk_group in range(1, G + 1):
            topk = int(torch.randint(1, min(32, topk_group * group_size) + 1, (1,), generator=g))
            routing = dict(scoring_func=scoring_func, renormalize=True, correction_bias=bias, num_expert_group=G,
                           topk_group=topk_group, routed_scaling_factor=2.5)
            cuda_routing = dict(routing, correction_bias=None if bias is None else bias.cuda())
            cpu = moe_ext.topk_gating(logits, topk, **routing)
            gpu = moe_ext.topk_gating(logits.cuda(), topk, **cuda_routing)
            where = f"topk_group={topk_group}, topk={topk}, bias={with_bias}"
            assert torch.equal(gpu[1].cpu(), cpu[1]), f"ids differ ({where})"
            assert torch.equal(gpu[0].cpu(), cpu[0]), f"weights differ ({where})"
            fused = moe_ext.fused_topk_align(logits[:16].cuda(), topk, 16, **cuda_routing)
            want = moe_ext.fused_topk_align(logits[:16], topk, 16, **routing)
            for got, exp in zip(fused, want):
                assert torch.equal(got.cpu(), exp), f"fused differs ({where})"


@cuda_only
@pytest.mark.parametrize("T", [1, 16, 1000, 2048, 16384, 65536])
@pytest.mark.parametrize("E,topk", [(8, 2), (256, 8), (1024, 8), (257, 4)])
@pytest.mark.parametrize("block_size", [16, 64])
def test_align_cuda_large_and_identical_to_cpu(T, E, topk, block_size):
    require_kernel("moe_align_block_size", "cuda")
    g = torch.Generator().manual_seed(T + E)
    # Skewed routing: a few hot experts, like real traffic, plus some invalid ids.
    hot = torch.randint(0, E, (T, topk), generator=g) % max(1, E // 8)
    ids = torch.where(torch.rand(T, topk, generator=g) < 0.5, hot, torch.randint(0, E, (T, topk), generator=g))
    ids[torch.rand(T, topk, generator=g) < 0.01] = -1
    ids = ids.to(torch.int32)
    emap = torch.where(torch.arange(E) % 4 == 1, -1, torch.arange(E)).to(torch.int32)
    for expert_map in (None, emap):
        cpu = moe_ext.moe_align_block_size(ids, E, block_size, expert_map)
        max_padded = ref.align_max_padded(T * topk, E, block_size)
        poison_allocator("cuda", [max_padded * 4, max_padded // block_size * 4, 4])
        gpu = moe_ext.moe_align_block_size(ids.cuda(), E, block_size, None if expert_map is None else expert_map.cuda())
        for a, b in zip(gpu, cpu):
            assert torch.equal(a.cpu(), b)
        again = moe_ext.moe_align_block_size(ids.cuda(), E, block_size, None if expert_map is None else expert_map.cuda())
        assert all(torch.equal(a, b) for a, b in zip(gpu, again)), "not deterministic"
        if T <= 2048:
            assert_align_matches(gpu, ids, E, block_size, expert_map)


FUSED_EXPERTS = [1, 3, 8, 64, 128, 256, 257, 512, 1024]
FUSED_VARIANTS = ["softmax", "softmax-renorm", "sigmoid-bias", "grouped", "grouped-softmax", "scaled"]


def check_fused_case(T, E, variant, i, g, check_cpu=False, check_rerun=False):
    """One fused_topk_align call on CUDA against topk_gating + moe_align_block_size (bit for bit), its
    outputs over poisoned memory: a random topk, dtype and block size by case index i, NaN/Inf rows in
    every fourth case, an expert map in every third; against the CPU kernel too when check_cpu, and
    against a second call when check_rerun. Returns the inputs (logits, topk, block_size, map, routing)."""
    dtype = DTYPES[i % 3]
    routing, max_k = routing_variant(variant, E, g, "cuda")
    topk = int(torch.randint(1, max_k + 1, (1,), generator=g))
    block_size = (16, 32, 64, 1, 5)[i % 5]
    logits = random_logits(T, E, dtype, "cpu", g)
    if i % 4 == 1:  # NaN/Inf rows
        logits[:, ::5] = float("nan")
        logits[::3, E // 2] = float("inf")
        logits[2::7] = float("-inf")
    logits = logits.cuda()
    expert_map = None
    if i % 3 == 2:
        expert_map = torch.where(torch.rand(E, generator=g) < 0.4, -1, torch.arange(E)).to(torch.int32).cuda()
    max_padded = ref.align_max_padded(T * topk, E, block_size)
    poison_allocator("cuda", [T * topk * 4] * 2 + [max_padded * 4, max_padded // block_size * 4, 4])
    fused = moe_ext.fused_topk_align(logits, topk, block_size, expert_map=expert_map, **routing)
    w, ids = moe_ext.topk_gating(logits, topk, **routing)
    separate = (w, ids, *moe_ext.moe_align_block_size(ids, E, block_size, expert_map))
    for name, got, want in zip(["weights", "ids", "sorted", "expert_ids", "ntpp"], fused, separate):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got, want), f"{name} differs (T={T}, topk={topk}, block_size={block_size})"
    if check_rerun:
        again = moe_ext.fused_topk_align(logits, topk, block_size, expert_map=expert_map, **routing)
        assert all(torch.equal(a, b) for a, b in zip(fused, again)), f"not deterministic (T={T})"
    if check_cpu:
        cpu_routing = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in routing.items()}
        cpu = moe_ext.fused_topk_align(logits.cpu(), topk, block_size,
                                       expert_map=None if expert_map is None else expert_map.cpu(), **cpu_routing)
        for got, want in zip(fused, cpu):
            assert torch.equal(got.cpu(), want)
    return logits, topk, block_size, expert_map, routing


@cuda_only
@pytest.mark.parametrize("E", FUSED_EXPERTS)
@pytest.mark.parametrize("variant", FUSED_VARIANTS)
def test_fused_decode_kernel_bit_identical(E, variant):
    """The single-launch fused kernel (T up to its limit, and one past it) gives exactly the outputs
    of topk_gating followed by moe_align_block_size, over seeds, dtypes, topk values, block sizes,
    expert maps and NaN/Inf logits."""
    require_kernel("fused_topk_align", "cuda")
    g = torch.Generator().manual_seed(E * 31 + len(variant))
    for T in list(range(0, 34)):
        check_fused_case(T, E, variant, T, g, check_cpu=T in (1, 16, 32))


@cuda_only
@pytest.mark.parametrize("E", FUSED_EXPERTS)
@pytest.mark.parametrize("variant", FUSED_VARIANTS)
def test_fused_decode_one_token(E, variant):
    """One token takes its own path in the fused kernel (one warp; its lanes rank their experts by
    shuffles, no shared masks): every block size from 1 to 128 and odd ones, no map, a partial map,
    a map that drops every expert, and every topk, against the CPU kernel bit for bit."""
    require_kernel("fused_topk_align", "cuda")
    g = torch.Generator().manual_seed(E * 17 + len(variant))
    maps = [None, torch.where(torch.rand(E, generator=g) < 0.5, -1, torch.arange(E).flip(0)).to(torch.int32),
            torch.full((E,), -1, dtype=torch.int32)]
    routing, max_k = routing_variant(variant, E, g)
    cuda_routing = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in routing.items()}
    for i, topk in enumerate(sorted({1, min(2, max_k), max(1, max_k // 2), max_k})):
        logits = random_logits(1, E, DTYPES[i % 3], "cpu", g)
        if i == 1:
            logits[0, ::4] = float("nan")
        for block_size in (1, 5, 16, 64, 128):
            for expert_map in maps:
                max_padded = ref.align_max_padded(topk, E, block_size)
                poison_allocator("cuda", [topk * 4] * 2 + [max_padded * 4, max_padded // block_size * 4, 4])
                got = moe_ext.fused_topk_align(logits.cuda(), topk, block_size,
                                               expert_map=None if expert_map is None else expert_map.cuda(),
                                               **cuda_routing)
                want = moe_ext.fused_topk_align(logits, topk, block_size, expert_map=expert_map, **routing)
                for name, a, b in zip(["weights", "ids", "sorted", "expert_ids", "ntpp"], got, want):
                    assert torch.equal(a.cpu(), b), f"{name} differs (topk={topk}, block_size={block_size})"


@cuda_only
@pytest.mark.parametrize("E", FUSED_EXPERTS)
@pytest.mark.parametrize("variant", FUSED_VARIANTS)
def test_fused_grid_path_bit_identical(E, variant, monkeypatch):
    """The cooperative grid path of fused_topk_align (forced; one grid barrier between the gating
    and the placing) gives exactly the outputs of topk_gating followed by moe_align_block_size: token
    counts from 1 to 32 a multiprocessor, blocks of 1 to 32 tokens (partial last blocks, one block,
    every multiprocessor), block sizes, expert maps, NaN/Inf logits; the CPU kernel at some."""
    require_kernel("fused_topk_align", "cuda")
    monkeypatch.setenv("MOE_EXT_FUSED_PATH", "1")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    g = torch.Generator().manual_seed(E * 37 + len(variant))
    cases = [(1, 1), (5, 2), (17, 0), (33, 0), (33, 32), (64, 3), (100, 7), (257, 0), (1024, 0), (1024, 32),
             (2000, 16), (sms * 32, 32), (sms * 32 - 5, 0)]
    for i, (T, per_block) in enumerate(cases):
        monkeypatch.setenv("MOE_EXT_FUSED_GRID_TOKENS", str(per_block))
        logits, topk, block_size, expert_map, routing = check_fused_case(T, E, variant, i, g, check_cpu=T in (33, 1024),
                                                                         check_rerun=True)
        if T == 1024 and per_block == 0:  # the path ran (a forced path that cannot take T runs another)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                moe_ext.fused_topk_align(logits, topk, block_size, expert_map=expert_map, **routing)
                torch.cuda.synchronize()
            assert any("fused_gating_align_grid_kernel" in e.name for e in prof.events()), "grid kernel not run"


@cuda_only
@pytest.mark.parametrize("T", [65, 129, 1000, 1024, 2000, 4096])
@pytest.mark.parametrize("E,topk", [(8, 2), (128, 4), (256, 8), (1024, 8)])
@pytest.mark.parametrize("repeats", [False, True])
def test_align_cuda_token_mask_path(T, E, topk, repeats, monkeypatch):
    """Mid sizes on the single-block token-mask path (forced; it takes up to 4096 ids where the masks
    fit, the automatic choice only below 2048): ids distinct within each row, as the router produces
    them, and rows with a repeated expert (the counting fallback), both equal to the CPU kernel."""
    require_kernel("moe_align_block_size", "cuda")
    monkeypatch.setenv("MOE_EXT_ALIGN_PATH", "1")
    g = torch.Generator().manual_seed(T * 3 + E + repeats)
    ids = torch.stack([torch.randperm(E, generator=g)[:topk] for _ in range(T)])
    if repeats:
        ids[T // 2, 1 % topk] = ids[T // 2, 0]
        ids[-1, -1] = ids[-1, 0]
    ids[torch.rand(T, topk, generator=g) < 0.01] = E  # out of range: skipped
    ids = ids.to(torch.int32)
    emap = torch.where(torch.arange(E) % 5 == 3, -1, torch.arange(E)).to(torch.int32)
    for block_size in (16, 64):
        for expert_map in (None, emap):
            cpu = moe_ext.moe_align_block_size(ids, E, block_size, expert_map)
            max_padded = ref.align_max_padded(T * topk, E, block_size)
            poison_allocator("cuda", [max_padded * 4, max_padded // block_size * 4, 4])
            gpu = moe_ext.moe_align_block_size(ids.cuda(), E, block_size,
                                               None if expert_map is None else expert_map.cuda())
            for a, b in zip(gpu, cpu):
                assert torch.equal(a.cpu(), b)


# Sizes of the one-launch grid path (4096 < ids <= 32768), as (T, topk), and one past it; the
# forced two-launch path also at decode sizes; topk 32 (the cooperative path's 7 tokens a block).
GRID_SIZES = [(4097, 1), (750, 8), (1024, 8), (2048, 8), (4096, 8), (5461, 6), (32769, 1)]
TWO_LAUNCH_SIZES = [(1, 1), (16, 8), (33, 3), (300, 8), (900, 32)] + GRID_SIZES
# The automatic path; the one-launch grid, the two launches (count, place) and the cooperative grid
# forced where they take the size (the cooperative one also with 5 tokens a block); the two launches
# and the cooperative grid without programmatic dependent launch.
ALIGN_PATHS = {"auto": {}, "grid": {"MOE_EXT_ALIGN_PATH": "2"}, "two-launch": {"MOE_EXT_ALIGN_PATH": "3"},
               "two-launch-nopdl": {"MOE_EXT_ALIGN_PATH": "3", "MOE_EXT_PDL": "0"},
               "coop": {"MOE_EXT_ALIGN_PATH": "4"},
               "coop-5": {"MOE_EXT_ALIGN_PATH": "4", "MOE_EXT_ALIGN_COOP_TOKENS": "5"},
               "coop-nopdl": {"MOE_EXT_ALIGN_PATH": "4", "MOE_EXT_PDL": "0"}}
FORCED_PATHS = ("grid", "two-launch", "two-launch-nopdl", "coop", "coop-5", "coop-nopdl")


@cuda_only
@pytest.mark.parametrize("T,topk,path", [(T, k, "auto") for T, k in GRID_SIZES] +
                         [(T, k, p) for T, k in TWO_LAUNCH_SIZES for p in FORCED_PATHS])
@pytest.mark.parametrize("E", [8, 256, 257, 1024])
def test_align_cuda_multi_block_paths(T, topk, E, path, monkeypatch):
    """The multi-block paths (the one-launch grid, the two launches, the cooperative grid) equal the CPU
    kernel bit for bit, and are deterministic: ids distinct within each row (as the router gives them),
    one expert taking most ids (rows repeat it: the cooperative grid's counting fallback), invalid ids
    with an expert map, and ids starting off a 16-byte boundary."""
    require_kernel("moe_align_block_size", "cuda")
    for name, value in ALIGN_PATHS[path].items():
        monkeypatch.setenv(name, value)
    g = torch.Generator().manual_seed(T * topk + E)
    if topk <= E:
        routed = torch.rand(T, E, generator=g).argsort(dim=1)[:, :topk]
    else:
        routed = torch.randint(0, E, (T, topk), generator=g)
    skewed = torch.where(torch.rand(T, topk, generator=g) < 0.8, E // 3, routed)
    invalid = routed.clone()
    bad = torch.rand(T, topk, generator=g) < 0.1
    junk = torch.tensor([-1, E, E + 7, -5, 2**31 - 1])
    invalid[bad] = junk[torch.randint(0, len(junk), (int(bad.sum()),), generator=g)]
    emap = torch.where(torch.arange(E) % 3 == 0, torch.arange(E) // 3, -1).to(torch.int32)
    cases = [(routed, None, False), (skewed, None, False), (invalid, emap, False), (invalid, None, True)]
    for block_size in (1, 16, 64, 128):
        for ids, expert_map, misaligned in cases:
            ids = ids.to(torch.int32)
            cpu = moe_ext.moe_align_block_size(ids, E, block_size, expert_map)
            if misaligned:  # 4 bytes past an allocation's start: three ids before the vector loads
                buf = torch.empty(ids.numel() + 1, dtype=torch.int32, device="cuda")
                buf[1:] = ids.flatten().cuda()
                ids_gpu = buf[1:].view(T, topk)
            else:
                ids_gpu = ids.cuda()
            map_gpu = None if expert_map is None else expert_map.cuda()
            max_padded = ref.align_max_padded(T * topk, E, block_size)
            poison_allocator("cuda", [max_padded * 4, max_padded // block_size * 4, 4])
            gpu = moe_ext.moe_align_block_size(ids_gpu, E, block_size, map_gpu)
            for name, a, b in zip(("sorted", "expert_ids", "ntpp"), gpu, cpu):
                assert torch.equal(a.cpu(), b), f"{name} differs (block {block_size}, map {expert_map is not None})"
            again = moe_ext.moe_align_block_size(ids_gpu, E, block_size, map_gpu)
            assert all(torch.equal(a, b) for a, b in zip(gpu, again)), "not deterministic"


@cuda_only
@pytest.mark.parametrize("T,E,topk", [(1024, 256, 8), (1024, 128, 4), (900, 8, 32), (1024, 512, 2), (64, 256, 8)])
@pytest.mark.parametrize("tokens_per_block", ["auto", "32"])
def test_align_cuda_coop_path(T, E, topk, tokens_per_block, monkeypatch):
    """The cooperative grid is the automatic path at these sizes (the kernel runs), and stays exact where
    its byte counts are fullest: every id of a block naming one expert (with 32 tokens a block asked for:
    31 tokens, 248 ids, at topk 8; 7 tokens, 224 ids, at topk 32) and a single repeated id in an
    otherwise router-like block."""
    require_kernel("moe_align_block_size", "cuda")
    if tokens_per_block != "auto":
        monkeypatch.setenv("MOE_EXT_ALIGN_COOP_TOKENS", tokens_per_block)
    cap = min(32, 255 // topk)  # tokens a block at most; the grid is at most a block a multiprocessor
    T = min(T, cap * torch.cuda.get_device_properties(0).multi_processor_count)
    g = torch.Generator().manual_seed(E + topk)
    if topk <= E:
        routed = torch.rand(T, E, generator=g).argsort(dim=1)[:, :topk]
    else:
        routed = torch.randint(0, E, (T, topk), generator=g)
    one_expert = torch.full((T, topk), E - 1)
    one_repeat = routed.clone()
    one_repeat[T // 3, -1] = one_repeat[T // 3, 0]
    for ids in (routed, one_expert, one_repeat):
        ids = ids.to(torch.int32)
        for block_size in (16, 5):
            cpu = moe_ext.moe_align_block_size(ids, E, block_size)
            max_padded = ref.align_max_padded(T * topk, E, block_size)
            poison_allocator("cuda", [max_padded * 4, max_padded // block_size * 4, 4])
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                gpu = moe_ext.moe_align_block_size(ids.cuda(), E, block_size)
                torch.cuda.synchronize()
            assert any("moe_align_coop_kernel" in e.name for e in prof.events()), "cooperative kernel not run"
            for name, a, b in zip(("sorted", "expert_ids", "ntpp"), gpu, cpu):
                assert torch.equal(a.cpu(), b), f"{name} differs (block {block_size})"


@cuda_only
@pytest.mark.parametrize("T", [1, 5, 16, 32, 33, 513, 1024, 4096, 20000])
def test_routing_cuda_graph_capture(T):
    """Gating + alignment captured in a CUDA graph and replayed on new logits equals eager."""
    for op in ("topk_gating", "moe_align_block_size", "fused_topk_align"):
        require_kernel(op, "cuda")
    E, topk = 256, 8
    bias = torch.randn(E, device="cuda")
    routing = dict(DEEPSEEK, correction_bias=bias)
    static = torch.randn(T, E, device="cuda", dtype=torch.bfloat16)

    def run():
        w, ids = moe_ext.topk_gating(static, topk, **routing)
        return (w, ids, *moe_ext.moe_align_block_size(ids, E, 16), *moe_ext.fused_topk_align(static, topk, 16, **routing))

    graph, outs = capture_graph(run)
    for seed in range(3):
        static.copy_(torch.randn(T, E, generator=torch.Generator().manual_seed(seed)).to("cuda", torch.bfloat16))
        graph.replay()
        for got, want in zip(outs, run()):
            assert torch.equal(got, want)
