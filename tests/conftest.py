"""Shared test setup: Triton interpreter on GPU-less machines, fixed seeds, the gpu marker, skips
that fail under CI, and the tiny model's assets shared by the trainer tests (`tiny_assets`, `assets`;
their plain helpers are in tests/_tiny_runs.py).

Under CI=true (.ci/run sets it) every dependency of the suite is installed (the README's
test command installs the extras the suite needs, and the CI torch brings triton), so a skipped test means
something is broken, e.g. an import error that a module-level skip would hide: such a skip is
reported as a failure. Only tests marked `gpu` may skip there (CI has no GPU), and tests whose
skip reason names a dependency that CI deliberately does not install (NOT_INSTALLED_BY_CI).
"""

import os
import re

# Must happen before anything imports triton: without an NVIDIA device, Triton kernels can only
# run under the interpreter (docs/design.md "Backends and dispatch").
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests._tiny_runs import build_tiny_assets  # noqa: E402

# Optional dependencies that the README's test command does not install, and why. A skip whose
# reason names one of them (as a word) stays a skip under CI=true; every other skip fails there.
# .ci/run installs verl in a later stage and reruns its tests with PAPO_REQUIRE_VERL=1, where a
# verl skip fails too.
NOT_INSTALLED_BY_CI = {
    "verl": "its pins conflict with ours: it installs apart, pip install --no-deps verl==0.9.1",
}
if os.environ.get("PAPO_REQUIRE_VERL") == "1":
    del NOT_INSTALLED_BY_CI["verl"]


def _under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _fail_skip(report, what: str) -> None:
    reason = _skip_reason(report)
    if any(re.search(rf"\b{re.escape(name)}\b", reason) for name in NOT_INSTALLED_BY_CI):
        return
    report.outcome = "failed"
    report.longrepr = (
        f"{what} skipped under CI=true ({reason}). CI installs the suite's dependencies (the "
        "README's test command, triton with the CI torch), so this skip hides a failure; only `gpu` "
        f"tests, and those of {sorted(NOT_INSTALLED_BY_CI)} (not installed by CI), may skip in CI."
    )


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is visible on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if (_under_ci() and report.skipped and not hasattr(report, "wasxfail")
            and "gpu" not in item.keywords):
        _fail_skip(report, "test")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    # a module-level skip (pytest.skip(allow_module_level=True), importorskip) skips every test
    # of the module at once
    outcome = yield
    report = outcome.get_result()
    if _under_ci() and report.skipped:
        _fail_skip(report, f"module {report.nodeid}")


# --------------------------------------------------------------------------- the tiny model's assets


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """build(n_train, n_val) -> a directory holding the tiny model (tiny_model/) and that many
    synthetic questions (data/); each size is built once per session. Runs copy it
    (`tests._tiny_runs.fresh_dir`), never write into it."""
    built: dict[tuple[int, int], Path] = {}

    def build(n_train: int, n_val: int) -> Path:
        if (n_train, n_val) not in built:
            root = tmp_path_factory.mktemp(f"assets_{n_train}_{n_val}")
            built[(n_train, n_val)] = build_tiny_assets(root, n_train=n_train, n_val=n_val)
        return built[(n_train, n_val)]

    return build


@pytest.fixture(scope="session")
def assets(tiny_assets):
    """The tiny model and the data of the trainer tests' run (`tests._tiny_runs.FAST`: 32 + 8
    questions); a module whose runs use other sizes overrides this fixture."""
    return tiny_assets(32, 8)
