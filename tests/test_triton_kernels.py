"""backend="triton" against backend="torch" and a dense float64 oracle (the workspace strategy;
the dZ ring's own cases are in test_workspace_ring.py).

On machines without an NVIDIA device the kernels run under the Triton interpreter
(TRITON_INTERPRET=1, set by conftest.py before triton is imported) with small shapes. The
interpreter has no bf16 arithmetic, so half inputs are upcast to fp32 right after loading and the
GEMMs of the workspace strategy run in fp32: bf16/fp16 cases here check the upcast path only.
The real bf16/fp16 GPU path (tensor-core dots, half dZ before cuBLAS, out_dtype GEMMs) is
checked by the same tests when a GPU is present, plus the `gpu`-marked tests at the end.
Tolerances: tests/_numerics.py (|triton - gt| <= 2 |torch - gt| + atol).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import papo_kernels as pk
from tests._numerics import assert_close_to_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if "triton" not in pk.available_backends(DEVICE):
    pytest.skip("backend='triton' cannot run here (no triton, or no GPU and no TRITON_INTERPRET=1)",
                allow_module_level=True)

from papo_kernels import kernels as K  # noqa: E402
from papo_kernels import reference  # noqa: E402
from papo_kernels._options import KernelOptions  # noqa: E402
from papo_kernels.kernels import _config  # noqa: E402
from papo_kernels.reference import RowGrads, RowStats  # noqa: E402

STRATEGIES = ("workspace",)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TWO_VIEW_OUTPUTS = ("logp_a", "logp_b", "entropy_a", "entropy_b", "kl_ab", "kl_ba")
TOKEN_OUTPUTS = ("logp", "entropy")
# (N, H, V): odd sizes, V not a multiple of any block (a vocabulary tail), and a single row.
SHAPES = [(37, 40, 300), (1, 17, 257)]
# Statistics are fp32 math on the same (rounded) inputs in every backend.
STAT_ATOL = 2e-5
# Gradients are accumulated in fp32 and rounded once to the input dtype: one unit of rounding
# relative to the largest gradient entry, on top of 2 x the torch backend's own error.
GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 2.0**-9, torch.bfloat16: 2.0**-6}
# Under the interpreter half inputs are upcast after loading, so the gradient is fp32 math
# rounded once: one unit in the last place of each element (the interpreter's stores truncate
# fp32 -> bf16, hence an ulp rather than half of one), not of the largest element. The
# max-relative bound above would pass a 1% bias of bf16 gradients there.
ONE_ULP = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _ids(shape):
    return "x".join(map(str, shape))


def make_inputs(n, h, v, dtype, *, ignored=(), seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    ha = torch.randn(n, h, generator=g)
    hb = ha + 0.5 * torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) * (2.0 / h**0.5)
    w[:3] *= 4.0  # a few dominant tokens: large logits, adversarial for the online max
    t = torch.randint(0, v, (n,), generator=g)
    for i in ignored:
        if i < n:
            t[i] = -100
    return tuple(x.to(device=device, dtype=dtype) for x in (ha, hb, w)) + (t.to(device),)


def dense64(ha, hb, w, t, temperature, *, b_live=True, ignore_index=-100):
    """Materialized-logit float64 outputs; a constant view b sees a detached weight."""
    za = ha @ w.T / temperature
    la = za.log_softmax(-1)
    valid = t != ignore_index
    idx = torch.where(valid, t, 0)[:, None]
    out = dict(logp_a=la.gather(1, idx).squeeze(1), entropy_a=-(la.exp() * la).sum(-1))
    if hb is not None:
        lb = (hb @ (w if b_live else w.detach()).T / temperature).log_softmax(-1)
        pa, pb = la.exp(), lb.exp()
        out.update(
            logp_b=lb.gather(1, idx).squeeze(1),
            entropy_b=-(pb * lb).sum(-1),
            kl_ab=(pa * (la - lb)).sum(-1),
            kl_ba=(pb * (lb - la)).sum(-1),
        )
    return {k: torch.where(valid, x, torch.zeros_like(x)) for k, x in out.items()}


def _leaves(tensors, grads):
    return [x.detach().clone().requires_grad_(g) for x, g in zip(tensors, grads)]


def _coefs(n, k, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, n, generator=g, dtype=torch.float64)


def _weighted(outs, names, coefs):
    return sum((coefs[i].to(device=outs[0].device, dtype=outs[0].dtype) * outs[i]).sum()
               for i in range(len(names)))


def _check_grads(tri, ref, gt, dtype, what):
    interpreting = _config.is_interpreting()
    for name, (k, r, g) in what(tri, ref, gt).items():
        assert k is not None and r is not None and g is not None, name
        g_max = float(g.detach().double().abs().max())
        if interpreting:
            assert_close_to_ref(k.cpu(), r.cpu(), g.cpu(), dtype=dtype, name=name,
                                atol=1e-6 + GRAD_RTOL[torch.float32] * g_max, rtol=ONE_ULP[dtype])
        else:
            assert_close_to_ref(k.cpu(), r.cpu(), g.cpu(), dtype=dtype, name=name,
                                atol=1e-6 + GRAD_RTOL[dtype] * g_max)


# ---------------------------------------------------------------- statistics calls


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_token_stats(strategy, dtype, temperature, shape):
    n, h, v = shape
    ha, _, w, t = make_inputs(n, h, v, dtype, ignored=(3, 10))
    coefs = _coefs(n, 2)
    runs = {}
    for backend in ("triton", "torch"):
        a, wl = _leaves((ha, w), (True, True))
        s = pk.token_stats(a, wl, t, temperature=temperature, backend=backend, strategy=strategy)
        _weighted(list(s), TOKEN_OUTPUTS, coefs).backward()
        runs[backend] = (s, a.grad, wl.grad)
    a, wl = _leaves((ha.double().cpu(), w.double().cpu()), (True, True))
    d = dense64(a, None, wl, t.cpu(), temperature)
    _weighted([d["logp_a"], d["entropy_a"]], TOKEN_OUTPUTS, coefs).backward()
    (s_k, *g_k), (s_r, *g_r) = runs["triton"], runs["torch"]
    for i, name in enumerate(TOKEN_OUTPUTS):
        assert s_k[i].dtype == torch.float32 and s_k[i].shape == t.shape
        assert_close_to_ref(s_k[i].cpu(), s_r[i].cpu(), d[name + "_a"], dtype=dtype, name=name,
                            atol=STAT_ATOL)
    for i in (3, 10):  # ignored rows: exactly 0 outputs, exactly 0 hidden gradient
        if i < n:
            assert s_k.logp[i].item() == 0.0 and s_k.entropy[i].item() == 0.0
            assert torch.all(g_k[0][i] == 0)
    _check_grads(g_k, g_r, (a.grad, wl.grad), dtype,
                 lambda k, r, g: {"d_hidden": (k[0], r[0], g[0]), "d_weight": (k[1], r[1], g[1])})


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("b_live", [False, True], ids=["b_const", "b_live"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_view_stats(strategy, dtype, temperature, b_live, shape):
    n, h, v = shape
    ha, hb, w, t = make_inputs(n, h, v, dtype, ignored=(0, 7))
    coefs = _coefs(n, 6)
    runs = {}
    for backend in ("triton", "torch"):
        a, b, wl = _leaves((ha, hb, w), (True, b_live, True))
        s = pk.two_view_stats(a, b, wl, t, temperature=temperature, backend=backend, strategy=strategy)
        _weighted(list(s), TWO_VIEW_OUTPUTS, coefs).backward()
        runs[backend] = (s, a.grad, b.grad, wl.grad)
    a, b, wl = _leaves((ha.double().cpu(), hb.double().cpu(), w.double().cpu()), (True, b_live, True))
    d = dense64(a, b, wl, t.cpu(), temperature, b_live=b_live)
    _weighted([d[k] for k in TWO_VIEW_OUTPUTS], TWO_VIEW_OUTPUTS, coefs).backward()
    (s_k, *g_k), (s_r, *g_r) = runs["triton"], runs["torch"]
    for i, name in enumerate(TWO_VIEW_OUTPUTS):
        assert s_k[i].dtype == torch.float32 and s_k[i].shape == t.shape
        assert_close_to_ref(s_k[i].cpu(), s_r[i].cpu(), d[name], dtype=dtype, name=name, atol=STAT_ATOL)
        assert s_k[i][0].item() == 0.0  # ignored row
    assert (g_k[1] is None) == (not b_live)
    gt = (a.grad, b.grad, wl.grad)
    names = ("d_hidden_a", "d_hidden_b", "d_weight")
    _check_grads(g_k, g_r, gt, dtype,
                 lambda k, r, g: {nm: (k[i], r[i], g[i]) for i, nm in enumerate(names) if g[i] is not None})


# ---------------------------------------------------------------- fused (gradient-in-forward) calls


def _loss_fn(coefs, names):
    def loss_fn(stats, index):
        c = coefs[:, index.cpu()].to(device=stats[0].device, dtype=stats[0].dtype)
        loss = sum((c[i] * getattr(stats, nm)).sum() for i, nm in enumerate(names))
        return loss, {"sum/first": stats[0].detach().sum(), "count": torch.tensor(float(index.numel()))}
    return loss_fn


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fused_token_loss(strategy, dtype, temperature):
    n, h, v = 37, 40, 300
    ha, _, w, t = make_inputs(n, h, v, dtype, ignored=(4, 5))
    coefs = _coefs(n, 2)
    runs = {}
    for backend in ("triton", "torch"):
        a, wl = _leaves((ha, w), (True, True))
        loss, metrics = pk.fused_token_loss(a, wl, t, _loss_fn(coefs, TOKEN_OUTPUTS), temperature=temperature,
                                            backend=backend, strategy=strategy, chunk_tokens=16)
        loss.backward()
        runs[backend] = (loss, metrics, a.grad, wl.grad)
    a, wl = _leaves((ha.double().cpu(), w.double().cpu()), (True, True))
    d = dense64(a, None, wl, t.cpu(), temperature)
    loss64 = _weighted([d["logp_a"], d["entropy_a"]], TOKEN_OUTPUTS, coefs)
    loss64.backward()
    (l_k, m_k, *g_k), (l_r, m_r, *g_r) = runs["triton"], runs["torch"]
    assert_close_to_ref(l_k.cpu(), l_r.cpu(), loss64.detach(), dtype=dtype, name="loss", atol=1e-4)
    assert set(m_k) == set(m_r) and float(m_k["count"]) == n
    assert abs(float(m_k["sum/first"]) - float(m_r["sum/first"])) < 1e-4
    _check_grads(g_k, g_r, (a.grad, wl.grad), dtype,
                 lambda k, r, g: {"d_hidden": (k[0], r[0], g[0]), "d_weight": (k[1], r[1], g[1])})


@pytest.mark.parametrize("b_live", [False, True], ids=["b_const", "b_live"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fused_two_view_loss(strategy, dtype, b_live):
    n, h, v, temperature = 37, 40, 300, 0.7
    ha, hb, w, t = make_inputs(n, h, v, dtype, ignored=(1, 30))
    coefs = _coefs(n, 6)
    runs = {}
    for backend in ("triton", "torch"):
        a, b, wl = _leaves((ha, hb, w), (True, b_live, True))
        loss, metrics = pk.fused_two_view_loss(a, b, wl, t, _loss_fn(coefs, TWO_VIEW_OUTPUTS),
                                               temperature=temperature, backend=backend, strategy=strategy,
                                               chunk_tokens=16)
        loss.backward()
        runs[backend] = (loss, metrics, a.grad, b.grad, wl.grad)
    a, b, wl = _leaves((ha.double().cpu(), hb.double().cpu(), w.double().cpu()), (True, b_live, True))
    d = dense64(a, b, wl, t.cpu(), temperature, b_live=b_live)
    loss64 = _weighted([d[k] for k in TWO_VIEW_OUTPUTS], TWO_VIEW_OUTPUTS, coefs)
    loss64.backward()
    (l_k, m_k, *g_k), (l_r, m_r, *g_r) = runs["triton"], runs["torch"]
    assert_close_to_ref(l_k.cpu(), l_r.cpu(), loss64.detach(), dtype=dtype, name="loss", atol=1e-4)
    assert set(m_k) == set(m_r)
    assert (g_k[1] is None) == (not b_live)
    gt = (a.grad, b.grad, wl.grad)
    names = ("d_hidden_a", "d_hidden_b", "d_weight")
    _check_grads(g_k, g_r, gt, dtype,
                 lambda k, r, g: {nm: (k[i], r[i], g[i]) for i, nm in enumerate(names) if g[i] is not None})


def test_fused_loss_without_grad_skips_the_sweep(monkeypatch):
    from papo_kernels.kernels import workspace

    calls = []  # every launch of the gradient epilogue (dZ), which the gradient GEMMs consume
    real = workspace.workspace_dz
    monkeypatch.setattr(workspace, "workspace_dz", lambda *a, **k: calls.append(1) or real(*a, **k))
    ha, hb, w, t = make_inputs(9, 16, 100, torch.float32)
    fn = _loss_fn(_coefs(9, 6), TWO_VIEW_OUTPUTS)
    for strategy in STRATEGIES:
        loss, _ = pk.fused_two_view_loss(ha, hb, w, t, fn, backend="triton", strategy=strategy)
        ref, _ = pk.fused_two_view_loss(ha, hb, w, t, fn, backend="torch")
        assert not loss.requires_grad
        assert abs(float(loss) - float(ref)) < 1e-4
    assert calls == []
    for strategy in STRATEGIES:  # with a gradient to compute, the same spies see the sweep
        leaf = ha.clone().requires_grad_(True)
        pk.fused_two_view_loss(leaf, hb, w, t, fn, backend="triton", strategy=strategy)
    assert calls, "the spy does not see the gradient sweep"


# ---------------------------------------------------------------- contract edge cases


def _backend_grads(backend, strategy, ha, hb, w, t, b_live=True, **kw):
    a, b, wl = _leaves((ha, hb, w), (True, b_live, True))
    s = pk.two_view_stats(a, b, wl, t, backend=backend, strategy=strategy, check_inputs=False, **kw)
    _weighted(list(s), TWO_VIEW_OUTPUTS, _coefs(ha.shape[0], 6)).backward()
    return s, a.grad, b.grad, wl.grad


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_out_of_range_targets_give_nan_rows(strategy):
    n, h, v = 11, 24, 130
    ha, hb, w, t = make_inputs(n, h, v, torch.float32, ignored=(2,))
    t[4], t[8] = v, -7  # out of range, not ignore_index: NaN outputs and gradients, no raise
    s, dha, dhb, dw = _backend_grads("triton", strategy, ha, hb, w, t)
    s_r, dha_r, dhb_r, dw_r = _backend_grads("torch", strategy, ha, hb, w, t)
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


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ignored_rows_with_nan_hidden_stay_zero(strategy):
    """An ignored row may hold anything: its NaN must not reach outputs, dh or dW (0 * NaN)."""
    ha, hb, w, t = make_inputs(10, 20, 150, torch.float32, ignored=(3,))
    ha[3] = math.nan
    hb[3] = math.inf
    s, dha, dhb, dw = _backend_grads("triton", strategy, ha, hb, w, t)
    s_r, dha_r, dhb_r, dw_r = _backend_grads("torch", strategy, ha, hb, w, t)
    for x in s:
        assert x[3].item() == 0.0 and torch.isfinite(x).all()
    assert torch.all(dha[3] == 0) and torch.all(dhb[3] == 0)
    assert torch.isfinite(dw).all()
    assert torch.allclose(dw, dw_r, atol=1e-5, rtol=1e-5)
    assert torch.allclose(dha, dha_r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_all_rows_ignored_and_empty(strategy):
    ha, hb, w, t = make_inputs(5, 16, 70, torch.float32)
    t[:] = -100
    s, dha, dhb, dw = _backend_grads("triton", strategy, ha, hb, w, t)
    assert all(torch.all(x == 0) for x in s)
    assert torch.all(dha == 0) and torch.all(dhb == 0) and torch.all(dw == 0)
    empty = [x[:0] for x in (ha, hb)]
    stats = pk.two_view_stats(*empty, w, t[:0], backend="triton", strategy=strategy)
    assert all(x.shape == (0,) for x in stats)
    loss, metrics = pk.fused_token_loss(empty[0].requires_grad_(), w, t[:0],
                                        _loss_fn(_coefs(1, 2), TOKEN_OUTPUTS), backend="triton",
                                        strategy=strategy)
    assert float(loss) == 0.0 and "count" in metrics


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_leading_dims_and_custom_ignore_index(strategy):
    ha, hb, w, t = make_inputs(12, 16, 90, torch.float32)
    t[5] = 7
    shape = (3, 4)
    got = pk.two_view_stats(ha.reshape(*shape, 16), hb.reshape(*shape, 16), w, t.reshape(shape),
                            ignore_index=7, backend="triton", strategy=strategy)
    ref = pk.two_view_stats(ha, hb, w, t, ignore_index=7, backend="torch")
    for x, x_r in zip(got, ref):
        assert x.shape == shape
        assert torch.allclose(x.reshape(-1), x_r, atol=STAT_ATOL, rtol=0)
    assert got.logp_a.reshape(-1)[5].item() == 0.0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strided_inputs(strategy):
    """Hidden states as column slices of wider tensors (row stride > H), a column-major weight."""
    n, h, v = 13, 24, 140
    ha, hb, w, t = make_inputs(n, h, v, torch.float32)
    coefs = _coefs(n, 6)
    wide_a = torch.zeros(n, h + 8, device=ha.device)
    wide_b = torch.zeros(n, h + 5, device=ha.device)
    wide_a[:, 3:3 + h] = ha
    wide_b[:, :h] = hb
    w_t = w.T.contiguous()  # [H, V]: its transpose is a column-major weight
    for x in (wide_a, wide_b, w_t):
        x.requires_grad_(True)
    a, b, wl = wide_a[:, 3:3 + h], wide_b[:, :h], w_t.T
    assert a.stride(0) == h + 8 and wl.stride(0) == 1
    got = pk.two_view_stats(a, b, wl, t, backend="triton", strategy=strategy)
    _weighted(list(got), TWO_VIEW_OUTPUTS, coefs).backward()
    a_r, b_r, w_r = _leaves((ha, hb, w), (True, True, True))
    ref = pk.two_view_stats(a_r, b_r, w_r, t, backend="torch")
    _weighted(list(ref), TWO_VIEW_OUTPUTS, coefs).backward()
    for x, x_r in zip(got, ref):
        assert torch.allclose(x, x_r, atol=STAT_ATOL, rtol=0)
    pairs = ((wide_a.grad[:, 3:3 + h], a_r.grad), (wide_b.grad[:, :h], b_r.grad), (w_t.grad.T, w_r.grad))
    for x, x_r in pairs:
        assert torch.allclose(x, x_r, atol=1e-5, rtol=1e-5)
    assert torch.all(wide_a.grad[:, :3] == 0) and torch.all(wide_b.grad[:, h:] == 0)


def test_float64_falls_back_to_the_reference():
    ha, hb, w, t = make_inputs(6, 8, 50, torch.float64)
    s_r = reference.forward_stats(ha, hb, w, t)
    for strategy in STRATEGIES:
        s = K.forward_stats(ha, hb, w, t, KernelOptions(strategy=strategy))
        for x, x_r in zip(s, s_r):
            assert x.dtype == torch.float64 and torch.equal(x, x_r)


def test_unknown_and_retired_strategies_raise():
    ha, hb, w, t = make_inputs(3, 8, 20, torch.float32)
    with pytest.raises(ValueError, match="strategy must be one of"):
        K.forward_stats(ha, hb, w, t, KernelOptions(strategy="fastest"))
    for call in (lambda: K.forward_stats(ha, hb, w, t, KernelOptions(strategy="fused")),
                 lambda: pk.two_view_stats(ha, hb, w, t, backend="triton", strategy="fused")):
        with pytest.raises(ValueError, match="strategy='fused' was retired: .*104x"):
            call()


def test_weight_grad_acc_is_added_into():
    """backward_grads adds dW into the caller's accumulator (strided or not), never overwrites it."""
    ha, hb, w, t = make_inputs(9, 16, 80, torch.float32)
    for strategy in STRATEGIES:
        s = K.forward_stats(ha, hb, w, t, KernelOptions(strategy=strategy))
        g = RowGrads(logp_a=torch.ones(9, device=ha.device), kl_ab=torch.ones(9, device=ha.device))
        acc = torch.zeros_like(w)
        K.backward_grads(ha, hb, w, t, s, g, KernelOptions(strategy=strategy), weight_grad_acc=acc,
                         need_hidden_a=False)
        twice = torch.ones_like(w)
        K.backward_grads(ha, hb, w, t, s, g, KernelOptions(strategy=strategy), weight_grad_acc=twice,
                         need_hidden_a=False)
        assert torch.allclose(twice - 1, acc, atol=1e-6)
        strided = torch.zeros(w.shape[1], w.shape[0], device=w.device).T  # column-major
        K.backward_grads(ha, hb, w, t, s, g, KernelOptions(strategy=strategy), weight_grad_acc=strided,
                         need_hidden_a=False)
        assert torch.allclose(strided, acc, atol=1e-6)


