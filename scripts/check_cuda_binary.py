"""Check a CUDA build of papo_kernels._C: every epilogue kernel has SASS for each required architecture,
and none spills registers to local memory.

    python scripts/check_cuda_binary.py papo_kernels/_C*.so [--arch 80 --arch 90]

Reads `cuobjdump -res-usage` (the CUDA toolkit's, else the one on PATH, else the copy the triton
package ships: a minimal toolkit has nvcc but no cuobjdump). Prints one line per kernel and
architecture (registers, stack, local memory, shared memory) and exits non-zero with the reason
when a kernel is missing for an architecture or uses local memory (LOCAL or STACK > 0: spills).
No GPU is needed. .ci/run runs it on the CI's CUDA build.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Kernel templates of csrc/cuda/ and how many instantiations each has (element types of the
# logits, times those of dZ for the dZ kernel).
KERNELS = {"stats_kernel": 3, "dz_kernel": 9}
_FUNCTION = re.compile(r"^\s*Function (\S+):\s*$")
_ARCH = re.compile(r"^arch = sm_(\d+)")


def find_cuobjdump() -> str | None:
    """The toolkit's cuobjdump (CUDA_HOME, or setup.py's search), PATH's, or triton's bundled copy."""
    candidates = []
    try:
        import runpy

        setup = runpy.run_path(str(ROOT / "setup.py"), run_name="check_cuda_binary")
        home = setup["find_cuda_home"](os.environ)
        if home:
            candidates.append(Path(home) / "bin" / "cuobjdump")
    except Exception:  # noqa: BLE001 - setup.py's search is a convenience here
        pass
    on_path = shutil.which("cuobjdump")
    if on_path:
        candidates.append(Path(on_path))
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    return next((str(c) for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


def demangled_kernel(symbol: str) -> str | None:
    """The kernel template a mangled symbol names ("stats_kernel", ...), or None."""
    return next((k for k in KERNELS if f"{len(k)}{k}I" in symbol), None)


def resource_usage(text: str) -> list[dict]:
    """Rows (arch, kernel, symbol, REG, STACK, LOCAL, SHARED) from `cuobjdump -res-usage` output."""
    rows, arch, symbol = [], None, None
    for line in text.splitlines():
        if m := _ARCH.match(line.strip()):
            arch = int(m.group(1))
        elif m := _FUNCTION.match(line):
            symbol = m.group(1)
        elif symbol is not None and "REG:" in line:
            fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            kernel = demangled_kernel(symbol)
            if kernel is not None:
                rows.append(dict(arch=arch, kernel=kernel, symbol=symbol, **{
                    k: int(fields.get(k, 0)) for k in ("REG", "STACK", "LOCAL", "SHARED")}))
            symbol = None
    return rows


def problems(rows: list[dict], archs: list[int]) -> list[str]:
    """What is wrong with a build: kernels missing for an architecture, local memory (spills)."""
    out = []
    for arch in archs:
        for kernel, count in KERNELS.items():
            found = sum(1 for r in rows if r["arch"] == arch and r["kernel"] == kernel)
            if found != count:
                out.append(f"sm_{arch}: {found} of {count} {kernel} instantiations")
    for r in rows:
        if r["LOCAL"] or r["STACK"]:
            out.append(f"sm_{r['arch']} {r['symbol']}: LOCAL {r['LOCAL']} / STACK {r['STACK']} bytes "
                       "(spills)")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("library", help="the built papo_kernels/_C*.so")
    parser.add_argument("--arch", type=int, action="append",
                        help="required SM architecture (default 80 and 90)")
    args = parser.parse_args(argv)
    archs = args.arch or [80, 90]
    tool = find_cuobjdump()
    if tool is None:
        print("check_cuda_binary: no cuobjdump (CUDA toolkit, PATH or the triton package)", file=sys.stderr)
        return 2
    out = subprocess.run([tool, "-res-usage", args.library], capture_output=True, text=True)
    if out.returncode != 0:
        print(f"check_cuda_binary: {tool} -res-usage failed: {out.stderr.strip()}", file=sys.stderr)
        return 2
    rows = resource_usage(out.stdout)
    for r in sorted(rows, key=lambda r: (r["kernel"], r["arch"], r["symbol"])):
        print(f"sm_{r['arch']}  {r['kernel']:<13} REG {r['REG']:>3}  STACK {r['STACK']}  LOCAL {r['LOCAL']}  "
              f"SHARED {r['SHARED']:>4}  {r['symbol']}")
    bad = problems(rows, archs)
    for line in bad:
        print(f"check_cuda_binary: {line}", file=sys.stderr)
    if not bad:
        print(f"check_cuda_binary: ok: {len(rows)} kernels, sm_{', sm_'.join(map(str, archs))}, no spills")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
