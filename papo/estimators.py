"""Per-token estimators: sampled KL estimators k1/k2/k3 and the clipped policy objective.

All functions are elementwise on tensors of any (matching) shape and keep the input dtype.
The clamps are the official code's (EasyR1 `core_algos.compute_kl` / `compute_policy_loss`),
so the `sampled` estimator reproduces it bit for bit on float32 inputs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

# exp() of a log-ratio beyond this overflows fp32 gradients (pytorch#10729); official clamp.
_MAX_LOG_RATIO = 20.0
# k3 can still reach e^20; the official code bounds the estimate to keep one token from
# dominating the micro-batch mean.
_MAX_K3 = 10.0


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = logp - ref_logp: unbiased estimate of KL(pi || pi_ref) for tokens sampled from pi.

    Args:
        logp: [...] float log-probs of the sampled tokens under pi.
        ref_logp: [...] same shape, log-probs under the reference distribution.

    Returns:
        [...] per-token estimate (official kl_penalty "kl").
    """
    _check_pair(logp, ref_logp, "logp", "ref_logp")
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = 0.5 (logp - ref_logp)^2 (official kl_penalty "mse").

    Args:
        logp: [...] float log-probs of the sampled tokens under pi.
        ref_logp: [...] same shape, log-probs under the reference distribution.

    Returns:
        [...] per-token estimate, >= 0.
    """
    _check_pair(logp, ref_logp, "logp", "ref_logp")
    return 0.5 * (logp - ref_logp).square()


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = exp(d) - d - 1 with d = ref_logp - logp (official "low_var_kl"), clamped.

    d is clamped to [-20, 20] and the result to [-10, 10], as the official code does (the
    clamps also zero the gradient beyond them). For tokens sampled from pi it estimates
    KL(pi || pi_ref); its gradient w.r.t. logp is 1 - exp(d), whose expectation under pi is
    the gradient of KL(pi_ref || pi), the reverse direction (docs/algorithm.md).

    Args:
        logp: [...] float log-probs of the sampled tokens under pi (may require grad).
        ref_logp: [...] same shape, log-probs under the other distribution (the masked view
            for KL_prcp, the reference policy for the ref KL).

    Returns:
        [...] per-token estimate in [0, 10].
    """
    _check_pair(logp, ref_logp, "logp", "ref_logp")
    d = (ref_logp - logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return (d.exp() - d - 1.0).clamp(-_MAX_K3, _MAX_K3)


_KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str) -> Tensor:
    """Dispatch to `kl_k1` / `kl_k2` / `kl_k3` by name.

    Args:
        logp: [...] float log-probs under pi; ref_logp: [...] same shape.
        kind: "k1", "k2" or "k3".

    Returns:
        [...] per-token KL estimate.
    """
    if kind not in _KL_ESTIMATORS:
        raise ValueError(f"kind must be one of {tuple(_KL_ESTIMATORS)}, got {kind!r}")
    return _KL_ESTIMATORS[kind](logp, ref_logp)


class ClipInfo(NamedTuple):
    """Per-token diagnostics of `clipped_policy_loss` (each like the inputs)."""

    ratio: Tensor
    """exp(clamp(logp - old_logp, -20, 20)), detached."""
    clipped_low: Tensor
    """bool: A < 0 and the ratio was clipped at 1 - clip_low."""
    clipped_high: Tensor
    """bool: A > 0 and the ratio was clipped at 1 + clip_high."""
    clipped_dual: Tensor
    """bool: A < 0 and the dual clip bound -c * A is active."""


def clipped_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
) -> tuple[Tensor, ClipInfo]:
    """PPO clipped surrogate with asymmetric clip and dual clip, as a per-token loss.

    With r = exp(clamp(logp - old_logp, -20, 20)) and
    r_c = exp(clamp(logp - old_logp, log(1 - clip_low), log(1 + clip_high))):
        L_hi = max(-A r, -A r_c);  loss = min(L_hi, -A c) if A < 0 (dual clip) else L_hi.

    Args:
        logp: [...] float log-probs of sampled tokens under the current policy (with grad).
        old_logp: [...] same shape, under the rollout policy (no grad needed).
        advantages: [...] broadcastable to logp (e.g. [B, 1] against [B, T]).
        clip_low: in [0, 1); clip_high: >= 0; dual_clip: > 1 or None (disabled).

    Returns:
        (loss [...], ClipInfo): the per-token loss to minimize and detached diagnostics.
    """
    _check_pair(logp, old_logp, "logp", "old_logp")
    if not isinstance(advantages, Tensor):
        raise TypeError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low}")
    if clip_high < 0.0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 or None, got {dual_clip}")
    log_ratio = logp - old_logp
    ratio = log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO).exp()
    clipped_ratio = log_ratio.clamp(math.log(1.0 - clip_low), math.log(1.0 + clip_high)).exp()
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * clipped_ratio
    loss_hi = torch.maximum(loss_unclipped, loss_clipped)
    took_clipped = (loss_unclipped < loss_clipped).detach()
    negative = advantages < 0
    if dual_clip is not None:
        loss_dual = -advantages * dual_clip
        loss = torch.where(negative, torch.minimum(loss_hi, loss_dual), loss_hi)
        dual = (loss_hi > loss_dual).detach() & negative
    else:
        loss = loss_hi
        dual = torch.zeros_like(took_clipped)
    info = ClipInfo(
        ratio=ratio.detach(),
        clipped_low=took_clipped & negative,
        clipped_high=took_clipped & (advantages > 0),
        clipped_dual=dual,
    )
    return loss, info


def _check_pair(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    for name, t in ((name_a, a), (name_b, b)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if a.shape != b.shape:
        raise ValueError(f"{name_b} must have the shape of {name_a} {tuple(a.shape)}, got {tuple(b.shape)}")
