"""fused_moe and the MoE module against the eager fp32 reference; torch.compile; CUDA graphs."""

from __future__ import annotations

import pytest
import torch

import moe_ext
from moe_ext import reference as ref
from moe_ext.fused_moe import LARGE_EXPERT_BYTES
from moe_ext.models import MODELS

from conftest import DEVICES, HAS_CUDA, capture_graph, rel_l2, require_kernel

ALL_OPS = ["topk_gating", "moe_align_block_size", "fused_topk_align", "silu_and_mul", "moe_grouped_gemm",
           "moe_grouped_gemm_silu", "moe_combine", "moe_gemv_silu", "moe_gemv_combine"]

# Small layers in each model's routing style (real shapes run in the demo and the benchmark).
STYLES = {
    "deepseek": dict(E=32, topk=4, H=96, I=48, routing=dict(scoring_func="sigmoid", renormalize=True,
                                                           num_expert_group=4, topk_group=2,
                                                           routed_scaling_factor=2.5), bias=True),
    "gpt-oss": dict(E=16, topk=4, H=111, I=64, routing=dict(renormalize=True), bias=False),
    "mixtral": dict(E=8, topk=2, H=128, I=224, routing=dict(renormalize=True), bias=False),
    "qwen3": dict(E=64, topk=8, H=64, I=40, routing=dict(renormalize=True), bias=False),
    "plain-softmax": dict(E=3, topk=1, H=72, I=16, routing=dict(), bias=False),
}


def require_all(device):
    for op in ALL_OPS:
        require_kernel(op, device)


def make_layer(style, T, dtype, device, seed=0, expert_map=None):
    s = STYLES[style]
    g = torch.Generator().manual_seed(seed)
    E, H, I = s["E"], s["H"], s["I"]
    E_local = E if expert_map is None else int(expert_map.max()) + 1
    x = torch.randn(T, H, generator=g).to(device=device, dtype=dtype)
    w13 = (torch.randn(E_local, 2 * I, H, generator=g) / H**0.5).to(device=device, dtype=dtype)
    w2 = (torch.randn(E_local, H, I, generator=g) / I**0.5).to(device=device, dtype=dtype)
    logits = torch.randn(T, E, generator=g).to(device)
    routing = dict(s["routing"])
    if s["bias"]:
        routing["correction_bias"] = (torch.randn(E, generator=g) * 0.1).to(device)
    return x, w13, w2, logits, s["topk"], routing


def check_against_reference(out, x, w13, w2, logits, topk, routing, expert_map=None):
    """fp32: within 1e-5 of the fp32 reference. bf16 / fp16: within 1e-2 and at most twice PyTorch's own error in
    that dtype on the same data, with no slack (session 24: the 230 CUDA cases pass on an H200; CPU cases reach
    1.23x)."""
    kw = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in dict(routing, expert_map=expert_map).items()}
    want = ref.fused_moe_ref(x.cpu(), w13.cpu(), w2.cpu(), logits.cpu(), topk, **kw)
    assert out.shape == x.shape and out.dtype == x.dtype
    if x.shape[0] == 0:
        return
    err = rel_l2(out.cpu(), want)
    if x.dtype == torch.float32:
        assert err < 1e-5, err
    else:
        lowp = ref.fused_moe_ref(x.cpu(), w13.cpu(), w2.cpu(), logits.cpu(), topk, compute_dtype=x.dtype, **kw)
        err_lowp = rel_l2(lowp, want)
        assert err <= 1e-2 and err <= 2 * err_lowp, (err, err_lowp)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("T", [0, 1, 3, 16, 17, 100])
def test_fused_moe(device, dtype, style, T):
    require_all(device)
    x, w13, w2, logits, topk, routing = make_layer(style, T, dtype, device, seed=T)
    out = moe_ext.fused_moe(x, w13, w2, logits, topk, **routing)
    check_against_reference(out, x, w13, w2, logits, topk, routing)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("model", list(MODELS))
