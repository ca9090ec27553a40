"""The "cpp" backend: the compiled papo_kernels_C ops (csrc/) behind reference.py's backend interface.

`forward_stats`, `backward_grads` and `loss_rows` have reference.py's signatures and semantics:
fp32 math on fp16/bf16/fp32 inputs (outputs float32), rows whose target is ignore_index give 0 in
every output and gradient, targets outside [0, V) give NaN outputs and gradients, the vocabulary
tail contributes exactly 0, a constant view b sends no gradient to the weight. float64 inputs go
to the torch backend (reference.py): fp64 is for gradchecks on small shapes, not for speed.

Strategies (docs/design.md "Execution strategies"):

- "workspace": per chunk of rows, one BLAS GEMM of the stacked views into a bounded fp32 logit
  workspace and at::vec epilogues over whole rows; the fused calls keep each chunk's logits
  between the phases (no recompute GEMM: 6HV FLOPs per token and view). Rows per chunk:
  `chunk_tokens`, else as many as fit PAPO_CPU_WORKSPACE_MB (default 64 MiB), at least 64.
- "tiles": no logit workspace: tile GEMMs with the epilogue applied while the tile is in cache,
  forward in parallel over token blocks, backward in parallel over vocabulary slices (each
  thread owns its rows of dW and a private dh partial, chunks of `chunk_tokens` rows).
  `chunk_vocab` sets the tile width (default 256 columns).
- "auto": what measured fastest on CPU (benchmarks/): "tiles" for the statistics calls
  (`forward_stats`, `backward_grads`: no [C, V] round trip through memory), "workspace" for the
  fused calls' `loss_rows` (one logit GEMM per chunk instead of two).

Results are bitwise reproducible at a fixed thread count (torch.get_num_threads()).

The library also holds the workspace epilogue ops of the Triton backend's
strategy="workspace_cuda" (csrc/epilogue_ops.cpp, kernels in csrc/cuda/, built with
PAPO_BUILD_CUDA=1): `cuda_archs` lists the GPU architectures compiled in, `epilogue_support`
says whether they run on a device and, if not, how to rebuild.

Importing this module loads the extension. It raises ImportError, which papo_kernels._backends
reports as the reason the backend is unavailable, when the extension is not built or when it was
built against another torch than the one running (checked from the library's build stamp before
the library is loaded, so a mismatched build is never linked into the process).
"""

from __future__ import annotations

import importlib.util
import mmap
import os
import re

import torch

from papo_kernels import reference
from papo_kernels._options import DEFAULT_OPTIONS, KernelOptions
from papo_kernels._strategies import check_strategy
from papo_kernels.reference import RowGrads, RowStats

REBUILD_HINT = (
    "rebuild it from the repository root with `pip install --no-build-isolation -e .` "
    "(torch installed first; see README)"
)
# Workspace strategy: bytes of the [views * C, V] fp32 logit workspace that set the chunk rows C.
DEFAULT_WORKSPACE_MB = 64
# Fewer rows per chunk would starve the GEMMs (the vocabulary is the long side).
MIN_WORKSPACE_ROWS = 64
# Fused strategy: rows per chunk of the backward, whose [views * C, H] fp32 dh partials are per
# thread; at most FUSED_PARTIALS_MB of them in all, at least FUSED_MIN_ROWS rows.
FUSED_BACKWARD_ROWS = 512
FUSED_PARTIALS_MB = 256
FUSED_MIN_ROWS = 32
_STAMP = re.compile(rb"papo_kernels_C build stamp: torch=([^;\x00]*);git=([^;\x00]*);")


def _library_path() -> str:
    spec = importlib.util.find_spec("papo_kernels._C")
    if spec is None or spec.origin is None:
        raise ImportError(f"the C++ extension papo_kernels._C is not built: {REBUILD_HINT}",
                          name="papo_kernels._C")
    return spec.origin


