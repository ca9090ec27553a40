"""papo.papo_loss on per-token statistics: hand values, the official code re-derived, aggregation,
loss scaling, the exact estimator's gradient identity and bad input."""

import math

import numpy as np
import pytest
import torch

from papo import PAPOConfig, papo_loss

F64 = torch.float64


def t(values):
    return torch.tensor(values, dtype=F64)


# ---------------------------------------------------------------------- hand-computed values


def test_every_term_hand_computed():
    # one sequence, two tokens, on-policy (ratio 1), A = 1
    cfg = PAPOConfig(gamma=0.5, eta_full=0.1, eta_masked=0.2, beta=0.3, ref_kl_estimator="k1")
    logp = t([[-1.0, -2.0]]).requires_grad_(True)
    masked = t([[-1.5, -1.0]])
    ref = t([[-1.2, -2.5]])
    out = papo_loss(logp, logp.detach(), t([1.0]), torch.ones(1, 2), config=cfg, masked_logp=masked,
                    ref_logp=ref, num_micro_batches=1)
    k3 = [math.exp(-0.5) + 0.5 - 1.0, math.e - 2.0]  # d = masked - logp = (-0.5, 1)
    policy, kl_prcp, h_full, h_masked, kl_ref = -1.0, sum(k3) / 2, 1.5, 1.25, (0.2 + 0.5) / 2
    expected = policy - 0.5 * kl_prcp + 0.1 * h_full + 0.2 * h_masked + 0.3 * kl_ref
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    m = out.metrics
    assert m["loss/policy"].item() == pytest.approx(policy)
    assert m["kl/perception"].item() == pytest.approx(kl_prcp)
    assert m["entropy/full"].item() == pytest.approx(h_full)
    assert m["entropy/masked"].item() == pytest.approx(h_masked)
    assert m["kl/ref"].item() == pytest.approx(kl_ref)
    assert m["loss/total"].item() == pytest.approx(expected)
    assert m["tokens/count"].item() == 2
    assert "kl/perception_exact" not in m
    out.loss.backward()
    # per token: d/dlogp = -A r - gamma (1 - e^d) - eta_full + beta, weighted 1/2
    grads = [(-1.0 - 0.5 * (1.0 - math.exp(d)) - 0.1 + 0.3) / 2 for d in (-0.5, 1.0)]
    torch.testing.assert_close(logp.grad, t([grads]))


def test_coefficients_override_the_config():
    cfg = PAPOConfig(gamma=0.5, eta_full=0.1, eta_masked=0.2)
    logp = t([[-1.0, -2.0]])
    args = dict(config=cfg, masked_logp=t([[-1.5, -1.0]]), num_micro_batches=1)
    base = papo_loss(logp, logp, t([1.0]), torch.ones(1, 2), coefficients=(0.0, 0.0, 0.0), **args)
    assert base.loss.item() == pytest.approx(-1.0)
    half = papo_loss(logp, logp, t([1.0]), torch.ones(1, 2),
                     coefficients=cfg.coefficients(0, 1)._replace(eta_masked=0.0), **args)
    k3 = (math.exp(-0.5) + 0.5 - 1.0 + math.e - 2.0) / 2
    assert half.loss.item() == pytest.approx(-1.0 - 0.5 * k3 + 0.1 * 1.5)


# per-token loss -A (on-policy, no PAPO terms) on a ragged batch: [[1, 2, 3, pad], [4, pad x 3]]
RAGGED_ADV = [[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]]
RAGGED_MASK = [[1, 1, 1, 0], [1, 0, 0, 0]]


