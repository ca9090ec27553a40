"""Backend registry: which implementations of `forward_stats` / `backward_grads` exist here.

A backend is the functions `forward_stats`, `backward_grads` and optionally `loss_rows` with
the signatures of papo_kernels/reference.py (the call's options in one `KernelOptions`). The
optional backends are imported lazily so that importing papo_kernels never fails on a machine
without a GPU, without Triton or without the compiled extension. Only a missing optional piece
makes a backend unavailable: an ImportError from inside our own modules is raised.

`backend="auto"` picks the fastest backend that runs on the tensors' device: Triton on CUDA, the
compiled extension ("cpp") on CPU once it is built, else the torch backend. The environment
variable PAPO_KERNELS_BACKEND=torch|triton|cpp makes "auto" mean that backend instead (to time or
debug a whole program, e.g. the trainer, with one backend); explicit backends are unaffected.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from papo_kernels._options import BACKENDS
from papo_kernels._strategies import STRATEGIES  # noqa: F401  (re-exported: the public choices)

FORCE_ENV = "PAPO_KERNELS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """Raised when a backend is requested explicitly but is not built or cannot run here."""


@dataclass(frozen=True)
class Backend:
    name: str
    forward_stats: Callable
    backward_grads: Callable
    loss_rows: Callable


def _torch_backend() -> Backend:
    from papo_kernels import reference

    return Backend("torch", reference.forward_stats, reference.backward_grads, reference.loss_rows)


def _missing_optional(exc: ImportError, module: str, optional: tuple[str, ...]) -> bool:
    """Whether `exc` says that `module` is absent from this build or that one of its optional
    dependencies (a package in `optional`, or a submodule of one) is not installed."""
    name = exc.name
    if name is None:
        return False
    if name == module:
        return importlib.util.find_spec(module) is None
    return any(name == p or name.startswith(p + ".") for p in optional)


def _optional_backend(name: str, module: str, missing: str,
                      optional: tuple[str, ...]) -> tuple[Backend | None, str]:
    """(backend, reason): the backend if its module imports and exports the interface.

    An ImportError means "unavailable" only when the backend's module is not part of this
    build or an `optional` dependency (triton, the compiled extension) is missing. Any other
    ImportError, e.g. a wrong name imported between our own modules, is a bug in this package
    and propagates: calling it "unavailable" would turn a broken kernel package into skipped
    tests and a silent fallback to a slower backend.
    """
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        if not _missing_optional(exc, module, optional):
            raise
        return None, f"{missing} ({type(exc).__name__}: {exc})"
    fwd = getattr(mod, "forward_stats", None)
    bwd = getattr(mod, "backward_grads", None)
    if fwd is None or bwd is None:
        return None, missing
    loss_rows = getattr(mod, "loss_rows", None)
    if loss_rows is None:  # the generic loop over the backend's two phases
        from papo_kernels import reference

        loss_rows = functools.partial(reference.run_loss_rows, fwd, bwd)
    return Backend(name, fwd, bwd, loss_rows), ""


# Cached: a failed import is retried by Python on every attempt, and dispatch runs per call.
@functools.cache
def _triton_backend() -> tuple[Backend | None, str]:
    return _optional_backend(
        "triton",
        "papo_kernels.kernels",
        "the Triton kernels are not part of this build (pip install triton; see issue 'Triton backend')",
        optional=("triton",),
    )


@functools.cache
def _cpp_backend() -> tuple[Backend | None, str]:
    return _optional_backend(
        "cpp",
        "papo_kernels.extension",
        "the C++ extension is not built (pip install --no-build-isolation -e . builds it)",
        optional=("papo_kernels._C",),
    )


def _cpp_can_run(device: torch.device) -> tuple[bool, str]:
    from papo_kernels import extension  # imported by _cpp_backend already

    return extension.can_run(device)


def _triton_can_run(device: torch.device) -> tuple[bool, str]:
    if device.type == "cuda":
        return True, ""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return False, (
        f"Triton kernels need a CUDA device (got tensors on {device}); on CPU they only run "
        "under the interpreter (set TRITON_INTERPRET=1 before importing triton)"
    )


def resolve_backend(name: str, device: torch.device) -> Backend:
    """Backend object for `name` ("auto" | "torch" | "triton" | "cpp") and the tensors' device.

    Raises:
        ValueError: unknown name.
        BackendUnavailableError: an explicit backend that is not built or cannot run on `device`.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "torch":
        return _torch_backend()
    if name == "triton":
        backend, reason = _triton_backend()
        if backend is None:
            raise BackendUnavailableError(f"backend='triton' is not available: {reason}")
        ok, reason = _triton_can_run(device)
        if not ok:
            raise BackendUnavailableError(f"backend='triton' is not available: {reason}")
        return backend
    if name == "cpp":
        backend, reason = _cpp_backend()
        if backend is None:
            raise BackendUnavailableError(f"backend='cpp' is not available: {reason}")
        ok, reason = _cpp_can_run(device)
        if not ok:
            raise BackendUnavailableError(f"backend='cpp' is not available: {reason}")
        return backend
    forced = os.environ.get(FORCE_ENV)
    if forced:
        if forced not in BACKENDS[1:]:
            raise ValueError(f"{FORCE_ENV} must be one of {BACKENDS[1:]} (or unset), got {forced!r}")
        try:
            return resolve_backend(forced, device)
        except BackendUnavailableError as exc:
            raise BackendUnavailableError(f"{FORCE_ENV}={forced} asks for it: {exc}") from None
    # auto: the fastest backend that runs on this device without an interpreter.
    if device.type == "cuda":
        backend, _ = _triton_backend()
        if backend is not None:
            return backend
    backend, reason = _cpp_backend()
    if backend is not None and _cpp_can_run(device)[0]:
        return backend
    if backend is None and device.type == "cpu" and importlib.util.find_spec("papo_kernels._C"):
        _warn_cpp_fallback(reason)
    return _torch_backend()


@functools.cache
def _warn_cpp_fallback(reason: str) -> None:
    """Once per process: a compiled extension is present but cannot be used, so `auto` runs the
    slower torch backend; say why (typically a build made for another torch) and how to fix it."""
    warnings.warn(f"backend='auto' uses the torch backend on CPU: {reason}", RuntimeWarning, stacklevel=3)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that `resolve_backend` accepts for `device`."""
    device = torch.device(device)
    names = []
    for name in BACKENDS[1:]:
        try:
            resolve_backend(name, device)
        except BackendUnavailableError:
            continue
        names.append(name)
    return names
