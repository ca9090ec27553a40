"""The gradient-in-forward calls equal autograd through the statistics calls for a PAPO-like
loss, at several chunk sizes; metrics sum over chunks; no gradient sweep without grads."""

from __future__ import annotations

import pytest
import torch

import papo_kernels as pk
from papo_kernels import reference


def _inputs(n=41, h=19, v=733, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ha = torch.randn(n, h, generator=g)
    hb = ha + 0.4 * torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) * 0.5
    t = torch.randint(0, v, (n,), generator=g)
    t[[i for i in (4, 17) if i < n]] = -100
    old_logp = -torch.rand(n, generator=g) * 5
    adv = torch.randn(n, generator=g)
    return ha.to(dtype), hb.to(dtype), w.to(dtype), t, old_logp, adv


def papo_like(stats, old_logp, adv, valid, denom):
    """Per-token sum with weights: clipped ratio, both KLs, both entropies (all terms active)."""
    ratio = torch.exp(stats.logp_a - old_logp)
    clipped = ratio.clamp(0.8, 1.3)
    pg = torch.maximum(-adv * ratio, -adv * clipped)
    per_tok = pg - 0.02 * stats.kl_ba + 0.01 * stats.kl_ab + 0.03 * stats.entropy_a + 0.03 * stats.entropy_b
    per_tok = per_tok + 0.1 * stats.logp_b
    w = valid.to(per_tok.dtype) / denom
    metrics = {"kl/ba": (stats.kl_ba.detach() * valid).sum(), "tokens": valid.sum()}
    return (per_tok * w).sum(), metrics


