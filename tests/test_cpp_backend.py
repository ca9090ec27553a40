"""backend="cpp" (the compiled extension, csrc/) against backend="torch" and a dense float64 oracle.

Both strategies ("workspace": chunk GEMMs into a logit workspace, the default; "tiles": tile GEMMs
with in-cache epilogues), fp32/bf16/fp16 inputs, temperature != 1, vocabulary tails (V not a
multiple of the vector width or the tile), ignored and out-of-range rows, N = 0 and 1, a constant
and a live view b, both KL directions, the fused calls, torch.compile, bitwise repeatability,
the portable (non-SIMD) epilogues, and the direct C++ ops' argument checks. Tolerances:
tests/_numerics.py (|cpp - gt| <= 2 |torch - gt| + atol).

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
from tests._numerics import assert_close_to_ref

if "cpp" not in pk.available_backends("cpu"):
    if os.environ.get("CI") == "true":
        from papo_kernels._backends import resolve_backend

        resolve_backend("cpp", torch.device("cpu"))  # raises with the reason: fails collection
    pytest.skip("backend='cpp' is not built (pip install --no-build-isolation -e .)", allow_module_level=True)

from papo_kernels import extension as E  # noqa: E402
from papo_kernels._options import KernelOptions  # noqa: E402
from papo_kernels.reference import RowGrads  # noqa: E402

STRATEGIES = ("workspace", "tiles")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TWO_VIEW_OUTPUTS = ("logp_a", "logp_b", "entropy_a", "entropy_b", "kl_ab", "kl_ba")
TOKEN_OUTPUTS = ("logp", "entropy")
# (N, H, V): odd sizes, V not a multiple of the vector width or the tile (a vocabulary tail), and
# a single row.
SHAPES = [(37, 40, 300), (1, 17, 257)]
STAT_ATOL = 2e-5
# Gradients are accumulated in fp32 and rounded once to the input dtype.
GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 2.0**-9, torch.bfloat16: 2.0**-6}
# Small tiles and chunks so that every loop runs several times with a tail.
SMALL = dict(chunk_tokens=16, chunk_vocab=64)


def _ids(shape):
    return "x".join(map(str, shape))


def make_inputs(n, h, v, dtype, *, ignored=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    ha = torch.randn(n, h, generator=g)
    hb = ha + 0.5 * torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) * (2.0 / h**0.5)
    w[:3] *= 4.0  # a few dominant tokens: large logits, adversarial for the online max
    t = torch.randint(0, v, (n,), generator=g)
    for i in ignored:
        if i < n:
            t[i] = -100
    return tuple(x.to(dtype) for x in (ha, hb, w)) + (t,)


def dense64(ha, hb, w, t, temperature, *, b_live=True, ignore_index=-100):
    """Materialized-logit float64 outputs; a constant view b sees a detached weight."""
    la = (ha @ w.T / temperature).log_softmax(-1)
    valid = t != ignore_index
    idx = torch.where(valid, t, 0)[:, None]
    out = dict(logp_a=la.gather(1, idx).squeeze(1), entropy_a=-(la.exp() * la).sum(-1))
    if hb is not None:
        lb = (hb @ (w if b_live else w.detach()).T / temperature).log_softmax(-1)
        pa, pb = la.exp(), lb.exp()
        out.update(logp_b=lb.gather(1, idx).squeeze(1), entropy_b=-(pb * lb).sum(-1),
                   kl_ab=(pa * (la - lb)).sum(-1), kl_ba=(pb * (lb - la)).sum(-1))
    return {k: torch.where(valid, x, torch.zeros_like(x)) for k, x in out.items()}


def _leaves(tensors, grads):
    return [x.detach().clone().requires_grad_(g) for x, g in zip(tensors, grads)]


def _coefs(n, k, seed=1):
    return torch.randn(k, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _weighted(outs, coefs):
    return sum((coefs[i].to(outs[0].dtype) * outs[i]).sum() for i in range(len(outs)))


def _check_grads(got, ref, gt, dtype, names):
    for name, k, r, g in zip(names, got, ref, gt):
        if g is None:
            assert k is None, name
            continue
        rtol_abs = GRAD_RTOL[dtype] * float(g.detach().double().abs().max())
        assert_close_to_ref(k, r, g, dtype=dtype, name=name, atol=1e-6 + rtol_abs)


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
    for backend in ("cpp", "torch"):
        a, wl = _leaves((ha, w), (True, True))
        s = pk.token_stats(a, wl, t, temperature=temperature, backend=backend, strategy=strategy, **SMALL)
        _weighted(list(s), coefs).backward()
        runs[backend] = (s, a.grad, wl.grad)
    a, wl = _leaves((ha.double(), w.double()), (True, True))
    d = dense64(a, None, wl, t, temperature)
    _weighted([d["logp_a"], d["entropy_a"]], coefs).backward()
    (s_k, *g_k), (s_r, *g_r) = runs["cpp"], runs["torch"]
    for i, name in enumerate(TOKEN_OUTPUTS):
        assert s_k[i].dtype == torch.float32 and s_k[i].shape == t.shape
        assert_close_to_ref(s_k[i], s_r[i], d[name + "_a"], dtype=dtype, name=name, atol=STAT_ATOL)
    for i in (3, 10):  # ignored rows: exactly 0 outputs, exactly 0 hidden gradient
        if i < n:
            assert s_k.logp[i].item() == 0.0 and s_k.entropy[i].item() == 0.0
            assert torch.all(g_k[0][i] == 0)
    _check_grads(g_k, g_r, (a.grad, wl.grad), dtype, ("d_hidden", "d_weight"))


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
    for backend in ("cpp", "torch"):
        a, b, wl = _leaves((ha, hb, w), (True, b_live, True))
        s = pk.two_view_stats(a, b, wl, t, temperature=temperature, backend=backend, strategy=strategy,
                              **SMALL)
        _weighted(list(s), coefs).backward()
        runs[backend] = (s, a.grad, b.grad, wl.grad)
    a, b, wl = _leaves((ha.double(), hb.double(), w.double()), (True, b_live, True))
    d = dense64(a, b, wl, t, temperature, b_live=b_live)
    _weighted([d[k] for k in TWO_VIEW_OUTPUTS], coefs).backward()
    (s_k, *g_k), (s_r, *g_r) = runs["cpp"], runs["torch"]
    for i, name in enumerate(TWO_VIEW_OUTPUTS):
        assert s_k[i].dtype == torch.float32 and s_k[i].shape == t.shape
        assert_close_to_ref(s_k[i], s_r[i], d[name], dtype=dtype, name=name, atol=STAT_ATOL)
        assert s_k[i][0].item() == 0.0  # ignored row
    assert (g_k[1] is None) == (not b_live)
    _check_grads(g_k, g_r, (a.grad, b.grad, wl.grad), dtype, ("d_hidden_a", "d_hidden_b", "d_weight"))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_identical_views_have_zero_kl(strategy):
    """z_a - z_b comes from the unshifted products: identical views give a KL of exactly 0."""
    ha, _, w, t = make_inputs(9, 24, 333, torch.float32)
    s = pk.two_view_stats(ha, ha, w, t, temperature=0.9, backend="cpp", strategy=strategy, **SMALL)
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


def _loss_fn(coefs, names):
    def loss_fn(stats, index):
        c = coefs[:, index].to(stats[0].dtype)
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
    for backend in ("cpp", "torch"):
        a, wl = _leaves((ha, w), (True, True))
        loss, metrics = pk.fused_token_loss(a, wl, t, _loss_fn(coefs, TOKEN_OUTPUTS), temperature=temperature,
                                            backend=backend, strategy=strategy, **SMALL)
        loss.backward()
        runs[backend] = (loss, metrics, a.grad, wl.grad)
    a, wl = _leaves((ha.double(), w.double()), (True, True))
    d = dense64(a, None, wl, t, temperature)
    loss64 = _weighted([d["logp_a"], d["entropy_a"]], coefs)
    loss64.backward()
    (l_k, m_k, *g_k), (l_r, m_r, *g_r) = runs["cpp"], runs["torch"]
    assert_close_to_ref(l_k, l_r, loss64.detach(), dtype=dtype, name="loss", atol=1e-4)
    assert set(m_k) == set(m_r) and float(m_k["count"]) == n
    assert abs(float(m_k["sum/first"]) - float(m_r["sum/first"])) < 1e-4
    _check_grads(g_k, g_r, (a.grad, wl.grad), dtype, ("d_hidden", "d_weight"))


@pytest.mark.parametrize("b_live", [False, True], ids=["b_const", "b_live"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fused_two_view_loss(strategy, dtype, b_live):
    n, h, v, temperature = 37, 40, 300, 0.7
    ha, hb, w, t = make_inputs(n, h, v, dtype, ignored=(1, 30))
    coefs = _coefs(n, 6)
    runs = {}
    for backend in ("cpp", "torch"):
        a, b, wl = _leaves((ha, hb, w), (True, b_live, True))
        loss, metrics = pk.fused_two_view_loss(a, b, wl, t, _loss_fn(coefs, TWO_VIEW_OUTPUTS),
                                               temperature=temperature, backend=backend, strategy=strategy,
                                               **SMALL)
        loss.backward()
        runs[backend] = (loss, metrics, a.grad, b.grad, wl.grad)
    a, b, wl = _leaves((ha.double(), hb.double(), w.double()), (True, b_live, True))
    d = dense64(a, b, wl, t, temperature, b_live=b_live)
    loss64 = _weighted([d[k] for k in TWO_VIEW_OUTPUTS], coefs)
    loss64.backward()
    (l_k, m_k, *g_k), (l_r, m_r, *g_r) = runs["cpp"], runs["torch"]
    assert_close_to_ref(l_k, l_r, loss64.detach(), dtype=dtype, name="loss", atol=1e-4)
    assert set(m_k) == set(m_r)
    assert (g_k[1] is None) == (not b_live)
    _check_grads(g_k, g_r, (a.grad, b.grad, wl.grad), dtype, ("d_hidden_a", "d_hidden_b", "d_weight"))


@pytest.mark.parametrize("kl", ["kl_ab", "kl_ba"])
def test_fused_loss_of_one_kl_direction(kl):
    """A loss of a single KL direction: only that term's dZ (the other gradients arrive as None)."""
    ha, hb, w, t = make_inputs(20, 24, 130, torch.float32, ignored=(2,))
    grads = {}
    for backend in ("cpp", "torch"):
        a, b, wl = _leaves((ha, hb, w), (True, True, True))
        loss, _ = pk.fused_two_view_loss(a, b, wl, t, lambda s, i: (getattr(s, kl).sum(), {}),
                                         backend=backend, chunk_tokens=8)
        loss.backward()
        grads[backend] = (a.grad, b.grad, wl.grad)
    a, b, wl = _leaves((ha.double(), hb.double(), w.double()), (True, True, True))
    dense64(a, b, wl, t, 1.0)[kl].sum().backward()
    _check_grads(grads["cpp"], grads["torch"], (a.grad, b.grad, wl.grad), torch.float32,
                 ("d_hidden_a", "d_hidden_b", "d_weight"))