def test_fused_moe_model_shapes(model):
    """The four models' real layer shapes and routing (moe_ext.models, bf16 weights ~ N(0, 1/fan_in), as the
    benchmark draws them) at decode (T = 1, 4: the expert GEMVs where they apply; 16: the grouped GEMMs) and at
    prefill (T = 4096: every expert hit, 192-row wgmma blocks on Hopper). Each output row depends on its own
    token only, so the fp32 reference and PyTorch's bf16 layer run on a random sample of up to 64 of the T rows;
    bf16 error at most 1e-2 and at most twice the bf16 layer's on the same rows, with no slack."""
    require_all("cuda")
    cfg = MODELS[model]
    E, topk, H, I = cfg.num_experts, cfg.topk, cfg.hidden_size, cfg.intermediate_size
    if torch.cuda.mem_get_info()[0] < cfg.weight_bytes() + (8 << 30):
        pytest.skip(f"{model}: {cfg.weight_bytes() / 2**30:.1f} GiB of weights do not fit with room to spare")
    g = torch.Generator(device="cuda").manual_seed(len(model))
    w13 = torch.randn(E, 2 * I, H, generator=g, device="cuda", dtype=torch.bfloat16).div_(H**0.5)
    w2 = torch.randn(E, H, I, generator=g, device="cuda", dtype=torch.bfloat16).div_(I**0.5)
    routing = dict(cfg.routing)
    if cfg.correction_bias:
        routing["correction_bias"] = torch.randn(E, generator=g, device="cuda") * 0.1
    try:
        for T in (1, 4, 16, 4096):
            x = torch.randn(T, H, generator=g, device="cuda", dtype=torch.bfloat16)
            logits = torch.randn(T, E, generator=g, device="cuda")
            out = moe_ext.fused_moe(x, w13, w2, logits, topk, **routing)
            assert out.shape == x.shape and out.dtype == x.dtype
            rows = torch.randperm(T, generator=g, device="cuda")[:64]
            args = (x[rows], w13, w2, logits[rows], topk)
            want = ref.fused_moe_ref(*args, **routing)
            err = rel_l2(out[rows], want)
            err_lowp = rel_l2(ref.fused_moe_ref(*args, compute_dtype=torch.bfloat16, **routing), want)
            assert err <= 1e-2 and err <= 2 * err_lowp, (model, T, err, err_lowp)
    finally:
        del w13, w2
        torch.cuda.empty_cache()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [1, 16, 17, 64])
@pytest.mark.parametrize("decode_gemv", [None, True])
def test_fused_moe_expert_map(device, T, decode_gemv):
    """Expert parallelism: this rank holds experts 8..15 of 32; the rest contribute nothing."""
    require_all(device)
    E = STYLES["deepseek"]["E"]
    expert_map = torch.full((E,), -1, dtype=torch.int32)
    expert_map[8:16] = torch.arange(8, dtype=torch.int32)
    x, w13, w2, logits, topk, routing = make_layer("deepseek", T, torch.bfloat16, device, 1, expert_map)
    out = moe_ext.fused_moe(x, w13, w2, logits, topk, expert_map=expert_map.to(device), decode_gemv=decode_gemv,
                            **routing)
    check_against_reference(out, x, w13, w2, logits, topk, routing, expert_map)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("style", ["gpt-oss", "qwen3"])
@pytest.mark.parametrize("T", [1, 17, 100])
@pytest.mark.parametrize("fuse_silu", [False, True])
def test_fused_moe_fuse_silu(device, dtype, style, T, fuse_silu):
    """Both first-GEMM paths, forced (the default picks the fused op for bf16/fp16 on CUDA only)."""
    require_all(device)
    x, w13, w2, logits, topk, routing = make_layer(style, T, dtype, device, seed=T + 7)
    out = moe_ext.fused_moe(x, w13, w2, logits, topk, fuse_silu=fuse_silu, **routing)
    check_against_reference(out, x, w13, w2, logits, topk, routing)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("T", [1, 4, 5, 33])
@pytest.mark.parametrize("decode_gemv", [False, True])
def test_fused_moe_decode_gemv(device, dtype, style, T, decode_gemv):
    """Both expert paths, forced, at token counts on both sides of the default's switch (the GEMVs on
    CUDA while T * topk <= E / 4)."""
    require_all(device)
    x, w13, w2, logits, topk, routing = make_layer(style, T, dtype, device, seed=T + 11)
    out = moe_ext.fused_moe(x, w13, w2, logits, topk, decode_gemv=decode_gemv, **routing)
    check_against_reference(out, x, w13, w2, logits, topk, routing)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("style", ["mixtral", "gpt-oss", "plain-softmax"])