# ---------------------------------------------------------------- kernel configurations


_SMALL = dict(
    workspace_stats=_config.LaunchConfig(BLOCK_N=16, BLOCK_V=32, splits=5),
    workspace_dz=_config.LaunchConfig(BLOCK_N=16, BLOCK_V=64),
    stats_combine=_config.LaunchConfig(BLOCK_N=16, BLOCK_V=16),
)


def test_many_tiles_splits_and_chunks():
    """Small tiles: several row and vocabulary tiles; 7 vocabulary tiles in 5 splits of 2 (the
    last one empty) merged by the combine kernel; workspace chunks of 16 rows (the last one
    partial)."""
    ha, hb, w, t = make_inputs(37, 40, 203, torch.float32, ignored=(6,))
    with _config.override_configs(**_SMALL):
        s, *g = _backend_grads("triton", "workspace", ha, hb, w, t, chunk_tokens=16)
    s_r, *g_r = _backend_grads("torch", "workspace", ha, hb, w, t)
    for name, x, x_r in zip(TWO_VIEW_OUTPUTS, s, s_r):
        assert torch.allclose(x, x_r, atol=STAT_ATOL, rtol=0), name
    for name, x, x_r in zip(("dh_a", "dh_b", "dw"), g, g_r):
        assert torch.allclose(x, x_r, atol=1e-5, rtol=1e-5), name


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_inregister_forward(dtype, monkeypatch):
    """The in-register forward (PAPO_INREGISTER_FORWARD=1, kept for the GPU comparison of the
    no-grad statistics): one split, and 7 vocabulary tiles in 5 splits merged by the combine kernel."""
    n, h, v = 37, 40, 203
    ha, hb, w, t = make_inputs(n, h, v, dtype, ignored=(6,))
    ref = reference.forward_stats(ha, hb, w, t, KernelOptions(temperature=0.7))
    calls = []
    real = K.inregister_stats
    monkeypatch.setattr(K, "inregister_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    small = _config.LaunchConfig(BLOCK_N=16, BLOCK_V=32, BLOCK_D=16, splits=5)
    for configs in ({}, dict(inregister_stats=small, stats_combine=_SMALL["stats_combine"])):
        with _config.override_workspace(inregister_forward=True), _config.override_configs(**configs):
            got = K.forward_stats(ha, hb, w, t, KernelOptions(temperature=0.7))
        for name, x, x_r in zip(RowStats._fields, got, ref):
            assert torch.allclose(x, x_r, atol=STAT_ATOL, rtol=0), (name, configs)
        assert got.logp_a[6].item() == 0.0
    assert len(calls) == 2
    K.forward_stats(ha, hb, w, t)  # the switch is off again: the workspace forward
    assert len(calls) == 2


def test_workspace_is_bitwise_reproducible():
    ha, hb, w, t = make_inputs(21, 24, 150, torch.float32)
    first = _backend_grads("triton", "workspace", ha, hb, w, t, chunk_tokens=8)
    second = _backend_grads("triton", "workspace", ha, hb, w, t, chunk_tokens=8)
    for x, y in zip(first[1:], second[1:]):
        assert torch.equal(x, y)


def test_config_overrides_and_validation():
    with pytest.raises(ValueError, match="power of two"):
        _config.LaunchConfig(BLOCK_N=24, BLOCK_V=64)
    with pytest.raises(ValueError, match="unknown kernel"):
        with _config.override_configs(not_a_kernel=_config.LaunchConfig(16, 16)):
            pass
    cfg = _config.LaunchConfig(16, 32, 16)
    dev = torch.device(DEVICE)
    with _config.override_configs(workspace_dz=cfg):
        assert _config.get_config("workspace_dz", dev, torch.float32, 10, 10, 10) is cfg
    assert _config.get_config("workspace_dz", dev, torch.float32, 10, 10, 10) is not cfg


def test_environment_switches(monkeypatch):
    monkeypatch.setenv("PAPO_AUTOTUNE", "1")
    assert _config.autotune_enabled() == (not _config.is_interpreting())
    monkeypatch.setenv("PAPO_WORKSPACE_MB", "3")
    assert _config.workspace_bytes() == 3 << 20
    monkeypatch.setenv("PAPO_DW_RING_ROWS", "1000")
    assert _config.ring_rows(torch.bfloat16) == 1000 and _config.ring_rows(torch.float32) == 1000
    monkeypatch.delenv("PAPO_DW_RING_ROWS")
    assert _config.ring_rows(torch.bfloat16) == _config.DEFAULT_RING_ROWS
    assert _config.ring_rows(torch.float32) == 0  # fp32: one chunk
    monkeypatch.setenv("PAPO_WORKSPACE_VARIANT", "v1")
    assert _config.workspace_variant() == "v1"
    with _config.override_workspace(variant="ring2s", ring_rows=7, workspace_mb=5, inregister_forward=True):
        assert _config.workspace_variant() == "ring2s" and _config.ring_rows(torch.float32) == 7
        assert _config.workspace_bytes() == 5 << 20 and _config.inregister_forward_enabled()
    assert _config.workspace_variant() == "v1" and not _config.inregister_forward_enabled()
    monkeypatch.setenv("PAPO_INREGISTER_FORWARD", "1")
    assert _config.inregister_forward_enabled()
    for name, bad in (("PAPO_WORKSPACE_VARIANT", "fast"), ("PAPO_DW_RING_ROWS", "-3"),
                      ("PAPO_WORKSPACE_MB", "lots")):
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError, match=name):
            _config.workspace_variant(), _config.ring_rows(torch.bfloat16), _config.workspace_bytes()
        monkeypatch.delenv(name)
    with pytest.raises(ValueError, match="ring_rows must be a positive int"):
        with _config.override_workspace(ring_rows=0):
            pass


