"""The torch backend against a dense float64 reference written here: values and every gradient,
odd shapes, ignored rows, temperatures and dtypes (tolerances: tests/_numerics.py)."""

from __future__ import annotations

import pytest
import torch

import papo_kernels as pk
from tests._numerics import assert_close_to_ref

OUTPUTS = ("logp_a", "logp_b", "entropy_a", "entropy_b", "kl_ab", "kl_ba")


def dense_two_view(ha, hb, w, targets, temperature, ignore_index=-100):
    """Materialized-logit statistics in the dtype of the inputs (float64 for the ground truth)."""
    za = (ha @ w.T) / temperature
    zb = (hb @ w.T) / temperature
    la, lb = za.log_softmax(-1), zb.log_softmax(-1)
    pa, pb = la.exp(), lb.exp()
    valid = targets != ignore_index
    idx = torch.where(valid, targets, 0)[:, None]
    out = dict(
        logp_a=la.gather(1, idx).squeeze(1),
        logp_b=lb.gather(1, idx).squeeze(1),
        entropy_a=-(pa * la).sum(-1),
        entropy_b=-(pb * lb).sum(-1),
        kl_ab=(pa * (la - lb)).sum(-1),
        kl_ba=(pb * (lb - la)).sum(-1),
    )
    return {k: torch.where(valid, v, torch.zeros_like(v)) for k, v in out.items()}


def make_inputs(n, h, v, dtype, *, ignored=(), scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    ha = torch.randn(n, h, generator=g) * scale
    hb = ha + 0.5 * torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) * (2.0 / h**0.5)
    w[:3] *= 4.0  # a few dominant tokens: large logits, adversarial for the online max
    targets = torch.randint(0, v, (n,), generator=g)
    for i in ignored:
        targets[i] = -100
    upstream = {k: torch.randn(n, generator=g) for k in OUTPUTS}
    return ha.to(dtype), hb.to(dtype), w.to(dtype), targets, upstream


def _loss(stats: dict, upstream: dict):
    return sum((stats[k].double() * upstream[k].double()).sum() for k in stats)