@pytest.mark.parametrize(
    "agg, divisor, scale, kwargs, expected",
    [
        ("token-mean", None, "microbatch", dict(num_micro_batches=1), -10 / 4),
        ("seq-mean-token-mean", None, "microbatch", dict(num_micro_batches=1), -(2 + 4) / 2),
        ("seq-mean-token-sum", None, "microbatch", dict(num_micro_batches=1), -(6 + 4) / 2),
        ("seq-sum-norm", 8, "microbatch", dict(num_micro_batches=1), -10 / (2 * 8)),
        ("token-mean", None, "microbatch", dict(num_micro_batches=2), -10 / 4 / 2),
        ("seq-mean-token-mean", None, "microbatch", dict(num_micro_batches=4), -(2 + 4) / 2 / 4),
        ("token-mean", None, "global", dict(num_valid_tokens=8), -10 / 8),
        ("token-mean", None, "global", dict(num_valid_tokens=torch.tensor(8)), -10 / 8),
        ("seq-mean-token-mean", None, "global", dict(num_valid_sequences=4), -(2 + 4) / 4),
        ("seq-mean-token-sum", None, "global", dict(num_valid_sequences=4), -10 / 4),
        ("seq-sum-norm", 8, "global", dict(num_valid_sequences=4), -10 / (4 * 8)),
    ],
)
def test_aggregation_and_scale_hand_values(agg, divisor, scale, kwargs, expected):
    cfg = PAPOConfig(gamma=0.0, eta_full=0.0, eta_masked=0.0, loss_agg=agg, loss_scale=scale,
                     seq_sum_norm_divisor=divisor)
    # a third, empty row (packing padding) must not count as a sequence
    adv = t(RAGGED_ADV + [[5.0] * 4])
    mask = torch.tensor(RAGGED_MASK + [[0] * 4])
    logp = torch.full((3, 4), -1.0, dtype=F64)
    out = papo_loss(logp, logp, adv, mask, config=cfg, **kwargs)
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("agg, divisor", [("token-mean", None), ("seq-mean-token-mean", None),
                                          ("seq-mean-token-sum", None), ("seq-sum-norm", 8)])
@pytest.mark.parametrize("scale, kwargs, tokens", [
    ("microbatch", dict(num_micro_batches=2), 4 * 2),
    ("global", dict(num_valid_tokens=8, num_valid_sequences=4), 8),
])
def test_entropy_terms_are_token_means_whatever_the_aggregation(agg, divisor, scale, kwargs, tokens):
    """Official dp_actor: entropy_loss = -masked_mean(log_probs) (and the masked view's) however the
    policy loss is averaged; with loss_agg != token-mean only the other terms follow loss_agg."""
    cfg = PAPOConfig(gamma=0.0, eta_full=0.1, eta_masked=0.2, loss_agg=agg, loss_scale=scale,
                     seq_sum_norm_divisor=divisor)
    mask = torch.tensor(RAGGED_MASK + [[0] * 4])  # 3 + 1 tokens and a padding row
    logp = t([[-1.0, -2.0, -3.0, 0.0], [-4.0, 0.0, 0.0, 0.0], [0.0] * 4]).requires_grad_(True)
    masked = t([[-0.5, -0.5, -0.5, 0.0], [-2.5, 0.0, 0.0, 0.0], [0.0] * 4])
    zero = torch.zeros(3, dtype=F64)  # A = 0: the policy term vanishes
    out = papo_loss(logp, logp.detach(), zero, mask, config=cfg, masked_logp=masked, **kwargs)
    assert out.loss.item() == pytest.approx((0.1 * 10 + 0.2 * 4) / tokens, rel=1e-12)
    out.loss.backward()
    torch.testing.assert_close(logp.grad, -0.1 * mask.to(F64) / tokens)  # every token weighs the same
    # the policy term still follows loss_agg (test_aggregation_and_scale_hand_values)
    with_policy = papo_loss(logp.detach(), logp.detach(), t(RAGGED_ADV + [[5.0] * 4]), mask, config=cfg,
                            masked_logp=masked, **kwargs)
    policy_only = papo_loss(logp.detach(), logp.detach(), t(RAGGED_ADV + [[5.0] * 4]), mask,
                            config=PAPOConfig(gamma=0.0, eta_full=0.0, eta_masked=0.0, loss_agg=agg,
                                              loss_scale=scale, seq_sum_norm_divisor=divisor), **kwargs)
    assert with_policy.loss.item() == pytest.approx(policy_only.loss.item() + out.loss.item(), rel=1e-12)


