"""Timing helpers shared by the benchmarks: ceilings measured in the same run, event timing after
warm-up (median of many runs), CUDA-graph replay time per call, and result files."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_tag() -> str:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return name.replace("NVIDIA ", "").replace(" ", "-").lower()


def warm_up_device(seconds: float = 1.0) -> None:
    """Keeps the GPU busy with device copies for about `seconds`, so the first timed case does not run
    while clocks and memory are still leaving their idle state (session 14: the first row of an
    elementwise table, and its same-bytes copy, read 5-6% slow)."""
    src = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    while True:
        for _ in range(50):
            dst.copy_(src)
        stop.record()
        stop.synchronize()
        if start.elapsed_time(stop) >= seconds * 1e3:
            return


def time_events(fn, iters: int = 100, warmup: int = 10) -> float:
    """Median µs of fn() over iters calls, each bracketed by CUDA events, after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3


def capture_calls(fn, calls_per_graph: int) -> torch.cuda.CUDAGraph:
    """fn called 3 times on a side stream (warm-up), then captured calls_per_graph times in one CUDA graph,
    replayed 3 times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls_per_graph):
            fn()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    return graph


def time_graph(fn, calls_per_graph: int = 20, replays: int = 50) -> float:
    """Median µs per call of fn captured calls_per_graph times in one CUDA graph and replayed."""
    graph = capture_calls(fn, calls_per_graph)
    times = []
    for _ in range(replays):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / calls_per_graph)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy rate in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    us = time_events(lambda: dst.copy_(src), iters=20, warmup=3)
    return 2 * nbytes / (us * 1e-6) / 1e9


def write_results(stem: str, meta: dict, rows: list[dict], table: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    # The MOE_EXT_* settings the run was made under (config overrides, paths) belong to its command.
    env = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MOE_EXT_"))
    meta = dict(meta, device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                torch=torch.__version__, cuda=torch.version.cuda,
                command=" ".join(([env] if env else []) + ["python"] + sys.argv))
    path = RESULTS / f"{device_tag()}-{stem}"
    path.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    header = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    path.with_suffix(".md").write_text(f"# {stem}\n\n{header}\n\n{table}\n")
    return path


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec)."""
    out = ["| " + " | ".join(h for _, h, _ in columns) + " |",
           "|" + "|".join("---:" if f else "---" for _, _, f in columns) + "|"]
    for r in rows:
        out.append("| " + " | ".join(format(r[k], f) if f else str(r[k]) for k, _, f in columns) + " |")
    return "\n".join(out)


def time_kernels(fn, calls: int = 20) -> float:
    """Mean µs of GPU kernel time per call of fn (sum of its kernels' durations, from the profiler),
    i.e. the time with launch gaps and host overhead removed."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total = 0.0
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            total += evt.time_range.elapsed_us()
    return total / calls


class Calibration:
    """The cheapest kernel PyTorch launches (a one-element in-place add_), timed eagerly and in graph
    replay now, and by the profiler at the end (kernel_time), since the profiler slows later launches."""

    def __init__(self):
        self.tiny = torch.zeros(1, device="cuda")
        self.times = dict(eager_us=time_events(self.add, iters=200), graph_us=time_graph(self.add))
        print(f"calibration, 1-element add_: eager {self.times['eager_us']:.2f} us, "
              f"graph {self.times['graph_us']:.2f} us/call")

    def add(self):
        self.tiny.add_(1)

    def kernel_time(self, skip: bool) -> dict:
        self.times["kernel_us"] = float("nan") if skip else time_kernels(self.add)
        return {k: round(v, 2) for k, v in self.times.items()}


@contextlib.contextmanager
def environment(settings):
    """Sets the variables of `settings` ({name: value}) for the body, then restores them."""
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def parse_variant(spec):
    """'name:ENV=V,ENV2=V2' (or 'name') -> (name, {ENV: V, ...})."""
    name, _, env = spec.partition(":")
    return name, dict(kv.split("=", 1) for kv in env.split(",") if kv)
