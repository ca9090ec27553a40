"""Which epilogue kernels the Triton workspace path runs: its Triton ones or the extension's CUDA C++ ones.

The workspace path (workspace.py) computes each chunk's logits with a GEMM and reads them with
two epilogues, statistics and dZ. Both exist twice: as Triton kernels (stats_workspace.py,
stats_combine.py, grad_workspace.py) and as CUDA C++ kernels in the compiled extension
(csrc/cuda/, ops papo_kernels_C::epilogue_stats / epilogue_dz), with the same semantics; the
chunk loop, the GEMMs and the dZ ring are shared.

    strategy="workspace"        Triton epilogues
    strategy="workspace_cuda"   CUDA epilogues; BackendUnavailableError, saying how to rebuild,
                                when the extension is missing, was built without CUDA
                                (PAPO_BUILD_CUDA=1 builds it) or not for this GPU's architecture
    strategy="auto"             CUDA epilogues only where CUDA_EPILOGUE_EVIDENCE has a committed
                                GPU run for this GPU family whose gpu tests of the CUDA epilogues
                                passed and whose loss benchmark measured them faster than the
                                Triton ones (and the extension can run them here); Triton otherwise

CUDA_EPILOGUE_EVIDENCE is empty until such a run exists: `auto` keeps the Triton epilogues.
After a GPU window (benchmarks/gpu_session.sh: stage "tests" runs tests/test_cuda_epilogue.py,
stage "loss16k" times `triton:fused:workspace` beside `triton:fused:workspace_cuda`), commit the
results and add an entry naming the committed files and the two medians;
tests/test_cuda_epilogue.py checks that every entry's files exist, that the junit log has the
CUDA epilogue tests passing, and that the results file holds the two times.

Under the Triton interpreter (CPU tensors) `workspace_cuda` runs the ops' CPU registration, the
host reference of the CUDA kernels (same math, same per-thread decomposition): the chunk loop's
plumbing is tested on CPU, the kernels themselves on a GPU.
"""

from __future__ import annotations

import dataclasses

import torch

from papo_kernels._backends import BackendUnavailableError
from papo_kernels._strategies import check_strategy
from papo_kernels.kernels import _config

EPILOGUES = ("triton", "cuda")


@dataclasses.dataclass(frozen=True)
class Evidence:
    """A committed GPU run that tested and timed the CUDA epilogues beside the Triton ones.

    Paths are relative to the repository root. `triton_s` / `cuda_s`: the median seconds of
    `triton:fused:workspace` and `triton:fused:workspace_cuda` (two views fwd+bwd, 7B head,
    16k tokens) in `results`' loss-16k section.
    """

    gpu: str  # e.g. "NVIDIA H200"
    junit: str  # benchmarks/results/<gpu>-<date>-tests-junit.xml
    results: str  # benchmarks/results/<gpu>-<date>.json
    triton_s: float
    cuda_s: float

    @property
    def cuda_faster(self) -> bool:
        return self.cuda_s < self.triton_s


# GPU family (_config.gpu_family: "sm90", "sm80") -> the run that decides `auto` there.
CUDA_EPILOGUE_EVIDENCE: dict[str, Evidence] = {}


def cuda_epilogue_support(device: torch.device) -> tuple[bool, str]:
    """(whether the extension's epilogue ops run on `device`, why not)."""
    try:
        from papo_kernels import extension
    except ImportError as exc:
        return False, (f"the CUDA epilogues are ops of the C++ extension, which is not available "
                       f"({exc}); build it with PAPO_BUILD_CUDA=1 pip install --no-build-isolation -e .")
    return extension.epilogue_support(device)


def choose_epilogue(strategy: str, device: torch.device) -> str:
    """"triton" or "cuda" for a Triton-backend call with `strategy` on `device`.

    Raises ValueError for the cpp backend's "tiles" and BackendUnavailableError for an
    explicit "workspace_cuda" that cannot run here.
    """
    strategy = check_strategy(strategy)
    if strategy == "tiles":
        raise ValueError("strategy='tiles' is the cpp backend's (CPU); the Triton backend has 'workspace', "
                         "'workspace_cuda' (or 'auto')")
    if strategy == "workspace":
        return "triton"
    if strategy == "workspace_cuda":
        ok, reason = cuda_epilogue_support(device)
        if not ok:
            raise BackendUnavailableError(f"strategy='workspace_cuda' is not available: {reason}")
        return "cuda"
    return auto_epilogue(device)


def auto_epilogue(device: torch.device) -> str:
    """The CUDA epilogues where committed evidence says they passed and were faster, else Triton."""
    if device.type != "cuda":
        return "triton"
    evidence = CUDA_EPILOGUE_EVIDENCE.get(_config.gpu_family(device))
    if evidence is None or not evidence.cuda_faster:
        return "triton"
    return "cuda" if cuda_epilogue_support(device)[0] else "triton"
