"""Build script: metadata lives in pyproject.toml; this file only adds the optional extension.

The C++/CUDA extension (csrc/) is built when its sources exist and torch is importable in the
build environment (install with --no-build-isolation so it builds against your torch). Switches:
PAPO_SKIP_EXTENSION=1 skips it entirely, PAPO_SKIP_CUDA_BUILD=1 skips only the CUDA part;
TORCH_CUDA_ARCH_LIST (default "8.0;9.0" when no GPU is visible) and NVCC_THREADS are honoured;
MAX_JOBS is derived from cores and free memory when unset.
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _max_jobs() -> str:
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            avail_kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
        by_mem = max(1, avail_kb // (3 * 1024 * 1024))  # ~3 GB per nvcc/g++ job
    except (OSError, StopIteration, ValueError):
        by_mem = cores
    return str(max(1, min(cores, by_mem)))


def _extensions():
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    if os.environ.get("PAPO_SKIP_EXTENSION") == "1" or not cpp_sources:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("papo-kernels: torch is not importable at build time; skipping the C++ extension "
              "(install with --no-build-isolation to build it)")
        return [], {}
    os.environ.setdefault("MAX_JOBS", _max_jobs())
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    want_cuda = (
        bool(cuda_sources)
        and os.environ.get("PAPO_SKIP_CUDA_BUILD") != "1"
        and torch.version.cuda is not None
        and CUDA_HOME is not None
    )
    cxx = ["-O3", "-std=c++20"]
    if want_cuda:
        if not torch.cuda.is_available():
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        nvcc = ["-O3", "-std=c++20", "--use_fast_math", f"--threads={os.environ.get('NVCC_THREADS', '4')}"]
        ext = CUDAExtension(
            "papo_kernels._C",
            cpp_sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DPAPO_WITH_CUDA"], "nvcc": nvcc},
        )
    else:
        if cuda_sources:
            print("papo-kernels: building the C++ extension without CUDA "
                  "(no CUDA torch, no CUDA_HOME, or PAPO_SKIP_CUDA_BUILD=1)")
        ext = CppExtension("papo_kernels._C", cpp_sources, extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
