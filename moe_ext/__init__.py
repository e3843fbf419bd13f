"""moe_ext: fast Mixture-of-Experts inference kernels as PyTorch custom ops (torch.ops.moe_ext)."""

from __future__ import annotations

import importlib.util
import os

import torch


def _load_library() -> str:
    """Load the compiled op library: $MOE_EXT_LIBRARY (e.g. a CMake build) or moe_ext/_C*.so."""
    path = os.environ.get("MOE_EXT_LIBRARY")
    if not path:
        spec = importlib.util.find_spec("moe_ext._C")
        if spec is None or spec.origin is None:
            raise ImportError(
                "moe_ext: the compiled library moe_ext/_C is missing; build it with "
                "`pip install --no-build-isolation -e .` or point MOE_EXT_LIBRARY at a CMake build")
        path = spec.origin
    torch.ops.load_library(path)
    return path


LIBRARY_PATH = _load_library()

from . import ops  # noqa: E402
from .fused_moe import choose_block_size, default_block_size, fused_moe, hopper_tiles, route  # noqa: E402
from .layer import MoE  # noqa: E402
from .ops import (  # noqa: E402
    fused_topk_align,
    moe_align_block_size,
    moe_combine,
    moe_gemv_combine,
    moe_gemv_silu,
    moe_grouped_gemm,
    moe_grouped_gemm_silu,
    silu_and_mul,
    topk_gating,
)


def has_kernel(op: str, device: str = "cuda") -> bool:
    """Whether torch.ops.moe_ext.<op> has a kernel registered for device ("cpu" or "cuda")."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"moe_ext::{op}", device.upper())


__all__ = [
    "MoE",
    "choose_block_size",
    "default_block_size",
    "fused_moe",
    "fused_topk_align",
    "has_kernel",
    "hopper_tiles",
    "moe_align_block_size",
    "moe_combine",
    "moe_gemv_combine",
    "moe_gemv_silu",
    "moe_grouped_gemm",
    "moe_grouped_gemm_silu",
    "ops",
    "route",
    "silu_and_mul",
    "topk_gating",
]
