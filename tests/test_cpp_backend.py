"""backend="cpp" (the compiled extension, csrc/): what only this backend has.

The contract it shares with the Triton backend (statistics and fused calls in fp32/bf16/fp16
against the torch backend and float64, edge cases, strided inputs, the dW accumulator) runs for
both strategies in tests/test_backend_contract.py. Here: identical views and peaked rows, a loss
of one KL direction, the input check of out-of-range targets, bitwise repeatability, dispatch,
torch.compile, the portable (non-SIMD) epilogues, the direct C++ ops' argument checks and the
build stamp. Tolerances: tests/_numerics.py (|cpp - gt| <= 2 |torch - gt| + atol).

Skipped as a whole when the extension is not built, except under CI=true, where a missing
extension is a failure (a build that silently skipped it must not pass).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import papo_kernels as pk
from tests._backend_contract import (
    SMALL_CHUNKS,
    STAT_ATOL,
    TWO_VIEW_OUTPUTS,
    backend_grads,
    check_grads,
    dense64,
    leaves,
    loss_fn,
    make_inputs,
    row_coefs,
)
from tests._numerics import assert_close_to_ref

if "cpp" not in pk.available_backends("cpu"):
    if os.environ.get("CI") == "true":
        from papo_kernels._backends import resolve_backend

        resolve_backend("cpp", torch.device("cpu"))  # raises with the reason: fails collection
    pytest.skip("backend='cpp' is not built (pip install --no-build-isolation -e .)", allow_module_level=True)

from papo_kernels import extension as E  # noqa: E402
from papo_kernels._options import KernelOptions  # noqa: E402

STRATEGIES = ("workspace", "tiles")

# ---------------------------------------------------------------- statistics calls


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_identical_views_have_zero_kl(strategy):
    """z_a - z_b comes from the unshifted products: identical views give a KL of exactly 0."""
    ha, _, w, t = make_inputs(9, 24, 333, torch.float32)
    s = pk.two_view_stats(ha, ha, w, t, temperature=0.9, backend="cpp", strategy=strategy, **SMALL_CHUNKS)
    assert torch.all(s.kl_ab == 0) and torch.all(s.kl_ba == 0)
    assert torch.equal(s.logp_a, s.logp_b) and torch.equal(s.entropy_a, s.entropy_b)


def test_peaked_rows_and_large_logits():
    """Large logit ranges (T = 0.05: |z| up to ~300) through the online max over many tiles: no
    worse than the torch backend's fp32 error (which the rounding of z itself dominates)."""
    ha, hb, w, t = make_inputs(12, 32, 1000, torch.float32)
    d = dense64(ha.double(), hb.double(), w.double(), t, 0.05)
    ref = pk.two_view_stats(ha, hb, w, t, temperature=0.05, backend="torch")
    for strategy in STRATEGIES:
        s = pk.two_view_stats(ha, hb, w, t, temperature=0.05, backend="cpp", strategy=strategy,
                              chunk_vocab=64)
        for name in TWO_VIEW_OUTPUTS:
            assert_close_to_ref(getattr(s, name), getattr(ref, name), d[name], dtype=torch.float32,
                                name=f"{strategy} {name}", atol=STAT_ATOL)


# ---------------------------------------------------------------- fused (gradient-in-forward) calls


@pytest.mark.parametrize("kl", ["kl_ab", "kl_ba"])
def test_fused_loss_of_one_kl_direction(kl):
    """A loss of a single KL direction: only that term's dZ (the other gradients arrive as None)."""
    ha, hb, w, t = make_inputs(20, 24, 130, torch.float32, ignored=(2,))
    grads = {}
    for backend in ("cpp", "torch"):
        a, b, wl = leaves((ha, hb, w), (True, True, True))
        loss, _ = pk.fused_two_view_loss(a, b, wl, t, lambda s, i: (getattr(s, kl).sum(), {}),
                                         backend=backend, chunk_tokens=8)
        loss.backward()
        grads[backend] = (a.grad, b.grad, wl.grad)
    a, b, wl = leaves((ha.double(), hb.double(), w.double()), (True, True, True))
    dense64(a, b, wl, t, 1.0)[kl].sum().backward()
    check_grads(grads["cpp"], grads["torch"], (a.grad, b.grad, wl.grad), torch.float32,
                 ("d_hidden_a", "d_hidden_b", "d_weight"))


# ---------------------------------------------------------------- input checks and strategies


def test_out_of_range_targets_raise_with_check_inputs():
    ha, hb, w, t = make_inputs(6, 8, 40, torch.float32)
    t[3] = 40
    with pytest.raises(ValueError, match=r"targets must be in \[0, 40\).*targets\[3\] = 40"):
        pk.two_view_stats(ha, hb, w, t, backend="cpp")


def test_unknown_strategy_raises():
    ha, hb, w, t = make_inputs(3, 8, 20, torch.float32)
    with pytest.raises(ValueError, match="strategy must be one of"):
        E.forward_stats(ha, hb, w, t, KernelOptions(strategy="fastest"))


