"""setup.py's build logic: when the C++ and CUDA sources are built, where the CUDA toolkit is found,
and the refusal to build a wheel without torch (instead of silently leaving the extension out).

setup.py is loaded with runpy under a name other than __main__, so setup() does not run.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
S = runpy.run_path(str(ROOT / "setup.py"), run_name="setup_under_test")


def test_cuda_sources_build_only_with_a_gpu_or_when_forced():
    plan = S["cuda_plan"]
    cu = ["csrc/cuda/stats.cu"]
    assert plan([], {}, True, "13.0") == (False, "no CUDA sources (csrc/**/*.cu)")
    assert plan(cu, {}, True, "13.0") == (True, "a GPU is visible")
    built, why = plan(cu, {}, False, "13.0")
    assert not built and "PAPO_BUILD_CUDA=1" in why  # the CPU machine is told how to force it
    assert plan(cu, {"PAPO_BUILD_CUDA": "1"}, False, "13.0") == (True, "PAPO_BUILD_CUDA=1")
    assert plan(cu, {"PAPO_BUILD_CUDA": "0"}, True, "13.0") == (False, "PAPO_BUILD_CUDA=0")
    built, why = plan(cu, {"PAPO_BUILD_CUDA": "1"}, True, None)
    assert not built and "CPU build" in why
    with pytest.raises(ValueError, match="PAPO_BUILD_CUDA must be 0, 1 or unset"):
        plan(cu, {"PAPO_BUILD_CUDA": "yes"}, True, "13.0")


def _toolkit(root: Path) -> Path:
    (root / "include").mkdir(parents=True)
    (root / "include" / "cuda_runtime.h").write_text("")
    (root / "bin").mkdir()
    (root / "bin" / "nvcc").write_text("")
    return root


def test_cuda_home_from_the_environment_then_nvcc(tmp_path):
    find = S["find_cuda_home"]
    assert find({"CUDA_HOME": "/opt/cuda"}, which=lambda _: None) == "/opt/cuda"
    assert find({"CUDA_PATH": "/opt/cuda-p"}, which=lambda _: None) == "/opt/cuda-p"
    # nvcc on PATH is a symlink into the toolkit: its real location gives the root
    toolkit = _toolkit(tmp_path / "cuda-13.0")
    link_dir = tmp_path / "bin"
    link_dir.mkdir()
    (link_dir / "nvcc").symlink_to(toolkit / "bin" / "nvcc")
    assert find({}, which=lambda _: str(link_dir / "nvcc"), defaults=()) == str(toolkit)


def test_cuda_home_behind_a_wrapper_script(tmp_path):
    """/usr/local/bin/nvcc as a shell script exec'ing the real one: torch's guess (/usr/local)
    fails at link time; nvcc --dryrun reports where the real nvcc lives."""
    toolkit = _toolkit(tmp_path / "cuda-13.0")
    wrapper = tmp_path / "local" / "bin" / "nvcc"
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f"#!/bin/sh\nexec {toolkit}/bin/nvcc \"$@\"\n")

    class Dryrun:
        stdout = ""
        stderr = f"#$ _NVVM_BRANCH_=nvvm\n#$ _HERE_={toolkit}/bin\n#$ _THERE_={toolkit}/bin\n"

    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        return Dryrun()

    assert find_home(which=lambda _: str(wrapper), run=run) == str(toolkit)
    assert calls and calls[0][0] == str(wrapper) and "--dryrun" in calls[0]
    assert find_home(which=lambda _: None, run=run) is None  # nothing on PATH, no default


def find_home(**kw):
    return S["find_cuda_home"]({}, defaults=(), **kw)


def test_binary_commands_need_the_extension_metadata_does_not():
    building = S["building_binaries"]
    assert building(["bdist_wheel"]) and building(["editable_wheel", "--dist-dir", "x"])
    assert building(["build_ext", "--inplace"])
    assert not building(["sdist"]) and not building(["egg_info"]) and not building(["dist_info"])


def test_extension_sources():
    cpp, cu = S["extension_sources"](str(ROOT))
    assert "csrc/papo_kernels.cpp" in cpp and "csrc/python_module.cpp" in cpp
    assert any(p.startswith("csrc/cpu/") for p in cpp)
    assert not any(p.startswith("csrc/tests/") for p in cpp)  # the ctest program is CMake's
    assert cu == sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("csrc/**/*.cu"))


def test_the_cuda_epilogues_are_in_the_build_plan():
    """csrc/cuda/ holds one .cu file per kernel; PAPO_BUILD_CUDA=1 builds them with the extension
    (no GPU needed), together with the op registration, which every build compiles."""
    cpp, cu = S["extension_sources"](str(ROOT))
    assert {"csrc/cuda/stats_epilogue.cu", "csrc/cuda/dz_epilogue.cu"} <= set(cu)
    assert "csrc/epilogue_ops.cpp" in cpp
    assert S["cuda_plan"](cu, {"PAPO_BUILD_CUDA": "1"}, False, "13.0") == (True, "PAPO_BUILD_CUDA=1")
    assert not S["cuda_plan"](cu, {}, False, "13.0")[0]  # the README's install on a CPU machine


def test_the_cpu_fallback_gets_setuptools_build_state():
    """A failed CUDA build falls back to the CPU extension, created after setuptools finalized the
    original: without the copied state setuptools raised "'Extension' object has no attribute
    '_needs_stub'" and the fallback never built."""
    from setuptools import Extension

    built, fallback = Extension("papo_kernels._C", ["a.cu"]), Extension("papo_kernels._C", ["a.cpp"])
    values = ("papo_kernels._C", False, False, "papo_kernels/_C.so")
    for attr, value in zip(S["FINALIZED_EXTENSION_ATTRS"], values):
        setattr(built, attr, value)
    assert S["carry_finalized_state"](built, fallback) is fallback
    assert all(getattr(fallback, a) == getattr(built, a) for a in S["FINALIZED_EXTENSION_ATTRS"])


def test_capability_files_get_their_instruction_sets(monkeypatch):
    import platform

    flags = S["_isa_flags"]
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert "-mavx2" in flags("csrc/cpu/epilogue_avx2.cpp")
    assert "-mavx512f" in flags("csrc/cpu/epilogue_avx512.cpp")
    assert flags("csrc/cpu/workspace.cpp") is None
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert flags("csrc/cpu/epilogue_avx2.cpp") is None


def _setup_py(*argv: str, block_torch: bool) -> subprocess.CompletedProcess:
    code = (
        "import runpy, sys\n"
        + ("sys.modules['torch'] = None\n" if block_torch else "")
        + f"sys.argv = ['setup.py', *{list(argv)!r}]\n"
        + "runpy.run_path('setup.py', run_name='__main__')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PAPO_SKIP_EXTENSION"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=env)


def test_a_wheel_without_torch_is_refused_with_instructions():
    out = _setup_py("bdist_wheel", block_torch=True)
    assert out.returncode != 0
    assert "torch is not importable" in out.stderr and "pip install --no-build-isolation -e ." in out.stderr
    assert "PAPO_SKIP_EXTENSION=1" in out.stderr


def test_metadata_needs_no_torch():
    out = _setup_py("--name", block_torch=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "papo-kernels"
