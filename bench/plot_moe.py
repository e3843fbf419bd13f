"""Plot bench_moe.py's results: one panel per model, % of floor against T (log scale), a line per path.

    python bench/plot_moe.py bench/results/<device>-moe.json    # writes bench/results/<device>-moe.png

Several JSON files (a run split with bench_moe.py --stem) are plotted together; the meta is the first's.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", type=Path, nargs="+")
    p.add_argument("--out", type=Path, default=None, help="default: results/<device>-moe.png beside the first JSON")
    args = p.parse_args()
    runs = [json.loads(f.read_text()) for f in args.json]
    meta, rows = runs[0]["meta"], [r for run in runs for r in run["rows"]]
    models = list(dict.fromkeys(r["model"] for r in rows))
    paths = list(dict.fromkeys(path for run in runs for path in run["meta"]["paths"]))
    cols = min(2, len(models))
    fig, axes = plt.subplots(-(-len(models) // cols), cols, figsize=(6 * cols, 4 * -(-len(models) // cols)),
                             squeeze=False)
    for ax, model in zip(axes.flat, models):
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["T"])
        for path in paths:
            pts = [(r["T"], r[f"{path}_pct"]) for r in mine if not math.isnan(r.get(f"{path}_pct", math.nan))]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=path)
        ax.set_xscale("log", base=2)
        ax.set_xticks([r["T"] for r in mine], [str(r["T"]) for r in mine])
        ax.set_title(f"{model} (bound: {', '.join(dict.fromkeys(r['bound'] for r in mine))})")
        ax.set_xlabel("tokens T")
        ax.set_ylabel("% of floor")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(models):]:
        ax.set_visible(False)
    ceil = meta.get("ceilings", {})
    fig.suptitle(f"MoE layer, {meta.get('dtype', '')} on {meta.get('device', '')}: % of floor (read "
                 f"{ceil.get('read_gbps', 0):.0f} GB/s, matmul {ceil.get('matmul_tflops', 0):.0f} TFLOP/s)")
    fig.tight_layout()
    first = args.json[0]
    out = args.out or first.with_name(first.name.rsplit("-moe", 1)[0] + "-moe.png")
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