def test_workspace_chunk_rows_respect_the_bound(monkeypatch):
    from papo_kernels.kernels.workspace import chunk_rows

    monkeypatch.setenv("PAPO_WORKSPACE_MB", "512")
    # Qwen2.5-VL-7B: two views, fp32 logits, V = 152,064: 384 rows per view.
    c = chunk_rows(16384, 152_064, 2, torch.bfloat16, None)
    assert c == 384 and 2 * c * 152_064 * 4 <= 512 << 20
    # the 2026-11-25 path: logits + bf16 dZ copy within 1 GiB: the 576-row chunks measured then
    assert chunk_rows(16384, 152_064, 2, torch.bfloat16, None, variant="v1") == 576
    assert chunk_rows(10, 152_064, 2, torch.bfloat16, None) == 10
    assert chunk_rows(1000, 50, 2, torch.float32, 128) == 128


def test_cpu_device_queries_are_guarded():
    cpu = torch.device("cpu")
    assert _config.device_props(cpu) is None
    assert _config.sm_count(cpu) > 0
    assert _config.gpu_family(cpu) == "interpreter"


def test_import_without_gpu_or_interpreter_never_fails():
    """A fresh interpreter without TRITON_INTERPRET: importing everything works, and triton is
    simply not offered for CPU tensors."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    code = (
        "import papo_kernels as pk, papo_kernels.kernels as K, torch\n"
        "assert callable(K.forward_stats) and callable(K.backward_grads)\n"
        "assert 'triton' not in pk.available_backends('cpu')\n"
        "print('ok')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


# ---------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("variant", _config.WORKSPACE_VARIANTS)
def test_gpu_bf16_default_configs(variant):
    """The compiled bf16 path with the default GPU configs at a shape with a vocabulary tail,
    every workspace variant (the ring's flushes on a second stream included)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    n, h, v = 300, 256, 5003
    ha, hb, w, t = make_inputs(n, h, v, torch.bfloat16, ignored=(0, 99), device="cuda")
    with _config.override_workspace(variant=variant, ring_rows=160):
        s, *g = _backend_grads("triton", "workspace", ha, hb, w, t, chunk_tokens=64)
    s_r, *g_r = _backend_grads("torch", "workspace", ha, hb, w, t)
    a, b, wl = _leaves((ha.double().cpu(), hb.double().cpu(), w.double().cpu()), (True, True, True))
    d = dense64(a, b, wl, t.cpu(), 1.0)
    _weighted([d[k] for k in TWO_VIEW_OUTPUTS], TWO_VIEW_OUTPUTS, _coefs(n, 6)).backward()
    for i, name in enumerate(TWO_VIEW_OUTPUTS):
        assert_close_to_ref(s[i].cpu(), s_r[i].cpu(), d[name], dtype=torch.bfloat16, name=name,
                            atol=STAT_ATOL)
    # bf16 dZ feeds the GEMMs on the GPU: allow a few bf16 units relative to the largest entry.
    for name, x, x_r, gt in zip(("dh_a", "dh_b", "dw"), g, g_r, (a.grad, b.grad, wl.grad)):
        atol = 4 * 2.0**-8 * float(gt.abs().max())
        assert_close_to_ref(x.cpu(), x_r.cpu(), gt, dtype=torch.bfloat16, name=name, atol=atol)


def test_workspace_fused_loss_computes_each_logit_chunk_once(monkeypatch):
    """The fused calls reuse the workspace logits for dZ: one logit GEMM per chunk, not two."""
    from papo_kernels import _gemm

    calls = []
    real = _gemm.mm_f32

    def counting(a, b, out=None):
        calls.append(b.shape[1])  # output columns: V for a logit GEMM, H for a dh GEMM
        return real(a, b, out=out)

    monkeypatch.setattr(_gemm, "mm_f32", counting)
    ha, hb, w, t = make_inputs(40, 16, 200, torch.float32, ignored=(3,))
    a, wl = _leaves((ha, w), (True, True))
    fn = _loss_fn(_coefs(40, 6), TWO_VIEW_OUTPUTS)
    loss, _ = pk.fused_two_view_loss(a, hb, wl, t, fn, backend="triton", strategy="workspace",
                                     chunk_tokens=16)
    loss.backward()
    assert calls.count(200) == 3  # ceil(40 / 16) chunks, one logit GEMM each
    a2, wl2 = _leaves((ha, w), (True, True))
    ref, _ = pk.fused_two_view_loss(a2, hb, wl2, t, fn, backend="torch")
    ref.backward()
    torch.testing.assert_close(a.grad, a2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(wl.grad, wl2.grad, rtol=1e-4, atol=1e-5)