def build_stamp(path: str) -> tuple[str, str] | None:
    """(torch version, torch git version) the library at `path` was compiled against, read from its
    bytes without loading it; None if it carries no stamp."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        match = _STAMP.search(data)
        return None if match is None else (match.group(1).decode(), match.group(2).decode())


def check_build(path: str) -> None:
    """Raise ImportError unless the library at `path` was built against the running torch."""
    stamp = build_stamp(path)
    if stamp is None:
        raise ImportError(
            f"{path} has no papo_kernels build stamp (not built from this source tree): {REBUILD_HINT}",
            name="papo_kernels._C",
        )
    version, git = stamp
    if version != torch.__version__ or git != str(torch.version.git_version):
        raise ImportError(
            f"papo_kernels._C was built against torch {version} (git {git[:12]}), but this is torch "
            f"{torch.__version__} (git {str(torch.version.git_version)[:12]}); a C++ extension only "
            f"works with the torch it was compiled against: {REBUILD_HINT}",
            name="papo_kernels._C",
        )


check_build(_library_path())

from papo_kernels import _C  # noqa: E402,F401  (loading the library registers torch.ops.papo_kernels_C)

_ops = torch.ops.papo_kernels_C


def build_info() -> str:
    """The torch the library was built against, the CPU capability in use and the thread count."""
    return _ops.build_info()


def can_run(device: torch.device) -> tuple[bool, str]:
    """(whether the compiled kernels run on `device`, why not)."""
    if device.type == "cpu":
        return True, ""
    return False, f"the C++ extension has CPU kernels only (got tensors on {device})"


def cuda_archs() -> list[int]:
    """The GPU architectures the extension's CUDA kernels were built for (e.g. [80, 90]); [] when
    it was built without CUDA."""
    return [int(a) // 10 for a in _ops.cuda_archs().split(",") if a.strip().isdigit()]


def epilogue_support(device: torch.device) -> tuple[bool, str]:
    """(whether the workspace epilogue ops, papo_kernels_C::epilogue_stats / epilogue_dz, run on
    `device`, why not). CPU tensors run their host reference (a check of the CUDA kernels' math,
    not a fast path); CUDA tensors need a build with CUDA kernels for the device's architecture."""
    if device.type == "cpu":
        return True, ""
    if device.type != "cuda":
        return False, f"the CUDA epilogues run on CUDA tensors (got tensors on {device})"
    archs = cuda_archs()
    if not archs:
        return False, ("papo_kernels._C was built without CUDA kernels: rebuild it with "
                       "PAPO_BUILD_CUDA=1 pip install --no-build-isolation -e . (a CUDA build of torch and "
                       "the CUDA toolkit's nvcc needed)")
    major, minor = torch.cuda.get_device_capability(device)
    # SASS for sm_XY runs on sm_XZ with Z >= Y (the build embeds no PTX to JIT from)
    if not any(a // 10 == major and a % 10 <= minor for a in archs):
        built = ", ".join(f"sm_{a}" for a in archs)
        return False, (f"papo_kernels._C has CUDA kernels for {built}, not for this GPU "
                       f"(sm_{major}{minor}): rebuild with TORCH_CUDA_ARCH_LIST={major}.{minor} "
                       "PAPO_BUILD_CUDA=1 pip install --no-build-isolation -e .")
    return True, ""


def _strategy(strategy: str, auto: str) -> str:
    if check_strategy(strategy) == "workspace_cuda":
        raise ValueError("strategy='workspace_cuda' is the Triton backend's workspace path with the CUDA "
                         "epilogues (CUDA tensors); the cpp backend has 'workspace' and 'tiles' (or 'auto')")
    return auto if strategy == "auto" else strategy


def _scalars(options: KernelOptions) -> tuple[float, int, int | None, int | None]:
    """(temperature, ignore_index, chunk_tokens, chunk_vocab): what the compiled ops take."""
    return options.temperature, options.ignore_index, options.chunk_tokens, options.chunk_vocab


def _workspace_bytes() -> int:
    value = os.environ.get("PAPO_CPU_WORKSPACE_MB", str(DEFAULT_WORKSPACE_MB))
    try:
        mb = int(value)
    except ValueError:
        mb = -1
    if mb <= 0:
        raise ValueError(f"PAPO_CPU_WORKSPACE_MB must be a positive integer (MiB), got {value!r}")
    return mb << 20


def chunk_rows(strategy: str, n: int, hidden: int, vocab: int, views: int, chunk_tokens: int | None) -> int:
    """Rows per chunk: `chunk_tokens`, else the workspace budget (workspace) or what keeps the
    per-thread dh partials within their budget (tiles)."""
    if chunk_tokens:
        rows = chunk_tokens
    elif strategy == "workspace":
        rows = max(MIN_WORKSPACE_ROWS, _workspace_bytes() // (4 * views * vocab))
    else:
        per_row = 4 * views * hidden * torch.get_num_threads()
        rows = max(FUSED_MIN_ROWS, min(FUSED_BACKWARD_ROWS, (FUSED_PARTIALS_MB << 20) // per_row))
    return max(1, min(n, rows))


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


def _upstream(grads: RowGrads, two: bool) -> list[torch.Tensor | None]:
    g = [_f32(x) for x in grads]
    if not two:  # view-b gradients of a single view are meaningless: zero
        g[2:] = [None] * 4
    return g


def _saved(stats: RowStats, two: bool) -> list[torch.Tensor | None]:
    names = ("lse_a", "entropy_a", "lse_b", "entropy_b", "kl_ab", "kl_ba")
    return [_f32(getattr(stats, k)) if (two or k.endswith("_a")) else None for k in names]


def forward_stats(
    hidden_a: torch.Tensor,
    hidden_b: torch.Tensor | None,
    weight: torch.Tensor,
    targets: torch.Tensor,
    options: KernelOptions = DEFAULT_OPTIONS,
) -> RowStats:
    """Phase 1 over all rows: hidden_* [N, H], weight [V, H], targets [N] -> RowStats ([N] each)."""
    strategy = _strategy(options.strategy, "tiles")
    if hidden_a.dtype == torch.float64:
        return reference.forward_stats(hidden_a, hidden_b, weight, targets, options)
    temperature, ignore_index, chunk_tokens, chunk_vocab = _scalars(options)
    views = 1 if hidden_b is None else 2
    rows = chunk_rows(strategy, hidden_a.shape[0], hidden_a.shape[1], weight.shape[0], views, chunk_tokens)
    outs = _ops.forward_stats(hidden_a, hidden_b, weight, targets, float(temperature), int(ignore_index),
                              strategy, rows, chunk_vocab or 0)
    return RowStats(*outs)


def _contiguous_out(t: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(what the op writes into, where it must be copied afterwards or None)."""
    if t is None or t.is_contiguous():
        return t, None
    # zeros: chunks without gradient leave their rows as they are
    return torch.zeros(t.shape, dtype=t.dtype, device=t.device), t


def backward_grads(
    hidden_a: torch.Tensor,
    hidden_b: torch.Tensor | None,
    weight: torch.Tensor,
    targets: torch.Tensor,
    stats: RowStats,
    grads: RowGrads,
    options: KernelOptions = DEFAULT_OPTIONS,
    *,
    need_hidden_a: bool = True,
    need_hidden_b: bool = False,
    weight_grad_acc: torch.Tensor | None = None,
    hidden_b_is_constant: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Phase 2: returns (dh_a, dh_b) in the hidden dtype (None where not needed) and adds dW into
    `weight_grad_acc` ([V, H]) when given. `hidden_b_is_constant`: no dW flows through view b."""
    strategy = _strategy(options.strategy, "tiles")
    if hidden_a.dtype == torch.float64:
        return reference.backward_grads(
            hidden_a, hidden_b, weight, targets, stats, grads, options, need_hidden_a=need_hidden_a,
            need_hidden_b=need_hidden_b, weight_grad_acc=weight_grad_acc,
            hidden_b_is_constant=hidden_b_is_constant,
        )
    temperature, ignore_index, chunk_tokens, chunk_vocab = _scalars(options)
    two = hidden_b is not None
    dh_a = torch.empty(hidden_a.shape, dtype=hidden_a.dtype) if need_hidden_a else None
    dh_b = torch.empty(hidden_b.shape, dtype=hidden_b.dtype) if (two and need_hidden_b) else None
    if dh_a is None and dh_b is None and weight_grad_acc is None:
        return dh_a, dh_b
    # the op adds into a contiguous fp32 accumulator; anything else goes through one
    acc = weight_grad_acc
    if acc is not None and (acc.dtype != torch.float32 or not acc.is_contiguous()):
        acc = torch.zeros(weight.shape, dtype=torch.float32)
    views = 2 if two else 1
    rows = chunk_rows(strategy, hidden_a.shape[0], hidden_a.shape[1], weight.shape[0], views, chunk_tokens)
    _ops.backward_grads(
        hidden_a, hidden_b, weight, targets, *_saved(stats, two), *_upstream(grads, two), dh_a, dh_b, acc,
        two and not hidden_b_is_constant, float(temperature), int(ignore_index), strategy, rows,
        chunk_vocab or 0,
    )
    if acc is not None and acc is not weight_grad_acc:
        weight_grad_acc += acc.to(weight_grad_acc.dtype)
    return dh_a, dh_b


def loss_rows(
    hidden_a: torch.Tensor,
    hidden_b: torch.Tensor | None,
    weight: torch.Tensor,
    targets: torch.Tensor,
    on_chunk,
    options: KernelOptions = DEFAULT_OPTIONS,
    *,
    dh_a: torch.Tensor | None,
    dh_b: torch.Tensor | None,
    weight_grad_acc: torch.Tensor | None,
    hidden_b_is_constant: bool = True,
) -> None:
    """The fused calls' gradient-in-forward loop (reference.run_loss_rows' contract).

    The workspace strategy keeps each chunk's logits between `chunk_forward` (statistics), the
    caller's `on_chunk` (upstream gradients) and `chunk_backward` (dZ in place, dh and dW GEMMs):
    one logit GEMM per chunk. The tiles strategy, float64 inputs and N = 0 use the generic loop.
    """
    strategy = _strategy(options.strategy, "workspace")
    temperature, ignore_index, chunk_tokens, chunk_vocab = _scalars(options)
    n, vocab = hidden_a.shape[0], weight.shape[0]
    acc_ok = weight_grad_acc is None or (
        weight_grad_acc.dtype == torch.float32 and weight_grad_acc.is_contiguous()
    )
    if strategy != "workspace" or hidden_a.dtype == torch.float64 or n == 0 or not acc_ok:
        reference.run_loss_rows(
            forward_stats, backward_grads, hidden_a, hidden_b, weight, targets, on_chunk,
            options.replace(strategy=strategy), dh_a=dh_a, dh_b=dh_b, weight_grad_acc=weight_grad_acc,
            hidden_b_is_constant=hidden_b_is_constant,
        )
        return
    two = hidden_b is not None
    c_max = chunk_rows(strategy, n, hidden_a.shape[1], vocab, 2 if two else 1, chunk_tokens)
    workspace = torch.empty((2 if two else 1) * c_max * vocab, dtype=torch.float32)
    outs_a, copy_a = _contiguous_out(dh_a)
    outs_b, copy_b = _contiguous_out(dh_b)
    opts = (float(temperature), int(ignore_index))
    b_in_dw = two and not hidden_b_is_constant
    for r0 in range(0, n, c_max):
        r1 = min(r0 + c_max, n)
        h_a = hidden_a[r0:r1]
        h_b = None if hidden_b is None else hidden_b[r0:r1]
        t = targets[r0:r1]
        stats = RowStats(*_ops.chunk_forward(workspace, h_a, h_b, weight, t, *opts, chunk_vocab or 0))
        grads = on_chunk(r0, r1, stats)
        if grads is None or not (outs_a is not None or outs_b is not None or weight_grad_acc is not None):
            continue
        _ops.chunk_backward(
            workspace, h_a, h_b, weight, t, *_saved(stats, two), *_upstream(grads, two),
            None if outs_a is None else outs_a[r0:r1], None if outs_b is None else outs_b[r0:r1],
            weight_grad_acc, b_in_dw, *opts, chunk_vocab or 0,
        )
    for src, dst in ((outs_a, copy_a), (outs_b, copy_b)):
        if dst is not None:
            dst.copy_(src)
