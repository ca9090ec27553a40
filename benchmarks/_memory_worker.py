"""One provider's extra memory on CPU, measured in a fresh process.

    python -m benchmarks._memory_worker '{"op": "two_view", "mode": "fwd_bwd", "n": 2048, ...}'

Prints one JSON line: status ("ok" | "unavailable" | "error" | "oom"), extra_bytes = peak RSS
of one call minus the RSS with the inputs and one gradient per input resident (docs/design.md),
and the call's seconds. Providers that compile on first use are warmed up first, so the
compiler's own memory is not counted; the warm-up's freed heap is returned to the OS before
the baseline is read.
"""

from __future__ import annotations

import json
import sys
import time
import traceback

import torch

from benchmarks import _harness as H
from benchmarks import providers as P

WARMUP_ROWS = 64


def measure(payload: dict) -> dict:
    if payload.get("threads"):
        torch.set_num_threads(int(payload["threads"]))
    dtype = getattr(torch, payload.get("dtype", "float32"))
    inp = P.make_inputs(payload["op"], payload["mode"], payload["n"], payload["hidden"],
                        payload["vocab"], dtype, "cpu",
                        b_requires_grad=payload.get("b_requires_grad", True))
    inputs_bytes = sum(H.tensor_bytes(t) for t in inp.tensors())
    try:
        fn = P.build(payload["provider"], inp, payload.get("opts") or {})
    except P.Unavailable as exc:
        return {"status": "unavailable", "reason": str(exc)}
    # Warm-up: the full call for providers that compile for the shape on first use; a few rows
    # for the others (imports and lazy initialization are not the call's memory).
    if P.PROVIDERS[payload["provider"]].needs_warmup:
        fn()
        inp.zero_grads()
    else:
        small = P.make_inputs(payload["op"], payload["mode"], min(payload["n"], WARMUP_ROWS),
                              payload["hidden"], payload["vocab"], dtype, "cpu",
                              b_requires_grad=payload.get("b_requires_grad", True), seed=1)
        P.build(payload["provider"], small, payload.get("opts") or {})()
        del small
    H.release_cpu_memory()
    # Baseline: inputs plus one gradient per input, resident (touched).
    buffers = [torch.ones_like(t) for t in inp.grad_leaves]
    baseline = H.rss_bytes()
    del buffers
    H.release_cpu_memory()
    if not H.reset_peak_rss():
        return {"status": "error", "reason": "cannot reset peak RSS (/proc/self/clear_refs)"}
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    peak = H.peak_rss_bytes()
    return {"status": "ok", "extra_bytes": peak - baseline, "peak_bytes": peak,
            "baseline_bytes": baseline, "inputs_bytes": inputs_bytes,
            "grad_bytes": P.grad_bytes(inp), "seconds": seconds}


def main() -> None:
    payload = json.loads(sys.argv[1])
    try:
        out = measure(payload)
    except Exception as exc:  # noqa: BLE001 - reported as a cell
        kind = "oom" if H.is_oom(exc) else "error"
        out = {"status": kind, "reason": f"{type(exc).__name__}: {exc}"[:400],
               "trace": traceback.format_exc()[-800:]}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
