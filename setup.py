"""Build script: metadata lives in pyproject.toml; this file builds the C++ extension (csrc/).

The extension (`papo_kernels._C`, the "cpp" backend) must be compiled against the torch that will
import it, so install torch first and build without pip's isolated build environment (which has
no torch, or a different one):

    pip install torch setuptools wheel ninja
    pip install --no-build-isolation -e .

Building a wheel or an editable install with torch missing from the build environment is an
error that says this, never a silent package without the extension. An sdist needs no torch.
papo_kernels/extension.py refuses to load a build made against another torch version and says
how to rebuild.

Switches (environment variables):
    PAPO_SKIP_EXTENSION=1   build no extension (pure Python package; backend="cpp" unavailable)
    PAPO_BUILD_CUDA=1 | 0   build the CUDA sources (csrc/**/*.cu) even without a visible GPU | never;
                            unset: only when a GPU is visible. A failed CUDA build falls back to
                            the CPU extension and says why.
    CUDA_HOME               the toolkit; unset: found from nvcc's real location (a wrapper script
                            on PATH is asked where the real nvcc lives)
    TORCH_CUDA_ARCH_LIST    default "8.0;9.0" when no GPU is visible;  NVCC_THREADS (default 4)
    MAX_JOBS                parallel compile jobs, derived from cores and free memory when unset
"""

import glob
import os
import platform
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "papo_kernels._C"
# Commands that compile binaries; sdist and the metadata hooks (egg_info, dist_info) do not.
BINARY_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install", "bdist_egg"}
# Instruction-set flags of the per-capability epilogue files (csrc/cpu/*_<isa>.cpp) on x86-64.
ISA_FLAGS = {
    "_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
}


def building_binaries(argv: list[str]) -> bool:
    return any(arg in BINARY_COMMANDS for arg in argv)


def extension_sources(root: str = ROOT) -> tuple[list[str], list[str]]:
    """(C++ sources, CUDA sources) of the extension, relative to root; csrc/tests/ is CMake's."""
    def find(pattern):
        found = glob.glob(os.path.join(root, "csrc", "**", pattern), recursive=True)
        rel = sorted(os.path.relpath(p, root) for p in found)
        return [p for p in rel if not p.startswith(os.path.join("csrc", "tests") + os.sep)]

    return find("*.cpp"), find("*.cu")


def cuda_plan(cuda_sources: list[str], env, gpu_visible: bool, torch_cuda: str | None) -> tuple[bool, str]:
    """(build the CUDA sources?, why): a CPU machine does not spend minutes in nvcc."""
    if not cuda_sources:
        return False, "no CUDA sources (csrc/**/*.cu)"
    flag = env.get("PAPO_BUILD_CUDA", "")
    if flag not in ("", "0", "1"):
        raise ValueError(f"PAPO_BUILD_CUDA must be 0, 1 or unset, got {flag!r}")
    if flag == "0":
        return False, "PAPO_BUILD_CUDA=0"
    if torch_cuda is None:
        return False, "this torch is a CPU build (torch.version.cuda is None)"
    if flag == "1":
        return True, "PAPO_BUILD_CUDA=1"
    if gpu_visible:
        return True, "a GPU is visible"
    return False, "no GPU is visible (PAPO_BUILD_CUDA=1 builds the CUDA sources anyway)"


def _nvcc_dir_from_dryrun(nvcc: str, run=subprocess.run) -> str | None:
    """The directory of the real nvcc behind `nvcc` (which may be a wrapper script)."""
    try:
        out = run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                  capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ _HERE_=(.+)$", (out.stdout or "") + (out.stderr or ""), re.MULTILINE)
    return match.group(1).strip() if match else None


def _is_toolkit(home: str) -> bool:
    return os.path.exists(os.path.join(home, "include", "cuda_runtime.h"))


def find_cuda_home(env, which=shutil.which, run=subprocess.run, defaults=("/usr/local/cuda",)) -> str | None:
    """CUDA_HOME / CUDA_PATH, else the toolkit around nvcc's real location, else `defaults`.

    torch's own guess (the parent of the nvcc on PATH) fails at link time ("cannot find
    -lcudart") when that nvcc is a wrapper under /usr/local/bin.
    """
    for key in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(key):
            return env[key]
    nvcc = which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if _is_toolkit(home):
            return home
        here = _nvcc_dir_from_dryrun(nvcc, run)
        if here and _is_toolkit(os.path.dirname(here)):
            return os.path.dirname(here)
    return next((home for home in defaults if _is_toolkit(home)), None)


# What setuptools' build_ext.finalize_options sets on each extension it was handed; the CPU
# fallback, created after that, needs them too (without them setuptools fails on its own
# bookkeeping: "'Extension' object has no attribute '_needs_stub'").
FINALIZED_EXTENSION_ATTRS = ("_full_name", "_links_to_dynamic", "_needs_stub", "_file_name")


def carry_finalized_state(built, replacement):
    """Copy setuptools' per-extension build state from `built` onto `replacement`; returns it."""
    for attr in FINALIZED_EXTENSION_ATTRS:
        if hasattr(built, attr):
            setattr(replacement, attr, getattr(built, attr))
    return replacement