def _grads(fn, tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    stats, upstream = fn(*leaves)
    _loss(stats, upstream).backward()
    return {k: v.detach() for k, v in stats.items()}, [leaf.grad for leaf in leaves]


SHAPES = [  # (N, H, V, ignored rows, chunk_tokens, chunk_vocab)
    (1, 5, 1037, (), 16, 256),
    (37, 33, 1037, (0, 5, 36), 16, 256),
    (20, 17, 300, tuple(range(20)), 7, 64),  # all ignored
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-H{s[1]}-V{s[2]}-ign{len(s[3])}")
def test_two_view_values_and_grads(dtype, temperature, shape):
    n, h, v, ignored, ct, cv = shape
    ha, hb, w, t, up = make_inputs(n, h, v, dtype, ignored=ignored)

    def ours(a, b, ww):
        s = pk.two_view_stats(a, b, ww, t, temperature=temperature, backend="torch",
                              chunk_tokens=ct, chunk_vocab=cv)
        return s._asdict(), up

    def dense(a, b, ww):
        return dense_two_view(a, b, ww, t, temperature), up

    out_k, grads_k = _grads(ours, (ha, hb, w))
    out_gt, grads_gt = _grads(dense, (ha.double(), hb.double(), w.double()))
    out_ref, grads_ref = _grads(dense, (ha, hb, w))
    for k in OUTPUTS:
        assert out_k[k].dtype == torch.float32
        assert_close_to_ref(out_k[k], out_ref[k], out_gt[k], dtype=dtype, name=k)
    for name, gk, gr, gg in zip(("hidden_a", "hidden_b", "weight"), grads_k, grads_ref, grads_gt):
        assert gk.dtype == dtype
        assert_close_to_ref(gk, gr, gg, dtype=dtype, name=f"d{name}", rtol=_RTOL[dtype])
    for k in OUTPUTS:  # ignored rows are exactly zero
        if ignored:
            assert torch.all(out_k[k][list(ignored)] == 0)
    if ignored:
        assert torch.all(grads_k[0][list(ignored)] == 0) and torch.all(grads_k[1][list(ignored)] == 0)


# The kernels round each gradient to the input dtype once: allow one rounding of the result.
_RTOL = {torch.float32: 1e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_stats_matches_dense(temperature):
    ha, _, w, t, up = make_inputs(29, 21, 1037, torch.float32, ignored=(3,))

    def ours(a, ww):
        s = pk.token_stats(a, ww, t, temperature=temperature, backend="torch",
                           chunk_tokens=8, chunk_vocab=200)
        return {"logp_a": s.logp, "entropy_a": s.entropy}, up

    def dense(a, ww):
        d = dense_two_view(a, a, ww, t, temperature)
        return {"logp_a": d["logp_a"], "entropy_a": d["entropy_a"]}, up

    out_k, g_k = _grads(ours, (ha, w))
    out_gt, g_gt = _grads(dense, (ha.double(), w.double()))
    out_ref, g_ref = _grads(dense, (ha, w))
    for k in out_k:
        assert_close_to_ref(out_k[k], out_ref[k], out_gt[k], dtype=torch.float32, name=k)
    for name, a, b, c in zip(("hidden", "weight"), g_k, g_ref, g_gt):
        assert_close_to_ref(a, b, c, dtype=torch.float32, name=name, rtol=1e-6)


def test_leading_dims_and_float64_outputs():
    ha, hb, w, t, _ = make_inputs(12, 9, 211, torch.float64)
    s = pk.two_view_stats(ha.view(3, 4, 9), hb.view(3, 4, 9), w, t.view(3, 4), backend="torch")
    flat = pk.two_view_stats(ha, hb, w, t, backend="torch")
    for a, b in zip(s, flat):
        assert a.shape == (3, 4) and a.dtype == torch.float64
        torch.testing.assert_close(a.reshape(-1), b, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["token", "two_view"])
def test_gradcheck_float64(op):
    g = torch.Generator().manual_seed(1)
    ha = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    hb = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(13, 5, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 13, (6,), generator=g)
    t[2] = -100
    kw = dict(temperature=0.7, backend="torch", chunk_tokens=4, chunk_vocab=5)
    if op == "token":
        assert torch.autograd.gradcheck(lambda a, ww: pk.token_stats(a, ww, t, **kw), (ha, w))
    else:
        assert torch.autograd.gradcheck(lambda a, b, ww: pk.two_view_stats(a, b, ww, t, **kw), (ha, hb, w))


def test_gradcheck_constant_view():
    """hidden_b not requiring grad: the true derivative w.r.t. hidden_a is unaffected."""
    g = torch.Generator().manual_seed(2)
    ha = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    hb = torch.randn(5, 4, dtype=torch.float64, generator=g)
    w = torch.randn(11, 4, dtype=torch.float64, generator=g)
    t = torch.randint(0, 11, (5,), generator=g)
    kw = dict(temperature=1.3, backend="torch", chunk_vocab=4)
    assert torch.autograd.gradcheck(lambda a: pk.two_view_stats(a, hb, w, t, **kw), (ha,))


def test_constant_view_weight_grad_is_view_a_only():
    """With hidden_b detached, dW equals autograd of the dense loss with view b's weight detached."""
    ha, hb, w, t, up = make_inputs(15, 11, 400, torch.float64, ignored=(2,))
    a1, w1 = ha.clone().requires_grad_(), w.clone().requires_grad_()
    s = pk.two_view_stats(a1, hb, w1, t, temperature=0.8, backend="torch", chunk_vocab=128)
    _loss(s._asdict(), up).backward()
    a2, w2 = ha.clone().requires_grad_(), w.clone().requires_grad_()
    za, zb = a2 @ w2.T / 0.8, hb @ w2.detach().T / 0.8
    la, lb = za.log_softmax(-1), zb.log_softmax(-1)
    valid = t != -100
    idx = torch.where(valid, t, 0)[:, None]
    d = dict(
        logp_a=la.gather(1, idx).squeeze(1), logp_b=lb.gather(1, idx).squeeze(1),
        entropy_a=-(la.exp() * la).sum(-1), entropy_b=-(lb.exp() * lb).sum(-1),
        kl_ab=(la.exp() * (la - lb)).sum(-1), kl_ba=(lb.exp() * (lb - la)).sum(-1),
    )
    d = {k: torch.where(valid, x, torch.zeros_like(x)) for k, x in d.items()}
    _loss(d, up).backward()
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-10, atol=1e-12)
