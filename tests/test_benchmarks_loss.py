"""The loss benchmark's harness on tiny shapes: providers compute the same loss and gradients,
unavailable providers become cells, the memory worker and the result files work.

Fast with `--benchmark-disable` (each benchmarked call runs once); providers that need
torch.compile (compile, liger, cce's CPU path) are marked slow.
"""

from __future__ import annotations

import json

import pytest
import torch

import papo_kernels as pk
from benchmarks import _harness as H
from benchmarks import loss as L
from benchmarks import providers as P
from benchmarks.shapes import HEADS, SHAPES

N, HID, V = 67, 96, 1531  # odd sizes, not block multiples
COMPILING = {"compile", "liger", "cce"}


def _inputs(op, mode, dtype=torch.float32):
    return P.make_inputs(op, mode, N, HID, V, dtype, "cpu")


def _result(inp, out):
    if inp.mode == "fwd":
        return [o.detach().clone() for o in out]
    return [out.detach().clone()] + [t.grad.clone() for t in inp.grad_leaves]


def _same_output_providers(op, mode):
    names = []
    for name, p in P.PROVIDERS.items():
        if (op, mode) not in p.workloads or p.kind == "floor" or not P.outputs_match(p, op):
            continue
        marks = [pytest.mark.slow] if name in COMPILING else []
        names.append(pytest.param(name, marks=marks, id=name))
    return names


def test_registry():
    assert {"qwen2.5-vl-3b", "qwen2.5-vl-7b", "cpu"} <= set(HEADS)
    assert HEADS["qwen2.5-vl-7b"].vocab == 152_064 and HEADS["qwen2.5-vl-7b"].hidden == 3584
    assert SHAPES["cpu"].tokens == (2048,) and SHAPES["cpu"].head.vocab == 32_768
    assert {"eager", "compile", "floor", "liger", "cce", "verl", "torch:fused", "triton:fused:workspace",
            "triton:fused:workspace:v1", "triton:fused:workspace:ring2s", "triton:stats:inregister",
            "cpp:stats", "cpp:fused"} <= set(P.PROVIDERS)
    assert not any(name.endswith(":fused:fused") for name in P.PROVIDERS)  # the retired strategy
    # 6HV per token and view with grad; 2HV for a forward or a detached view
    assert P.useful_flops("two_view", "fwd_bwd", 1, 1, 1) == 12
    assert P.useful_flops("two_view", "fwd_bwd", 1, 1, 1, b_requires_grad=False) == 8
    assert P.useful_flops("token_stats", "fwd", 1, 1, 1) == 2


