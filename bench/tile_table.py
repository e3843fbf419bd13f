"""The grouped GEMMs' tuned tile tables, csrc/cuda/grouped_gemm_table.h, emitted from the tuner's timings.

bench/tune_grouped_gemm.py times the launchers' configs on the model layers' GEMMs and writes
results/<device>-<stem>.json (with --silu, moe_grouped_gemm_silu's); `python bench/tune_grouped_gemm.py --emit-table
<json>...` then calls emit_table here. The header holds one table per op (TABLES below): moe_grouped_gemm's by
MmaBucket (shared) then GemmBucket, moe_grouped_gemm_silu's by MmaBucket then SiluBucket. Each results file fills
its op's table (its meta's "silu"); a table no file is given for is copied as it is. Each timed shape goes to its bucket of the heuristic by the
launcher's own code (moe_ext.ops.grouped_gemm_tile_bucket, host arithmetic: no GPU needed), and each bucket gets the
config with the least total time over its shapes, among the configs timed on all of them; the mma buckets, which
also serve GPUs without the Hopper tiles, take mma.sync configs only. The config the current header gives the
bucket keeps it unless its total is more than MARGIN above the least (the tuner's noise: in session 25's run, the
heuristic's own timing and its config's, the same kernel timed twice, differed by a median 0.4% a shape and up to
9%; and a 0.2% lead of config 17 over 15 in the Hopper 128-row bucket came out 0.8-1.2% behind in the layer at
T=1024, bench/results/h200-tile-table-s25.md). A bucket that no timed shape falls in keeps its config too. Shapes
of a run made with --generic-blocks (the block sizes fused_moe takes off Hopper) are bucketed as on a cc 8.0 GPU,
so they fill the mma buckets; the others as on the run's own GPU.

The buckets' order and names are the enums the header defines (TABLES below); which shapes fall in which bucket is
gemm_bucket and silu_bucket in csrc/cuda/grouped_gemm.cu.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER = ROOT / "csrc" / "cuda" / "grouped_gemm_table.h"
MARGIN = 0.02  # a bucket's config is replaced only by one with a total time more than this fraction less
GENERIC_CC = 80  # the compute capability a --generic-blocks run's shapes are bucketed for

MMA_BUCKETS = [  # (name, what falls in it): the first ten buckets of both tables, in this order (enum MmaBucket)
    ("kMma16Many", "mma.sync tiles, block_size <= 16, a reference tile's grid >= 2 CTAs an SM"),
    ("kMma16Few", "mma.sync tiles, block_size <= 16, a smaller grid"),
    ("kMma32Many", "mma.sync tiles, block_size <= 32, >= 2 CTAs a multiprocessor"),
    ("kMma32Few", "mma.sync tiles, block_size <= 32, a smaller grid"),
    ("kMma64Many", "mma.sync tiles, block_size <= 64, >= 2 CTAs a multiprocessor"),
    ("kMma64Few", "mma.sync tiles, block_size <= 64, a smaller grid"),
    ("kMma128Many", "mma.sync tiles, block_size <= 128, >= 2 CTAs a multiprocessor"),
    ("kMma128Few", "mma.sync tiles, block_size <= 128, a smaller grid"),
    ("kMmaLargeMany", "mma.sync tiles, block_size > 128, >= 2 CTAs a multiprocessor"),
    ("kMmaLargeFew", "mma.sync tiles, block_size > 128, a smaller grid"),
]
FIRST_HOPPER_BUCKET = len(MMA_BUCKETS)


@dataclass(frozen=True)
class Table:
    op: str  # the op whose heuristic reads the table
    enum: str  # its bucket enum (the Hopper buckets, after MmaBucket's)
    prefix: str  # its Hopper enumerators' prefix
    array: str  # the table's name
    first_wgmma_config: int  # the launcher's count of mma.sync configs (kNumMmaConfigs, kNumSiluMmaConfigs)
    hopper: tuple  # (suffix, what falls in it) for the buckets after the mma ones

    @property
    def buckets(self) -> list[tuple[str, str]]:
        return MMA_BUCKETS + [(self.prefix + name, what) for name, what in self.hopper]

    @property
    def count(self) -> str:
        return f"kNum{self.enum}s"


GEMM = Table("moe_grouped_gemm", "GemmBucket", "k", "kTunedGemmConfig", 12, (
    ("HopperDecode", "Hopper, block_size < 64, rows <= 16 E, the 64 x 128 tile's grid >= 2 CTAs an SM"),
    ("HopperNarrow", "Hopper, block_size >= 64 (not a multiple of 192), rows <= 16 E"),
    ("Hopper64Many", "Hopper, 64 <= block_size < 128, rows > 16 E, the 64 x 256 tile's grid >= 2 CTAs an SM"),
    ("Hopper64Few", "Hopper, 64 <= block_size < 128, rows > 16 E, a smaller grid"),
    ("Hopper128", "Hopper, block_size >= 128 (not a multiple of 192), rows > 16 E"),
    ("Hopper192", "Hopper, block_size a multiple of 192"),
))
SILU = Table("moe_grouped_gemm_silu", "SiluBucket", "kSilu", "kTunedSiluConfig", 4, (
    ("Hopper64Many", "Hopper, 32 < block_size <= 64, kMma64Many's shapes"),
    ("Hopper64Few", "Hopper, 32 < block_size <= 64, kMma64Few's shapes"),
    ("HopperNarrow", "Hopper, block_size >= 128 (not a multiple of 192), rows <= 16 E"),
    ("Hopper128", "Hopper, block_size >= 128 (not a multiple of 192), rows > 16 E"),
    ("Hopper192", "Hopper, block_size a multiple of 192"),
))
TABLES = (GEMM, SILU)

PREAMBLE = """\
// The grouped GEMMs' tile config for each bucket of their heuristics (gemm_bucket and silu_bucket in
// csrc/cuda/grouped_gemm.cu sort a call's shapes into the buckets; these tables name the config each bucket runs).
// GENERATED by `python bench/tune_grouped_gemm.py --emit-table <results json>...` (bench/tile_table.py) from the
// tuner's timings: do not edit by hand; re-tune and re-emit.
// rule: per bucket, the config with the least total time over the bucket's timed shapes, among the configs timed
// on all of them (mma.sync configs only in the mma buckets), unless the bucket's config was within 2% of it (then
// kept: the tuner's noise); a bucket no timed shape falls in keeps its config.
#pragma once

