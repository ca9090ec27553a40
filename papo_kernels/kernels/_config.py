"""Launch configurations, environment switches and guarded device queries of the Triton backend.

Defaults are fixed, documented configs chosen by a small heuristic (Triton tutorial / Liger
`calculate_settings` style), per kernel, per GPU family and per input dtype; `PAPO_AUTOTUNE=1`
switches the four fused kernels to `triton.autotune` over a small config list (never under the
interpreter, which cannot benchmark). Every driver query is guarded: nothing here touches a GPU
at import time, and a failed query falls back to the documented defaults.

Environment switches (read at call time):
    TRITON_INTERPRET=1      kernels run on CPU under the Triton interpreter (set before import)
    PAPO_AUTOTUNE=1         autotune the fused kernels instead of the fixed configs
    PAPO_FUSED_ATOMICS=1    fused strategy: dh and dW by fp32 atomics in one recompute sweep
                            (faster, NOT deterministic: summation order varies run to run)
    PAPO_WORKSPACE_MB=1024  workspace strategy: bound on the per-chunk logit workspace
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Iterator

import torch
import triton

# ---------------------------------------------------------------- environment


def is_interpreting() -> bool:
    """True when kernels run under the Triton CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def autotune_enabled() -> bool:
    """PAPO_AUTOTUNE=1 and a real GPU (the interpreter runs one config only)."""
    return _flag("PAPO_AUTOTUNE") and not is_interpreting()


def fused_atomics_enabled() -> bool:
    """PAPO_FUSED_ATOMICS=1: non-deterministic single-sweep backward of the fused strategy."""
    return _flag("PAPO_FUSED_ATOMICS")


# Workspace bound (bytes) of the workspace strategy: [views * C, V] fp32 logits plus the dZ copy
# in the GEMM dtype. 1 GiB keeps C around 580 rows at Qwen2.5-VL's V = 152,064 with two views.
DEFAULT_WORKSPACE_BYTES = 1 << 30


def workspace_bytes() -> int:
    value = os.environ.get("PAPO_WORKSPACE_MB")
    if value:
        try:
            return max(1, int(value)) << 20
        except ValueError:
            pass
    return DEFAULT_WORKSPACE_BYTES


# ---------------------------------------------------------------- guarded device queries


@functools.lru_cache(maxsize=None)
def _device_props(index: int):
    try:
        return torch.cuda.get_device_properties(index)
    except Exception:  # no driver, no device, or a broken runtime: use the defaults
        return None


def device_props(device: torch.device):
    """torch's CUDA device properties, or None (CPU tensors, no driver, any failure)."""
    if device.type != "cuda":
        return None
    try:
        if not torch.cuda.is_available():
            return None
        index = device.index if device.index is not None else torch.cuda.current_device()
    except Exception:
        return None
    return _device_props(index)


def gpu_family(device: torch.device) -> str:
    """"sm90" (Hopper and newer), "sm80" (Ampere/Ada and unknown) or "interpreter"."""
    if is_interpreting() or device.type != "cuda":
        return "interpreter"
    props = device_props(device)
    if props is not None and props.major >= 9:
        return "sm90"
    return "sm80"


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the device (132 on H100 SXM when the query fails)."""
    props = device_props(device)
    return int(props.multi_processor_count) if props is not None else 132


# ---------------------------------------------------------------- launch configurations


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Block sizes and launch options of one kernel (all block sizes powers of two, dot tiles >= 16).

    BLOCK_N rows x BLOCK_V vocabulary columns per tile, BLOCK_D hidden columns per dot step.
    `splits` (fused stats: vocabulary splits per row tile; 0 = heuristic) and `max_programs`
    (fused dh: persistent programs; 0 = heuristic) only apply where noted.
    """

    BLOCK_N: int
    BLOCK_V: int
    BLOCK_D: int = 16
    num_warps: int = 4
    num_stages: int = 1
    splits: int = 0
    max_programs: int = 0

    def __post_init__(self):
        for name in ("BLOCK_N", "BLOCK_V", "BLOCK_D"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"LaunchConfig.{name} must be a power of two, got {v}")

    def launch_kwargs(self) -> dict:
        return dict(num_warps=self.num_warps, num_stages=self.num_stages)


KERNELS = ("workspace_stats", "workspace_dz", "fused_stats", "stats_combine", "fused_dh", "fused_dw",
           "fused_atomic")