@pytest.mark.parametrize(
    "scale, agg, missing",
    [("microbatch", "token-mean", "num_micro_batches"),
     ("global", "token-mean", "num_valid_tokens"),
     ("global", "seq-mean-token-mean", "num_valid_sequences")],
)
def test_missing_scale_argument(scale, agg, missing):
    cfg = PAPOConfig(loss_scale=scale, loss_agg=agg, gamma=0.0, eta_masked=0.0)
    logp = torch.zeros(1, 2, dtype=F64)
    with pytest.raises(ValueError, match=missing):
        papo_loss(logp, logp, t([1.0]), torch.ones(1, 2), config=cfg)


# ---------------------------------------------------------------------- the official code, re-derived


def _official_masked_mean(values, mask, eps=1e-8):
    # verl.utils.torch_functional.masked_mean
    return (values * mask).sum() / (mask.sum() + eps)


def _official_micro_batch_loss(lp, old, lp_mask, lp_ref, adv, mask, c, grad_accum):
    """dp_actor.update_policy + core_algos, written from the text of docs/algorithm.md."""
    advantages = adv.unsqueeze(-1) * mask  # compute_grpo_outcome_advantage returns scores * mask
    negative_approx_kl = lp - old
    ratio = torch.exp(torch.clamp(negative_approx_kl, -20.0, 20.0))
    clipped_ratio = torch.exp(
        torch.clamp(negative_approx_kl, np.log(1 - c["clip_low"]), np.log(1 + c["clip_high"])))
    pg_loss1, pg_loss2, pg_loss3 = -advantages * ratio, -advantages * clipped_ratio, -advantages * c["dual"]
    higher = torch.max(pg_loss1, pg_loss2)
    lower = torch.min(higher, pg_loss3)
    final = torch.where(advantages < 0, lower, higher)
    pg_loss = _official_masked_mean(final, mask)
    entropy_loss = -_official_masked_mean(lp, mask)

    def low_var_kl(log_probs, ref_log_probs):
        kl = (ref_log_probs - log_probs).clamp(-20.0, 20.0)
        return torch.clamp(kl.exp() - kl - 1, min=-10.0, max=10.0)

    pg_loss = pg_loss + _official_masked_mean(low_var_kl(lp, lp_ref), mask) * c["beta"]
    aug_entropy_loss = -_official_masked_mean(lp_mask, mask)
    kl_prcp_loss = _official_masked_mean(low_var_kl(lp, lp_mask), mask)
    pg_loss = pg_loss - kl_prcp_loss * c["gamma"]
    pg_loss = pg_loss + c["eta_masked"] * aug_entropy_loss
    pg_loss = pg_loss + c["eta_full"] * entropy_loss
    clipfrac_higher = _official_masked_mean((pg_loss1 < pg_loss2).to(lp.dtype), mask)
    clipfrac_lower = _official_masked_mean(
        (higher > pg_loss3).to(lp.dtype) * (advantages < 0).to(lp.dtype), mask)
    return pg_loss / grad_accum, kl_prcp_loss, clipfrac_higher, clipfrac_lower


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sampled_matches_the_official_code(dtype):
    g = torch.Generator().manual_seed(0)
    B, T = 4, 7
    lp = -torch.rand(B, T, generator=g, dtype=F64) * 3
    old = lp + 0.4 * torch.randn(B, T, generator=g, dtype=F64)  # off-policy: every clip branch
    old[0, 1] = lp[0, 1] - 30.0  # a ratio beyond the +-20 clamp
    old[2, 0] = lp[2, 0] - 2.0  # ratio e^2 > 3 with A < 0: the dual clip
    lp_mask = lp + torch.randn(B, T, generator=g, dtype=F64)
    lp_mask[1, 2] = lp[1, 2] + 25.0  # a k3 beyond its clamps
    lp_ref = lp + 0.1 * torch.randn(B, T, generator=g, dtype=F64)
    adv = t([1.3, -0.7, -2.0, 0.4])
    mask = (torch.arange(T) < torch.tensor([[7], [5], [3], [6]])).to(F64)
    c = dict(clip_low=0.2, clip_high=0.3, dual=3.0, gamma=0.02, beta=0.01, eta_full=0.03, eta_masked=0.03)
    cfg = PAPOConfig(gamma=c["gamma"], beta=c["beta"], eta_full=c["eta_full"], eta_masked=c["eta_masked"])

    lp_ours = lp.to(dtype).requires_grad_(True)
    out = papo_loss(lp_ours, old.to(dtype), adv.to(dtype), mask, config=cfg, masked_logp=lp_mask.to(dtype),
                    ref_logp=lp_ref.to(dtype), num_micro_batches=3)
    out.loss.backward()

    lp_off = lp.to(dtype).requires_grad_(True)
    ref_loss, ref_kl, ref_clip_hi, ref_clip_lo = _official_micro_batch_loss(
        lp_off, old.to(dtype), lp_mask.to(dtype), lp_ref.to(dtype), adv.to(dtype), mask.to(dtype), c, 3)
    ref_loss.backward()

    # the official mean divides by (count + 1e-8): relative 1e-9 at these counts
    rtol = 1e-8 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(out.loss.detach(), ref_loss.detach(), rtol=rtol, atol=1e-9)
    torch.testing.assert_close(lp_ours.grad, lp_off.grad, rtol=rtol, atol=1e-9)
    m = out.metrics
    torch.testing.assert_close(m["kl/perception"], ref_kl.detach(), rtol=rtol, atol=1e-9)
    torch.testing.assert_close(m["clip/frac_low"] + m["clip/frac_high"], ref_clip_hi, rtol=rtol, atol=1e-9)
    torch.testing.assert_close(m["clip/frac_dual"], ref_clip_lo, rtol=rtol, atol=1e-9)
    # the data exercise every branch, so the comparison above covers them
    assert m["clip/frac_low"] > 0 and m["clip/frac_high"] > 0 and m["clip/frac_dual"] > 0


