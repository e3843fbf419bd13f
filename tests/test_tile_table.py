"""The grouped GEMMs' tuned tile tables (csrc/cuda/grouped_gemm_table.h: moe_grouped_gemm's and
moe_grouped_gemm_silu's) and their emitter (bench/tile_table.py).

The header is what `bench/tune_grouped_gemm.py --emit-table` writes from the results it names: emitting again from
those results reproduces it byte for byte. The emitter's rule is checked on made-up timings; the launcher's bucket
query against its config query, for both ops. Host code only (CUDA builds): no GPU needed.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

import moe_ext

from conftest import FIRST_WGMMA_CONFIG, FIRST_WGMMA_SILU_CONFIG, require_kernel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import tile_table  # noqa: E402


def test_emitter_knows_the_launchers_families():
    """The emitter keeps wgmma configs out of the mma buckets by the launchers' first wgmma index."""
    assert tile_table.GEMM.first_wgmma_config == FIRST_WGMMA_CONFIG
    assert tile_table.SILU.first_wgmma_config == FIRST_WGMMA_SILU_CONFIG


@pytest.fixture(autouse=True)
def _cuda_build():
    require_kernel("moe_grouped_gemm", "cuda")  # the table and its queries exist in CUDA builds only


def test_header_is_the_emitters_output():
    """Re-emitting from the results the header names gives the header itself: both tables were made by the tuner."""
    text = tile_table.HEADER.read_text()
    sources = []
    for table in tile_table.TABLES:
        _, mine = tile_table.read_header(text, table)
        assert mine, f"the {table.op} table names no tuner results"
        for src in mine:
            assert (ROOT / src).is_file(), f"{src}: the results the table was emitted from are not in the repository"
            assert tile_table.results_op(ROOT / src) == table.op, f"{src}: results of the other op"
        sources += mine
    assert tile_table.emit_table(sources, text, tile_table.op_bucket_of()) == text


@pytest.mark.parametrize("table", tile_table.TABLES, ids=lambda t: t.op)
def test_bucket_query_matches_config_query(table):
    """For shapes across every bucket, the heuristic's config is the table's config of the bucket it reports."""
    configs, _ = tile_table.read_header(tile_table.HEADER.read_text(), table)
    rng = random.Random(0)
    seen = set()
    for _ in range(3000):
        cc, sms = rng.choice([(80, 108), (89, 128), (90, 132), (90, 78)])
        E = rng.choice([1, 8, 64, 128, 256])
        rows = rng.choice([1, 4, 8, 32, 128, 512, 2048, 8192, 32768])
        N = rng.choice([64, 768, 2048, 4096, 28672])
        bs = rng.choice([16, 32, 48, 64, 96, 128, 192, 256, 384])
        blocks = moe_ext.ops.align_max_padded(rows, E, bs) // bs  # as the alignment sizes them
        K = rng.choice([768, 2048, 100])
        bucket = moe_ext.ops.grouped_gemm_tile_bucket(table.op, rows, N, K, E, blocks, bs, cc, sms)
        cfg = moe_ext.ops.grouped_gemm_tile_config(table.op, rows, N, K, E, blocks, bs, cc, sms)
        if K % 8:
            assert bucket == -1
            continue
        assert 0 <= bucket < len(table.buckets) and cfg == configs[bucket], (rows, N, K, E, blocks, bs, cc, sms)
        assert (bucket >= tile_table.FIRST_HOPPER_BUCKET) <= (cc == 90), "a Hopper bucket off Hopper"
        seen.add(bucket)
    assert len(seen) >= 8, sorted(seen)
    with pytest.raises(ValueError, match="grouped_gemm_tile_bucket: block_size"):
        moe_ext.ops.grouped_gemm_tile_bucket(table.op, 8, 64, 64, 2, 1, 0, 90, 132)
    with pytest.raises(ValueError, match="grouped_gemm_tile_bucket: op must be"):
        moe_ext.ops.grouped_gemm_tile_bucket("moe_gemv_silu", 8, 64, 64, 2, 1, 16, 90, 132)


