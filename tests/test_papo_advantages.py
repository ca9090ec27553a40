"""papo.advantages: GRPO / Dr.GRPO group normalization and the DAPO online filter."""

import math
import random

import pytest
import torch

from papo.advantages import dr_grpo_advantages, group_mean_std, grpo_advantages, online_filter


def test_grpo_hand_values():
    # group a: rewards (1, 0, 1): mean 2/3, unbiased std sqrt(1/3); group b: (0.5, 0.5): std 0
    rewards = torch.tensor([1.0, 0.5, 0.0, 0.5, 1.0], dtype=torch.float64)
    groups = ["a", "b", "a", "b", "a"]
    adv = grpo_advantages(rewards, groups)
    s = math.sqrt(1 / 3) + 1e-6
    expected = [(1 - 2 / 3) / s, 0.0, (0 - 2 / 3) / s, 0.0, (1 - 2 / 3) / s]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(dr_grpo_advantages(rewards, groups),
                               torch.tensor([1 / 3, 0.0, -2 / 3, 0.0, 1 / 3], dtype=torch.float64))


def _official_grpo(scores, index, eps=1e-6):
    """core_algos.compute_grpo_outcome_advantage (docs/algorithm.md), per-group loop."""
    by_id = {}
    for i, uid in enumerate(index):
        by_id.setdefault(uid, []).append(scores[i])
    mean = {k: torch.mean(torch.tensor(v)) for k, v in by_id.items()}
    std = {k: torch.std(torch.tensor(v)) for k, v in by_id.items()}
    return torch.stack([(scores[i] - mean[uid]) / (std[uid] + eps) for i, uid in enumerate(index)])


def test_grpo_matches_the_official_loop_in_any_order():
    rng = random.Random(0)
    uids = [f"uid-{k}" for k in range(6) for _ in range(5)]  # 6 prompts x n = 5
    rng.shuffle(uids)  # the official trainer reorders responses across ranks
    scores = torch.tensor([rng.choice([0.0, 0.1, 0.9, 1.0]) for _ in uids])
    ours = grpo_advantages(scores, uids)
    torch.testing.assert_close(ours, _official_grpo(scores, uids), rtol=1e-5, atol=1e-5)
    # integer group ids give the same result
    ints = torch.tensor([int(u.split("-")[1]) for u in uids])
    torch.testing.assert_close(grpo_advantages(scores, ints), ours)


def test_group_stats():
    mean, std, count = group_mean_std(torch.tensor([1.0, 3.0, 5.0]), [0, 0, 1])
    torch.testing.assert_close(mean, torch.tensor([2.0, 2.0, 5.0]))
    torch.testing.assert_close(std[:2], torch.tensor([math.sqrt(2.0)] * 2))
    assert torch.isnan(std[2])
    torch.testing.assert_close(count, torch.tensor([2.0, 2.0, 1.0]))


def test_online_filter_keeps_groups_strictly_inside():
    # group means: g0 = 0 (all wrong), g1 = 1 (all right), g2 = 0.5, g3 = 0.01 (== low: dropped)
    acc = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.01, 0.01])
    groups = [0, 0, 1, 1, 2, 2, 3, 3]
    keep = online_filter(acc, groups, low=0.01, high=0.99)
    assert keep.tolist() == [False, False, False, False, True, True, False, False]
    assert not online_filter(acc[:4], groups[:4], low=0.01, high=0.99).any()


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: grpo_advantages(torch.ones(3), [0, 0, 1]), ValueError, "group_ids"),
        (lambda: grpo_advantages(torch.ones(3), [0, 0]), ValueError, "group_ids"),
        (lambda: grpo_advantages(torch.ones(2, 2), [0, 0]), ValueError, "rewards"),
        (lambda: grpo_advantages([1.0, 0.0], [0, 0]), TypeError, "rewards"),
        (lambda: grpo_advantages(torch.ones(2), "ab"), TypeError, "group_ids"),
        (lambda: online_filter(torch.ones(2), [0, 0], low=0.9, high=0.1), ValueError, "low < high"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_dr_grpo_accepts_singleton_groups():
    torch.testing.assert_close(dr_grpo_advantages(torch.tensor([1.0, 2.0, 4.0]), [0, 1, 1]),
                               torch.tensor([0.0, -1.0, 1.0]))