# ---------------------------------------------------------------- reproducibility, dispatch, compile


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bitwise_reproducible(strategy):
    """Same inputs, same thread count: identical bits (the trainer's kill-and-resume test relies on it)."""
    ha, hb, w, t = make_inputs(70, 48, 900, torch.float32, ignored=(5,))
    first = backend_grads("cpp", strategy, ha, hb, w, t, chunk_tokens=32)
    second = backend_grads("cpp", strategy, ha, hb, w, t, chunk_tokens=32)
    for x, y in zip([*first[0], *first[1:]], [*second[0], *second[1:]]):
        assert torch.equal(x, y)
    fn = loss_fn(row_coefs(70, 6), TWO_VIEW_OUTPUTS)
    runs = []
    for _ in range(2):
        a, b, wl = leaves((ha, hb, w), (True, True, True))
        loss, _ = pk.fused_two_view_loss(a, b, wl, t, fn, backend="cpp", strategy=strategy, chunk_tokens=32)
        loss.backward()
        runs.append((loss, a.grad, b.grad, wl.grad))
    for x, y in zip(*runs):
        assert torch.equal(x, y)


def test_auto_picks_cpp_on_cpu_and_the_env_switch_forces_a_backend(monkeypatch):
    from papo_kernels._backends import FORCE_ENV, resolve_backend

    cpu = torch.device("cpu")
    monkeypatch.delenv(FORCE_ENV, raising=False)
    assert resolve_backend("auto", cpu).name == "cpp"
    monkeypatch.setenv(FORCE_ENV, "torch")
    assert resolve_backend("auto", cpu).name == "torch"
    assert resolve_backend("cpp", cpu).name == "cpp"  # explicit backends are unaffected
    monkeypatch.setenv(FORCE_ENV, "fastest")
    with pytest.raises(ValueError, match=FORCE_ENV):
        resolve_backend("auto", cpu)


def test_cpp_backend_refuses_cuda_tensors():
    ok, reason = E.can_run(torch.device("cuda"))
    assert not ok and "CPU kernels only" in reason


def test_two_view_stats_under_torch_compile():
    n, h, v = 24, 16, 130
    ha, hb, w, t = make_inputs(n, h, v, torch.float32, ignored=(2,))
    coefs = row_coefs(n, 6).float()

    def objective(a, b, ww, tt):
        s = pk.two_view_stats(a, b, ww, tt, temperature=0.8, backend="cpp", chunk_vocab=64)
        return sum((coefs[i] * x).sum() for i, x in enumerate(s))

    compiled = torch.compile(objective, backend="inductor", fullgraph=True)
    grads = []
    for fn in (objective, compiled):
        a, b, wl = leaves((ha, hb, w), (True, True, True))
        loss = fn(a, b, wl, t)
        loss.backward()
        grads.append((loss.detach(), a.grad, b.grad, wl.grad))
    for eager, comp in zip(*grads):  # the same kernels; inductor only reorders the loss's sum
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)


def test_portable_epilogues_match_the_vectorized_ones():
    """ATEN_CPU_CAPABILITY=default selects the at::vec fallback (no AVX): same results."""
    code = (
        "import torch, papo_kernels as pk\n"
        "from papo_kernels import extension as E\n"
        "g = torch.Generator().manual_seed(0)\n"
        "ha, hb = torch.randn(19, 24, generator=g), torch.randn(19, 24, generator=g)\n"
        "w, t = torch.randn(301, 24, generator=g), torch.randint(0, 301, (19,), generator=g)\n"
        "for strategy in ('workspace', 'tiles'):\n"
        "    s = pk.two_view_stats(ha, hb, w, t, temperature=0.7, backend='cpp', strategy=strategy,\n"
        "                          chunk_vocab=64)\n"
        "    r = pk.two_view_stats(ha, hb, w, t, temperature=0.7, backend='torch')\n"
        "    assert all(torch.allclose(x, y, atol=2e-5, rtol=0) for x, y in zip(s, r)), strategy\n"
        "print(E.build_info())\n"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "cpu_capability=DEFAULT" in out.stdout


# ---------------------------------------------------------------- the C++ ops' argument checks


def _op_args(**overrides):
    ha, hb, w, t = make_inputs(4, 8, 10, torch.float32)
    args = dict(hidden_a=ha, hidden_b=hb, weight=w, targets=t, temperature=1.0, ignore_index=-100,
                strategy="workspace", chunk_tokens=4, chunk_vocab=0)
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(hidden_b=torch.randn(3, 8)), "hidden_b must have the shape of hidden_a"),
        (dict(weight=torch.randn(10, 7)), r"weight must be \[V, H\] with H = hidden_a.size\(1\)"),
        (dict(weight=torch.randn(10, 8).half()), "weight has dtype Half but hidden_a has dtype Float"),
        (dict(weight=torch.randn(0, 8)), "weight must have at least one vocabulary row"),
        (dict(targets=torch.zeros(4)), "targets must be int64 or int32"),
        (dict(targets=torch.zeros(3, dtype=torch.long)), r"targets must have shape \[4\]"),
        (dict(hidden_a=torch.randn(4, 8).double(), hidden_b=None, weight=torch.randn(10, 8).double()),
         "hidden_a is float64"),
        (dict(hidden_a=torch.randn(4, 8, 1)), "hidden_a must be 2-D"),
        (dict(temperature=0.0), "temperature must be finite and > 0"),
        (dict(temperature=math.inf), "temperature must be finite and > 0"),
        (dict(strategy="fused"), "strategy must be 'workspace' or 'tiles'"),
        (dict(chunk_tokens=0), "chunk_tokens must be > 0"),
        (dict(chunk_vocab=-1), "chunk_vocab must be >= 0"),
    ],
)
def test_forward_op_rejects_bad_arguments(overrides, match):
    args = _op_args(**overrides)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.papo_kernels_C.forward_stats(*args.values())