def _max_jobs() -> str:
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            avail_kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
        by_mem = max(1, avail_kb // (3 * 1024 * 1024))  # ~3 GB per nvcc/g++ job
    except (OSError, StopIteration, ValueError):
        by_mem = cores
    return str(max(1, min(cores, by_mem)))


def _isa_flags(source: str) -> list[str] | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None  # the capability files then compile to empty stubs
    return next((flags for suffix, flags in ISA_FLAGS.items() if source.endswith(suffix)), None)


def _extension_and_command():
    try:
        import torch
    except ImportError:
        sys.exit(
            "papo-kernels: the C++ extension is compiled against torch, but torch is not importable in "
            "this build environment (pip's default isolated build has none). Install torch first, then "
            "build without isolation:\n"
            "    pip install torch setuptools wheel ninja\n"
            "    pip install --no-build-isolation -e .\n"
            "To install without the extension (backend='cpp' unavailable): PAPO_SKIP_EXTENSION=1."
        )
    cpp_sources, cuda_sources = extension_sources()
    build_cuda, why = cuda_plan(cuda_sources, os.environ, torch.cuda.is_available(), torch.version.cuda)
    if build_cuda:
        home = find_cuda_home(os.environ)
        if home is None:
            build_cuda, why = False, "no CUDA toolkit found (set CUDA_HOME)"
        else:
            # before torch.utils.cpp_extension computes its CUDA_HOME at import
            os.environ["CUDA_HOME"] = home
    print(f"papo-kernels: CUDA sources {'built' if build_cuda else 'not built'}: {why}")
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    os.environ.setdefault("MAX_JOBS", _max_jobs())
    macros = [
        ("PAPO_TORCH_VERSION", f'"{torch.__version__}"'),
        ("PAPO_TORCH_GIT_VERSION", f'"{torch.version.git_version}"'),
    ]
    # -fopenmp: at::parallel_for is an inline OpenMP region (ATen/ParallelOpenMP.h); without it
    # our parallel loops would silently run on one thread. -g0: no debug info (Python's CFLAGS
    # add -g). The pragma and maybe-uninitialized warnings come from ATen's vector headers
    # (torch builds with the same two switches).
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    cxx = ["-O3", "-std=c++20", "-g0", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized"] + openmp
    python_sources = cpp_sources  # csrc/python_module.cpp makes the library importable

    def cpu_extension():
        return CppExtension(EXT_NAME, python_sources, define_macros=macros, extra_compile_args={"cxx": cxx},
                            extra_link_args=openmp)

    if build_cuda:
        if not torch.cuda.is_available():
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        nvcc = ["-O3", "-std=c++20", f"--threads={os.environ.get('NVCC_THREADS', '4')}"]
        ext = CUDAExtension(EXT_NAME, python_sources + cuda_sources,
                            define_macros=macros + [("PAPO_WITH_CUDA", "1")],
                            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=openmp)
    else:
        ext = cpu_extension()

    class PapoBuildExtension(BuildExtension):
        """torch's BuildExtension plus per-file instruction-set flags and the CUDA fallback."""

        def build_extension(self, ext):
            try:
                self._build_with_isa_objects(ext)
            except Exception as exc:  # noqa: BLE001 - any CUDA compile/link failure falls back
                if not any(s.endswith(".cu") for s in ext.sources):
                    raise
                print(f"papo-kernels: the CUDA build failed ({type(exc).__name__}: {exc}); "
                      "building the CPU extension instead")
                fallback = carry_finalized_state(ext, cpu_extension())
                # the flags BuildExtension.build_extensions added to the original extension
                fallback.extra_compile_args = {"cxx": list(ext.extra_compile_args["cxx"])}
                fallback.define_macros = [m for m in ext.define_macros if m[0] != "PAPO_WITH_CUDA"]
                self._build_with_isa_objects(fallback)

        def _build_with_isa_objects(self, ext):
            # setuptools has one flag set per extension: the capability files are compiled here
            # with their own -m flags and linked in as objects.
            isa = {src: flags for src in ext.sources if (flags := _isa_flags(src))}
            objects = []
            for src, flags in isa.items():
                args = dict(ext.extra_compile_args)
                args["cxx"] = list(args["cxx"]) + flags
                objects += self.compiler.compile([src], output_dir=self.build_temp, macros=ext.define_macros,
                                                 include_dirs=ext.include_dirs, debug=self.debug,
                                                 extra_postargs=args, depends=ext.depends)
            ext.sources = [s for s in ext.sources if s not in isa]
            ext.extra_objects = list(ext.extra_objects or []) + objects
            super().build_extension(ext)

    return [ext], {"build_ext": PapoBuildExtension}


def main():
    ext_modules, cmdclass = [], {}
    if building_binaries(sys.argv[1:]) and os.environ.get("PAPO_SKIP_EXTENSION") != "1":
        ext_modules, cmdclass = _extension_and_command()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)


if __name__ == "__main__":  # setuptools.build_meta runs this file as __main__; tests import it
    main()
