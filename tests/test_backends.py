"""papo_kernels._backends: a missing optional dependency makes a backend unavailable; a broken
import inside our own code raises (it must never turn into "unavailable" and skipped tests)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from papo_kernels import _backends

ROOT = Path(__file__).resolve().parent.parent


def _package(root: Path, name: str, files: dict[str, str]) -> None:
    (root / name).mkdir()
    for filename, text in files.items():
        (root / name / filename).write_text(textwrap.dedent(text))


def test_only_missing_optional_pieces_are_unavailable(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    _package(tmp_path, "needs_dep", {"__init__.py": "import papo_test_absent_dependency\n"})
    _package(tmp_path, "wrong_name", {"__init__.py": "from wrong_name.helpers import absent\n",
                                      "helpers.py": "present = 1\n"})
    _package(tmp_path, "wrong_module", {"__init__.py": "from wrong_module import absent_submodule\n"})
    _package(tmp_path, "third_party", {"__init__.py": "import papo_test_other_absent_package\n"})
    optional = ("papo_test_absent_dependency",)

    def load(module):
        return _backends._optional_backend("x", module, "not here", optional=optional)

    backend, reason = load("needs_dep")  # the optional dependency is missing
    assert backend is None and "papo_test_absent_dependency" in reason
    backend, reason = load("papo_test_backend_not_built")  # the backend module is not in this build
    assert backend is None and reason.startswith("not here")
    for broken in ("wrong_name", "wrong_module", "third_party"):  # bugs or undeclared dependencies
        with pytest.raises(ImportError):
            load(broken)


def test_the_triton_kernels_import():
    pytest.importorskip("triton")
    backend, reason = _backends._triton_backend()
    assert backend is not None and backend.name == "triton", reason


def test_without_triton_the_backend_is_unavailable():
    """triton hidden from a fresh interpreter: importing works and backend='triton' says why not."""
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # as if triton were not installed
        import torch
        import papo_kernels as pk
        assert "triton" not in pk.available_backends("cpu"), pk.available_backends("cpu")
        try:
            targets = torch.zeros(2, dtype=torch.long)
            pk.token_stats(torch.zeros(2, 4), torch.zeros(8, 4), targets, backend="triton")
        except pk.BackendUnavailableError as exc:
            assert "pip install triton" in str(exc) and "triton" in str(exc), exc
        else:
            raise AssertionError("backend='triton' ran without triton")
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_a_refused_build_is_unavailable_and_auto_says_why():
    """A compiled extension made for another torch: backend='cpp' raises with the rebuild hint,
    and backend='auto' runs the torch backend on CPU with one warning saying why (never an
    ImportError, which would mean a bug in our own modules)."""
    import importlib.util

    if importlib.util.find_spec("papo_kernels._C") is None:
        pytest.skip("the C++ extension is not built here (pip install --no-build-isolation -e .)")
    code = textwrap.dedent("""
        import warnings
        import torch
        torch.__version__ = "1.0.0"  # as if the extension had been built for another torch
        import papo_kernels as pk
        h, w, t = torch.randn(3, 4), torch.randn(8, 4), torch.tensor([1, 2, 3])
        try:
            pk.token_stats(h, w, t, backend="cpp")
        except pk.BackendUnavailableError as exc:
            assert "built against torch" in str(exc) and "--no-build-isolation" in str(exc), exc
        else:
            raise AssertionError("backend='cpp' loaded a build made for another torch")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                pk.token_stats(h, w, t)
        messages = [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning)]
        assert len(messages) == 1 and "built against torch" in messages[0], messages
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("PAPO_KERNELS_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_strategies_belong_to_their_backends():
    """'tiles' is the cpp backend's; the Triton backend refuses it by name; the retired
    'fused' names the reason everywhere."""
    import torch

    import papo_kernels as pk

    h, w, t = torch.randn(3, 4), torch.randn(8, 4), torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="strategy='tiles' is the cpp backend's"):
        pk.token_stats(h, w, t, backend="triton", strategy="tiles")
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match="strategy='fused' was retired"):
            pk.token_stats(h, w, t, backend=backend, strategy="fused")
    ref = pk.token_stats(h, w, t, backend="torch", strategy="tiles")  # one strategy: any valid name
    assert torch.isfinite(ref.logp).all()