namespace moe_ext::cuda {

// Both tables' first buckets: the mma.sync tiles' (mma_bucket), by block size, then many or few by whether a
// reference tile's grid fills the GPU; each table's own buckets follow.
enum MmaBucket : int {
"""
_MMA_WIDTH = max(len(name) for name, _ in MMA_BUCKETS) + 1
PREAMBLE += "".join(f"  {name + ',':<{_MMA_WIDTH}}  // {what}\n" for name, what in MMA_BUCKETS)
PREAMBLE += "  kNumMmaBuckets\n};\n"
EPILOGUE = "\n}  // namespace moe_ext::cuda\n"


def section_re(table: Table) -> re.Pattern:
    """A table's section of the header: its comment line through the end of its array."""
    return re.compile(rf"^// {table.op}: .*?^constexpr int {table.array}\[.*?^}};\n", re.M | re.S)


def read_header(text: str, table: Table = GEMM) -> tuple[list[int], list[str]]:
    """(config per bucket, source paths) of one table of a header emit_table wrote."""
    m = section_re(table).search(text)
    if m is None:
        raise ValueError(f"grouped_gemm_table.h: no {table.op} table")
    section = m.group(0)
    configs = {m.group(2): int(m.group(1)) for m in re.finditer(r"^\s+(\d+),\s+// (\w+):", section, re.M)}
    missing = [name for name, _ in table.buckets if name not in configs]
    if missing:
        raise ValueError(f"grouped_gemm_table.h: no config for {missing}")
    sources = []
    for m in re.finditer(r"^// sources: (.*)$", section, re.M):
        sources += [s for s in m.group(1).split() if s.endswith(".json")]
    return [configs[name] for name, _ in table.buckets], sources


def results_op(path: Path) -> str:
    """The op a tuner results file timed."""
    return SILU.op if json.loads(path.read_text())["meta"].get("silu") else GEMM.op


def bucketed_shapes(path: Path, bucket_of) -> list[tuple[int, str, dict[int, float]]]:
    """(bucket, shape label, {config: µs}) for each shape of a tuner results file; bucket_of(op, rows, N, K, E,
    num_blocks, block_size, cc, num_sms) -> bucket index or -1 (shapes outside every bucket are left out)."""
    data = json.loads(path.read_text())
    meta = data["meta"]
    op = SILU.op if meta.get("silu") else GEMM.op
    generic = meta.get("generic_blocks", "--generic-blocks" in meta.get("command", ""))
    cc = GENERIC_CC if generic else meta.get("compute_capability", 90)
    sms = meta.get("num_sms", 132)
    shapes: dict[tuple, dict] = {}
    for r in data["rows"]:
        if r["config"] < 0:  # the heuristic's own timing
            continue
        key = (r["shape"], r["T"], r["block_size"])
        s = shapes.setdefault(key, dict(r=r, times={}))
        s["times"][r["config"]] = r["us"]
    out = []
    for (name, T, bs), s in shapes.items():
        r = s["r"]
        rows = r.get("rows", r["T"] * r["topk"])
        N = r["N"] // 2 if op == SILU.op else r["N"]  # the SiLU op's N is I; the tuner records w13's 2I rows
        b = bucket_of(op, rows, N, r["K"], r["E"], r["num_blocks"], bs, cc, sms)
        if b >= 0:
            out.append((b, f"{name} T={T} bs={bs}", s["times"]))
    return out


def pick(shapes: list[tuple[str, dict[int, float]]], mma_below: int | None, incumbent: int) -> tuple[int, str] | None:
    """(config, note for the header) for a bucket's timed shapes: the least total time among the configs timed on
    every shape (below mma_below only, where given; ties: the lower index), or the incumbent where its total is within
    MARGIN of that; None if no config was timed on all of them."""
    common = set.intersection(*(set(t) for _, t in shapes))
    if mma_below is not None:
        common = {c for c in common if c < mma_below}
    totals = {c: sum(t[c] for _, t in shapes) for c in common}
    ranked = sorted(common, key=lambda c: (totals[c], c))
    if not ranked:
        return None
    best = ranked[0]
    note = f"{len(shapes)} shapes, "
    if incumbent != best and incumbent in totals and totals[incumbent] <= totals[best] * (1 + MARGIN):
        return incumbent, note + (f"{totals[incumbent]:.1f} us (least: config {best}, {totals[best]:.1f} us, "
                                  f"within {MARGIN:.0%})")
    note += f"{totals[best]:.1f} us"
    if len(ranked) > 1:
        note += f" (next: config {ranked[1]}, {totals[ranked[1]]:.1f} us)"
    return best, note


def section(table: Table, configs: list[int], notes: list[str], sources: list[str]) -> str:
    """One table's text: its sources, the bucket enum, the array of configs with a note each."""
    lines = [f"// {table.op}: bucket by {'gemm_bucket' if table is GEMM else 'silu_bucket'}, config an index into "
             f"its launcher's config table\n"]
    src_line = "// sources:"
    for src in sources:
        if len(src_line) + 1 + len(src) > 120:
            lines.append(src_line + "\n")
            src_line = "// sources:"
        src_line += " " + src
    if sources:
        lines.append(src_line + "\n")
    lines.append(f"enum {table.enum} : int {{\n")
    own = table.buckets[FIRST_HOPPER_BUCKET:]
    width = max(len(name) for name, _ in own) + 1
    lines.append(f"  {own[0][0]} = kNumMmaBuckets,  // {own[0][1]}\n")  # numbered on from MmaBucket
    lines += [f"  {name + ',':<{width}}  // {what}\n" for name, what in own[1:]]
    lines.append(f"  {table.count}\n}};\n\nconstexpr int {table.array}[{table.count}] = {{\n")
    for (name, _), cfg, note in zip(table.buckets, configs, notes):
        lines.append(f"    {str(cfg) + ',':<4} // {name}: {note}\n")
    lines.append("};\n")
    return "".join(lines)


def emit_table(sources: list[str], current: str, bucket_of, root: Path = ROOT) -> str:
    """The header text for the tuner results `sources` (paths relative to root); buckets they do not reach keep
    their config in `current` (the header's text now), and a table none of them timed is copied from it."""
    parts = [PREAMBLE]
    for table in TABLES:
        mine = [s for s in sources if results_op(root / s) == table.op]
        if not mine:
            parts.append("\n" + section_re(table).search(current).group(0))
            continue
        configs, _ = read_header(current, table)
        by_bucket: dict[int, list] = {}
        for src in mine:
            for b, label, times in bucketed_shapes(root / src, bucket_of):
                by_bucket.setdefault(b, []).append((label, times))
        chosen, notes = [], []
        for i in range(len(table.buckets)):
            shapes = by_bucket.get(i, [])
            mma_below = table.first_wgmma_config if i < FIRST_HOPPER_BUCKET else None
            choice = pick(shapes, mma_below, configs[i]) if shapes else None
            if choice is None:
                why = "no config timed on all its shapes" if shapes else "no timed shape"
                choice = configs[i], f"kept ({why})"
            chosen.append(choice[0])
            notes.append(choice[1])
        parts.append("\n" + section(table, chosen, notes, mine))
    parts.append(EPILOGUE)
    return "".join(parts)


def op_bucket_of():
    """bucket_of through the launcher's own heuristic (a CUDA build of moe_ext; no GPU needed)."""
    import moe_ext

    def bucket_of(op, rows, N, K, E, num_blocks, block_size, cc, num_sms):
        return moe_ext.ops.grouped_gemm_tile_bucket(op, rows, N, K, E, num_blocks, block_size, cc, num_sms)

    return bucket_of
