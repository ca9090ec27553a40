"""fp32 accuracy of the exact KL and entropy at every magnitude (docs/design.md "Numerical rules"),
including the real Qwen2.5-VL-7B vocabulary size."""

from __future__ import annotations

import pytest
import torch

import papo_kernels as pk

QWEN_7B_VOCAB = 152_064


def dense64(ha, hb, w):
    la = (ha.double() @ w.double().T).log_softmax(-1)
    lb = (hb.double() @ w.double().T).log_softmax(-1)
    pa, pb = la.exp(), lb.exp()
    return (
        -(pa * la).sum(-1),
        -(pb * lb).sum(-1),
        (pa * (la - lb)).sum(-1),
        (pb * (lb - la)).sum(-1),
    )


def _views(n, h, v, noise, logit_scale, seed):
    g = torch.Generator().manual_seed(seed)
    ha = torch.randn(n, h, generator=g)
    hb = ha + noise * torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) * (logit_scale / h**0.5)
    t = torch.randint(0, v, (n,), generator=g)
    return ha, hb, w, t


# (name, noise of view b, logit scale): KLs from ~1e-6 (nearly identical views) to ~20.
REGIMES = [
    ("identical-ish", 1e-3, 1.0),
    ("small", 3e-2, 2.0),
    ("medium", 0.5, 3.0),
    ("large", 2.0, 3.0),
]


@pytest.mark.parametrize("name,noise,scale", REGIMES, ids=[r[0] for r in REGIMES])
def test_kl_and_entropy_error_bounds_fp32(name, noise, scale):
    ha, hb, w, t = _views(64, 48, 4099, noise, scale, seed=3)
    s = pk.two_view_stats(ha, hb, w, t, backend="torch", chunk_tokens=32, chunk_vocab=1000)
    ent_a, ent_b, kl_ab, kl_ba = dense64(ha, hb, w)
    for got, want in ((s.kl_ab, kl_ab), (s.kl_ba, kl_ba)):
        err = (got.double() - want).abs()
        assert torch.all(err <= 5e-6 + 1e-6 * want.abs()), f"{name}: max KL err {err.max():.3g}"
        big = want >= 1e-2
        if big.any():
            rel = err[big] / want[big]
            assert rel.max() <= 1e-3, f"{name}: max relative KL err {rel.max():.3g}"
    for got, want in ((s.entropy_a, ent_a), (s.entropy_b, ent_b)):
        assert (got.double() - want).abs().max() <= 5e-6



def test_regimes_span_the_claimed_magnitudes():
    """The regimes above really cover KL ~ 1e-6 up to KL ~ 20."""
    lo = dense64(*_views(64, 48, 4099, 1e-3, 1.0, seed=3)[:3])[2]
    hi = dense64(*_views(64, 48, 4099, 2.0, 3.0, seed=3)[:3])[2]
    assert lo.median() < 1e-5
    assert hi.max() > 15


def test_recurrence_error_beyond_kl_20():
    """At KL ~ 50 the fp32 GEMM's own logit rounding (~1e-5 at |z| ~ 30) dominates the error
    against float64. Against a dense float64 evaluation of the *same* fp32 logits, the online
    recurrence itself stays within 5e-6 + 1e-6 * KL."""
    ha, hb, w, t = _views(64, 48, 4099, 3.0, 4.0, seed=3)
    s = pk.two_view_stats(ha, hb, w, t, backend="torch", chunk_tokens=32, chunk_vocab=1000)
    la, lb = (ha @ w.T).double().log_softmax(-1), (hb @ w.T).double().log_softmax(-1)
    kl_ab = (la.exp() * (la - lb)).sum(-1)
    kl_ba = (lb.exp() * (lb - la)).sum(-1)
    assert kl_ab.max() > 40
    for got, want in ((s.kl_ab, kl_ab), (s.kl_ba, kl_ba)):
        assert torch.all((got.double() - want).abs() <= 5e-6 + 1e-6 * want)


def test_kl_exactly_zero_for_identical_views():
    ha, _, w, t = _views(33, 40, 2053, 0.0, 4.0, seed=4)
    s = pk.two_view_stats(ha, ha, w, t, backend="torch", chunk_vocab=512)
    assert torch.all(s.kl_ab == 0) and torch.all(s.kl_ba == 0)
    torch.testing.assert_close(s.logp_a, s.logp_b, rtol=0, atol=0)


def test_qwen_vocab_size():
    """V = 152,064 (not a multiple of any block): values and the KL bound at full scale."""
    ha, hb, w, t = _views(8, 64, QWEN_7B_VOCAB, 0.3, 3.0, seed=5)
    t[-1] = QWEN_7B_VOCAB - 1  # the last vocabulary row, in the tail tile
    s = pk.two_view_stats(ha, hb, w, t, backend="torch")
    ent_a, _, kl_ab, kl_ba = dense64(ha, hb, w)
    la = (ha.double() @ w.double().T).log_softmax(-1)
    logp = la.gather(1, t[:, None]).squeeze(1)
    assert (s.logp_a.double() - logp).abs().max() <= 5e-5 + 1e-6 * logp.abs().max()
    assert (s.entropy_a.double() - ent_a).abs().max() <= 5e-6
    for got, want in ((s.kl_ab, kl_ab), (s.kl_ba, kl_ba)):
        assert torch.all((got.double() - want).abs() <= 5e-6 + 1e-6 * want)
