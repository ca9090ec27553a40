"""Execution strategy names: the public choices and the retired ones (with the reason, for errors).

A strategy selects how a backend that has several runs (docs/design.md "Execution strategies"):
"workspace" (chunk GEMMs into a bounded fp32 logit workspace, kept between the fused calls'
phases) on Triton and cpp; "tiles" (no logit workspace: logit tiles consumed while in cache,
recomputed for the gradient) on cpp; "workspace_cuda" (Triton's workspace path with the CUDA C++
epilogue kernels of the compiled extension, csrc/cuda/, instead of its Triton epilogues; needs a
build with PAPO_BUILD_CUDA=1) on Triton; "auto" picks per backend and call (on Triton the CUDA
epilogues only where a committed GPU run measured them faster, papo_kernels/kernels/
epilogue_choice.py). The torch backend has one strategy and accepts any valid name.
"fused" (the in-register Triton kernels) was retired from the public choices: with gradients
it measured 104x the GEMM floor on an H100 (benchmarks/GPU_NOTES.md), and an in-register
backward recomputes the logits, 8HV FLOPs against the 6HV floor, so it cannot get under 1.33x
by construction.
"""

from __future__ import annotations

STRATEGIES = ("auto", "workspace", "tiles", "workspace_cuda")
RETIRED_STRATEGIES = {
    "fused": "the in-register Triton kernels measured 104x the GEMM floor with gradients on an H100 "
             "(an in-register backward recomputes the logits: >= 1.33x by construction); use "
             "'auto' or 'workspace' (benchmarks/GPU_NOTES.md); the cpp backend's tile strategy is "
             "'tiles'",
}


def check_strategy(strategy) -> str:
    """`strategy` if it is a public choice; ValueError naming the argument otherwise."""
    if isinstance(strategy, str) and strategy in RETIRED_STRATEGIES:
        raise ValueError(f"strategy={strategy!r} was retired: {RETIRED_STRATEGIES[strategy]}")
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    return strategy