def bucket(T, topk, E, N, K, block_size, cc=90, sms=132, table=tile_table.GEMM):
    """The bucket name of a model GEMM: rows = T * topk, blocks as the alignment sizes them."""
    rows = T * topk
    blocks = moe_ext.ops.align_max_padded(rows, E, block_size) // block_size
    b = moe_ext.ops.grouped_gemm_tile_bucket(table.op, rows, N, K, E, blocks, block_size, cc, sms)
    return table.buckets[b][0] if b >= 0 else None


def test_buckets_of_model_gemms():
    """Where the model layers' GEMMs fall (gemm_bucket's structure, as bench/NOTES.md sessions 9-17 measured it)."""
    # Off Hopper (cc 8.0, 108 multiprocessors): the mma rows by block size, many or few CTAs.
    assert bucket(16, 8, 128, 1536, 2048, 16, cc=80, sms=108) == "kMma16Many"
    assert bucket(1024, 8, 128, 1536, 2048, 128, cc=80, sms=108) == "kMma128Many"
    assert bucket(4, 2, 8, 4096, 14336, 16, cc=75, sms=40) is None  # no tensor-core table before sm_80
    assert bucket(3, 2, 8, 77, 111, 16) is None  # K % 8 != 0: the unaligned instance
    if bucket(4096, 8, 128, 1536, 2048, 192) != "kHopper192":
        pytest.skip("a build without sm_90a code: no Hopper tiles")
    # Hopper (cc 9.0, 132 multiprocessors).
    assert bucket(2, 2, 8, 4096, 14336, 16).startswith("kMma16")  # Mixtral w2 T=2: the 64 x 128 grid under 2 an SM
    assert bucket(2, 2, 8, 28672, 4096, 16) == "kHopperDecode"  # Mixtral w13 T=2
    assert bucket(16, 8, 256, 4096, 7168, 16) == "kHopperDecode"  # DeepSeek-V3 w13 T=16
    assert bucket(4, 2, 8, 4096, 14336, 64) == "kHopperNarrow"  # Mixtral w2 T=4 (64-row blocks)
    assert bucket(256, 8, 128, 2048, 768, 128) == "kHopperNarrow"  # Qwen3 w2 T=256: 16 rows an expert
    assert bucket(512, 8, 128, 2048, 768, 128) == "kHopper128"  # 32 rows an expert
    assert bucket(1024, 8, 256, 4096, 7168, 128) == "kHopper128"  # DeepSeek-V3 w13 T=1024
    assert bucket(64, 8, 128, 2048, 768, 64) == "kHopperNarrow"
    assert bucket(512, 8, 32, 2048, 768, 64) == "kHopper64Many"  # 128 rows an expert in 64-row blocks
    assert bucket(512, 8, 32, 256, 768, 64) == "kHopper64Few"
    assert bucket(4096, 8, 256, 7168, 2048, 192) == "kHopper192"


def test_silu_buckets_of_model_gemms():
    """Where the model layers' first GEMMs fall in silu_bucket (N is I)."""
    silu = tile_table.SILU
    # Off Hopper: the mma rows, split by the SiLU tiles' own reference configs.
    assert bucket(1, 8, 128, 768, 2048, 16, cc=80, sms=108, table=silu) == "kMma16Few"
    assert bucket(1024, 8, 256, 2048, 7168, 32, cc=80, sms=108, table=silu) == "kMma32Many"
    assert bucket(4096, 8, 128, 768, 2048, 128, cc=80, sms=108, table=silu) == "kMma128Many"
    if bucket(4096, 8, 256, 2048, 7168, 192, table=silu) != "kSiluHopper192":
        pytest.skip("a build without sm_90a code: no Hopper tiles")
    # Hopper: the 64-row mma row as buckets of its own, smaller blocks the mma rows; 128-row blocks split by narrow.
    assert bucket(4, 2, 8, 14336, 4096, 64, table=silu) == "kSiluHopper64Many"  # Mixtral T=4 (64-row blocks)
    assert bucket(1, 8, 128, 768, 2048, 16, table=silu) == "kMma16Few"  # Qwen3 T=1
    assert bucket(128, 8, 128, 768, 2048, 128, table=silu) == "kSiluHopperNarrow"  # Qwen3 T=128: 8 rows an expert
    assert bucket(1024, 8, 256, 2048, 7168, 128, table=silu) == "kSiluHopper128"  # DeepSeek-V3 T=1024