@pytest.mark.parametrize("op,mode", sorted(P.OPS))
def test_dense_reference_matches_ours(op, mode):
    """eager (materialized logits) equals our torch backend: the loss and every gradient."""
    got = {}
    for name in ("eager", "torch:stats"):
        inp = _inputs(op, mode, torch.float64)
        got[name] = _result(inp, P.build(name, inp)())
    for a, b in zip(got["eager"], got["torch:stats"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("op,mode", sorted(P.OPS))
def test_providers_agree(op, mode, benchmark):
    """Every provider computing the same outputs agrees with our torch backend (fp32)."""
    ref_inp = _inputs(op, mode)
    ref = _result(ref_inp, P.build("torch:stats", ref_inp)())
    for name in [p.values[0] for p in _same_output_providers(op, mode)]:
        if name in COMPILING:
            continue  # covered by test_compiling_provider_agrees (slow)
        inp = _inputs(op, mode)
        try:
            fn = P.build(name, inp)
        except P.Unavailable:
            continue
        for a, b in zip(_result(inp, fn()), ref):
            assert L._rel_err(a, b) < 1e-5, name
    inp = _inputs(op, mode)
    fn = P.build("torch:fused" if mode == "fwd_bwd" else "torch:stats", inp)

    def call():
        inp.zero_grads()
        return fn()

    benchmark(call)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["compile"])
def test_compiling_provider_agrees(name):
    for op, mode in sorted(P.OPS):
        ref_inp = _inputs(op, mode)
        ref = _result(ref_inp, P.build("torch:stats", ref_inp)())
        inp = _inputs(op, mode)
        for a, b in zip(_result(inp, P.build(name, inp)()), ref):
            assert L._rel_err(a, b) < 1e-5


@pytest.mark.parametrize("op,mode", sorted(P.OPS))
def test_floor_does_the_useful_gemms(op, mode, benchmark):
    inp = _inputs(op, mode)
    dw, outs = benchmark(P.build("floor", inp))
    if mode == "fwd_bwd":
        assert dw.shape == inp.weight.shape and torch.isfinite(dw).all()
        assert all(o is not None for o in outs)


def test_unavailable_providers_are_cells_not_crashes(tmp_path):
    cells = L.main(["--shape", "cpu-odd", "--reps", "1", "--no-isolate", "--out-dir", str(tmp_path),
                    "--workloads", "two_view/fwd_bwd,token_stats/fwd",
                    "--providers", "eager,torch:stats,torch:fused,triton:fused:workspace,"
                                   "triton:fused:workspace:v1,cpp:fused,verl,floor"])
    by = {(c["op"], c["provider"]): c for c in cells}
    assert by[("two_view", "triton:fused:workspace")]["status"] == "unavailable"
    assert "gpu-only" in by[("two_view", "triton:fused:workspace")]["reason"]
    assert by[("token_stats", "verl")]["status"] == "unavailable"
    # the cell tells whether the extension is built here: never a silent fallback to another backend
    cpp_built = "cpp" in pk.available_backends("cpu")
    assert by[("two_view", "cpp:fused")]["status"] == ("ok" if cpp_built else "unavailable")
    if not cpp_built:
        assert "backend='cpp' is not available" in by[("two_view", "cpp:fused")]["reason"]
    assert by[("two_view", "triton:fused:workspace:v1")]["status"] == "unavailable"
    assert ("two_view", "verl") not in by  # verl has no two-view workload
    for name in ("eager", "torch:stats", "torch:fused", "floor"):
        c = by[("two_view", name)]
        assert c["status"] == "ok", c
        assert c["time"]["n"] == 1 and c["tflops"] > 0 and c["max_tokens"] == "gpu-only"
        assert c["vs_floor"] > 0
    assert by[("two_view", "torch:fused")]["check"] == "reference"
    assert by[("two_view", "eager")]["check"] < 1e-5
    assert by[("two_view", "torch:fused")]["vs_best_peer"] is not None  # eager is a same-outputs peer
    doc = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert doc["env"]["git_commit"] and torch.__version__.startswith(doc["env"]["versions"]["torch"])
    assert doc["loss"]["partial"] is False and len(doc["loss"]["cells"]) == len(cells)
    md = next(tmp_path.glob("*.md")).read_text()
    assert "### two_view fwd_bwd: N=67" in md and "`triton:fused:workspace`" in md and "gpu-only" in md


def test_memory_worker_isolated():
    """One provider in its own process: extra memory of an eager call covers its logits."""
    res = H.run_isolated("benchmarks._memory_worker",
                         {"op": "token_stats", "mode": "fwd_bwd", "n": 512, "hidden": 64,
                          "vocab": 8192, "provider": "eager"}, timeout=300)
    assert res["status"] == "ok", res
    logits = 512 * 8192 * 4
    assert res["extra_bytes"] >= logits, res  # at least one fp32 [N, V] tensor
    assert res["grad_bytes"] == (512 + 8192) * 64 * 4
    res = H.run_isolated("benchmarks._memory_worker",
                         {"op": "token_stats", "mode": "fwd", "n": 8, "hidden": 8, "vocab": 64,
                          "provider": "verl"}, timeout=300)
    assert res["status"] == "unavailable"


def test_search_max_tokens():
    assert H.search_max_tokens(lambda n: n <= 5000, 1024, 1 << 20, 64, H.Deadline(None)) == \
        {"max_tokens": 4992, "bound": "exact", "trials": H.search_max_tokens(
            lambda n: n <= 5000, 1024, 1 << 20, 64, H.Deadline(None))["trials"]}
    r = H.search_max_tokens(lambda n: n <= 5000, 8192, 1 << 20, 64, H.Deadline(None))
    assert 4750 <= r["max_tokens"] <= 5000 and r["bound"] == "exact"
    r = H.search_max_tokens(lambda n: True, 1024, 4096, 64, H.Deadline(None))
    assert r == {"max_tokens": 4096, "bound": "lower", "trials": 3}
    assert H.search_max_tokens(lambda n: False, 1024, 4096, 64, H.Deadline(None))["max_tokens"] is None


def test_summarize():
    s = H.summarize([3.0, 1.0, 2.0, 5.0, 4.0])
    assert s["median"] == 3.0 and s["min"] == 1.0 and s["max"] == 5.0
    assert s["p20"] == pytest.approx(1.8) and s["p80"] == pytest.approx(4.2)
    assert s["spread"] == pytest.approx(4 / 3)


def test_slow_providers_are_measured_once(tmp_path):
    """--drop-slower-than: a provider over the limit at the first N is not run at later N."""
    cells = L.main(["--shape", "cpu-odd", "--tokens", "67,33", "--reps", "1", "--no-isolate",
                    "--out-dir", str(tmp_path), "--workloads", "token_stats/fwd_bwd",
                    "--providers", "eager,torch:stats,torch:fused,floor", "--drop-slower-than", "1e-3"])
    by_n = {}
    for c in cells:
        by_n.setdefault(c["tokens"], set()).add(c["provider"])
    assert by_n[67] == {"eager", "torch:stats", "torch:fused", "floor"}
    # every provider is over 1e-3x the floor; the floor and the check's reference stay
    assert by_n[33] == {"torch:fused", "floor"}
    assert [c["check"] for c in cells if c["tokens"] == 33 and c["provider"] == "torch:fused"] == ["reference"]
    doc = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert set(doc["loss"]["dropped"]["providers"]) == {"eager", "torch:stats"}
    assert "Measured at N=67 only" in next(tmp_path.glob("*.md")).read_text()
    fake = [{"tokens": 8, "status": "ok", "vs_floor": 3.0, "provider": "a"},
            {"tokens": 8, "status": "ok", "vs_floor": 9.0, "provider": "a"},
            {"tokens": 8, "status": "ok", "vs_floor": 2.0, "provider": "b"},
            {"tokens": 8, "status": "oom", "vs_floor": None, "provider": "c"},
            {"tokens": 8, "status": "ok", "vs_floor": 1.0, "provider": "floor", "kind": "floor"},
            {"tokens": 16, "status": "ok", "vs_floor": 99.0, "provider": "b"}]
    assert L.slow_providers(fake, 8, 8.0) == {"a": 9.0}
    assert L.slow_providers(fake, 8, 0.5) == {"a": 9.0, "b": 2.0}
