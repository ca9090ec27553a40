"""Shape registry: the lm_head shapes of the target VLMs and the scaled shapes CPUs can run.

Benchmarks take shapes from here by name, never hard-coded. A head is
(H, V); a shape adds the token counts to sweep.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Head:
    """An lm_head: hidden size H and vocabulary V (weight [V, H])."""

    name: str
    hidden: int
    vocab: int
    note: str = ""


HEADS: dict[str, Head] = {
    h.name: h
    for h in (
        Head("qwen2.5-vl-3b", 2048, 151_936, "Qwen2.5-VL-3B-Instruct text head"),
        Head("qwen2.5-vl-7b", 3584, 152_064, "Qwen2.5-VL-7B-Instruct text head"),
        Head("cpu", 1024, 32_768, "scaled head a 2-core CPU runs in seconds (issue 6)"),
        Head("tiny", 128, 4096, "development and tests"),
        Head("odd", 96, 1531, "tests: sizes that are not block multiples"),
    )
}


@dataclass(frozen=True)
class Shape:
    """A head and the token counts N to benchmark it at (tokens per view)."""

    name: str
    head: Head
    tokens: tuple[int, ...]
    dtype: str  # "float32" | "bfloat16"
    device: str  # "cpu" | "cuda"


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        # GPU: the targets are read at the 7B head, 16k tokens, bf16 (issue 6).
        Shape("gpu-7b", HEADS["qwen2.5-vl-7b"], (2048, 4096, 8192, 16384, 32768), "bfloat16", "cuda"),
        Shape("gpu-3b", HEADS["qwen2.5-vl-3b"], (2048, 4096, 8192, 16384, 32768), "bfloat16", "cuda"),
        Shape("gpu-7b-16k", HEADS["qwen2.5-vl-7b"], (16384,), "bfloat16", "cuda"),
        Shape("gpu-tiny", HEADS["tiny"], (256, 512), "bfloat16", "cuda"),
        # CPU: the acceptance shape (2 cores, fp32, N 2048, H 1024, V 32k) and development shapes.
        Shape("cpu", HEADS["cpu"], (2048,), "float32", "cpu"),
        Shape("cpu-sweep", HEADS["cpu"], (512, 1024, 2048), "float32", "cpu"),
        Shape("cpu-tiny", HEADS["tiny"], (256,), "float32", "cpu"),
        Shape("cpu-odd", HEADS["odd"], (67,), "float32", "cpu"),
    )
}


def get_shape(name: str) -> Shape:
    if name not in SHAPES:
        raise SystemExit(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    return SHAPES[name]