def write_results(tmp_path, name, rows, meta):
    path = tmp_path / name
    path.write_text(json.dumps(dict(meta=meta, rows=rows)))
    return str(path)


def timing_rows(shape, configs_us, rows=8, N=4096, K=2048, E=64, num_blocks=8, block_size=16):
    return [dict(shape=shape, T=1, topk=8, rows=rows, N=N, K=K, E=E, num_blocks=num_blocks, block_size=block_size,
                 config=c, us=us) for c, us in configs_us.items()]


def test_emit_rule(tmp_path):
    """Least total time among the configs timed on every shape of a bucket; the mma buckets take mma.sync configs
    only; a bucket's config stays unless another is more than 2% faster; buckets no shape reaches keep their config;
    the output reads back."""
    current = tile_table.HEADER.read_text()
    before, _ = tile_table.read_header(current)
    fake = {1: 3, 2: 3, 3: 11, 4: 14, 5: 4, 6: 6}  # rows -> bucket

    def bucket_of(op, rows, N, K, E, num_blocks, block_size, cc, num_sms):
        assert op == "moe_grouped_gemm"
        return fake[rows] if cc == 90 else 0

    inc4, inc6 = before[4], before[6]  # mma buckets' configs now; rivals of a different mma.sync index
    hopper = timing_rows("a", {0: 10.0, 1: 5.0, 18: 1.0, 7: 2.0}, rows=1) + \
        timing_rows("b", {0: 10.0, 1: 9.0, 18: 1.0}, rows=2) + \
        timing_rows("c", {15: 4.0, 18: 3.0, -1: 0.5}, rows=3) + \
        timing_rows("d", {before[14]: 4.0, 16: 4.0, 17: 4.0}, rows=4) + \
        timing_rows("e", {inc4: 101.0, (inc4 + 1) % 12: 100.0}, rows=5) + \
        timing_rows("f", {inc6: 103.0, (inc6 + 1) % 12: 100.0}, rows=6)
    generic = timing_rows("g", {2: 7.0, 5: 6.0})
    src = [write_results(tmp_path, "h.json", hopper, dict(compute_capability=90, num_sms=132)),
           write_results(tmp_path, "g.json", generic, dict(command="python tune_grouped_gemm.py --generic-blocks"))]
    text = tile_table.emit_table(src, current, bucket_of, root=Path("/"))
    after, sources = tile_table.read_header(text)
    assert sources == src
    assert tile_table.read_header(text, tile_table.SILU) == tile_table.read_header(current, tile_table.SILU)
    # bucket 3 (an mma bucket): 18 is not mma.sync and 7 was not timed on "b": 1 (14 us) over 0 (20 us)
    assert after[3] == 1
    assert after[11] == 18  # the heuristic's own timing (-1) never counts
    assert after[14] == before[14]  # a tie: the bucket's config stays
    assert after[0] == 5  # the --generic-blocks file bucketed for cc 8.0
    assert after[4] == inc4  # 1% slower: kept
    assert after[6] == (inc6 + 1) % 12  # 3% slower: replaced
    for b in set(range(len(tile_table.GEMM.buckets))) - {0, 3, 4, 6, 11, 14}:
        assert after[b] == before[b]
    assert f"// kMma64Many: 1 shapes, 101.0 us (least: config {(inc4 + 1) % 12}, 100.0 us, within 2%)" in text
    assert "// kMma32Few: 2 shapes, 14.0 us (next: config 0, 20.0 us)" in text
    assert "kept (no timed shape)" in text
    assert max(len(line) for line in text.splitlines()) <= 120


