"""The contract every compiled backend keeps, run for each (backend, strategy): backend="cpp" (the
compiled extension, csrc/; strategies "workspace" and "tiles") and backend="triton" ("workspace";
the dZ ring's own cases are in test_workspace_ring.py) against backend="torch" and a dense
float64 oracle.

Statistics and gradients in fp32/bf16/fp16, temperature != 1, vocabulary tails, a single row, a
constant and a live view b, the fused calls, out-of-range targets (NaN rows), ignored rows (also
holding NaN hidden states), N = 0, leading dimensions, strided inputs, float64 inputs and the
dW accumulator. Each backend's own cases (argument checks, bitwise repeatability, which kernel
ran, torch.compile, SIMD variants, launch configurations) stay in test_cpp_backend.py and
test_triton_kernels.py.

A case whose backend cannot run here is skipped with the reason; under CI=true conftest.py turns
that skip into a failure (CI builds the extension and installs triton). Chunk settings are each
backend's: the cpp backend runs small tiles and chunks (SMALL_CHUNKS) so that every loop has a
tail. Triton runs on a GPU when there is one, else under the interpreter (TRITON_INTERPRET=1,
set by conftest.py before triton is imported) with these small shapes. The interpreter has no
bf16 arithmetic, so half inputs are upcast to fp32 right after loading and the GEMMs of the
workspace strategy run in fp32: its bf16/fp16 cases check the upcast path only (the real half
GPU path is checked by the same tests on a GPU, plus the `gpu`-marked tests of
test_triton_kernels.py). Tolerances: tests/_numerics.py (|backend - gt| <= 2 |torch - gt| + atol).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field

import pytest
import torch

import papo_kernels as pk
from papo_kernels._backends import BackendUnavailableError, resolve_backend
from papo_kernels._options import KernelOptions
from papo_kernels.reference import RowGrads
from tests._backend_contract import (
    DTYPES,
    GRAD_RTOL,
    SHAPES,
    SMALL_CHUNKS,
    STAT_ATOL,
    TOKEN_OUTPUTS,
    TWO_VIEW_OUTPUTS,
    GradTolerance,
    backend_grads,
    check_grads,
    dense64,
    leaves,
    loss_fn,
    make_inputs,
    max_relative_grad_tolerance,
    row_coefs,
    shape_id,
    weighted,
)
from tests._numerics import assert_close_to_ref

# Under the interpreter half inputs are upcast after loading, so the gradient is fp32 math
# rounded once: one unit in the last place of each element (the interpreter's stores truncate
# fp32 -> bf16, hence an ulp rather than half of one), not of the largest element. The
# max-relative bound of GRAD_RTOL[dtype] would pass a 1% bias of bf16 gradients there.
ONE_ULP = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def triton_grad_tolerance(dtype, g_max):
    from papo_kernels.kernels import _config

    if _config.is_interpreting():
        return 1e-6 + GRAD_RTOL[torch.float32] * g_max, ONE_ULP[dtype]
    return max_relative_grad_tolerance(dtype, g_max)


@dataclass(frozen=True)
class Case:
    backend: str
    strategy: str
    device: str
    module: str  # forward_stats / backward_grads with KernelOptions, as in papo_kernels/reference.py
    chunks: dict = field(default_factory=dict)  # chunk settings of the statistics calls
    fused_chunks: dict = field(default_factory=dict)  # ... and of the fused calls
    grad_tolerance: GradTolerance = max_relative_grad_tolerance

    def kernels(self):
        return importlib.import_module(self.module)


TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [
    pytest.param(Case("cpp", strategy, "cpu", "papo_kernels.extension", SMALL_CHUNKS, SMALL_CHUNKS),
                 id=f"cpp-{strategy}")
    for strategy in ("workspace", "tiles")
] + [
    pytest.param(Case("triton", "workspace", TRITON_DEVICE, "papo_kernels.kernels",
                      fused_chunks=dict(chunk_tokens=16), grad_tolerance=triton_grad_tolerance),
                 id="triton-workspace"),
]


@pytest.fixture(params=CASES)
def case(request) -> Case:
    c = request.param
    try:
        resolve_backend(c.backend, torch.device(c.device))
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))
    return c


# ---------------------------------------------------------------- statistics calls


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_stats(case, dtype, temperature, shape):
    n, h, v = shape
    ha, _, w, t = make_inputs(n, h, v, dtype, ignored=(3, 10), device=case.device)
    coefs = row_coefs(n, 2)
    runs = {}
    for backend in (case.backend, "torch"):
        a, wl = leaves((ha, w), (True, True))
        s = pk.token_stats(a, wl, t, temperature=temperature, backend=backend, strategy=case.strategy,
                           **case.chunks)
        weighted(list(s), coefs).backward()
        runs[backend] = (s, a.grad, wl.grad)
    a, wl = leaves((ha.double().cpu(), w.double().cpu()), (True, True))
    d = dense64(a, None, wl, t.cpu(), temperature)
    weighted([d["logp_a"], d["entropy_a"]], coefs).backward()
    (s_k, *g_k), (s_r, *g_r) = runs[case.backend], runs["torch"]
    for i, name in enumerate(TOKEN_OUTPUTS):
        assert s_k[i].dtype == torch.float32 and s_k[i].shape == t.shape
        assert_close_to_ref(s_k[i].cpu(), s_r[i].cpu(), d[name + "_a"], dtype=dtype, name=name,
                            atol=STAT_ATOL)
    for i in (3, 10):  # ignored rows: exactly 0 outputs, exactly 0 hidden gradient
        if i < n:
            assert s_k.logp[i].item() == 0.0 and s_k.entropy[i].item() == 0.0
            assert torch.all(g_k[0][i] == 0)
    check_grads(g_k, g_r, (a.grad, wl.grad), dtype, ("d_hidden", "d_weight"), case.grad_tolerance)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("b_live", [False, True], ids=["b_const", "b_live"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_two_view_stats(case, dtype, temperature, b_live, shape):
    n, h, v = shape
    ha, hb, w, t = make_inputs(n, h, v, dtype, ignored=(0, 7), device=case.device)
    coefs = row_coefs(n, 6)
    runs = {}
    for backend in (case.backend, "torch"):
        a, b, wl = leaves((ha, hb, w), (True, b_live, True))
        s = pk.two_view_stats(a, b, wl, t, temperature=temperature, backend=backend, strategy=case.strategy,
                              **case.chunks)
        weighted(list(s), coefs).backward()
        runs[backend] = (s, a.grad, b.grad, wl.grad)
    a, b, wl = leaves((ha.double().cpu(), hb.double().cpu(), w.double().cpu()), (True, b_live, True))
    d = dense64(a, b, wl, t.cpu(), temperature, b_live=b_live)
    weighted([d[k] for k in TWO_VIEW_OUTPUTS], coefs).backward()
    (s_k, *g_k), (s_r, *g_r) = runs[case.backend], runs["torch"]
    for i, name in enumerate(TWO_VIEW_OUTPUTS):
        assert s_k[i].dtype == torch.float32 and s_k[i].shape == t.shape
        assert_close_to_ref(s_k[i].cpu(), s_r[i].cpu(), d[name], dtype=dtype, name=name, atol=STAT_ATOL)
        assert s_k[i][0].item() == 0.0  # ignored row
    assert (g_k[1] is None) == (not b_live)
    check_grads(g_k, g_r, (a.grad, b.grad, wl.grad), dtype, ("d_hidden_a", "d_hidden_b", "d_weight"),
                case.grad_tolerance)


# ---------------------------------------------------------------- fused (gradient-in-forward) calls


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_token_loss(case, dtype, temperature):
    n, h, v = 37, 40, 300
    ha, _, w, t = make_inputs(n, h, v, dtype, ignored=(4, 5), device=case.device)
    coefs = row_coefs(n, 2)
    runs = {}
    for backend in (case.backend, "torch"):
        a, wl = leaves((ha, w), (True, True))
        loss, metrics = pk.fused_token_loss(a, wl, t, loss_fn(coefs, TOKEN_OUTPUTS), temperature=temperature,
                                            backend=backend, strategy=case.strategy, **case.fused_chunks)
        loss.backward()
        runs[backend] = (loss, metrics, a.grad, wl.grad)
    a, wl = leaves((ha.double().cpu(), w.double().cpu()), (True, True))
    d = dense64(a, None, wl, t.cpu(), temperature)
    loss64 = weighted([d["logp_a"], d["entropy_a"]], coefs)
    loss64.backward()
    (l_k, m_k, *g_k), (l_r, m_r, *g_r) = runs[case.backend], runs["torch"]
    assert_close_to_ref(l_k.cpu(), l_r.cpu(), loss64.detach(), dtype=dtype, name="loss", atol=1e-4)
    assert set(m_k) == set(m_r) and float(m_k["count"]) == n
    assert abs(float(m_k["sum/first"]) - float(m_r["sum/first"])) < 1e-4
    check_grads(g_k, g_r, (a.grad, wl.grad), dtype, ("d_hidden", "d_weight"), case.grad_tolerance)


@pytest.mark.parametrize("b_live", [False, True], ids=["b_const", "b_live"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_two_view_loss(case, dtype, b_live):
    n, h, v, temperature = 37, 40, 300, 0.7
    ha, hb, w, t = make_inputs(n, h, v, dtype, ignored=(1, 30), device=case.device)
    coefs = row_coefs(n, 6)
    runs = {}
    for backend in (case.backend, "torch"):
        a, b, wl = leaves((ha, hb, w), (True, b_live, True))
        loss, metrics = pk.fused_two_view_loss(a, b, wl, t, loss_fn(coefs, TWO_VIEW_OUTPUTS),
                                               temperature=temperature, backend=backend,
                                               strategy=case.strategy, **case.fused_chunks)
        loss.backward()
        runs[backend] = (loss, metrics, a.grad, b.grad, wl.grad)
    a, b, wl = leaves((ha.double().cpu(), hb.double().cpu(), w.double().cpu()), (True, b_live, True))
    d = dense64(a, b, wl, t.cpu(), temperature, b_live=b_live)
    loss64 = weighted([d[k] for k in TWO_VIEW_OUTPUTS], coefs)
    loss64.backward()
    (l_k, m_k, *g_k), (l_r, m_r, *g_r) = runs[case.backend], runs["torch"]
    assert_close_to_ref(l_k.cpu(), l_r.cpu(), loss64.detach(), dtype=dtype, name="loss", atol=1e-4)
    assert set(m_k) == set(m_r)
    assert (g_k[1] is None) == (not b_live)
    check_grads(g_k, g_r, (a.grad, b.grad, wl.grad), dtype, ("d_hidden_a", "d_hidden_b", "d_weight"),
                case.grad_tolerance)


def test_fused_loss_without_grad_skips_the_sweep(case):
    """No input needs a gradient: the loss alone (test_triton_kernels.py also checks that no dZ
    kernel is launched)."""
    ha, hb, w, t = make_inputs(9, 16, 100, torch.float32, device=case.device)
    fn = loss_fn(row_coefs(9, 6), TWO_VIEW_OUTPUTS)
    ref, _ = pk.fused_two_view_loss(ha, hb, w, t, fn, backend="torch")
    loss, _ = pk.fused_two_view_loss(ha, hb, w, t, fn, backend=case.backend, strategy=case.strategy)
    assert not loss.requires_grad
    assert abs(float(loss) - float(ref)) < 1e-4


# ---------------------------------------------------------------- contract edge cases


def test_out_of_range_targets_give_nan_rows(case):
    n, h, v = 11, 24, 130
    ha, hb, w, t = make_inputs(n, h, v, torch.float32, ignored=(2,), device=case.device)
    t[4], t[8] = v, -7  # out of range, not ignore_index: NaN outputs and gradients, no raise
    s, dha, dhb, dw = backend_grads(case.backend, case.strategy, ha, hb, w, t, **case.chunks)
    s_r, dha_r, dhb_r, dw_r = backend_grads("torch", case.strategy, ha, hb, w, t)
    bad = torch.zeros(n, dtype=torch.bool, device=t.device)
    bad[4] = bad[8] = True
    for name, x, x_r in zip(TWO_VIEW_OUTPUTS, s, s_r):
        assert torch.equal(x.isnan(), bad), name
        assert torch.equal(x_r.isnan(), bad), name
        assert x[2].item() == 0.0
        assert torch.allclose(x[~bad], x_r[~bad], atol=STAT_ATOL, rtol=0)
    for name, g, g_r in (("dh_a", dha, dha_r), ("dh_b", dhb, dhb_r)):
        assert torch.equal(g.isnan().any(1), bad), name
        assert torch.equal(g.isnan(), g_r.isnan()), name
        assert torch.all(g[2] == 0)
    assert torch.equal(dw.isnan(), dw_r.isnan()) and dw.isnan().all()


def test_ignored_rows_with_nan_hidden_stay_zero(case):
    """An ignored row may hold anything: its NaN must not reach outputs, dh or dW (0 * NaN)."""
    ha, hb, w, t = make_inputs(10, 20, 150, torch.float32, ignored=(3,), device=case.device)
    ha[3] = math.nan
    hb[3] = math.inf
    s, dha, dhb, dw = backend_grads(case.backend, case.strategy, ha, hb, w, t, **case.chunks)
    s_r, dha_r, dhb_r, dw_r = backend_grads("torch", case.strategy, ha, hb, w, t)
    for x in s:
        assert x[3].item() == 0.0 and torch.isfinite(x).all()
    assert torch.all(dha[3] == 0) and torch.all(dhb[3] == 0)
    assert torch.isfinite(dw).all()
    assert torch.allclose(dw, dw_r, atol=1e-5, rtol=1e-5)
    assert torch.allclose(dha, dha_r, atol=1e-5, rtol=1e-5)


def test_all_rows_ignored_and_empty(case):
    ha, hb, w, t = make_inputs(5, 16, 70, torch.float32, device=case.device)
    t[:] = -100
    s, dha, dhb, dw = backend_grads(case.backend, case.strategy, ha, hb, w, t)
    assert all(torch.all(x == 0) for x in s)
    assert torch.all(dha == 0) and torch.all(dhb == 0) and torch.all(dw == 0)
    empty = [x[:0] for x in (ha, hb)]
    stats = pk.two_view_stats(*empty, w, t[:0], backend=case.backend, strategy=case.strategy)
    assert all(x.shape == (0,) for x in stats)
    a, wl = leaves((empty[0], w), (True, True))
    loss, metrics = pk.fused_token_loss(a, wl, t[:0], loss_fn(row_coefs(1, 2), TOKEN_OUTPUTS),
                                        backend=case.backend, strategy=case.strategy)
    loss.backward()
    assert float(loss.detach()) == 0.0 and "count" in metrics and torch.all(wl.grad == 0)


def test_leading_dims_and_custom_ignore_index(case):
    ha, hb, w, t = make_inputs(12, 16, 90, torch.float32, device=case.device)
    t[5] = 7
    got = pk.two_view_stats(ha.reshape(3, 4, 16), hb.reshape(3, 4, 16), w, t.reshape(3, 4), ignore_index=7,
                            backend=case.backend, strategy=case.strategy)
    ref = pk.two_view_stats(ha, hb, w, t, ignore_index=7, backend="torch")
    for x, x_r in zip(got, ref):
        assert x.shape == (3, 4)
        assert torch.allclose(x.reshape(-1), x_r, atol=STAT_ATOL, rtol=0)
    assert got.logp_a.reshape(-1)[5].item() == 0.0


def test_strided_inputs_and_int32_targets(case):
    """Hidden states as column slices of wider tensors (row stride > H), a column-major weight,
    int32 targets."""
    n, h, v = 13, 24, 140
    ha, hb, w, t = make_inputs(n, h, v, torch.float32, device=case.device)
    coefs = row_coefs(n, 6)
    wide_a = torch.zeros(n, h + 8, device=ha.device)
    wide_b = torch.zeros(n, h + 5, device=ha.device)
    wide_a[:, 3:3 + h] = ha
    wide_b[:, :h] = hb
    w_t = w.T.contiguous()  # [H, V]: its transpose is a column-major weight
    for x in (wide_a, wide_b, w_t):
        x.requires_grad_(True)
    a, b, wl = wide_a[:, 3:3 + h], wide_b[:, :h], w_t.T
    assert a.stride(0) == h + 8 and wl.stride(0) == 1
    got = pk.two_view_stats(a, b, wl, t.int(), backend=case.backend, strategy=case.strategy, **case.chunks)
    weighted(list(got), coefs).backward()
    a_r, b_r, w_r = leaves((ha, hb, w), (True, True, True))
    ref = pk.two_view_stats(a_r, b_r, w_r, t, backend="torch")
    weighted(list(ref), coefs).backward()
    for x, x_r in zip(got, ref):
        assert torch.allclose(x, x_r, atol=STAT_ATOL, rtol=0)
    pairs = ((wide_a.grad[:, 3:3 + h], a_r.grad), (wide_b.grad[:, :h], b_r.grad), (w_t.grad.T, w_r.grad))
    for x, x_r in pairs:
        assert torch.allclose(x, x_r, atol=1e-5, rtol=1e-5)
    assert torch.all(wide_a.grad[:, :3] == 0) and torch.all(wide_b.grad[:, h:] == 0)


# ---------------------------------------------------------------- the backend module's functions


def test_float64_goes_to_the_reference(case):
    from papo_kernels import reference

    ha, hb, w, t = make_inputs(6, 8, 50, torch.float64, device=case.device)
    s_r = reference.forward_stats(ha, hb, w, t)
    for x, x_r in zip(case.kernels().forward_stats(ha, hb, w, t, KernelOptions(strategy=case.strategy)), s_r):
        assert x.dtype == torch.float64 and torch.equal(x, x_r)


def test_weight_grad_acc_is_added_into(case):
    """backward_grads adds dW into the caller's accumulator (strided or not), never overwrites it."""
    ha, hb, w, t = make_inputs(9, 16, 80, torch.float32, device=case.device)
    kernels, options = case.kernels(), KernelOptions(strategy=case.strategy)
    s = kernels.forward_stats(ha, hb, w, t, options)
    g = RowGrads(logp_a=torch.ones(9, device=ha.device), kl_ab=torch.ones(9, device=ha.device))
    acc = torch.zeros_like(w)
    kernels.backward_grads(ha, hb, w, t, s, g, options, weight_grad_acc=acc, need_hidden_a=False)
    twice = torch.ones_like(w)
    kernels.backward_grads(ha, hb, w, t, s, g, options, weight_grad_acc=twice, need_hidden_a=False)
    assert torch.allclose(twice - 1, acc, atol=1e-6)
    strided = torch.zeros(w.shape[1], w.shape[0], device=w.device).T  # column-major
    kernels.backward_grads(ha, hb, w, t, s, g, options, weight_grad_acc=strided, need_hidden_a=False)
    assert torch.allclose(strided, acc, atol=1e-6)
