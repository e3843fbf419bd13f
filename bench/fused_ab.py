"""Builds bench/fused_ab.cu against several copies of the kernel headers and runs them in turn, twice
(a variant is a folder holding kernels/ and core/, as csrc does; copy csrc or `git archive` an older
revision there and edit it for an ablation). Torch-free; needs nvcc and a GPU.

    python bench/fused_ab.py new=csrc old=/tmp/old   # /tmp/old from: git archive REV csrc | tar -x ...

A variant whose kernels have the fused kernel's kPacked parameter (session 13 on) is built with
-DFUSED_AB_PACKED (-DFUSED_AB_PACKED_RULE in sessions 20-21, where fused_packed_rounds decides;
-DFUSED_AB_ROUNDS_RULE from session 22, where fused_rounds picks one of three instances, with
-DFUSED_AB_GATE_PATH or -DFUSED_AB_GATE_ENUM where the kernels take the gating's path as a template
argument), so it times the instances the extension launches. A variant folder may also hold a file
`ab_flags` of extra nvcc flags for the harness (e.g. -DFUSED_AB_ROUTER_LOOKAHEAD=false: the router's
other instance).
"""

import os
import sys

from ab_build import ROOT, build_and_run, header_has

variants = dict(arg.split("=", 1) for arg in sys.argv[1:]) or {"csrc": os.path.join(ROOT, "csrc")}


def flags(kernels):
    # A variant folder may hold ab_flags: extra -D flags for the harness (e.g. -DFUSED_AB_ROUTER_LOOKAHEAD=false).
    extra_file = os.path.join(os.path.dirname(kernels), "ab_flags")
    extra = open(extra_file).read().split() if os.path.exists(extra_file) else []
    if header_has(kernels, "fused_routing.cuh", "fused_rounds("):
        path = (["-DFUSED_AB_GATE_ENUM"] if header_has(kernels, "gating.cuh", "enum class GatePath")
                else ["-DFUSED_AB_GATE_PATH"] if header_has(kernels, "gating.cuh", "bool kByLogit") else [])
        return ["-DFUSED_AB_ROUNDS_RULE", *path, *extra]
    if header_has(kernels, "fused_routing.cuh", "fused_packed_rounds("):
        return ["-DFUSED_AB_PACKED_RULE", *extra]
    return (["-DFUSED_AB_PACKED"] if header_has(kernels, "fused_routing.cuh", "bool kPacked") else []) + extra


build_and_run("fused_ab.cu", variants, os.environ.get("FUSED_AB_BUILD", "/tmp/fused_ab"), nvcc_flags=["--fmad=false"],
              flags=flags)