# ---------------------------------------------------------------------- exact estimator


def test_exact_term_gradient_is_the_expected_sampled_k3_gradient():
    # E_{y ~ pi_theta}[grad k3(logp_theta(y), logp_masked(y))] = grad KL(pi_masked || pi_theta),
    # summed exhaustively over a tiny categorical
    g = torch.Generator().manual_seed(1)
    V = 6
    z = torch.randn(V, generator=g, dtype=F64).requires_grad_(True)
    logp_masked = torch.log_softmax(torch.randn(V, generator=g, dtype=F64), -1)
    cfg_s = PAPOConfig(gamma=1.0, eta_full=0.0, eta_masked=0.0)
    one = torch.ones(1, 1)
    expected = torch.zeros(V, dtype=F64)
    for y in range(V):
        logp = torch.log_softmax(z, -1)
        out = papo_loss(logp[y].view(1, 1), None, t([0.0]), one, config=cfg_s,
                        masked_logp=logp_masked[y].view(1, 1), num_micro_batches=1)
        (grad,) = torch.autograd.grad(out.loss, z)
        expected += logp[y].exp().detach() * grad

    def exact_grad(direction):
        cfg = PAPOConfig(estimator="exact", masked_view="current_no_grad", kl_prcp_direction=direction,
                         gamma=1.0, eta_full=0.0, eta_masked=0.0)
        logp = torch.log_softmax(z, -1)
        if direction == "masked_to_full":
            kl = (logp_masked.exp() * (logp_masked - logp)).sum()
        else:
            kl = (logp.exp() * (logp - logp_masked)).sum()
        out = papo_loss(logp[0].view(1, 1), None, t([0.0]), one, config=cfg, kl_prcp=kl.view(1, 1),
                        num_micro_batches=1)
        return torch.autograd.grad(out.loss, z)[0]

    torch.testing.assert_close(exact_grad("masked_to_full"), expected, rtol=1e-10, atol=1e-12)
    # the paper's literal direction has a different gradient (so the check above can fail)
    assert (exact_grad("full_to_masked") - expected).abs().max() > 1e-3


def test_exact_uses_full_vocabulary_terms():
    cfg = PAPOConfig(estimator="exact", masked_view="current_no_grad", gamma=0.5, eta_full=0.1,
                     eta_masked=0.2)
    logp = t([[-1.0, -2.0]])
    out = papo_loss(logp, logp, t([1.0]), torch.ones(1, 2), config=cfg, kl_prcp=t([[0.3, 0.1]]),
                    entropy=t([[2.0, 1.0]]), masked_entropy=t([[3.0, 2.0]]), num_micro_batches=1)
    assert out.loss.item() == pytest.approx(-1.0 - 0.5 * 0.2 + 0.1 * 1.5 + 0.2 * 2.5)
    assert out.metrics["kl/perception_exact"].item() == pytest.approx(0.2)


