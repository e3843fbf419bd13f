"""Builds bench/fused_ab.cu against several copies of the kernel headers and runs them in turn, twice
(a variant is a folder holding kernels/ and core/, as csrc does; copy csrc or `git archive` an older
revision there and edit it for an ablation). Torch-free; needs nvcc and a GPU.

    python bench/fused_ab.py new=csrc old=/tmp/old   # /tmp/old from: git archive REV csrc | tar -x ...

A variant whose kernels have the fused kernel's kPacked parameter (session 13 on) is built with
-DFUSED_AB_PACKED, so it times the instances the extension launches.
"""

import concurrent.futures
import os
import subprocess
import sys

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
variants = dict(arg.split("=", 1) for arg in sys.argv[1:]) or {"csrc": os.path.join(root, "csrc")}
build = os.environ.get("FUSED_AB_BUILD", "/tmp/fused_ab")
os.makedirs(build, exist_ok=True)


def compile_variant(name):
    exe = os.path.join(build, name)
    cmd = ["nvcc", "-std=c++17", "-O3", "-arch=sm_90a", "--expt-relaxed-constexpr", "--fmad=false",
           f"-I{os.path.join(os.path.abspath(variants[name]), 'kernels')}", f'-DVARIANT="{name}"',
           os.path.join(root, "bench", "fused_ab.cu"), "-o", exe]
    with open(os.path.join(variants[name], "kernels", "fused_routing.cuh")) as f:
        if "bool kPacked" in f.read():
            cmd.insert(-3, "-DFUSED_AB_PACKED")
    subprocess.run(cmd, check=True)
    return exe


with concurrent.futures.ThreadPoolExecutor(8) as pool:
    exes = list(pool.map(compile_variant, variants))
for _ in range(2):
    for exe in exes:
        subprocess.run([exe], check=True)
