"""Launch configurations, environment switches and guarded device queries of the Triton backend.

Defaults are fixed, documented configs chosen by a small heuristic (Triton tutorial / Liger
`calculate_settings` style), per kernel, per GPU family and per input dtype; `PAPO_AUTOTUNE=1`
switches the in-register forward to `triton.autotune` over a small config list (never under the
interpreter, which cannot benchmark). Every driver query is guarded: nothing here touches a GPU
at import time, and a failed query falls back to the documented defaults.

Environment switches (read at call time; a malformed value raises ValueError naming it):
    TRITON_INTERPRET=1          kernels run on CPU under the Triton interpreter (set before import)
    PAPO_AUTOTUNE=1             autotune the in-register forward instead of its fixed config
    PAPO_WORKSPACE_MB=512       workspace strategy: bound on one chunk's fp32 logits ([views * C, V]);
                                sets C, the rows per view per chunk (a multiple of 64)
    PAPO_DW_RING_ROWS=4096      workspace strategy, bf16/fp16 GEMMs: dZ rows (both views counted)
                                gathered before one dW GEMM and one stacked dh GEMM, rounded down
                                to whole chunks (>= 1). Memory: rows x (V + H) x 2 bytes, e.g.
                                3,840 rows at the 7B head (V 152,064, H 3,584) = 1.2 GB. fp32
                                inputs default to one chunk (their dZ is twice as large and their
                                GEMMs are not tensor-core bound)
    PAPO_WORKSPACE_VARIANT=ring workspace strategy variant, kept side by side for GPU comparisons:
                                "ring" (default), "ring2s" (ring flushes on a second CUDA stream,
                                two half rings), "v1" (the 2026-11-25 path: dh per view and dW per
                                chunk, 1 GiB of logits + dZ per chunk, unsplit statistics)
    PAPO_INREGISTER_FORWARD=1   forward statistics by the in-register kernel (stats_inregister.py)
                                instead of the workspace forward: a comparison switch for the GPU
                                benchmark, not a public strategy
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


# Private overrides of the workspace switches (benchmarks and tests compare variants in one
# process); each wins over its environment variable.
_WORKSPACE_OVERRIDES: dict[str, object] = {}

WORKSPACE_VARIANTS = ("ring", "ring2s", "v1")
# One chunk's fp32 logits: at Qwen2.5-VL-7B's V = 152,064 and two views, C = 384 rows per view.
DEFAULT_WORKSPACE_BYTES = 512 << 20
# The 2026-11-25 path ("v1") bounded logits + the half dZ copy by 1 GiB: C = 576 at the 7B head.
V1_WORKSPACE_BYTES = 1 << 30
DEFAULT_RING_ROWS = 4096


def _positive_int_env(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return number


def inregister_forward_enabled() -> bool:
    """PAPO_INREGISTER_FORWARD=1 (or the private override): in-register forward statistics."""
    if "inregister_forward" in _WORKSPACE_OVERRIDES:
        return bool(_WORKSPACE_OVERRIDES["inregister_forward"])
    return _flag("PAPO_INREGISTER_FORWARD")


def workspace_variant() -> str:
    """The workspace strategy's variant: "ring" (default), "ring2s" or "v1"."""
    value = (_WORKSPACE_OVERRIDES.get("variant") or os.environ.get("PAPO_WORKSPACE_VARIANT", "").strip()
             or "ring")
    if value not in WORKSPACE_VARIANTS:
        raise ValueError(f"PAPO_WORKSPACE_VARIANT must be one of {WORKSPACE_VARIANTS}, got {value!r}")
    return value


def workspace_bytes() -> int:
    """Bound on one chunk's fp32 logit workspace (PAPO_WORKSPACE_MB, MiB)."""
    if "workspace_mb" in _WORKSPACE_OVERRIDES:
        return int(_WORKSPACE_OVERRIDES["workspace_mb"]) << 20
    mb = _positive_int_env("PAPO_WORKSPACE_MB")
    return DEFAULT_WORKSPACE_BYTES if mb is None else mb << 20


def ring_rows(gemm_dtype: torch.dtype) -> int:
    """dZ rows per dW GEMM (PAPO_DW_RING_ROWS); 0 means one chunk (the fp32 default)."""
    if "ring_rows" in _WORKSPACE_OVERRIDES:
        return int(_WORKSPACE_OVERRIDES["ring_rows"])
    rows = _positive_int_env("PAPO_DW_RING_ROWS")
    if rows is not None:
        return rows
    return 0 if gemm_dtype in (torch.float32, torch.float64) else DEFAULT_RING_ROWS