@pytest.mark.parametrize("block_size", [None, 128])
def test_fused_moe_prefill_blocks(device, style, block_size):
    """Token counts where a hit expert expects 96 rows or more: on Hopper the default takes 192-row
    blocks (three-warpgroup tiles); 128 forced for comparison. Both against the reference."""
    require_all(device)
    s = STYLES[style]
    T = 96 * s["E"] // s["topk"] + 5
    x, w13, w2, logits, topk, routing = make_layer(style, T, torch.bfloat16, device, seed=T)
    out = moe_ext.fused_moe(x, w13, w2, logits, topk, block_size=block_size, **routing)
    check_against_reference(out, x, w13, w2, logits, topk, routing)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [2, 3, 64, 4096])
def test_default_block_size(device, T):
    """fused_moe's default: choose_block_size with the device's hopper_tiles and one expert's w13 + w2
    bytes (Mixtral's shapes on the meta device: 352 MB experts, so T=3 takes 64 rows on Hopper)."""
    x = torch.empty(T, 4096, dtype=torch.bfloat16, device=device)
    w13 = torch.empty(8, 2 * 14336, 4096, dtype=torch.bfloat16, device="meta")
    w2 = torch.empty(8, 4096, 14336, dtype=torch.bfloat16, device="meta")
    hopper = x.is_cuda and moe_ext.hopper_tiles(x.device.index)
    want = moe_ext.choose_block_size(T, 2, 8, hopper, MIXTRAL_EXPERT_BYTES)
    assert moe_ext.default_block_size(x, w13, w2, 2, 8) == want
    other = moe_ext.choose_block_size(T, 2, 8, not hopper, MIXTRAL_EXPERT_BYTES)  # a caller's hopper wins
    assert moe_ext.default_block_size(x, w13, w2, 2, 8, hopper=not hopper) == other


@pytest.mark.parametrize("device", DEVICES)
def test_fused_moe_paths_agree(device):
    """route() (the fused op, whose CUDA kernel differs by T: one block at 16 tokens, the grid at 32
    and 200) equals the separate ops bit for bit, and the layer's output over T rows equals the
    first T rows of its output over 2T."""
    require_all(device)
    T = 16
    x, w13, w2, logits, topk, routing = make_layer("qwen3", T, torch.bfloat16, device)
    out_fused = moe_ext.fused_moe(x, w13, w2, logits, topk, **routing)
    two = lambda t: torch.cat([t, t])  # noqa: E731
    out_two = moe_ext.fused_moe(two(x), w13, w2, two(logits), topk, block_size=16, **routing)
    assert torch.equal(out_fused, out_two[: x.shape[0]])
    for rows in (logits, two(logits), torch.cat([logits] * 13)[:200]):
        routed = moe_ext.route(rows, topk, 16, **routing)
        w, ids = moe_ext.topk_gating(rows, topk, **routing)
        for got, want in zip(routed, (w, ids, *moe_ext.moe_align_block_size(ids, logits.shape[1], 16))):
            assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("style", ["deepseek", "mixtral"])
def test_module(device, style):
    require_all(device)
    s = STYLES[style]
    torch.manual_seed(0)
    layer = moe_ext.MoE(s["H"], s["I"], s["E"], s["topk"], use_correction_bias=s["bias"], dtype=torch.bfloat16,
                        device=device, **s["routing"])
    x = torch.randn(2, 5, s["H"], device=device, dtype=torch.bfloat16)
    out = layer(x)
    assert out.shape == x.shape
    flat = x.reshape(-1, s["H"])
    routing = dict(s["routing"], correction_bias=layer.correction_bias)
    with torch.no_grad():
        check_against_reference(out.reshape(-1, s["H"]).detach(), flat, layer.w13.detach(), layer.w2.detach(),
                                layer.router_logits(flat).detach(), s["topk"], routing)


MIXTRAL_EXPERT_BYTES = 3 * 4096 * 14336 * 2  # w13 + w2 of one Mixtral-8x7B expert, bf16


@pytest.mark.parametrize("T,topk,E,expert_bytes,plain,hopper", [
    (1, 8, 256, 0, 16, 16), (64, 8, 256, 0, 16, 16), (65, 8, 256, 0, 16, 64), (128, 8, 256, 0, 16, 64),
    (255, 8, 256, 0, 16, 64), (256, 8, 256, 0, 16, 128), (1024, 8, 256, 0, 32, 128), (1024, 8, 128, 0, 64, 128),
    (4096, 8, 256, 0, 128, 192), (4096, 2, 8, 0, 128, 192), (1535, 8, 128, 0, 128, 128),
    (4, 2, 8, 0, 16, 16), (2, 2, 8, MIXTRAL_EXPERT_BYTES, 16, 16), (3, 2, 8, MIXTRAL_EXPERT_BYTES, 16, 64),
    (4, 2, 8, MIXTRAL_EXPERT_BYTES, 16, 64), (16, 8, 256, LARGE_EXPERT_BYTES, 16, 16),
    (17, 8, 256, LARGE_EXPERT_BYTES, 16, 64), (16, 8, 256, LARGE_EXPERT_BYTES - 1, 16, 16)])
