"""SiLU-and-mul, combine and the grouped expert GEMM against the fp32 references."""

from __future__ import annotations

import pytest
import torch

import moe_ext
from moe_ext import reference as ref

from conftest import DEVICES, POISON_BYTE, check_silu_gemm, nbytes, poison_allocator, rel_l2, require_kernel

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Output rounding of one fp32 result into the dtype, plus fp32 accumulation-order slack.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def assert_close_lowp(out: torch.Tensor, ref_fp32: torch.Tensor, dtype: torch.dtype) -> None:
    """|out - ref| <= rtol(dtype) * |ref| + atol, atol a small fraction of the output's scale."""
    out, ref_fp32 = out.float().cpu(), ref_fp32.float().cpu()
    scale = ref_fp32.abs().max().item() if ref_fp32.numel() else 0.0
    torch.testing.assert_close(out, ref_fp32, rtol=RTOL[dtype], atol=1e-5 + 1e-3 * scale)


# ------------------------------------------------------------------------------------------------
# silu_and_mul


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
# (20000, 256) and (9001, 512): more rows than the CUDA grid's blocks (at most 16 a multiprocessor), so
# each block strides over several rows, some blocks over one more than others.
@pytest.mark.parametrize("shape", [(0, 64), (1, 2), (3, 222), (16, 1536), (17, 4096), (1000, 768), (2, 3, 130),
                                   (20000, 256), (9001, 512)])
