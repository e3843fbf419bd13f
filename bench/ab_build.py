"""Shared by the torch-free A/B harness drivers (bench/fused_ab.py, bench/elementwise_ab.py): build one
harness source against several variants of the kernel headers (a variant is a folder holding
kernels/ and core/, as csrc does), in parallel, then run the binaries in turn, twice."""

import concurrent.futures
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_and_run(source, variants, build_dir, flags=lambda kernels: [], sources=lambda folder: [], nvcc_flags=(),
                  run_args=()):
    """variants: {name: folder}; flags(kernels_dir) -> extra -D flags for that variant's headers;
    sources(folder) -> the variant's files compiled with the harness."""
    os.makedirs(build_dir, exist_ok=True)

    def compile_variant(name):
        folder = os.path.abspath(variants[name])
        kernels = os.path.join(folder, "kernels")
        exe = os.path.join(build_dir, name)
        subprocess.run(["nvcc", "-std=c++17", "-O3", "-arch=sm_90a", "--expt-relaxed-constexpr", *nvcc_flags,
                        f"-I{kernels}", f'-DVARIANT="{name}"', *flags(kernels),
                        os.path.join(ROOT, "bench", source), *sources(folder), "-o", exe], check=True)
        return exe

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        exes = list(pool.map(compile_variant, variants))
    for _ in range(2):
        for exe in exes:
            subprocess.run([exe, *run_args], check=True)


def header_has(kernels, header, text):
    with open(os.path.join(kernels, header)) as f:
        return text in f.read()