def test_fused_loss_without_grad_skips_the_sweep():
    ha, hb, w, t = make_inputs(9, 16, 100, torch.float32)
    fn = _loss_fn(_coefs(9, 6), TWO_VIEW_OUTPUTS)
    ref, _ = pk.fused_two_view_loss(ha, hb, w, t, fn, backend="torch")
    for strategy in STRATEGIES:
        loss, _ = pk.fused_two_view_loss(ha, hb, w, t, fn, backend="cpp", strategy=strategy)
        assert not loss.requires_grad
        assert abs(float(loss) - float(ref)) < 1e-4


# ---------------------------------------------------------------- contract edge cases


def _backend_grads(backend, strategy, ha, hb, w, t, b_live=True, **kw):
    a, b, wl = _leaves((ha, hb, w), (True, b_live, True))
    s = pk.two_view_stats(a, b, wl, t, backend=backend, strategy=strategy, check_inputs=False, **kw)
    _weighted(list(s), _coefs(ha.shape[0], 6)).backward()
    return s, a.grad, b.grad, wl.grad


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_out_of_range_targets_give_nan_rows(strategy):
    n, h, v = 11, 24, 130
    ha, hb, w, t = make_inputs(n, h, v, torch.float32, ignored=(2,))
    t[4], t[8] = v, -7  # out of range, not ignore_index: NaN outputs and gradients, no raise
    s, dha, dhb, dw = _backend_grads("cpp", strategy, ha, hb, w, t, **SMALL)
    s_r, dha_r, dhb_r, dw_r = _backend_grads("torch", strategy, ha, hb, w, t)
    bad = torch.zeros(n, dtype=torch.bool)
    bad[4] = bad[8] = True
    for name, x, x_r in zip(TWO_VIEW_OUTPUTS, s, s_r):
        assert torch.equal(x.isnan(), bad) and torch.equal(x_r.isnan(), bad), name
        assert x[2].item() == 0.0
        assert torch.allclose(x[~bad], x_r[~bad], atol=STAT_ATOL, rtol=0)
    for name, g, g_r in (("dh_a", dha, dha_r), ("dh_b", dhb, dhb_r)):
        assert torch.equal(g.isnan().any(1), bad), name
        assert torch.equal(g.isnan(), g_r.isnan()), name
        assert torch.all(g[2] == 0)
    assert torch.equal(dw.isnan(), dw_r.isnan()) and dw.isnan().all()