def test_choose_block_size(T, topk, E, expert_bytes, plain, hopper):
    """Off Hopper, the smallest block holding an expert's expected rows. On Hopper: 16-row blocks up to
    two rows an expert (half a row for experts of LARGE_EXPERT_BYTES or more), then the wgmma tiles: 64
    below 8 rows an expert, 128 below 96, 192 from 96."""
    assert moe_ext.choose_block_size(T, topk, E, expert_bytes=expert_bytes) == plain
    assert moe_ext.choose_block_size(T, topk, E, hopper=True, expert_bytes=expert_bytes) == hopper


@pytest.mark.parametrize("block_size", [16, 32, 128, 192])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_use_fused_silu(block_size, dtype):
    """fuse_silu's default: the fused first GEMM for 16-bit CUDA activations at prefill-sized blocks, never on
    Hopper (the plain wgmma tiles and silu_and_mul measured faster) nor on the CPU. Only the attributes the rule
    reads, so it runs without a GPU."""
    from types import SimpleNamespace

    from moe_ext.fused_moe import use_fused_silu
    x = SimpleNamespace(is_cuda=True, dtype=dtype)
    expect = dtype != torch.float32 and block_size >= 32
    assert use_fused_silu(x, block_size) == expect
    assert not use_fused_silu(x, block_size, hopper=True)
    assert not use_fused_silu(SimpleNamespace(is_cuda=False, dtype=dtype), block_size)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    """torch.compile(fullgraph=True) of fused_moe with a dynamic token count: no graph break, the
    compiled graph matches eager on both sides of the routing threshold and of the expert-GEMV switch
    (T = 1 takes the GEMVs at this shape, E = 32 and topk 4)."""
    require_all(device)
    torch._dynamo.reset()
    compiled = torch.compile(moe_ext.fused_moe, fullgraph=True, dynamic=True)
    for T in (3, 40, 1, 5, 64):
        x, w13, w2, logits, topk, routing = make_layer("deepseek", T, torch.bfloat16, device, seed=T)
        with torch.no_grad():
            got = compiled(x, w13, w2, logits, topk, **routing)
        want = moe_ext.fused_moe(x, w13, w2, logits, topk, **routing)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("style", ["deepseek", "qwen3"])
def test_route_compiles_once(device, style):
    """Issue 4's dispatch under torch.compile with a dynamic token count: route() takes the fused op at every T
    (the op picks its kernels inside), so one graph serves T = 2 ... 1024, across the single block, the grid and
    the pair on CUDA, with no graph break and no recompile (T = 0 and 1 are specialized by dynamo, as any size)."""
    require_kernel("fused_topk_align", device)
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(moe_ext.route, backend=counter, fullgraph=True, dynamic=True)
    for T in (2, 5, 16, 17, 33, 200, 1024):
        _, _, _, logits, topk, routing = make_layer(style, T, torch.bfloat16, device, seed=T)
        logits = logits.to(torch.bfloat16)
        got = compiled(logits, topk, 16, **routing)
        want = moe_ext.route(logits, topk, 16, **routing)
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    assert counter.frame_count == 1, counter.frame_count


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("T", [1, 8])
def test_cuda_graph_capture(T):
    """The whole layer captured in a CUDA graph, replayed on new inputs, equals eager (T = 1: the
    expert GEMVs; T = 8: fused routing and the grouped GEMMs)."""
    require_all("cuda")
    x, w13, w2, logits, topk, routing = make_layer("deepseek", T, torch.bfloat16, "cuda")
    static_x, static_logits = x.clone(), logits.clone()
    graph, static_out = capture_graph(lambda: moe_ext.fused_moe(static_x, w13, w2, static_logits, topk, **routing),
                                      warmup=2)
    for seed in range(3):
        x2, _, _, logits2, _, _ = make_layer("deepseek", T, torch.bfloat16, "cuda", seed=100 + seed)
        static_x.copy_(x2)
        static_logits.copy_(logits2)
        graph.replay()
        torch.testing.assert_close(static_out, moe_ext.fused_moe(x2, w13, w2, logits2, topk, **routing), rtol=0, atol=0)