def test_silu_and_mul(device, dtype, shape):
    require_kernel("silu_and_mul", device)
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 3).to(device=device, dtype=dtype)
    poison_allocator(device, [nbytes((*shape[:-1], shape[-1] // 2), dtype)])
    out = moe_ext.silu_and_mul(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype
    gate, up = x.float().chunk(2, dim=-1)
    assert_close_lowp(out, torch.nn.functional.silu(gate) * up, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_large_gates(device, dtype):
    """Gates out to +-100 (e^100 overflows fp32, and the 16-bit CUDA path's approximate reciprocal
    flushes past 2^126), and exact zeros."""
    require_kernel("silu_and_mul", device)
    g = torch.Generator().manual_seed(5)
    gate = torch.empty(64, 264).uniform_(-100, 100, generator=g)
    gate[:, :8] = torch.tensor([-100.0, -88.5, -87.5, -30.0, -0.0, 0.0, 30.0, 100.0])
    x = torch.cat([gate, torch.randn(64, 264, generator=g)], dim=1).to(device=device, dtype=dtype)
    out = moe_ext.silu_and_mul(x)
    gate, up = x.float().chunk(2, dim=-1)
    assert_close_lowp(out, torch.nn.functional.silu(gate) * up, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_silu_and_mul_unaligned_view(device):
    """A contiguous tensor at an odd storage offset takes the scalar path and stays correct."""
    require_kernel("silu_and_mul", device)
    buf = torch.randn(1 + 5 * 64, device=device, dtype=torch.bfloat16)
    x = buf[1:].view(5, 64)
    torch.testing.assert_close(moe_ext.silu_and_mul(x).float(), ref.silu_and_mul_ref(x).float(), rtol=1.6e-2, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# moe_combine


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
# topk 3, 6: loads past topk in a chunk of 4 or 8 (the CUDA kernel's); 10, 16: two chunks. (9001, 1, 64)
# and (5000, 2, 512): blocks over several tokens.
@pytest.mark.parametrize("T,topk,H", [(0, 8, 64), (1, 1, 8), (3, 2, 111), (16, 8, 7168), (17, 4, 2880), (1000, 8, 256),
                                     (9001, 1, 64), (5000, 2, 512), (11, 3, 4104), (20, 6, 1000), (7, 10, 130),
                                     (33, 16, 2048)])
@pytest.mark.parametrize("weighted", [False, True])
def test_moe_combine(device, dtype, T, topk, H, weighted):
    require_kernel("moe_combine", device)
    g = torch.Generator().manual_seed(T + topk + H)
    x = torch.randn(T, topk, H, generator=g).to(device=device, dtype=dtype)
    w = torch.rand(T, topk, generator=g).to(device) if weighted else None
    poison_allocator(device, [nbytes((T, H), dtype)])
    out = moe_ext.moe_combine(x, w)
    assert out.shape == (T, H) and out.dtype == dtype
    want = (x.float() * (w.unsqueeze(-1) if weighted else 1.0)).sum(dim=1)
    assert_close_lowp(out, want, dtype)


# ------------------------------------------------------------------------------------------------
# moe_grouped_gemm


def make_routing(T, topk, E, block_size, g, mode="random"):
    if mode == "random":
        ids = torch.stack([torch.randperm(E, generator=g)[:topk] for _ in range(T)]) if T else torch.empty(0, topk)
    elif mode == "one_expert":
        ids = torch.full((T, topk), E - 1)
        ids[:, 1:] = -1  # the other slots are padding rows
    elif mode == "few_experts":  # most experts empty
        ids = torch.randint(0, min(E, 2), (T, topk), generator=g)
    ids = ids.to(torch.int32).reshape(T, topk)
    return ids, ref.moe_align_block_size_ref(ids, E, block_size)


GEMM_CASES = [
    # T, topk, E, N, K
    (0, 2, 4, 32, 64),
    (1, 1, 1, 16, 16),
    (3, 2, 8, 77, 111),
    (16, 8, 64, 96, 128),
    (17, 4, 8, 130, 200),
    (200, 2, 8, 64, 48),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,topk,E,N,K", GEMM_CASES)
@pytest.mark.parametrize("mode", ["random", "one_expert", "few_experts"])
@pytest.mark.parametrize("weighted", [False, True])
def test_grouped_gemm(device, dtype, T, topk, E, N, K, mode, weighted):
    require_kernel("moe_grouped_gemm", device)
    if mode == "random" and topk > E:
        pytest.skip("topk > E")
    g = torch.Generator().manual_seed(T * 3 + N + K)
    ids, (sorted_ids, expert_ids, ntpp) = make_routing(T, topk, E, 16, g, mode)
    a = torch.randn(T, K, generator=g).to(dtype)
    w = (torch.randn(E, N, K, generator=g) / K**0.5).to(dtype)
    tw = torch.rand(T, topk, generator=g) if weighted else None
    want = ref.moe_grouped_gemm_ref(a, w, sorted_ids, expert_ids, ntpp, topk, tw)
    args = [t.to(device) if t is not None else None for t in (a, w, sorted_ids, expert_ids, ntpp)]
    poison_allocator(device, [nbytes((T * topk, N), dtype)])
    out = moe_ext.moe_grouped_gemm(*args[:5], topk, None if tw is None else tw.to(device))
    assert out.shape == (T * topk, N) and out.dtype == dtype
    assert_close_lowp(out, want, dtype)
    if mode == "one_expert" and T:
        assert (out.view(T, topk, N)[:, 1:] == 0).all(), "padding rows must be zero"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("T,N", [(37, 136), (1024, 1040)])  # on CUDA a memset-sized and a flags-sized output
def test_grouped_gemm_zero_unwritten_false(device, silu, T, N):
    """zero_unwritten=False: the rows a block names are bit-identical to the default call's; the rows
    none names (here the padding slots) stay as the allocator held them on CUDA (the poison: no memset
    and no zero pass ran) and zero on the CPU, which always zeroes."""
    name = "moe_grouped_gemm_silu" if silu else "moe_grouped_gemm"
    require_kernel(name, device)
    topk, E, K, dtype = 4, 8, 64, torch.bfloat16
    g = torch.Generator().manual_seed(T + N)
    _, (sorted_ids, expert_ids, ntpp) = make_routing(T, topk, E, 16, g, "one_expert")
    a = torch.randn(T, K, generator=g).to(dtype)
    w = (torch.randn(E, N, K, generator=g) / K**0.5).to(dtype)
    args = [t.to(device) for t in (a, w, sorted_ids, expert_ids, ntpp)]
    op = getattr(moe_ext, name)
    extra = () if silu else (torch.rand(T, topk, generator=g).to(device),)
    want = op(*args, topk, *extra)
    rows, cols = T * topk, N // 2 if silu else N
    poison_allocator(device, [nbytes((rows, cols), dtype)])
    got = op(*args, topk, *extra, zero_unwritten=False)
    assert got.shape == want.shape == (rows, cols)
    named = torch.zeros(T, topk, dtype=torch.bool)
    named[:, 0] = True  # "one_expert": slot 0 of each token on expert E - 1, the other slots -1
    named = named.flatten().to(device)
    assert torch.equal(got[named], want[named])
    unnamed = got[~named]
    if device == "cpu":
        assert (unnamed == 0).all()
    else:
        assert (unnamed.view(torch.int16) == POISON_BYTE * 0x0101).all(), "rows no block names were written"


def upper_half_on_rank(T, k, E, g):
    """Router-like ids [T, k] over E experts, an expert_map putting experts E/2.. on this rank as
    0.. (the rest -1), and their alignment (block 16) by the reference."""
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)
    expert_map = torch.full((E,), -1, dtype=torch.int32)
    expert_map[E // 2:] = torch.arange(E // 2, dtype=torch.int32)
    return ids, expert_map, ref.moe_align_block_size_ref(ids, E, 16, expert_map)


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_gemm_second_layer_and_expert_map(device):
    """The second GEMM's form (topk = 1 over [T*k, I] rows, weights [T, k]) with expert_map: rows of
    experts off this rank, and blocks whose expert is -1, are zero."""
    require_kernel("moe_grouped_gemm", device)
    g = torch.Generator().manual_seed(0)
    T, k, E, H, I = 33, 4, 16, 72, 40
    ids, expert_map, (sorted_ids, expert_ids, ntpp) = upper_half_on_rank(T, k, E, g)
    act = torch.randn(T * k, I, generator=g).to(torch.bfloat16)
    w2 = (torch.randn(E // 2, H, I, generator=g) / I**0.5).to(torch.bfloat16)
    tw = torch.rand(T, k, generator=g)
    want = ref.moe_grouped_gemm_ref(act, w2, sorted_ids, expert_ids, ntpp, 1, tw)
    out = moe_ext.moe_grouped_gemm(*(t.to(device) for t in (act, w2, sorted_ids, expert_ids, ntpp)), 1, tw.to(device))
    assert_close_lowp(out, want, torch.bfloat16)
    off_rank = (expert_map.long()[ids.long()] < 0).flatten()
    assert off_rank.any() and (out.cpu()[off_rank] == 0).all()
    # A block marked -1 and ids past num_tokens_post_padded are ignored.
    expert_ids2 = expert_ids.clone()
    expert_ids2[0] = -1
    out2 = moe_ext.moe_grouped_gemm(*(t.to(device) for t in (act, w2, sorted_ids, expert_ids2, ntpp)), 1, tw.to(device))
    dropped = torch.zeros(T * k, dtype=torch.bool)
    dropped[sorted_ids[:16][sorted_ids[:16] < T * k].long()] = True
    assert dropped.any() and (out2.cpu()[dropped] == 0).all()
    assert torch.equal(out2.cpu()[~dropped], out.cpu()[~dropped])


# ------------------------------------------------------------------------------------------------
# moe_grouped_gemm_silu


SILU_CASES = [
    # T, topk, E, I, K
    (0, 2, 4, 32, 64),      # no tokens
    (1, 1, 1, 16, 16),
    (3, 2, 8, 77, 111),     # odd I, K % 8 != 0
    (17, 4, 8, 77, 200),
    (16, 8, 64, 48, 128),   # most experts empty
    (40, 2, 4, 260, 72),    # several N-tiles, a partial last one
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,topk,E,I,K", SILU_CASES)
@pytest.mark.parametrize("mode", ["random", "one_expert", "few_experts"])
@pytest.mark.parametrize("block_size", [16, 64])
def test_grouped_gemm_silu(device, dtype, T, topk, E, I, K, mode, block_size):
    require_kernel("moe_grouped_gemm_silu", device)
    if mode == "random" and topk > E:
        pytest.skip("topk > E")
    g = torch.Generator().manual_seed(T * 5 + I + K)
    _, (sorted_ids, expert_ids, ntpp) = make_routing(T, topk, E, block_size, g, mode)
    a = torch.randn(T, K, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * I, K, generator=g) / K**0.5).to(dtype)
    args = [t.to(device) for t in (a, w13, sorted_ids, expert_ids, ntpp)]
    poison_allocator(device, [nbytes((T * topk, I), dtype)])
    out = moe_ext.moe_grouped_gemm_silu(*args, topk)
    check_silu_gemm(out, *args, topk)
    if mode == "one_expert" and T:
        assert (out.view(T, topk, I)[:, 1:] == 0).all(), "padding rows must be zero"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_gemm_silu_matches_two_ops(device, dtype):
    """The fused op equals moe_grouped_gemm + silu_and_mul up to the intermediate rounding (fp32: the
    same up to accumulation order), and is at least as close to the fp32 reference."""
    require_kernel("moe_grouped_gemm_silu", device)
    g = torch.Generator().manual_seed(1)
    T, topk, E, I, K = 29, 4, 8, 96, 128
    _, routing = make_routing(T, topk, E, 16, g)
    a = torch.randn(T, K, generator=g).to(device=device, dtype=dtype)
    w13 = (torch.randn(E, 2 * I, K, generator=g) / K**0.5).to(device=device, dtype=dtype)
    routing = [t.to(device) for t in routing]
    fused = moe_ext.moe_grouped_gemm_silu(a, w13, *routing, topk).float().cpu()
    two = moe_ext.silu_and_mul(moe_ext.moe_grouped_gemm(a, w13, *routing, topk)).float().cpu()
    want = ref.moe_grouped_gemm_silu_ref(a.cpu(), w13.cpu(), *(t.cpu() for t in routing), topk)
    if dtype == torch.float32:
        assert rel_l2(fused, two) < 1e-6
    else:
        assert rel_l2(fused, want) <= rel_l2(two, want) * 1.05 + 1e-6, (rel_l2(fused, want), rel_l2(two, want))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grouped_gemm_silu_expert_map_and_minus_one_blocks(device, dtype):
    """Experts off this rank (expert_map -1), a block marked -1, an expert id past E_local, and a
    smaller num_tokens_post_padded: all rows no valid block names are zero, the rest as the reference."""
    require_kernel("moe_grouped_gemm_silu", device)
    g = torch.Generator().manual_seed(2)
    T, k, E, I, K = 33, 4, 16, 40, 72
    ids, expert_map, (sorted_ids, expert_ids, ntpp) = upper_half_on_rank(T, k, E, g)
    a = torch.randn(T, K, generator=g).to(dtype)
    w13 = (torch.randn(E // 2, 2 * I, K, generator=g) / K**0.5).to(dtype)
    dev = lambda *ts: [t.to(device) for t in ts]  # noqa: E731
    out = moe_ext.moe_grouped_gemm_silu(*dev(a, w13, sorted_ids, expert_ids, ntpp), k)
    check_silu_gemm(out, a, w13, sorted_ids, expert_ids, ntpp, k)
    off_rank = (expert_map.long()[ids.long()] < 0).flatten()
    assert off_rank.any() and (out.cpu()[off_rank] == 0).all()
    expert_ids2 = expert_ids.clone()
    expert_ids2[0] = -1
    expert_ids2[2] = E // 2  # out of range: treated as -1
    out2 = moe_ext.moe_grouped_gemm_silu(*dev(a, w13, sorted_ids, expert_ids2, ntpp), k)
    check_silu_gemm(out2, a, w13, sorted_ids, expert_ids2, ntpp, k)
    dropped = torch.zeros(T * k, dtype=torch.bool)
    for b in (0, 2):
        blk = sorted_ids[16 * b:16 * (b + 1)]
        dropped[blk[blk < T * k].long()] = True
    assert dropped.any() and (out2.cpu()[dropped] == 0).all()
    assert torch.equal(out2.cpu()[~dropped], out.cpu()[~dropped])
    ntpp3 = ntpp - 2 * 16
    check_silu_gemm(moe_ext.moe_grouped_gemm_silu(*dev(a, w13, sorted_ids, expert_ids, ntpp3), k),
                    a, w13, sorted_ids, expert_ids, ntpp3, k)