# GPU defaults: the largest tiles that compile without register spills on both sm_90a and sm_80
# (tests/test_triton_static.py checks every one for spills and shared memory), not yet tuned on
# hardware (issue 4 "GPU"):
# - workspace_stats: memory-bound row reduction over the fp32 workspace, a few rows per program;
# - workspace_dz: elementwise over [rows x vocab] tiles of the workspace, 2-D grid, no loop;
# - stats_combine: one row per thread, loops over the splits;
# - fused_*: tl.dot tiles. Half inputs use tensor cores (wgmma on sm_90a: larger tiles fit);
#   fp32 inputs use exact IEEE fp32 dots (no TF32), which live in registers: small tiles.
#   fused_dh re-reads its fp32 dh rows once per vocabulary tile (traffic ~ 1/BLOCK_V), fused_dw
#   its dW rows once per row tile (traffic ~ 1/BLOCK_N).
_EPILOGUES = {
    "workspace_stats": LaunchConfig(BLOCK_N=4, BLOCK_V=1024, num_warps=8),
    "workspace_dz": LaunchConfig(BLOCK_N=16, BLOCK_V=256, num_warps=8),
    "stats_combine": LaunchConfig(BLOCK_N=256, BLOCK_V=16, num_warps=4),
}
_FP32 = dict(
    _EPILOGUES,
    fused_stats=LaunchConfig(BLOCK_N=32, BLOCK_V=32, BLOCK_D=32, num_warps=8, num_stages=2),
    fused_dh=LaunchConfig(BLOCK_N=32, BLOCK_V=64, BLOCK_D=16, num_warps=8, num_stages=2),
    fused_dw=LaunchConfig(BLOCK_N=32, BLOCK_V=64, BLOCK_D=16, num_warps=8, num_stages=2),
    fused_atomic=LaunchConfig(BLOCK_N=32, BLOCK_V=64, BLOCK_D=16, num_warps=8, num_stages=2),
)
DEFAULT_CONFIGS: dict[str, dict[str, LaunchConfig]] = {
    "sm90/half": dict(
        _EPILOGUES,
        fused_stats=LaunchConfig(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3),
        fused_dh=LaunchConfig(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, num_warps=8, num_stages=2),
        fused_dw=LaunchConfig(BLOCK_N=64, BLOCK_V=64, BLOCK_D=64, num_warps=8, num_stages=2),
        fused_atomic=LaunchConfig(BLOCK_N=64, BLOCK_V=64, BLOCK_D=64, num_warps=8, num_stages=2),
    ),
    "sm80/half": dict(
        _EPILOGUES,
        fused_stats=LaunchConfig(BLOCK_N=32, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3),
        fused_dh=LaunchConfig(BLOCK_N=32, BLOCK_V=64, BLOCK_D=32, num_warps=8, num_stages=2),
        fused_dw=LaunchConfig(BLOCK_N=64, BLOCK_V=32, BLOCK_D=64, num_warps=8, num_stages=2),
        fused_atomic=LaunchConfig(BLOCK_N=64, BLOCK_V=32, BLOCK_D=64, num_warps=8, num_stages=2),
    ),
    "sm90/fp32": _FP32,
    "sm80/fp32": _FP32,
}


def _pow2_clamp(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, x))))


def _interpreter_config(kernel: str, n: int, v: int, h: int) -> LaunchConfig:
    """Large tiles for the interpreter, whose cost grows with programs x tiles (numpy per op)."""
    bn = _pow2_clamp(n, 16, 32)
    bv = _pow2_clamp(v, 16, 256)
    bd = _pow2_clamp(h, 16, 64)
    if kernel == "stats_combine":
        return LaunchConfig(BLOCK_N=_pow2_clamp(n, 16, 128), BLOCK_V=16)
    if kernel == "workspace_stats":
        return LaunchConfig(BLOCK_N=bn, BLOCK_V=_pow2_clamp(v, 16, 1024))
    if kernel == "workspace_dz":
        return LaunchConfig(BLOCK_N=bn, BLOCK_V=_pow2_clamp(v, 16, 1024))
    return LaunchConfig(BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd)


_OVERRIDES: dict[str, LaunchConfig] = {}


@contextlib.contextmanager
def override_configs(**configs: LaunchConfig) -> Iterator[None]:
    """Force launch configs by kernel name for the duration of a `with` block (tests, tuning).

    Example: `with override_configs(fused_stats=LaunchConfig(16, 128, 16, splits=2)): ...`
    """
    unknown = set(configs) - set(KERNELS)
    if unknown:
        raise ValueError(f"unknown kernel names {sorted(unknown)}; known: {KERNELS}")
    saved = dict(_OVERRIDES)
    _OVERRIDES.update(configs)
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(saved)


def dtype_key(dtype: torch.dtype) -> str:
    return "fp32" if dtype in (torch.float32, torch.float64) else "half"


def get_config(kernel: str, device: torch.device, dtype: torch.dtype, n: int, v: int, h: int) -> LaunchConfig:
    """The launch config of `kernel` for these tensors: override > family default > interpreter."""
    if kernel in _OVERRIDES:
        return _OVERRIDES[kernel]
    family = gpu_family(device)
    if family == "interpreter":
        return _interpreter_config(kernel, n, v, h)
    return DEFAULT_CONFIGS[f"{family}/{dtype_key(dtype)}"][kernel]


# ---------------------------------------------------------------- dtype flags


def upcast_after_load(dtype: torch.dtype) -> bool:
    """The interpreter computes garbage on bf16 bits (and fp16 dots in fp16): upcast to fp32
    right after every load of a half tensor when interpreting. On GPUs half tiles feed tensor
    cores directly with fp32 accumulation."""
    return is_interpreting() and dtype in (torch.float16, torch.bfloat16)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: exact IEEE fp32 dots, as torch's default fp32 matmul (no TF32 rounding)."""
    return "ieee" if dtype == torch.float32 else "tf32"
