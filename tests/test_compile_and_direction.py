"""torch.compile through the custom ops, and the KL direction facts of docs/algorithm.md checked by
exhaustive expectation on a tiny categorical distribution."""

from __future__ import annotations

import torch

import papo_kernels as pk


def test_compiled_two_view_stats_matches_eager():
    g = torch.Generator().manual_seed(7)
    a = torch.randn(9, 8, generator=g)
    b = torch.randn(9, 8, generator=g)
    w = torch.randn(53, 8, generator=g)
    t = torch.randint(0, 53, (9,), generator=g)
    t[4] = -100

    def objective(ha, hb, ww, tt):
        s = pk.two_view_stats(ha, hb, ww, tt, temperature=0.8, backend="torch", chunk_vocab=16)
        return (0.3 * s.kl_ab - s.kl_ba + s.entropy_a - 0.5 * s.entropy_b + s.logp_a * s.logp_b).sum()

    compiled = torch.compile(objective, backend="inductor", fullgraph=True)
    results = []
    for fn in (objective, compiled):
        ha, hb, ww = (x.clone().requires_grad_() for x in (a, b, w))
        out = fn(ha, hb, ww, t)
        out.backward()
        results.append((out.detach(), ha.grad, hb.grad, ww.grad))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)


def test_expected_k3_gradient_is_reverse_kl_gradient():
    """E_{y ~ pi_theta}[grad k3(y)] with k3 = exp(d) - d - 1, d = logp_masked(y) - logp_theta(y)
    and the masked view constant, equals grad KL(pi_masked || pi_theta) = grad kl_ba."""
    g = torch.Generator().manual_seed(11)
    vocab, hid = 6, 4
    w0 = torch.randn(vocab, hid, generator=g, dtype=torch.float64)
    h_theta0 = torch.randn(1, hid, generator=g, dtype=torch.float64)
    h_masked = torch.randn(1, hid, generator=g, dtype=torch.float64)

    # Exact term: kl_ba of two_view_stats (view a = policy, view b = masked, detached).
    h1, w1 = h_theta0.clone().requires_grad_(), w0.clone().requires_grad_()
    s = pk.two_view_stats(h1, h_masked, w1, torch.zeros(1, dtype=torch.long), backend="torch")
    s.kl_ba.sum().backward()

    # Sampled k3 in exact expectation over every token y (the sampling distribution is held fixed).
    h2, w2 = h_theta0.clone().requires_grad_(), w0.clone().requires_grad_()
    ys = torch.arange(vocab)
    lp = pk.token_stats(h2.expand(vocab, hid), w2, ys, backend="torch").logp
    lp_masked = pk.token_stats(h_masked.expand(vocab, hid), w0, ys, backend="torch").logp
    d = lp_masked - lp
    k3 = torch.exp(d) - d - 1
    (lp.detach().exp() * k3).sum().backward()

    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-10, atol=1e-12)
    # ... and it is not the gradient of the KL the k3 value estimates (the forward direction).
    h3 = h_theta0.clone().requires_grad_()
    pk.two_view_stats(h3, h_masked, w0, torch.zeros(1, dtype=torch.long), backend="torch").kl_ab.sum().backward()
    assert not torch.allclose(h3.grad, h1.grad, rtol=1e-3)


def test_sampled_entropy_has_zero_expected_gradient_on_policy():
    """E_{y ~ pi}[grad(-log pi(y))] = 0: the official "entropy" term does nothing on-policy."""
    g = torch.Generator().manual_seed(12)
    w = torch.randn(7, 3, generator=g, dtype=torch.float64)
    h = torch.randn(1, 3, generator=g, dtype=torch.float64, requires_grad=True)
    lp = pk.token_stats(h.expand(7, 3), w, torch.arange(7), backend="torch").logp
    (lp.detach().exp() * -lp).sum().backward()
    torch.testing.assert_close(h.grad, torch.zeros_like(h.grad), rtol=0, atol=1e-12)