# ---------------------------------------------------------------------- global scale accumulates


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-sum-norm"])
def test_global_micro_batches_accumulate_to_the_full_batch(agg):
    g = torch.Generator().manual_seed(2)
    B, T = 6, 5
    lengths = torch.tensor([5, 1, 3, 4, 2, 5])
    mask = torch.arange(T) < lengths.unsqueeze(-1)
    lp = (-torch.rand(B, T, generator=g, dtype=F64) * 2).requires_grad_(True)
    old = lp.detach() + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    masked = lp.detach() + torch.randn(B, T, generator=g, dtype=F64)
    adv = torch.randn(B, generator=g, dtype=F64)
    cfg = PAPOConfig(loss_agg=agg, loss_scale="global", seq_sum_norm_divisor=8)
    counts = dict(num_valid_tokens=int(lengths.sum()), num_valid_sequences=B)
    full = papo_loss(lp, old, adv, mask, config=cfg, masked_logp=masked, **counts)
    (full_grad,) = torch.autograd.grad(full.loss, lp)
    acc_loss, acc_grad = 0.0, torch.zeros_like(lp)
    for rows in (slice(0, 2), slice(2, 3), slice(3, 6)):
        part = papo_loss(lp[rows], old[rows], adv[rows], mask[rows], config=cfg, masked_logp=masked[rows],
                         **counts)
        acc_loss += part.loss.item()
        acc_grad += torch.autograd.grad(part.loss, lp)[0]
    assert acc_loss == pytest.approx(full.loss.item(), rel=1e-12)
    torch.testing.assert_close(acc_grad, full_grad, rtol=1e-12, atol=1e-15)


