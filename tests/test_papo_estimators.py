"""papo.estimators: k1/k2/k3 and the clipped objective against hand-computed values."""

import math

import pytest
import torch

from papo.estimators import clipped_policy_loss, kl_estimate, kl_k1, kl_k2, kl_k3

F64 = torch.float64


def t(*values):
    return torch.tensor(values, dtype=F64)


def test_kl_estimators_hand_values():
    logp, ref = t(-1.0, -2.0, -0.5), t(-1.5, -1.0, -0.5)
    torch.testing.assert_close(kl_k1(logp, ref), t(0.5, -1.0, 0.0))
    torch.testing.assert_close(kl_k2(logp, ref), t(0.125, 0.5, 0.0))
    # d = ref - logp = (-0.5, 1, 0): exp(d) - d - 1
    expected = t(math.exp(-0.5) + 0.5 - 1.0, math.e - 2.0, 0.0)
    torch.testing.assert_close(kl_k3(logp, ref), expected)
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), expected)
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), t(0.5, -1.0, 0.0))


def test_k3_official_clamps_and_gradients():
    # d = -30 -> clamped to -20 -> e^-20 + 19 -> clamped to 10; d = 25 -> 20 -> e^20 - 21 -> 10;
    # d = 2 is inside both clamps: value e^2 - 3, gradient d/dlogp = 1 - e^2
    logp = t(0.0, -25.0, -3.0).requires_grad_(True)
    ref = t(-30.0, 0.0, -1.0)
    k3 = kl_k3(logp, ref)
    torch.testing.assert_close(k3.detach(), t(10.0, 10.0, math.exp(2.0) - 3.0))
    k3.sum().backward()
    torch.testing.assert_close(logp.grad, t(0.0, 0.0, 1.0 - math.exp(2.0)))


# (ratio, advantage) -> (loss, low, high, dual) with clip 0.2 / 0.3 and dual clip 3
CASES = [
    (1.1, 2.0, -2.2, False, False, False),  # inside the trust region
    (1.5, 2.0, -2.6, False, True, False),  # A > 0, clipped at 1.3
    (0.5, 2.0, -1.0, False, False, False),  # A > 0, below 0.8: min keeps the unclipped
    (0.5, -2.0, 1.6, True, False, False),  # A < 0, clipped at 0.8
    (1.5, -2.0, 3.0, False, False, False),  # A < 0, above 1.3: max keeps the unclipped
    (4.0, -2.0, 6.0, False, False, True),  # A < 0, dual clip: min(8, 3 * 2)
    (math.exp(25.0), -1.0, 3.0, False, False, True),  # ratio clamped at e^20, then dual clip
    (2.0, 0.0, 0.0, False, False, False),  # zero advantage
]


def test_clipped_policy_loss_every_branch():
    ratio = t(*[c[0] for c in CASES])
    adv = t(*[c[1] for c in CASES])
    logp = ratio.log().requires_grad_(True)
    old = torch.zeros_like(ratio)
    loss, info = clipped_policy_loss(logp, old, adv, clip_low=0.2, clip_high=0.3, dual_clip=3.0)
    torch.testing.assert_close(loss.detach(), t(*[c[2] for c in CASES]))
    assert info.clipped_low.tolist() == [c[3] for c in CASES]
    assert info.clipped_high.tolist() == [c[4] for c in CASES]
    assert info.clipped_dual.tolist() == [c[5] for c in CASES]
    torch.testing.assert_close(info.ratio[:6], ratio[:6])
    assert info.ratio[6].item() == pytest.approx(math.exp(20.0))
    loss.sum().backward()
    # unclipped branches: d(-A r)/dlogp = -A r; clipped and dual branches carry no gradient
    expected_grad = t(-2.2, 0.0, -1.0, 0.0, 3.0, 0.0, 0.0, 0.0)
    torch.testing.assert_close(logp.grad, expected_grad)


def test_dual_clip_disabled():
    logp, old, adv = t(math.log(4.0)), t(0.0), t(-2.0)
    loss, info = clipped_policy_loss(logp, old, adv, clip_low=0.2, clip_high=0.3, dual_clip=None)
    assert loss.item() == pytest.approx(8.0)
    assert not info.clipped_dual.any()


def test_advantages_broadcast_per_sequence():
    logp = torch.zeros(2, 3, dtype=F64)
    adv = t(1.0, -1.0).unsqueeze(-1)
    loss, _ = clipped_policy_loss(logp, logp, adv, clip_low=0.2, clip_high=0.3, dual_clip=3.0)
    torch.testing.assert_close(loss, t(-1.0, 1.0).unsqueeze(-1).expand(2, 3))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(old_logp=torch.zeros(3, dtype=F64)), ValueError, "old_logp"),
        (dict(old_logp=torch.zeros(2, dtype=torch.long)), TypeError, "old_logp"),
        (dict(dual_clip=0.5), ValueError, "dual_clip"),
        (dict(clip_low=1.0), ValueError, "clip_low"),
        (dict(advantages=[1.0, 2.0]), TypeError, "advantages"),
    ],
)
def test_bad_input(kwargs, exc, match):
    args = dict(logp=torch.zeros(2, dtype=F64), old_logp=torch.zeros(2, dtype=F64),
                advantages=torch.ones(2, dtype=F64), clip_low=0.2, clip_high=0.3, dual_clip=3.0)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        clipped_policy_loss(args.pop("logp"), args.pop("old_logp"), args.pop("advantages"), **args)


def test_unknown_kl_estimator():
    with pytest.raises(ValueError, match="kind"):
        kl_estimate(t(0.0), t(0.0), "k4")
