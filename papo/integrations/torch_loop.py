"""PAPO in a plain PyTorch loop: the two calls a custom trainer needs around `PAPOLoss`.

    stats = rollout_log_probs(hidden_fn, lm_head_weight, batch, config)   # once per rollout step
    batch.update(stats)
    metrics = train_step(loss_module, hidden_fn, lm_head_weight, optimizer, micro_batches, ...)

The model is abstracted as `hidden_fn(micro_batch, masked) -> [B, T, H]`: the last hidden
states that predict `completion_ids` (shifted by one against the inputs) with the original
(masked=False) or the masked images. Everything else follows the official step order
(docs/algorithm.md): old and masked log-probs from one no-grad two-view pass with the
rollout-time weights, then one optimizer step per mini-batch with gradient accumulation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from papo.config import Coefficients, PAPOConfig
from papo.losses import PAPOLoss

HiddenFn = Callable[[Mapping[str, Any], bool], Tensor]


@torch.no_grad()
def rollout_log_probs(hidden_fn: HiddenFn, lm_head_weight: Tensor, batch: Mapping[str, Any],
                      config: PAPOConfig) -> dict[str, Tensor]:
    """Old-policy and masked-image log-probs of the sampled tokens, from one two-view pass.

    Call it right after generation, before any update, so both come from the rollout-time
    weights (official `compute_log_probs` and `compute_log_probs_aug`).

    Args:
        hidden_fn: (batch, masked) -> [B, T, H] last hidden states (see the module docstring).
        lm_head_weight: [V, H] lm_head weight.
        batch: mapping with "completion_ids" [B, T] int and "completion_mask" [B, T] 0/1, plus
            whatever hidden_fn needs.
        config: the PAPOConfig (its temperature is used).

    Returns:
        dict with "old_logp" and "masked_logp" ([B, T] float32, 0 on padding) and detached
        collapse monitors "kl/perception_exact" (mean KL(pi || pi_masked)), "entropy/full_exact"
        and "entropy/masked_exact" (means over completion tokens).
    """
    from papo_kernels import two_view_stats

    mask = batch["completion_mask"].bool()
    targets = batch["completion_ids"].masked_fill(~mask, -100)
    stats = two_view_stats(hidden_fn(batch, False), hidden_fn(batch, True), lm_head_weight, targets,
                           temperature=config.temperature)
    count = mask.sum().clamp(min=1)
    return {
        "old_logp": stats.logp_a,
        "masked_logp": stats.logp_b,
        "kl/perception_exact": stats.kl_ab.sum() / count,
        "entropy/full_exact": stats.entropy_a.sum() / count,
        "entropy/masked_exact": stats.entropy_b.sum() / count,
    }


def train_step(
    loss_module: PAPOLoss,
    hidden_fn: HiddenFn,
    lm_head_weight: Tensor,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[Mapping[str, Any]],
    *,
    coefficients: Coefficients | None = None,
    max_grad_norm: float = 1.0,
) -> dict[str, float]:
    """One optimizer step over the micro-batches of a mini-batch (gradient accumulation).

    Args:
        loss_module: a `PAPOLoss`.
        hidden_fn: (micro_batch, masked) -> [B, T, H] hidden states, computed with grad.
        lm_head_weight: [V, H] lm_head weight (a parameter of the optimizer).
        optimizer: the optimizer over the policy's parameters.
        micro_batches: mappings with "completion_ids", "completion_mask", "advantages" ([B]),
            "old_logp", and "masked_logp" for masked_view="rollout_no_grad" (from
            `rollout_log_probs`), plus "ref_logp" when beta > 0.
        coefficients: `config.coefficients(step, total_steps)`; None for the config's values.
        max_grad_norm: gradient-norm clip (official 1.0); the step is skipped when the norm is
            not finite, as the official trainer does.

    Returns:
        Metrics averaged over the micro-batches plus "grad_norm" and "skipped" (0 or 1).
    """
    config = loss_module.config
    # the global normalizers are known up front (single process; all-reduce them across ranks)
    num_valid_tokens = sum(int(mb["completion_mask"].sum()) for mb in micro_batches)
    num_valid_sequences = sum(int((mb["completion_mask"].sum(-1) > 0).sum()) for mb in micro_batches)
    sums: dict[str, float] = {}
    for mb in micro_batches:
        masked_hidden = None
        if config.masked_view != "rollout_no_grad":
            with torch.set_grad_enabled(config.masked_view == "live"):
                masked_hidden = hidden_fn(mb, True)
        out = loss_module(
            hidden_fn(mb, False), lm_head_weight, mb["completion_ids"], mb["completion_mask"],
            mb["advantages"],
            old_logp=mb.get("old_logp"), masked_hidden=masked_hidden,
            masked_logp=mb.get("masked_logp") if config.masked_view == "rollout_no_grad" else None,
            ref_logp=mb.get("ref_logp"), num_valid_tokens=num_valid_tokens,
            num_valid_sequences=num_valid_sequences, num_micro_batches=len(micro_batches),
            coefficients=coefficients,
        )
        out.loss.backward()
        for key, value in out.metrics.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    grad_norm = float(nn.utils.clip_grad_norm_(params, max_grad_norm))
    skipped = not math.isfinite(grad_norm)
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    metrics = {k: v / len(micro_batches) for k, v in sums.items()}
    metrics.update(grad_norm=grad_norm, skipped=float(skipped))
    return metrics