def test_out_of_range_targets_raise_with_check_inputs():
    ha, hb, w, t = make_inputs(6, 8, 40, torch.float32)
    t[3] = 40
    with pytest.raises(ValueError, match=r"targets must be in \[0, 40\).*targets\[3\] = 40"):
        pk.two_view_stats(ha, hb, w, t, backend="cpp")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ignored_rows_with_nan_hidden_stay_zero(strategy):
    """An ignored row may hold anything: its NaN must not reach outputs, dh or dW (0 * NaN)."""
    ha, hb, w, t = make_inputs(10, 20, 150, torch.float32, ignored=(3,))
    ha[3] = math.nan
    hb[3] = math.inf
    s, dha, dhb, dw = _backend_grads("cpp", strategy, ha, hb, w, t, **SMALL)
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
    s, dha, dhb, dw = _backend_grads("cpp", strategy, ha, hb, w, t)
    assert all(torch.all(x == 0) for x in s)
    assert torch.all(dha == 0) and torch.all(dhb == 0) and torch.all(dw == 0)
    empty = [x[:0] for x in (ha, hb)]
    stats = pk.two_view_stats(*empty, w, t[:0], backend="cpp", strategy=strategy)
    assert all(x.shape == (0,) for x in stats)
    a, wl = _leaves((empty[0], w), (True, True))
    loss, metrics = pk.fused_token_loss(a, wl, t[:0], _loss_fn(_coefs(1, 2), TOKEN_OUTPUTS), backend="cpp",
                                        strategy=strategy)
    loss.backward()
    assert float(loss.detach()) == 0.0 and "count" in metrics and torch.all(wl.grad == 0)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_leading_dims_and_custom_ignore_index(strategy):
    ha, hb, w, t = make_inputs(12, 16, 90, torch.float32)
    t[5] = 7
    got = pk.two_view_stats(ha.reshape(3, 4, 16), hb.reshape(3, 4, 16), w, t.reshape(3, 4), ignore_index=7,
                            backend="cpp", strategy=strategy)
    ref = pk.two_view_stats(ha, hb, w, t, ignore_index=7, backend="torch")
    for x, x_r in zip(got, ref):
        assert x.shape == (3, 4)
        assert torch.allclose(x.reshape(-1), x_r, atol=STAT_ATOL, rtol=0)
    assert got.logp_a.reshape(-1)[5].item() == 0.0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strided_inputs_and_int32_targets(strategy):
    """Hidden states as column slices of wider tensors (row stride > H), a column-major weight,
    int32 targets."""
    n, h, v = 13, 24, 140
    ha, hb, w, t = make_inputs(n, h, v, torch.float32)
    coefs = _coefs(n, 6)
    wide_a, wide_b = torch.zeros(n, h + 8), torch.zeros(n, h + 5)
    wide_a[:, 3:3 + h] = ha
    wide_b[:, :h] = hb
    w_t = w.T.contiguous()  # [H, V]: its transpose is a column-major weight
    for x in (wide_a, wide_b, w_t):
        x.requires_grad_(True)
    a, b, wl = wide_a[:, 3:3 + h], wide_b[:, :h], w_t.T
    got = pk.two_view_stats(a, b, wl, t.int(), backend="cpp", strategy=strategy, **SMALL)
    _weighted(list(got), coefs).backward()
    a_r, b_r, w_r = _leaves((ha, hb, w), (True, True, True))
    ref = pk.two_view_stats(a_r, b_r, w_r, t, backend="torch")
    _weighted(list(ref), coefs).backward()
    for x, x_r in zip(got, ref):
        assert torch.allclose(x, x_r, atol=STAT_ATOL, rtol=0)
    pairs = ((wide_a.grad[:, 3:3 + h], a_r.grad), (wide_b.grad[:, :h], b_r.grad), (w_t.grad.T, w_r.grad))
    for x, x_r in pairs:
        assert torch.allclose(x, x_r, atol=1e-5, rtol=1e-5)
    assert torch.all(wide_a.grad[:, :3] == 0) and torch.all(wide_b.grad[:, h:] == 0)


