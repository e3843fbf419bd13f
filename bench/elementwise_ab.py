"""Builds bench/elementwise_ab.cu with several copies of csrc/cuda/activation.cu (and the headers beside
it) and runs them in turn, twice (a variant is a folder laid out as csrc; `git archive REV csrc | tar -x`
an older revision there, or copy csrc and edit it). Torch-free; needs nvcc and a GPU.

    python bench/elementwise_ab.py new=csrc old=/tmp/old/csrc [--tokens 1024 4096 16384]
"""

import argparse
import os

from ab_build import ROOT, build_and_run

p = argparse.ArgumentParser()
p.add_argument("variants", nargs="*", default=[f"csrc={os.path.join(ROOT, 'csrc')}"], help="NAME=FOLDER")
p.add_argument("--tokens", nargs="+", default=["1024", "4096", "16384"])
args = p.parse_args()
build_and_run("elementwise_ab.cu", dict(v.split("=", 1) for v in args.variants),
              os.environ.get("ELEMENTWISE_AB_BUILD", "/tmp/elementwise_ab"), run_args=args.tokens,
              sources=lambda folder: [os.path.join(folder, "cuda", "activation.cu")])
