"""fp32-output GEMMs of bf16/fp16 operands: tensor cores with fp32 accumulation and output.

The torch backend on CUDA and the Triton workspace strategy multiply half operands (hidden
states, W, dZ) but need fp32 products: logits are never rounded before a softmax, dW
accumulates in fp32, and dh is rounded once. torch exposes this as
`torch.mm(a, b, out_dtype=torch.float32)` and `torch.addmm(acc, a, b, out_dtype=torch.float32)`
(aten::mm.dtype / aten::addmm.dtype), on CUDA only, and the versions differ:

- older torch has no `out_dtype` at all (TypeError);
- some builds run mm.dtype but refuse an fp32 `self` in addmm.dtype ("self and mat2 must have
  the same dtype"), newer ones accept it ("self dtype must match either out_dtype or mat1
  dtype");
- CPU has neither (NotImplementedError), nor does the Triton interpreter's world.

Each capability is probed once per (device, dtype) on 16 x 16 tensors and cached. What cannot
run falls back: mm to an fp32 GEMM of upcast operands; addmm first to baddbmm.dtype on a batch
of one (its out_dtype form copies `self` into `out`, a no-op when they are the same tensor, and
accepts an fp32 `self`), then to fp32 products of row slices added into the accumulator (a
temporary of at most 64 Mi elements: three times the accumulator's memory traffic). `paths()`
counts which path ran, so a GPU run can report it.
"""

from __future__ import annotations

import collections
import functools

import torch

HALF = (torch.float16, torch.bfloat16)
_SLICE_ELEMENTS = 64 << 20  # bound of the fallback's fp32 temporary
_PATHS: collections.Counter = collections.Counter()


def paths() -> dict[str, int]:
    """How many GEMMs ran on each path since the last `reset_paths()` (name -> count)."""
    return dict(_PATHS)


def reset_paths() -> None:
    _PATHS.clear()


def _probe(device: torch.device, dtype: torch.dtype, call) -> bool:
    try:
        a = torch.ones((16, 16), dtype=dtype, device=device)
        out = call(a)
        return out.dtype == torch.float32 and bool(out[0, 0] == 16)
    except (RuntimeError, TypeError, NotImplementedError, ValueError):
        return False


@functools.lru_cache(maxsize=None)
def _mm_out_dtype_ok(device: torch.device, dtype: torch.dtype) -> bool:
    return _probe(device, dtype, lambda a: torch.mm(a, a, out_dtype=torch.float32))


@functools.lru_cache(maxsize=None)
def _addmm_fp32_self_ok(device: torch.device, dtype: torch.dtype) -> bool:
    def call(a):
        acc = torch.zeros((16, 16), dtype=torch.float32, device=a.device)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        return acc

    return _probe(device, dtype, call)


@functools.lru_cache(maxsize=None)
def _baddbmm_fp32_self_ok(device: torch.device, dtype: torch.dtype) -> bool:
    def call(a):
        acc = torch.zeros((16, 16), dtype=torch.float32, device=a.device)
        ptr = acc.data_ptr()
        out = torch.baddbmm(acc[None], a[None], a[None], out_dtype=torch.float32, out=acc[None])
        return acc if out.data_ptr() == ptr else acc.new_zeros(0)

    return _probe(device, dtype, call)


def _device_key(t: torch.Tensor) -> torch.device:
    device = t.device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def half_gemm_supported(t: torch.Tensor) -> bool:
    """True where `t` (a bf16/fp16 CUDA tensor) can feed fp32-output tensor-core GEMMs."""
    if t.dtype not in HALF or t.device.type != "cuda":
        return False
    return _mm_out_dtype_ok(_device_key(t), t.dtype)


def mm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b with fp32 accumulation and an fp32 (float64 for float64) result, written into `out`
    when given (contiguous rows). Half operands must share a dtype."""
    if a.dtype not in HALF:
        _PATHS["mm"] += 1
        return torch.mm(a, b, out=out) if out is not None else torch.mm(a, b)
    if half_gemm_supported(a):
        _PATHS["mm_out_dtype"] += 1
        if out is not None:
            return torch.mm(a, b, out_dtype=torch.float32, out=out)
        return torch.mm(a, b, out_dtype=torch.float32)
    _PATHS["mm_upcast"] += 1
    a32, b32 = a.to(torch.float32), b.to(torch.float32)
    return torch.mm(a32, b32, out=out) if out is not None else torch.mm(a32, b32)


def addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """acc += alpha * (a @ b) with fp32 accumulation; `acc` is float32 (float64 for float64
    operands) with unit column stride, updated in place where torch allows it."""
    if a.dtype not in HALF:
        _PATHS["addmm"] += 1
        return acc.addmm_(a, b, alpha=alpha)
    # The probes ran on contiguous 16 x 16 operands; a layout a build still refuses (the checks
    # run before any kernel, so acc is untouched) falls through to the slices.
    if half_gemm_supported(a) and _addmm_fp32_self_ok(_device_key(a), a.dtype):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, alpha=alpha, out=acc)
            _PATHS["addmm_out_dtype_inplace"] += 1
            return acc
        except RuntimeError:
            _PATHS["addmm_out_dtype_refused"] += 1
    if half_gemm_supported(a) and _baddbmm_fp32_self_ok(_device_key(a), a.dtype):
        try:
            torch.baddbmm(acc[None], a[None], b[None], out_dtype=torch.float32, alpha=alpha, out=acc[None])
            _PATHS["baddbmm_out_dtype_inplace"] += 1
            return acc
        except RuntimeError:
            _PATHS["baddbmm_out_dtype_refused"] += 1
    # fp32 products of row slices added into the accumulator: bounded temporaries
    _PATHS["addmm_sliced"] += 1
    step = max(1, _SLICE_ELEMENTS // max(1, acc.shape[1]))
    for r0 in range(0, acc.shape[0], step):
        part = mm_f32(a[r0:r0 + step], b)
        acc[r0:r0 + step].add_(part, alpha=alpha)
    return acc
