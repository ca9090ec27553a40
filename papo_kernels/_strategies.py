"""Execution strategy names: the public choices and the retired ones (with the reason, for errors).

A strategy selects how a backend that has several runs (docs/design.md "Execution strategies").
The torch backend has one and accepts any valid name; the Triton backend has the workspace
strategy. "fused" (the in-register Triton kernels) was retired from the public choices: with
gradients it measured 104x the GEMM floor on an H100 (benchmarks/GPU_NOTES.md), and an
in-register backward recomputes the logits, 8HV FLOPs against the 6HV floor, so it cannot get
under 1.33x by construction.
"""

from __future__ import annotations

STRATEGIES = ("auto", "workspace")
RETIRED_STRATEGIES = {
    "fused": "the in-register Triton kernels measured 104x the GEMM floor with gradients on an H100 "
             "(an in-register backward recomputes the logits: >= 1.33x by construction); use "
             "'auto' or 'workspace' (benchmarks/GPU_NOTES.md)",
}


def check_strategy(strategy) -> str:
    """`strategy` if it is a public choice; ValueError naming the argument otherwise."""
    if isinstance(strategy, str) and strategy in RETIRED_STRATEGIES:
        raise ValueError(f"strategy={strategy!r} was retired: {RETIRED_STRATEGIES[strategy]}")
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    return strategy
