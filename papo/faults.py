"""Deterministic fault injection at named points of the code, for the reliability tests.

A fault is armed by the environment variable PAPO_FAULTS (read once, at import) or, inside a
process that is already running, by `inject()`:

    PAPO_FAULTS="point:N:action[@rank][,point:N:action...]"

fires `action` the N-th time (1-based) this process reaches `fault_point("point")`; `@rank`
restricts it to the process whose RANK environment variable is that rank. Actions:

    kill    SIGKILL this process (no cleanup, no exception handlers: a crash or an OOM kill)
    hang    block this thread forever (a stuck process; whoever waits on it must give up)
    enospc  raise OSError(ENOSPC), as a write to a full disk does

With PAPO_FAULTS_ONCE set to a directory, each armed fault fires at most once among all the
processes that share it (a marker file is created there atomically), e.g. so that the grading
worker started to replace one killed by a fault does not die the same way.

The points (grep for `fault_point(`): "checkpoint.write" before and "checkpoint.written" after
each file of a trainer checkpoint, "optimizer.step" before each optimizer step of the trainer,
"grader.request" when a grading worker receives an answer. When nothing is armed a point costs
one dictionary truth test. Faults are triggered by counts, never by timers, so a test that
arms one gets the same failure at the same place on every run.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ACTIONS = ("kill", "hang", "enospc")
ENV = "PAPO_FAULTS"
ONCE_ENV = "PAPO_FAULTS_ONCE"


@dataclass(frozen=True)
class Fault:
    """One armed fault: fire `action` at the `hit`-th arrival at `point` (on `rank` only, if set)."""

    point: str
    hit: int
    action: str
    rank: int | None = None

    def marker_name(self) -> str:
        return f"{self.point}-{self.hit}-{self.action}-{self.rank}"


def parse(spec: str | None) -> dict[str, list[Fault]]:
    """Parse a PAPO_FAULTS value into {point: [faults]}; ValueError naming the bad entry."""
    faults: dict[str, list[Fault]] = {}
    for entry in (spec or "").split(","):
        entry = entry.strip()
        if not entry:
            continue
        body, _, rank = entry.partition("@")
        parts = body.split(":")
        if len(parts) != 3 or not parts[0] or not parts[1].isdigit() or int(parts[1]) < 1 \
                or parts[2] not in ACTIONS or (rank and not rank.isdigit()):
            raise ValueError(f"{ENV}: bad entry {entry!r}; expected point:N:action[@rank] with N >= 1 "
                             f"and action one of {ACTIONS}")
        fault = Fault(parts[0], int(parts[1]), parts[2], int(rank) if rank else None)
        faults.setdefault(fault.point, []).append(fault)
    return faults


_armed: dict[str, list[Fault]] = parse(os.environ.get(ENV))
_once_dir: str | None = os.environ.get(ONCE_ENV)
_hits: dict[str, int] = {}
_lock = threading.Lock()


def fault_point(name: str) -> None:
    """A named place where an armed fault may fire (see the module docstring)."""
    if _armed:
        _reach(name)


def _reach(name: str) -> None:
    faults = _armed.get(name)
    if not faults:
        return
    with _lock:
        _hits[name] = hit = _hits.get(name, 0) + 1
    rank = int(os.environ.get("RANK", "0"))
    for fault in faults:
        if fault.hit == hit and fault.rank in (None, rank) and _claim(fault):
            _fire(fault)


def _claim(fault: Fault) -> bool:
    """Whether this process may fire `fault` (always, unless PAPO_FAULTS_ONCE says it already fired)."""
    if not _once_dir:
        return True
    try:
        fd = os.open(Path(_once_dir) / fault.marker_name(), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def _fire(fault: Fault) -> None:
    if fault.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault.action == "hang":
        threading.Event().wait()
    else:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (fault injected at {fault.point})")


def armed() -> bool:
    """Whether any fault is armed in this process."""
    return bool(_armed)


def arrivals(name: str) -> int:
    """How many times this process reached point `name` while a fault was armed at it."""
    return _hits.get(name, 0)


@contextmanager
def inject(spec: str, *, once_dir: str | None = None):
    """Arm the faults of `spec` (PAPO_FAULTS syntax) in this process for the duration of the block,
    with fresh arrival counts; the previous setting is restored afterwards."""
    global _armed, _once_dir, _hits
    saved = (_armed, _once_dir, _hits)
    _armed, _once_dir, _hits = parse(spec), once_dir, {}
    try:
        yield
    finally:
        _armed, _once_dir, _hits = saved