def test_microbatch_scale_is_the_official_per_micro_batch_mean():
    # unequal token counts: the official token-mean per micro-batch / num_micro_batches is not
    # the full-batch token mean
    cfg = PAPOConfig(gamma=0.0, eta_full=0.0, eta_masked=0.0)
    logp = torch.zeros(2, 3, dtype=F64)
    adv = t([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    a = papo_loss(logp[:1], logp[:1], adv[:1], mask[:1], config=cfg, num_micro_batches=2).loss.item()
    b = papo_loss(logp[1:], logp[1:], adv[1:], mask[1:], config=cfg, num_micro_batches=2).loss.item()
    assert a + b == pytest.approx(-(2.0 + 4.0) / 2)


# ---------------------------------------------------------------------- masked / empty input


def test_padding_never_reaches_the_loss():
    cfg = PAPOConfig()
    logp = t([[-1.0, float("nan")], [-0.5, float("-inf")]]).requires_grad_(True)
    masked = t([[-2.0, float("nan")], [-1.0, float("inf")]])
    mask = torch.tensor([[True, False], [True, False]])
    out = papo_loss(logp, logp.detach(), t([1.0, -1.0]), mask, config=cfg, masked_logp=masked,
                    num_micro_batches=1)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert logp.grad[:, 1].eq(0).all() and torch.isfinite(logp.grad).all()
    assert all(torch.isfinite(v) for v in out.metrics.values())


@pytest.mark.parametrize("scale", ["microbatch", "global"])
def test_all_masked_gives_zero_loss_and_zero_gradient(scale):
    cfg = PAPOConfig(loss_scale=scale)
    logp = torch.full((2, 3), float("nan"), dtype=F64).requires_grad_(True)
    out = papo_loss(logp, logp.detach(), t([1.0, -1.0]), torch.zeros(2, 3), config=cfg,
                    masked_logp=torch.zeros(2, 3, dtype=F64), num_micro_batches=2, num_valid_tokens=0)
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert logp.grad.eq(0).all()
    assert all(v.item() == 0 for v in out.metrics.values())


# ---------------------------------------------------------------------- bad input


def _args(**overrides):
    z = torch.zeros(2, 3, dtype=F64)
    args = dict(logp=z, old_logp=z, advantages=t([1.0, 2.0]), mask=torch.ones(2, 3),
                config=PAPOConfig(), masked_logp=z, num_micro_batches=1)
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides, exc, match",
    [
        (dict(old_logp=torch.zeros(2, 4, dtype=F64)), ValueError, "old_logp"),
        (dict(masked_logp=torch.zeros(3, 3, dtype=F64)), ValueError, "masked_logp"),
        (dict(advantages=torch.zeros(3, dtype=F64)), ValueError, "advantages"),
        (dict(advantages=torch.zeros(2, 3, 1, dtype=F64)), ValueError, "advantages"),
        (dict(mask=torch.ones(2, 4)), ValueError, "mask"),
        (dict(mask=torch.full((2, 3), 2.0)), ValueError, "mask"),
        (dict(mask=[[1, 1, 1], [1, 1, 1]]), TypeError, "mask"),
        (dict(logp=torch.zeros(6, dtype=F64)), ValueError, "logp"),
        (dict(masked_logp=None), ValueError, "masked_logp"),
        (dict(config=PAPOConfig(beta=0.1)), ValueError, "ref_logp"),
        (dict(config=PAPOConfig(estimator="exact", masked_view="live")), ValueError, "kl_prcp"),
        (dict(config={"gamma": 0.01}), TypeError, "config"),
        (dict(coefficients=(0.1, -1.0, 0.0)), ValueError, "eta_full"),
        (dict(coefficients="fixed"), TypeError, "coefficients"),
        (dict(num_micro_batches=0), ValueError, "num_micro_batches"),
        (dict(config=PAPOConfig(gamma=0.0, eta_masked=0.0), masked_logp=None, coefficients=(0.1, 0.0, 0.0)),
         ValueError, "gamma"),
    ],
)
def test_bad_input(overrides, exc, match):
    args = _args(**overrides)
    with pytest.raises(exc, match=match):
        papo_loss(args.pop("logp"), args.pop("old_logp"), args.pop("advantages"), args.pop("mask"), **args)


def test_grpo_preset_needs_no_masked_inputs():
    cfg = PAPOConfig.from_preset("grpo", beta=0.0)
    logp = torch.zeros(1, 2, dtype=F64)
    out = papo_loss(logp, logp, t([2.0]), torch.ones(1, 2), config=cfg, num_micro_batches=1)
    assert out.loss.item() == pytest.approx(-2.0 + 0.0)


def test_half_precision_statistics_are_upcast():
    cfg = PAPOConfig()
    logp32 = t([[-1.0, -2.0, -0.5]]).float()
    masked = logp32 - 0.25
    ref = papo_loss(logp32, logp32 + 0.1, t([1.0]).float(), torch.ones(1, 3), config=cfg, masked_logp=masked,
                    num_micro_batches=1).loss
    logp16 = logp32.bfloat16().requires_grad_(True)  # these values are exact in bfloat16
    out = papo_loss(logp16, logp32 + 0.1, t([1.0]), torch.ones(1, 3), config=cfg,
                    masked_logp=masked.bfloat16(), num_micro_batches=1)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref)
    out.loss.backward()
    assert logp16.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("masked_view, leaks", [("rollout_no_grad", False), ("current_no_grad", False),
                                                ("live", True)])
def test_masked_statistics_carry_gradient_only_when_live(masked_view, leaks):
    """A masked_logp that happens to require grad gets none unless masked_view='live'."""
    est = "sampled" if masked_view == "rollout_no_grad" else "exact"
    cfg = PAPOConfig(estimator=est, masked_view=masked_view, eta_full=0.0)
    logp = torch.full((1, 3), -1.0, dtype=F64, requires_grad=True)
    masked_logp = torch.full((1, 3), -2.0, dtype=F64, requires_grad=True)
    masked_entropy = torch.full((1, 3), 1.5, dtype=F64, requires_grad=True)
    extra = {} if est == "sampled" else dict(kl_prcp=torch.full((1, 3), 0.1, dtype=F64),
                                            masked_entropy=masked_entropy)
    out = papo_loss(logp, logp.detach(), t([1.0]), torch.ones(1, 3), config=cfg, masked_logp=masked_logp,
                    num_micro_batches=1, **extra)
    out.loss.backward()
    grads = [g for g in (masked_logp.grad, masked_entropy.grad) if g is not None]
    assert bool(grads and any(g.abs().sum() > 0 for g in grads)) == leaks
