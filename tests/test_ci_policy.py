"""tests/conftest.py's CI policy, on a throwaway suite: under CI=true a skip fails (the test's
and a whole module's), except for `gpu` tests and dependencies CI does not install (verl);
outside CI a skip stays a skip."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

SUITE = {
    "test_skips.py": """
        import pytest

        def test_passes():
            pass

        def test_skips():
            pytest.skip("an optional dependency is missing")

        def test_needs_verl():
            pytest.skip("verl 0.9.1 does not import here")  # CI does not install verl

        @pytest.mark.gpu
        def test_needs_a_gpu():
            assert False, "gpu tests are skipped without CUDA before they run"
    """,
    "test_module_skip.py": """
        import pytest

        pytest.importorskip("papo_test_absent_module")

        def test_never_collected():
            pass
    """,
}


def _run_suite(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    suite = tmp_path / f"suite_{ci}"
    suite.mkdir()
    shutil.copy(HERE / "conftest.py", suite / "conftest.py")
    (suite / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a CUDA device\n")
    for name, text in SUITE.items():
        (suite / name).write_text(textwrap.dedent(text))
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    # the copied conftest imports the repository's tests package (shared tiny-model assets),
    # which an installed checkout does not put on sys.path for a suite elsewhere
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), *filter(None, [env.get("PYTHONPATH")])])
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                           "--continue-on-collection-errors", str(suite)],
                          cwd=suite, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("ci", [None, "true"])
def test_skips_fail_under_ci_except_gpu_tests(tmp_path, ci):
    out = _run_suite(tmp_path, ci)
    text = out.stdout + out.stderr
    last = text.strip().splitlines()[-1]
    assert "PASSED test_skips.py::test_passes" in text, text[-3000:]
    assert "needs a CUDA device" in text, text[-3000:]  # the gpu test: skipped in both cases
    if ci is None:
        assert out.returncode == 0, text[-3000:]
        assert last.startswith("1 passed, 4 skipped"), last
    else:
        assert out.returncode == 1, text[-3000:]
        assert last.startswith("1 failed, 1 passed, 2 skipped, 1 error"), last
        assert "FAILED test_skips.py::test_skips" in text and "ERROR test_module_skip.py" in text
        assert "skipped under CI=true" in text