def test_float64_goes_to_the_torch_backend():
    from papo_kernels import reference

    ha, hb, w, t = make_inputs(6, 8, 50, torch.float64)
    s_r = reference.forward_stats(ha, hb, w, t)
    for strategy in STRATEGIES:
        for x, x_r in zip(E.forward_stats(ha, hb, w, t, KernelOptions(strategy=strategy)), s_r):
            assert x.dtype == torch.float64 and torch.equal(x, x_r)


def test_weight_grad_acc_is_added_into():
    """backward_grads adds dW into the caller's accumulator (strided or not), never overwrites it."""
    ha, hb, w, t = make_inputs(9, 16, 80, torch.float32)
    for strategy in STRATEGIES:
        s = E.forward_stats(ha, hb, w, t, KernelOptions(strategy=strategy))
        g = RowGrads(logp_a=torch.ones(9), kl_ab=torch.ones(9))
        acc = torch.zeros_like(w)
        E.backward_grads(ha, hb, w, t, s, g, KernelOptions(strategy=strategy), weight_grad_acc=acc,
                         need_hidden_a=False)
        twice = torch.ones_like(w)
        E.backward_grads(ha, hb, w, t, s, g, KernelOptions(strategy=strategy), weight_grad_acc=twice,
                         need_hidden_a=False)
        assert torch.allclose(twice - 1, acc, atol=1e-6)
        strided = torch.zeros(w.shape[1], w.shape[0]).T  # column-major
        E.backward_grads(ha, hb, w, t, s, g, KernelOptions(strategy=strategy), weight_grad_acc=strided,
                         need_hidden_a=False)
        assert torch.allclose(strided, acc, atol=1e-6)