def _backward_call(ha, hb, w, t, s, grads, dh_a, dh_b, acc, b_in_dw=False):
    stats = [s.lse_a, s.entropy_a, s.lse_b, s.entropy_b, s.kl_ab, s.kl_ba]
    torch.ops.papo_kernels_C.backward_grads(ha, hb, w, t, *stats, *grads, dh_a, dh_b, acc, b_in_dw, 1.0, -100,
                                            "workspace", 4, 0)


def test_backward_op_rejects_bad_arguments():
    ha, hb, w, t = make_inputs(4, 8, 10, torch.float32)
    s = E.forward_stats(ha, hb, w, t)
    ones = [torch.ones(4)] * 6
    ok = dict(dh_a=torch.empty(4, 8), dh_b=torch.empty(4, 8), acc=torch.zeros(10, 8))
    _backward_call(ha, hb, w, t, s, ones, **ok)  # the valid call runs
    cases = [
        (dict(acc=torch.zeros(10, 8, dtype=torch.float64)),
         "weight_grad_acc must be a contiguous CPU float32"),
        (dict(acc=torch.zeros(8, 10).T), r"weight_grad_acc .* \(not contiguous\)"),
        (dict(dh_a=torch.empty(4, 9)), "dh_a must be Float of shape"),
        (dict(dh_b=torch.empty(8, 4).T), "dh_b must be contiguous"),
    ]
    for change, match in cases:
        with pytest.raises(RuntimeError, match=match):
            _backward_call(ha, hb, w, t, s, ones, **{**ok, **change})
    with pytest.raises(RuntimeError, match=r"grad_kl_ab must have shape \[4\]"):
        _backward_call(ha, hb, w, t, s, ones[:4] + [torch.ones(3), None], **ok)
    with pytest.raises(RuntimeError, match="grad_entropy_a must be float32"):
        _backward_call(ha, hb, w, t, s, [ones[0], ones[1].double()] + ones[2:], **ok)
    with pytest.raises(RuntimeError, match="lse_b must be None with one view"):
        _backward_call(ha, None, w, t, s, ones[:2] + [None] * 4, ok["dh_a"], None, ok["acc"])
    with pytest.raises(RuntimeError, match="b_in_dw needs hidden_b"):
        s1 = E.forward_stats(ha, None, w, t)
        _backward_call(ha, None, w, t, s1, ones[:2] + [None] * 4, ok["dh_a"], None, ok["acc"], b_in_dw=True)


def test_chunk_ops_reject_a_small_workspace():
    ha, hb, w, t = make_inputs(4, 8, 10, torch.float32)
    expected = r"workspace must hold at least views \* N \* V = 2 \* 4 \* 10 = 80"
    with pytest.raises(RuntimeError, match=expected):
        torch.ops.papo_kernels_C.chunk_forward(torch.empty(79), ha, hb, w, t, 1.0, -100, 0)


# ---------------------------------------------------------------- build stamp


def test_build_stamp_matches_this_torch():
    info = E.build_info()
    assert f"torch={torch.__version__};" in info and "cpu_capability=" in info
    # built with OpenMP: otherwise every at::parallel_for of the kernels runs on one thread
    assert ";openmp=1;" in info


def test_a_build_for_another_torch_is_refused(tmp_path):
    fake = tmp_path / "_C.so"
    fake.write_bytes(b"\x7fELF...papo_kernels_C build stamp: torch=1.0.0;git=0123456789ab;\x00...")
    expected = r"built against torch 1\.0\.0 .*pip install --no-build-isolation -e \."
    with pytest.raises(ImportError, match=expected):
        E.check_build(str(fake))
    fake.write_bytes(b"\x7fELF no stamp here")
    with pytest.raises(ImportError, match="no papo_kernels build stamp"):
        E.check_build(str(fake))
    same = f"papo_kernels_C build stamp: torch={torch.__version__};git={torch.version.git_version};"
    fake.write_bytes(same.encode())
    E.check_build(str(fake))