def test_emit_silu_table(tmp_path):
    """SiLU results (meta silu) fill the SiLU table only, bucketed with N = I (the tuner records w13's 2I rows),
    mma.sync configs (below 4) only in its mma buckets; the plain table is copied as it was."""
    current = tile_table.HEADER.read_text()
    before, _ = tile_table.read_header(current, tile_table.SILU)
    seen_n = []

    def bucket_of(op, rows, N, K, E, num_blocks, block_size, cc, num_sms):
        assert op == "moe_grouped_gemm_silu"
        seen_n.append(N)
        return {1: 0, 2: 12}[rows]

    rows = timing_rows("a", {1: 9.0, 3: 8.0, 5: 1.0}, rows=1, N=1536) + \
        timing_rows("b", {5: 3.0, 6: 2.0}, rows=2, N=1536)
    src = [write_results(tmp_path, "s.json", rows, dict(silu=True, compute_capability=90, num_sms=132))]
    text = tile_table.emit_table(src, current, bucket_of, root=Path("/"))
    after, sources = tile_table.read_header(text, tile_table.SILU)
    assert sources == src and set(seen_n) == {768}
    assert after[0] == 3  # 5 is a wgmma config: not in an mma bucket
    assert after[12] == 6
    assert after[1:12] == before[1:12]
    gemm_section = tile_table.section_re(tile_table.GEMM)
    assert gemm_section.search(text).group(0) == gemm_section.search(current).group(0)
    assert max(len(line) for line in text.splitlines()) <= 120


@pytest.mark.parametrize("table,env", [(tile_table.GEMM, "MOE_EXT_GROUPED_GEMM_TABLE"),
                                       (tile_table.SILU, "MOE_EXT_GROUPED_GEMM_SILU_TABLE")], ids=["gemm", "silu"])
def test_table_override_env(monkeypatch, table, env):
    """MOE_EXT_GROUPED_GEMM[_SILU]_TABLE (a candidate table, one config per bucket) replaces the compiled table for
    its op only, as the config query and the launch read it; a malformed value is a ValueError naming the variable."""
    n = len(table.buckets)
    candidate = [(3 * b + 1) % table.first_wgmma_config for b in range(n)]
    monkeypatch.setenv(env, ",".join(map(str, candidate)))
    other = tile_table.SILU if table is tile_table.GEMM else tile_table.GEMM
    other_configs, _ = tile_table.read_header(tile_table.HEADER.read_text(), other)
    for T, topk, E, N, K, bs, cc in [(1, 8, 128, 768, 2048, 16, 80), (1024, 8, 256, 2048, 7168, 32, 80),
                                     (4096, 8, 128, 768, 2048, 128, 90), (4096, 8, 256, 2048, 7168, 192, 90)]:
        rows = T * topk
        blocks = moe_ext.ops.align_max_padded(rows, E, bs) // bs
        b = moe_ext.ops.grouped_gemm_tile_bucket(table.op, rows, N, K, E, blocks, bs, cc, 132)
        assert moe_ext.ops.grouped_gemm_tile_config(table.op, rows, N, K, E, blocks, bs, cc, 132) == candidate[b]
        ob = moe_ext.ops.grouped_gemm_tile_bucket(other.op, rows, N, K, E, blocks, bs, cc, 132)
        assert moe_ext.ops.grouped_gemm_tile_config(other.op, rows, N, K, E, blocks, bs, cc, 132) == other_configs[ob]
    for bad in (",".join(["1"] * (n - 1)), ",".join(["1"] * (n + 1)), ",".join(["999"] * n), "1;2"):
        monkeypatch.setenv(env, bad)
        with pytest.raises(ValueError, match=env):
            moe_ext.ops.grouped_gemm_tile_config(table.op, 8, 768, 2048, 128, 8, 16, 80, 132)