@pytest.mark.parametrize("chunk_tokens", [1, 7, 64, None])
@pytest.mark.parametrize("b_requires_grad", [True, False])
def test_fused_two_view_equals_autograd(chunk_tokens, b_requires_grad):
    ha, hb, w, t, old, adv = _inputs()
    valid = t != -100
    denom = valid.sum()

    def leaves():
        return (ha.clone().requires_grad_(), hb.clone().requires_grad_(b_requires_grad),
                w.clone().requires_grad_())

    a1, b1, w1 = leaves()
    s = pk.two_view_stats(a1, b1, w1, t, temperature=0.9, backend="torch", chunk_vocab=128)
    ref_loss, ref_metrics = papo_like(s, old, adv, valid, denom)
    ref_loss.backward()

    a2, b2, w2 = leaves()

    def loss_fn(stats, index):
        return papo_like(stats, old[index], adv[index], valid[index], denom)

    loss, metrics = pk.fused_two_view_loss(a2, b2, w2, t, loss_fn, temperature=0.9, backend="torch",
                                           chunk_tokens=chunk_tokens, chunk_vocab=128)
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert set(metrics) == set(ref_metrics)
    for k in metrics:
        torch.testing.assert_close(metrics[k].to(ref_metrics[k].dtype), ref_metrics[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a2.grad, a1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-4, atol=1e-6)
    if b_requires_grad:
        torch.testing.assert_close(b2.grad, b1.grad, rtol=1e-4, atol=1e-6)
    else:
        assert b2.grad is None


@pytest.mark.parametrize("chunk_tokens", [3, None])
def test_fused_token_equals_autograd(chunk_tokens):
    ha, _, w, t, old, adv = _inputs(dtype=torch.float64)
    valid = t != -100
    a1, w1 = ha.clone().requires_grad_(), w.clone().requires_grad_()
    s = pk.token_stats(a1, w1, t, temperature=0.7, backend="torch")

    def per_token(stats, o, a, v):
        ratio = torch.exp(stats.logp - o)
        return ((-a * ratio + 0.03 * stats.entropy) * v).sum()

    ref = per_token(s, old, adv, valid)
    ref.backward()
    a2, w2 = ha.clone().requires_grad_(), w.clone().requires_grad_()
    loss, metrics = pk.fused_token_loss(
        a2, w2, t, lambda st, i: (per_token(st, old[i], adv[i], valid[i]), {"n": valid[i].sum()}),
        temperature=0.7, backend="torch", chunk_tokens=chunk_tokens,
    )
    (2.5 * loss).backward()  # the upstream gradient scales the stored gradients
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    assert int(metrics["n"]) == int(valid.sum())
    torch.testing.assert_close(a2.grad, 2.5 * a1.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w2.grad, 2.5 * w1.grad, rtol=1e-10, atol=1e-12)
    assert a2.grad.dtype == torch.float64 and w2.grad.dtype == torch.float64


def test_no_gradient_sweep_without_grads(monkeypatch):
    ha, hb, w, t, old, adv = _inputs()
    calls = []
    real = reference.backward_grads
    monkeypatch.setattr(reference, "backward_grads", lambda *a, **k: calls.append(1) or real(*a, **k))

    def loss_fn(stats, index):
        return stats.kl_ab.sum(), {}

    loss, _ = pk.fused_two_view_loss(ha, hb, w, t, loss_fn, backend="torch", chunk_tokens=8)
    assert not calls and not loss.requires_grad
    with torch.no_grad():
        pk.fused_two_view_loss(ha.requires_grad_(), hb, w, t, loss_fn, backend="torch", chunk_tokens=8)
    assert not calls
    loss, _ = pk.fused_two_view_loss(ha, hb, w, t, loss_fn, backend="torch", chunk_tokens=8)
    assert calls and loss.requires_grad


def test_fused_empty_input_gives_zero_loss_and_grads():
    w = torch.randn(50, 8, requires_grad=True)
    h = torch.zeros(0, 8, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long)
    loss, metrics = pk.fused_two_view_loss(
        h, h.detach(), w, t, lambda s, i: (s.logp_a.sum(), {"n": torch.tensor(float(i.numel()))}),
        backend="torch",
    )
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(metrics["n"]) == 0.0
    assert h.grad.shape == (0, 8) and torch.all(w.grad == 0)


def test_loss_fn_errors():
    ha, hb, w, t, *_ = _inputs(n=6)
    with pytest.raises(ValueError, match="scalar loss"):
        pk.fused_token_loss(ha, w, t, lambda s, i: (s.logp, {}), backend="torch")
    with pytest.raises(ValueError, match="loss_fn must return"):
        pk.fused_token_loss(ha, w, t, lambda s, i: s.logp.sum(), backend="torch")
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        pk.fused_two_view_loss(ha, hb, w, t, "not callable", backend="torch")


def test_fused_bf16_gradients_unbiased_for_non_unit_upstream():
    """loss / 3: the stored gradients are scaled in fp32 and rounded once, so bf16 dW carries no
    systematic bias from rounding 1/3 to bf16 (which would be +0.18%)."""
    g = torch.Generator().manual_seed(5)
    h = torch.randn(64, 32, generator=g)
    w = torch.randn(500, 32, generator=g) * 0.3
    t = torch.randint(0, 500, (64,), generator=g)

    def loss_fn(stats, index):
        return (stats.entropy - stats.logp).sum(), {}

    hb, wb = h.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    loss, _ = pk.fused_token_loss(hb, wb, t, loss_fn, backend="torch")
    (loss / 3).backward()
    h64, w64 = hb.detach().double().requires_grad_(), wb.detach().double().requires_grad_()
    loss64, _ = pk.fused_token_loss(h64, w64, t, loss_fn, backend="torch")
    (loss64 / 3).backward()
    ratio = (wb.grad.double() * w64.grad).sum() / (w64.grad * w64.grad).sum()
    assert abs(float(ratio) - 1) < 5e-4, float(ratio)
    ratio_h = (hb.grad.double() * h64.grad).sum() / (h64.grad * h64.grad).sum()
    assert abs(float(ratio_h) - 1) < 5e-4, float(ratio_h)


def test_stats_backward_skips_unused_terms(monkeypatch):
    """Outputs that do not reach the loss arrive at the backend as None, not as zero tensors."""
    seen = []
    real = reference.backward_grads

    def spy(*args, **kwargs):
        seen.append(args[5])
        return real(*args, **kwargs)

    monkeypatch.setattr(reference, "backward_grads", spy)
    ha, hb, w, t, *_ = _inputs(n=9)
    ha.requires_grad_()
    pk.two_view_stats(ha, hb, w, t, backend="torch").kl_ba.sum().backward()
    (grads,) = seen
    assert grads.kl_ba is not None
    assert all(g is None for name, g in grads._asdict().items() if name != "kl_ba")


def test_fused_loss_refuses_a_second_backward():
    """Gradients are scaled in place on backward: a second backward must fail loudly, not double."""
    ha, _, w, t, *_ = _inputs(n=8)
    ha.requires_grad_()
    loss, _ = pk.fused_token_loss(ha, w, t, lambda s, i: (s.logp.sum(), {}), backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="single backward"):
        loss.backward()
