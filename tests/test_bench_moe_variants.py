"""bench_moe.py's moe_ext variants (--variants, through bench/common.py's parse_variant and environment) and
per-row input seeds (host-side helpers; no GPU needed)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_moe  # noqa: E402
from common import parse_variant  # noqa: E402


def test_variant_spec():
    assert parse_variant("c3:MOE_EXT_GEMV_COMBINE_CONFIG=3,MOE_EXT_PDL=0") == (
        "c3", {"MOE_EXT_GEMV_COMBINE_CONFIG": "3", "MOE_EXT_PDL": "0"})
    assert parse_variant("default") == ("default", {})


def test_with_environment_sets_during_call_and_restores(monkeypatch):
    name = "MOE_EXT_BENCH_TEST_VAR"
    seen = []
    fn = lambda *args: seen.append((os.environ.get(name), args)) or "out"  # noqa: E731
    monkeypatch.delenv(name, raising=False)
    assert bench_moe.with_environment({name: "7"}, fn)(1, 2) == "out"
    assert seen == [("7", (1, 2))] and name not in os.environ
    monkeypatch.setenv(name, "old")
    bench_moe.with_environment({name: "8"}, fn)()
    assert seen[-1][0] == "8" and os.environ[name] == "old"

    def boom():
        raise RuntimeError("kernel failed")

    with pytest.raises(RuntimeError):
        bench_moe.with_environment({name: "9"}, boom)()
    assert os.environ[name] == "old"


def test_input_seed_depends_on_the_row_only():
    assert bench_moe.input_seed("deepseek-v3", 4) == bench_moe.input_seed("deepseek-v3", 4)
    seeds = {bench_moe.input_seed(m, t) for m in ("deepseek-v3", "qwen3-30b-a3b") for t in (-1, 1, 4, 16)}
    assert len(seeds) == 8
