"""Shared test setup: Triton interpreter on GPU-less machines, fixed seeds, the gpu marker."""

import os

# Must happen before anything imports triton: without an NVIDIA device, Triton kernels can only
# run under the interpreter (docs/design.md "Backends and dispatch").
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


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
