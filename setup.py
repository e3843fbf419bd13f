"""Build moe_ext: one extension module, moe_ext/_C, holding the CPU kernels always and the CUDA
kernels whenever torch is a CUDA build and nvcc is found.

Environment switches:
  MOE_EXT_SKIP_CUDA=1      build the CPU kernels only.
  CUDA_HOME                CUDA toolkit root; found from common locations when unset (a `nvcc` on
                           PATH may be a wrapper script, whose parent is not the toolkit).
  TORCH_CUDA_ARCH_LIST     CUDA targets; default "8.0;9.0a" plus any visible GPU's own.
  MAX_JOBS                 parallel compile jobs (ninja).
  MOE_EXT_DEBUG=1          -O0 -g builds, for debuggers and sanitizers.
"""

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()


def find_cuda_home() -> str | None:
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        # Ask the compiler for its own toolkit (resolves wrappers), then fall back to its parent.
        try:
            cmd = [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stderr
            for line in out.splitlines():
                if "_HERE_=" in line:
                    candidates.append(str(Path(line.split("_HERE_=", 1)[1].strip()).parent))
        except (OSError, subprocess.SubprocessError):
            pass
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").exists() and (Path(c) / "include" / "cuda_runtime.h").exists():
            return c
    return None


skip_cuda = os.environ.get("MOE_EXT_SKIP_CUDA", "0") == "1"
cuda_home = None if skip_cuda else find_cuda_home()
if cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

with_cuda = bool(cuda_home) and torch.version.cuda is not None
if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    archs = ["8.0", "9.0a"]
    for i in range(torch.cuda.device_count()):  # visible GPUs only add targets; none is required
        major, minor = torch.cuda.get_device_capability(i)
        cap = f"{major}.{minor}" + ("a" if major == 9 else "")
        if cap not in archs:
            archs.append(cap)
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)

debug = os.environ.get("MOE_EXT_DEBUG", "0") == "1"
opt = ["-O0", "-g"] if debug else ["-O3"]
# The C++ standard comes from cpp_extension (C++17 or C++20 by torch version). No FMA contraction
# (g++ -ffp-contract=off, nvcc --fmad=false): the gating math must round exactly as written,
# identically on every backend; explicit fmaf calls still fuse.
cxx_flags = opt + ["-ffp-contract=off"]
nvcc_flags = opt + ["--expt-relaxed-constexpr", "-lineinfo", "--fmad=false"]

# The Hopper wgmma kernels exist only in sm_90a code: the launchers may pick them (on cc 9.0 devices)
# only when that target is built.
if with_cuda and "9.0a" in os.environ["TORCH_CUDA_ARCH_LIST"].replace(" ", ";").split(";"):
    nvcc_flags.append("-DMOE_EXT_WGMMA=1")

sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
if with_cuda:
    cuda_dir = ROOT / "csrc" / "cuda"
    sources += sorted(str(p.relative_to(ROOT)) for p in [*cuda_dir.glob("*.cpp"), *cuda_dir.glob("*.cu")])
    ext = CUDAExtension(
        "moe_ext._C",
        sources,
        define_macros=[("MOE_EXT_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
    )
else:
    ext = CppExtension("moe_ext._C", sources, extra_compile_args={"cxx": cxx_flags})

print(f"moe_ext: building {'CPU + CUDA (' + os.environ['TORCH_CUDA_ARCH_LIST'] + ')' if with_cuda else 'CPU only'}"
      f", torch {torch.__version__}, CUDA_HOME={cuda_home}")

setup(
    name="moe_ext",
    version="0.1.0",
    description="Fast Mixture-of-Experts inference kernels as PyTorch custom ops",
    packages=["moe_ext"],
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
    install_requires=["torch>=2.10"],
)
