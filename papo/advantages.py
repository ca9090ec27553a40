"""Outcome advantages (GRPO, Dr.GRPO) and the DAPO online filter, grouped by prompt.

Groups are given as one id per response (an int tensor or any hashables, e.g. the official
uuid strings). The statistics are per group, so responses may come in any order (the
official trainer reorders them across ranks before computing advantages).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def _group_index(group_ids: Any, size: int) -> tuple[Tensor, int]:
    """Map group ids to dense indices 0..G-1 (first-seen order) on CPU."""
    if isinstance(group_ids, Tensor):
        if group_ids.dim() != 1 or group_ids.dtype.is_floating_point:
            raise ValueError(f"group_ids must be a 1-D integer tensor or a sequence, got "
                             f"{group_ids.dtype} {tuple(group_ids.shape)}")
        ids: Sequence[Any] = group_ids.tolist()
    elif isinstance(group_ids, (list, tuple)) or hasattr(group_ids, "__array__"):
        ids = list(group_ids)
    else:
        raise TypeError(f"group_ids must be a tensor or a sequence, got {type(group_ids).__name__}")
    if len(ids) != size:
        raise ValueError(f"group_ids must have one id per response ({size}), got {len(ids)}")
    dense: dict[Any, int] = {}
    index = [dense.setdefault(g, len(dense)) for g in ids]
    return torch.tensor(index, dtype=torch.long), len(dense)


def _check_scores(name: str, scores: Any) -> Tensor:
    if not isinstance(scores, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 1 or not scores.dtype.is_floating_point:
        raise ValueError(
            f"{name} must be a 1-D floating tensor [B], got {scores.dtype} {tuple(scores.shape)}")
    return scores


def group_mean_std(scores: Tensor, group_ids: Any, *, name: str = "scores") -> tuple[Tensor, Tensor, Tensor]:
    """Per-response mean, unbiased std (N - 1) and size of its group.

    Args:
        scores: [B] float scalar rewards.
        group_ids: [B] group (prompt) id per response.
        name: how errors refer to `scores` (the caller's argument name).

    Returns:
        (mean [B], std [B], count [B]) in scores' dtype and device; std is NaN for groups of 1
        (as torch.std), accumulated in float64.
    """
    scores = _check_scores(name, scores)
    index, num_groups = _group_index(group_ids, scores.shape[0])
    index = index.to(scores.device)
    x = scores.to(torch.float64)
    count = torch.zeros(num_groups, dtype=torch.float64, device=scores.device).index_add_(
        0, index, torch.ones_like(x))
    mean = torch.zeros_like(count).index_add_(0, index, x) / count
    centered = x - mean[index]
    var = torch.zeros_like(count).index_add_(0, index, centered.square()) / (count - 1)
    return (mean[index].to(scores.dtype), var.sqrt()[index].to(scores.dtype),
            count[index].to(scores.dtype))


def grpo_advantages(rewards: Tensor, group_ids: Any, *, eps: float = 1e-6,
                    scale_by_std: bool = True) -> Tensor:
    """GRPO outcome advantage (official `compute_grpo_outcome_advantage`).

    A_i = (R_i - mean_group) / (std_group + eps) with the unbiased std; with
    scale_by_std=False, A_i = R_i - mean_group (Dr.GRPO).

    Args:
        rewards: [B] float scalar reward per response (the official code sums the token-level
            rewards, which hold the score on the last token).
        group_ids: [B] prompt id per response (int tensor or hashables such as uid strings).
        eps: added to the std (official 1e-6).
        scale_by_std: False for Dr.GRPO.

    Returns:
        [B] advantages in rewards' dtype; broadcast them over each response's tokens.
    """
    mean, std, count = group_mean_std(rewards, group_ids, name="rewards")
    if not scale_by_std:
        return rewards - mean
    if bool((count < 2).any()):
        raise ValueError("group_ids: every group needs at least 2 responses for the GRPO std "
                         "(the official code asserts rollout.n > 1)")
    return (rewards - mean) / (std + eps)


def dr_grpo_advantages(rewards: Tensor, group_ids: Any) -> Tensor:
    """Dr.GRPO advantage: R_i - mean_group, no std normalization.

    Args:
        rewards: [B] float; group_ids: [B] prompt id per response.

    Returns:
        [B] advantages.
    """
    return grpo_advantages(rewards, group_ids, scale_by_std=False)


def online_filter(scores: Tensor, group_ids: Any, *, low: float, high: float) -> Tensor:
    """DAPO dynamic sampling: keep the groups whose mean score is strictly inside (low, high).

    Groups where every response is right (mean 1) or every one is wrong (mean 0) have zero
    advantage everywhere and only dilute the batch. The official PAPO-D recipe filters on the
    accuracy with (0.01, 0.99) (`PAPOConfig.online_filter`).

    Args:
        scores: [B] float per-response score (e.g. accuracy in {0, 1}).
        group_ids: [B] prompt id per response.
        low, high: bounds with 0 <= low < high <= 1 for accuracies.

    Returns:
        [B] bool keep-mask (whole groups are kept or dropped). It may keep nothing: the caller
        decides whether to sample more prompts (the official trainer does, up to a limit).
    """
    if not low < high:
        raise ValueError(f"online_filter needs low < high, got low={low}, high={high}")
    mean, _, _ = group_mean_std(scores, group_ids)
    return (mean > low) & (mean < high)
