"""Shared benchmark machinery: environment record, timing, memory accounting, result files.

Memory accounting (docs/design.md): extra = peak - (inputs + one gradient per input, in the input's
dtype). On CUDA the peak is `max_memory_allocated`; on CPU it is the process's peak resident
set (VmHWM, reset through /proc/self/clear_refs) measured in a fresh process per provider, so
that one provider's allocator cache never counts against another.

Results: one JSON per device and date, `results/<device>-<date>.json`, with one section per
benchmark ("loss", "step"); the Markdown twin and the PNG plot are regenerated from it after
every phase so that a run cut short still leaves its partial numbers. Rows are also appended to
`results/<bench>.csv` with Liger-Kernel's benchmark columns plus `git_commit` and `device`.
"""

from __future__ import annotations

import csv
import ctypes
import datetime as _dt
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
MB = 1e6
PACKAGES = ("torch", "triton", "transformers", "liger-kernel", "cut-cross-entropy", "verl",
            "deepspeed", "numpy", "matplotlib")


# ---------------------------------------------------------------- environment


def git_commit() -> str:
    """HEAD's hash, with '+dirty' when tracked files differ from it ('unknown' outside git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{_cpu_model()} ({os.cpu_count()} cores)"


def device_slug(device: str) -> str:
    """Short file-name form: 'h100', 'h200', 'cpu-2c'."""
    if device == "cuda":
        name = torch.cuda.get_device_name().lower()
        m = re.search(r"\b([a-z]\d{2,4}[a-z]?)\b", name)
        return m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return f"cpu-{os.cpu_count()}c"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        import papo_kernels

        out["papo_kernels"] = papo_kernels.__version__
    except Exception as exc:  # noqa: BLE001 - recorded, never fatal
        out["papo_kernels"] = f"import failed: {exc}"
    out["torch.cuda"] = str(torch.version.cuda)
    return out


def environment(device: str) -> dict[str, Any]:
    env = {
        "device": device,
        "device_name": device_name(device),
        "slug": device_slug(device),
        "date": _dt.date.today().isoformat(),
        "timestamp": _dt.datetime.now().isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "versions": versions(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env["gpu_memory_gb"] = round(props.total_memory / 1e9, 1)
    return env


# ---------------------------------------------------------------- timing


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_once(fn: Callable[[], Any], device: str, keep: bool = False):
    """Wall seconds of one call, the device drained before and after; with keep=True,
    (seconds, the call's result)."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    seconds = time.perf_counter() - t0
    return (seconds, out) if keep else seconds


def summarize(samples: list[float]) -> dict[str, float]:
    """median, p20, p80, min, max and spread = (max - min) / median of the samples."""
    xs = sorted(samples)
    if not xs:
        return {}

    def q(p: float) -> float:  # linear interpolation, as numpy's default
        k = (len(xs) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    med = statistics.median(xs)
    return {"median": med, "p20": q(0.2), "p80": q(0.8), "min": xs[0], "max": xs[-1],
            "spread": (xs[-1] - xs[0]) / med if med > 0 else 0.0, "n": len(xs)}


class Deadline:
    """A wall-clock budget: `left()` seconds remain; `expired(reserve)` when fewer than reserve."""

    def __init__(self, seconds: float | None):
        self.end = None if not seconds else time.monotonic() + seconds

    def left(self) -> float:
        return math.inf if self.end is None else self.end - time.monotonic()

    def expired(self, reserve: float = 0.0) -> bool:
        return self.left() <= reserve


# ---------------------------------------------------------------- memory


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_bytes() -> int:
    return _status_kb("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kb("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_cpu_memory() -> None:
    """Collect garbage and give free heap pages back to the OS (glibc malloc_trim)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def release_cuda_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError) or isinstance(exc, MemoryError):
        return True
    msg = str(exc)
    return "out of memory" in msg.lower() or "DefaultCPUAllocator: can't allocate" in msg


def run_isolated(module: str, payload: dict, timeout: float) -> dict:
    """Run `python -m module <json>` in a fresh process; its last stdout line is a JSON dict."""
    cmd = [sys.executable, "-m", module, json.dumps(payload)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "reason": f"isolated run exceeded {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    if proc.returncode in (-9, 137):
        return {"status": "oom", "reason": "isolated process killed (out of memory?)"}
    return {"status": "error", "reason": f"rc={proc.returncode}: " + " | ".join(tail)[-400:]}


def search_max_tokens(fits: Callable[[int], bool], start: int, limit: int, granule: int,
                      deadline: Deadline, reserve: float = 30.0) -> dict:
    """Largest n (a multiple of `granule`, <= limit) with fits(n), by doubling then bisection.

    Returns {"max_tokens": n or None, "bound": "exact" | "lower" (limit or time reached),
    "trials": k}. `fits` must clean up after itself (an OOM is False, not an exception).
    """
    trials = 0
    lo, hi = 0, None  # lo fits (0 = none found yet); hi fails
    n = max(granule, (start // granule) * granule)
    while hi is None and n <= limit:
        if deadline.expired(reserve):
            return {"max_tokens": lo or None, "bound": "lower", "trials": trials}
        trials += 1
        if fits(n):
            lo, n = n, n * 2
        else:
            hi = n
    if hi is None:  # even the limit fits
        return {"max_tokens": lo or None, "bound": "lower", "trials": trials}
    if lo == 0:  # the start failed: walk down
        n = hi // 2
        while n >= granule:
            if deadline.expired(reserve):
                return {"max_tokens": None, "bound": "lower", "trials": trials}
            trials += 1
            if fits(n):
                lo = n
                break
            hi, n = n, n // 2
        if lo == 0:
            return {"max_tokens": None, "bound": "exact", "trials": trials}
    while hi - lo > granule and (hi - lo) / lo > 0.05:  # 5% or one granule resolution
        if deadline.expired(reserve):
            return {"max_tokens": lo, "bound": "lower", "trials": trials}
        mid = ((lo + hi) // 2 // granule) * granule
        if mid in (lo, hi):
            break
        trials += 1
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return {"max_tokens": lo, "bound": "exact", "trials": trials}


# ---------------------------------------------------------------- result files


def results_stem(env: dict) -> str:
    return f"{env['slug']}-{env['date']}"


def load_results(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def save_section(section: str, payload: dict, env: dict, out_dir: Path,
                 render_md: Callable[[dict], str], plot: Callable[[dict, Path], str | None] | None,
                 mirror_dir: Path | None = None) -> dict[str, Path]:
    """Merge `payload` as `section` into <out_dir>/<device>-<date>.json, rewrite the .md and
    the section's .png; copy them to mirror_dir too (a lent GPU's $OUT)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = results_stem(env)
    jpath = out_dir / f"{stem}.json"
    doc = load_results(jpath)
    doc["env"] = env  # the latest run's; each section keeps its own (runs may differ in commit)
    doc[section] = dict(payload, env=env)
    tmp = jpath.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    tmp.replace(jpath)
    mpath = out_dir / f"{stem}.md"
    mpath.write_text(render_md(doc))
    written = {"json": jpath, "md": mpath}
    if plot is not None:
        png = out_dir / f"{stem}-{section}.png"
        try:
            if plot(payload, png):
                written["png"] = png
        except Exception as exc:  # noqa: BLE001 - a plot never sinks the numbers
            print(f"[bench] plot skipped: {type(exc).__name__}: {exc}", file=sys.stderr)
    if mirror_dir is not None:
        mirror_dir.mkdir(parents=True, exist_ok=True)
        for p in written.values():
            shutil.copy2(p, mirror_dir / p.name)
    return written


LIGER_COLUMNS = ["kernel_name", "kernel_provider", "metric_name", "metric_unit", "gpu_name",
                 "x_name", "x_label", "x_value", "y_value_50", "y_value_20", "y_value_80",
                 "extra_benchmark_config_str", "timestamp", "kernel_operation_mode",
                 "papo_kernels_version", "git_commit", "device"]


def append_csv(path: Path, rows: list[dict]) -> None:
    """Append rows with Liger's benchmark columns (plus git_commit and device)."""
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LIGER_COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if x == 0:
            return "0"
        mag = abs(x)
        if mag >= 100:
            return f"{x:.0f}"
        if mag >= 10:
            return f"{x:.1f}"
        return f"{x:.{digits - 1}f}" if mag >= 1 else f"{x:.{digits}g}"
    return str(x)


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def env_md(env: dict) -> str:
    v = env.get("versions", {})
    vs = ", ".join(f"{k} {val}" for k, val in v.items() if val != "not installed")
    missing = ", ".join(k for k, val in v.items() if val == "not installed")
    lines = [f"- device: **{env.get('device_name')}** ({env.get('device')}, "
             f"{env.get('torch_threads')} torch threads)",
             f"- date: {env.get('timestamp')}; git commit: `{env.get('git_commit')}`",
             f"- versions: {vs}"]
    if missing:
        lines.append(f"- not installed: {missing}")
    return "\n".join(lines)


def render_document(doc: dict, renderers: dict[str, Callable[[dict], str]]) -> str:
    env = doc.get("env", {})
    parts = [f"# Benchmarks: {env.get('device_name', '?')}, {env.get('date', '?')}", ""]
    for section, render in renderers.items():
        if section in doc:
            parts += [render(doc[section]), "", env_md(doc[section].get("env", env)), ""]
    return "\n".join(parts)