@contextlib.contextmanager
def override_workspace(*, variant: str | None = None, ring_rows: int | None = None,
                       workspace_mb: int | None = None,
                       inregister_forward: bool | None = None) -> Iterator[None]:
    """Set workspace switches for a `with` block (benchmarks and tests; not thread-safe).

    Example: `with override_workspace(variant="v1"): ...` runs the 2026-11-25 path.
    """
    if variant is not None and variant not in WORKSPACE_VARIANTS:
        raise ValueError(f"variant must be one of {WORKSPACE_VARIANTS}, got {variant!r}")
    for name, value in (("ring_rows", ring_rows), ("workspace_mb", workspace_mb)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    saved = dict(_WORKSPACE_OVERRIDES)
    for name, value in (("variant", variant), ("ring_rows", ring_rows), ("workspace_mb", workspace_mb),
                        ("inregister_forward", inregister_forward)):
        if value is not None:
            _WORKSPACE_OVERRIDES[name] = value
    try:
        yield
    finally:
        _WORKSPACE_OVERRIDES.clear()
        _WORKSPACE_OVERRIDES.update(saved)


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
    `splits`: vocabulary splits per row tile of the statistics kernels (0 = heuristic,
    stats_combine.num_splits).
    """

    BLOCK_N: int
    BLOCK_V: int
    BLOCK_D: int = 16
    num_warps: int = 4
    num_stages: int = 1
    splits: int = 0

    def __post_init__(self):
        for name in ("BLOCK_N", "BLOCK_V", "BLOCK_D"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"LaunchConfig.{name} must be a power of two, got {v}")

    def launch_kwargs(self) -> dict:
        return dict(num_warps=self.num_warps, num_stages=self.num_stages)


KERNELS = ("workspace_stats", "workspace_stats_v1", "workspace_dz", "inregister_stats", "stats_combine")

# GPU defaults: the largest tiles that compile without register spills on both sm_90a and sm_80
# (tests/test_triton_static.py checks every one for spills and shared memory), not yet tuned on
# hardware:
# - workspace_stats: memory-bound row reduction over the fp32 workspace, split over the
#   vocabulary (stats_combine.py) so that a chunk of a few hundred rows still gives ~8 programs
#   per multiprocessor; lane sums (one cross-warp reduction per tile, the row max); 4 x 512
#   tiles over 8 warps take ~122 registers: two programs (16 warps) per multiprocessor;
# - workspace_stats_v1: the 2026-11-25 config (4 rows over 8 warps, one program per row tile,
#   no split), kept for the "v1" variant;
# - workspace_dz: elementwise over [rows x vocab] tiles of the workspace, 2-D grid, no loop;
# - stats_combine: one row per thread, loops over the splits;
# - inregister_stats: tl.dot tiles. Half inputs use tensor cores (wgmma on sm_90a: larger tiles
#   fit); fp32 inputs use exact IEEE fp32 dots (no TF32), which live in registers: small tiles.
_EPILOGUES = {
    "workspace_stats": LaunchConfig(BLOCK_N=4, BLOCK_V=512, num_warps=8),
    "workspace_stats_v1": LaunchConfig(BLOCK_N=4, BLOCK_V=1024, num_warps=8, splits=1),
    "workspace_dz": LaunchConfig(BLOCK_N=16, BLOCK_V=256, num_warps=8),
    "stats_combine": LaunchConfig(BLOCK_N=256, BLOCK_V=16, num_warps=4),
}
DEFAULT_CONFIGS: dict[str, dict[str, LaunchConfig]] = {
    "sm90/half": dict(
        _EPILOGUES,
        # 3 stages spilled once the static check compiled with the real shapes' 16-byte alignment
        inregister_stats=LaunchConfig(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=2),
    ),
    "sm80/half": dict(
        _EPILOGUES,
        inregister_stats=LaunchConfig(BLOCK_N=32, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3),
    ),
    "sm90/fp32": dict(
        _EPILOGUES,
        inregister_stats=LaunchConfig(BLOCK_N=32, BLOCK_V=32, BLOCK_D=32, num_warps=8, num_stages=2),
    ),
}
DEFAULT_CONFIGS["sm80/fp32"] = DEFAULT_CONFIGS["sm90/fp32"]


def _pow2_clamp(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, x))))


def _interpreter_config(kernel: str, n: int, v: int, h: int) -> LaunchConfig:
    """Large tiles for the interpreter, whose cost grows with programs x tiles (numpy per op)."""
    bn = _pow2_clamp(n, 16, 32)
    bv = _pow2_clamp(v, 16, 256)
    bd = _pow2_clamp(h, 16, 64)
    if kernel == "stats_combine":
        return LaunchConfig(BLOCK_N=_pow2_clamp(n, 16, 128), BLOCK_V=16)
    if kernel in ("workspace_stats", "workspace_stats_v1"):
        return LaunchConfig(BLOCK_N=bn, BLOCK_V=_pow2_clamp(v, 16, 1024), splits=1)
    if kernel == "workspace_dz":
        return LaunchConfig(BLOCK_N=bn, BLOCK_V=_pow2_clamp(v, 16, 1024))
    return LaunchConfig(BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd)


_OVERRIDES: dict[str, LaunchConfig] = {}


@contextlib.contextmanager
def override_configs(**configs: LaunchConfig) -> Iterator[None]:
    """Force launch configs by kernel name for the duration of a `with` block (tests, tuning).

    Example: `with override_configs(workspace_stats=LaunchConfig(8, 128, splits=3)): ...`
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