def test_unknown_strategy_raises():
    ha, hb, w, t = make_inputs(3, 8, 20, torch.float32)
    with pytest.raises(ValueError, match="strategy must be one of"):
        E.forward_stats(ha, hb, w, t, KernelOptions(strategy="fastest"))


# ---------------------------------------------------------------- reproducibility, dispatch, compile


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bitwise_reproducible(strategy):
    """Same inputs, same thread count: identical bits (the trainer's kill-and-resume test relies on it)."""
    ha, hb, w, t = make_inputs(70, 48, 900, torch.float32, ignored=(5,))
    first = _backend_grads("cpp", strategy, ha, hb, w, t, chunk_tokens=32)
    second = _backend_grads("cpp", strategy, ha, hb, w, t, chunk_tokens=32)
    for x, y in zip([*first[0], *first[1:]], [*second[0], *second[1:]]):
        assert torch.equal(x, y)
    fn = _loss_fn(_coefs(70, 6), TWO_VIEW_OUTPUTS)
    runs = []
    for _ in range(2):
        a, b, wl = _leaves((ha, hb, w), (True, True, True))
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
    coefs = _coefs(n, 6).float()

    def objective(a, b, ww, tt):
        s = pk.two_view_stats(a, b, ww, tt, temperature=0.8, backend="cpp", chunk_vocab=64)
        return sum((coefs[i] * x).sum() for i, x in enumerate(s))

    compiled = torch.compile(objective, backend="inductor", fullgraph=True)
    grads = []
    for fn in (objective, compiled):
        a, b, wl = _leaves((ha, hb, w), (True, True, True))
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
