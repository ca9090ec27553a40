"""The PAPO loss: `papo_loss` on per-token statistics and `PAPOLoss` from hidden states.

Per completion token t of response i the loss to minimize is (docs/algorithm.md)

    l_t = PPOclip_dual(r_t, A_i) + beta KL_ref_t - gamma KL_prcp_t + eta_full H_t + eta_masked Hm_t

and every aggregation is a weighted sum  loss = sum_t w_t l_t  with weights fixed up front
(`_token_weights`), which is what lets `PAPOLoss` hand the whole loss to the fused kernels as a
per-chunk `loss_fn` without [tokens x vocab] logits. The entropy terms are token means whatever
`loss_agg` says (the official code averages them with `masked_mean` however the policy loss is
averaged), so they carry token-mean weights u_t:  loss = sum_t w_t l_t + sum_t u_t e_t. Both
entry points share `_token_terms`, so PAPOLoss equals papo_loss applied to the dense statistics
of the same logits.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from papo.config import Coefficients, PAPOConfig
from papo.estimators import clipped_policy_loss, kl_estimate, kl_k3


class LossOutput(NamedTuple):
    """What the loss calls return.

    loss: scalar tensor to call .backward() on (already normalized per `loss_scale`).
    metrics: dict of detached 0-dim tensors: token means over the micro-batch's completion
        tokens (a key is present only when its quantity was computed):
        "loss/total" (the returned loss), "loss/policy" (clipped surrogate), "kl/perception"
        (the KL_prcp value in the loss: sampled k3, or the exact KL), "kl/perception_exact"
        (full-vocabulary KL, when both full distributions were seen), "kl/ref", "kl/old"
        (mean old_logp - logp, the official ppo_kl), "entropy/full", "entropy/masked" (the
        entropy values in the loss), "entropy/full_exact", "entropy/masked_exact" (sampled
        estimator only, when full-vocabulary entropies were available), "clip/frac_low",
        "clip/frac_high" (their sum is the official pg_clipfrac_higher), "clip/frac_dual"
        (official pg_clipfrac_lower), "ratio/mean", "tokens/count".
    """

    loss: Tensor
    metrics: dict[str, Tensor]


# ---------------------------------------------------------------------- shared pieces


def _resolve_coefficients(config: PAPOConfig, coefficients: Any) -> Coefficients:
    if coefficients is None:
        return Coefficients(config.gamma, config.eta_full, config.eta_masked)
    if isinstance(coefficients, Coefficients):
        values = coefficients
    elif isinstance(coefficients, Mapping):
        missing = {"gamma", "eta_full", "eta_masked"} - set(coefficients)
        if missing:
            raise ValueError(f"coefficients is missing keys {sorted(missing)}")
        values = Coefficients(coefficients["gamma"], coefficients["eta_full"], coefficients["eta_masked"])
    elif isinstance(coefficients, tuple) and len(coefficients) == 3:
        values = Coefficients(*coefficients)
    else:
        raise TypeError(
            "coefficients must be None, a Coefficients (from config.coefficients(step, total_steps)),"
            f" a (gamma, eta_full, eta_masked) tuple or a mapping, got {type(coefficients).__name__}"
        )
    for name, v in zip(values._fields, values):
        # inf is refused too: inf * 0 on a term's zero tokens would make the whole loss NaN
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (v >= 0 and math.isfinite(v)):
            raise ValueError(f"coefficients.{name} must be a finite real number >= 0, got {v!r}")
    return values


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return  # may live on an accelerator after an all-reduce: not synced to check its sign
    # 0 is allowed: a step without completion tokens gives loss 0 (the divisor is clamped to 1);
    # inf is not: it would silently zero the loss
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number >= 0 (or a scalar tensor), got {value!r}")


def _token_weights(
    config: PAPOConfig,
    seq_index: Tensor,
    lengths: Tensor,
    *,
    num_valid_tokens: Any,
    num_valid_sequences: Any,
    num_micro_batches: Any,
    agg: str | None = None,
) -> Tensor:
    """Per-token weights w with loss = sum_t w_t l_t, float64, shape like seq_index.

    seq_index [n]: the sequence of each completion token; lengths [B]: completion tokens per
    sequence. Sequences without completion tokens are not counted (padding rows of a packed
    micro-batch must not dilute a sequence mean). `agg` overrides config.loss_agg (the entropy
    terms always use "token-mean").
    """
    agg, scale = agg or config.loss_agg, config.loss_scale
    token_level = agg == "token-mean"
    if scale == "microbatch":
        if num_micro_batches is None:
            raise ValueError(
                "num_micro_batches is required with loss_scale='microbatch' (the micro-batch loss "
                "is divided by it, as the official gradient accumulation does); pass 1 for none"
            )
        if isinstance(num_micro_batches, bool) or not isinstance(num_micro_batches, numbers.Integral) \
                or num_micro_batches < 1:
            raise ValueError(f"num_micro_batches must be an int >= 1, got {num_micro_batches!r}")
    elif token_level:
        if num_valid_tokens is None:
            raise ValueError(
                "num_valid_tokens is required with loss_scale='global' and loss_agg='token-mean' "
                "or entropy terms (eta > 0), which are token means whatever loss_agg is "
                "(the all-reduced completion-token count of the optimizer step)"
            )
        _check_count("num_valid_tokens", num_valid_tokens)
    else:
        if num_valid_sequences is None:
            raise ValueError(
                f"num_valid_sequences is required with loss_scale='global' and loss_agg={agg!r} "
                "(the all-reduced number of sequences of the optimizer step)"
            )
        _check_count("num_valid_sequences", num_valid_sequences)

    lengths = lengths.to(torch.float64)
    if agg == "token-mean":
        numer = torch.ones_like(seq_index, dtype=torch.float64)
    elif agg == "seq-mean-token-mean":
        numer = 1.0 / lengths[seq_index]
    elif agg == "seq-mean-token-sum":
        numer = torch.ones_like(seq_index, dtype=torch.float64)
    else:  # seq-sum-norm (Dr.GRPO): constant divisor instead of each sequence's length
        numer = torch.full_like(seq_index, 1.0 / config.seq_sum_norm_divisor, dtype=torch.float64)

    if scale == "microbatch":
        count = (lengths.sum() if token_level else (lengths > 0).sum().to(torch.float64))
        # clamp: an all-masked micro-batch has no tokens to weight, and 0/0 would be NaN
        return numer / (count.clamp(min=1.0) * num_micro_batches)
    denom = num_valid_tokens if token_level else num_valid_sequences
    if isinstance(denom, Tensor):
        denom = denom.to(device=numer.device, dtype=torch.float64).reshape(()).clamp(min=1.0)
    else:
        denom = max(float(denom), 1.0)
    return numer / denom


def _required(config: PAPOConfig) -> dict[str, bool]:
    """Which per-token inputs the configured loss needs (coefficient > 0 in the config)."""
    need_masked = config.gamma > 0 or config.eta_masked > 0
    return dict(masked=need_masked, ref=config.beta > 0)


def _token_terms(
    config: PAPOConfig,
    coefs: Coefficients,
    *,
    logp: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    masked_logp: Tensor | None = None,
    ref_logp: Tensor | None = None,
    entropy: Tensor | None = None,
    masked_entropy: Tensor | None = None,
    kl_exact: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
    """Per-token losses [n] and per-token (detached) metric values on compacted 1-D tensors.

    Returns (loss, entropy_loss, metrics): `loss` holds the terms aggregated per
    config.loss_agg, `entropy_loss` the eta-weighted entropy terms, which are always token
    means: None when both etas are 0 or when loss_agg is "token-mean" (they are in `loss`).
    kl_exact is the full-vocabulary KL_prcp: the loss term in the exact estimator (direction
    chosen by the caller), a monitor in the sampled one.
    """
    if old_logp is None:  # on-policy: the rollout policy is the current one, ratio == 1
        old_logp = logp.detach()
    pg, info = clipped_policy_loss(
        logp, old_logp, advantages,
        clip_low=config.clip_low, clip_high=config.clip_high, dual_clip=config.dual_clip,
    )
    loss = pg
    metrics: dict[str, Tensor] = {
        "loss/policy": pg.detach(),
        "kl/old": (old_logp - logp).detach(),
        "clip/frac_low": info.clipped_low.to(logp.dtype),
        "clip/frac_high": info.clipped_high.to(logp.dtype),
        "clip/frac_dual": info.clipped_dual.to(logp.dtype),
        "ratio/mean": info.ratio,
        "tokens/count": torch.ones_like(logp).detach(),
    }

    if config.estimator == "sampled":
        # official: KL_prcp = k3 on the sampled token against the masked view, "entropy" =
        # -logp of the sampled token in each view (docs/algorithm.md)
        kl_prcp = kl_k3(logp, masked_logp) if masked_logp is not None else None
        h_full = -logp
        h_masked = -masked_logp if masked_logp is not None else None
        if entropy is not None:
            metrics["entropy/full_exact"] = entropy.detach()
        if masked_entropy is not None:
            metrics["entropy/masked_exact"] = masked_entropy.detach()
    else:
        kl_prcp, h_full, h_masked = kl_exact, entropy, masked_entropy

    for coef_name, coef, term in (("gamma", coefs.gamma, kl_prcp), ("eta_full", coefs.eta_full, h_full),
                                  ("eta_masked", coefs.eta_masked, h_masked)):
        if coef != 0 and term is None:
            raise ValueError(
                f"coefficients.{coef_name} = {coef} but its term cannot be computed: the config has "
                f"{coef_name} = 0, so the inputs it needs were not required"
            )
    if coefs.gamma != 0:  # skip zero-weight terms: 0 * inf would poison the loss with NaN
        loss = loss - coefs.gamma * kl_prcp
    # the entropy terms are token means: with loss_agg "token-mean" they share the other terms'
    # weights (and join `loss` in the official order); otherwise they get their own weights
    separate = config.loss_agg != "token-mean"
    entropy_loss = torch.zeros_like(loss) if separate else loss
    if coefs.eta_full != 0:
        entropy_loss = entropy_loss + coefs.eta_full * h_full
    if coefs.eta_masked != 0:
        entropy_loss = entropy_loss + coefs.eta_masked * h_masked
    if separate:
        entropy_loss = entropy_loss if coefs.eta_full != 0 or coefs.eta_masked != 0 else None
    else:
        loss, entropy_loss = entropy_loss, None
    if ref_logp is not None:
        ref_kl = kl_estimate(logp, ref_logp, config.ref_kl_estimator)
        if config.beta != 0:
            loss = loss + config.beta * ref_kl
        metrics["kl/ref"] = ref_kl.detach()

    if kl_prcp is not None:
        metrics["kl/perception"] = kl_prcp.detach()
    if kl_exact is not None:
        metrics["kl/perception_exact"] = kl_exact.detach()
    if h_full is not None:
        metrics["entropy/full"] = h_full.detach()
    if h_masked is not None:
        metrics["entropy/masked"] = h_masked.detach()
    return loss, entropy_loss, metrics


def _weighted_sum(loss: Tensor, weights: Tensor, entropy_loss: Tensor | None,
                  entropy_weights: Tensor | None) -> Tensor:
    """sum_t w_t l_t (+ sum_t u_t e_t when the entropy terms carry their own weights)."""
    total = (weights * loss).sum()
    if entropy_loss is not None:
        total = total + (entropy_weights * entropy_loss).sum()
    return total


def _check_config(config: Any) -> PAPOConfig:
    if not isinstance(config, PAPOConfig):
        raise TypeError(f"config must be a papo.PAPOConfig, got {type(config).__name__}")
    return config


def _check_device(t: Tensor, name: str, device: torch.device, ref_name: str) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {device}: they must match")


def _check_mask(mask: Any, shape: torch.Size, name: str, device: torch.device, ref_name: str) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    _check_device(mask, name, device, ref_name)
    if mask.dtype != torch.bool:
        if mask.dtype.is_complex:
            raise TypeError(f"{name} must be a bool or 0/1 numeric tensor, got {mask.dtype}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{name} must contain only 0 and 1")
        mask = mask != 0
    return mask


def _check_token_tensor(t: Any, name: str, shape: torch.Size, ref_name: str, device: torch.device,
                        device_name: str) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if t.shape != shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(shape)}, got {tuple(t.shape)}")
    _check_device(t, name, device, device_name)


def _check_advantages(advantages: Any, shape: torch.Size, ref_name: str, device: torch.device,
                      device_name: str) -> Tensor:
    """Return advantages as [B, T] (a [B] tensor is broadcast over each sequence's tokens)."""
    if not isinstance(advantages, Tensor):
        raise TypeError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
    if not advantages.dtype.is_floating_point:
        raise TypeError(f"advantages must be a floating tensor, got {advantages.dtype}")
    _check_device(advantages, "advantages", device, device_name)
    if advantages.shape == shape[:1]:
        return advantages.unsqueeze(-1).expand(shape)
    if advantages.shape == shape:
        return advantages
    raise ValueError(
        f"advantages must have shape [B] = {tuple(shape[:1])} or [B, T] = {tuple(shape)} "
        f"(from {ref_name}), got {tuple(advantages.shape)}"
    )


def _raise_nonfinite_advantages(advantages: Tensor, bad: Tensor) -> None:
    """ValueError naming the first completion token whose advantage is NaN/Inf (`bad` [B, T])."""
    b, t = (int(i) for i in bad.nonzero()[0])
    where = f"advantages[{b}]" if advantages.dim() == 1 else f"advantages[{b}, {t}]"
    value = advantages[b] if advantages.dim() == 1 else advantages[b, t]
    raise ValueError(f"advantages must be finite on completion tokens; {where} = {float(value)} "
                     f"(completion token [{b}, {t}]): the loss would be NaN")


def _check_missing(config: PAPOConfig, required: dict[str, bool], given: dict[str, Any],
                   masked_hint: str) -> None:
    if required["ref"] and given.get("ref_logp") is None:
        raise ValueError(f"ref_logp is required when config.beta > 0 (beta={config.beta})")
    if required["masked"] and given.get(masked_hint) is None:
        raise ValueError(
            f"{masked_hint} is required with estimator={config.estimator!r}, "
            f"masked_view={config.masked_view!r}, gamma={config.gamma} and "
            f"eta_masked={config.eta_masked}"
        )


# ---------------------------------------------------------------------- papo_loss


def papo_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    config: PAPOConfig,
    masked_logp: Tensor | None = None,
    entropy: Tensor | None = None,
    masked_entropy: Tensor | None = None,
    kl_prcp: Tensor | None = None,
    ref_logp: Tensor | None = None,
    num_valid_tokens: int | float | Tensor | None = None,
    num_valid_sequences: int | float | Tensor | None = None,
    num_micro_batches: int | None = None,
    coefficients: Coefficients | Mapping | tuple | None = None,
) -> LossOutput:
    """The PAPO loss of one micro-batch from per-token statistics (plain PyTorch).

    Args:
        logp: [B, T] float log pi_theta(o_t | q, I, o_<t) of the sampled tokens at the
            configured temperature (with grad).
        old_logp: [B, T] float, the same under the rollout policy (no grad), or None for
            on-policy (old = logp.detach(), ratio 1).
        advantages: [B] (one per sequence, broadcast over its tokens) or [B, T] float.
        mask: [B, T] bool or 0/1 numeric: 1 on completion tokens. Other positions may hold
            anything (even NaN): they are dropped before any arithmetic.
        config: PAPOConfig.
        masked_logp: [B, T] float log-probs of the sampled tokens with the masked image.
            Needed by estimator="sampled" when gamma > 0 or eta_masked > 0 (with
            masked_view="rollout_no_grad" it is a constant computed at rollout time; with
            "live" it may carry grad). In "exact" mode it is unused.
        entropy: [B, T] float full-vocabulary entropy of pi_theta (original image). Needed by
            "exact" when eta_full > 0; in "sampled" mode only logged.
        masked_entropy: [B, T] float, the same with the masked image ("exact", eta_masked > 0).
        kl_prcp: [B, T] float full-vocabulary KL_prcp in the configured direction
            (masked_to_full: KL(pi_masked || pi_theta)). Needed by "exact" when gamma > 0. In
            "sampled" mode it is only logged as "kl/perception_exact": pass KL(pi_theta ||
            pi_masked) there (two_view_stats' kl_ab), the KL that the sampled k3 estimates, as
            PAPOLoss does. Its gradient is used as given: compute it with the masked view
            detached unless masked_view="live".
        ref_logp: [B, T] float log-probs under the reference policy; needed when beta > 0.
        num_valid_tokens: loss_scale="global" with loss_agg="token-mean": the completion-token
            count of the whole optimizer step (all micro-batches, all ranks).
        num_valid_sequences: loss_scale="global" with a sequence-level loss_agg: the number of
            sequences of the optimizer step.
        num_micro_batches: loss_scale="microbatch": gradient-accumulation steps the loss is
            divided by (official). Do not let the engine divide again (DeepSpeed's
            `scale_wrt_gas`).
        coefficients: `config.coefficients(step, total_steps)` (gamma, eta_full, eta_masked)
            for the current step; None uses the config's values.

    Returns:
        LossOutput(loss, metrics): loss = sum_t w_t l_t (0-dim; float32, or float64 for float64
        logp; bfloat16/float16 inputs are upcast); an all-masked
        micro-batch gives loss 0 with zero gradients. See `LossOutput` for the metrics.
        NaN/Inf in the model's statistics (logp, old_logp, ...) on completion tokens make the
        loss non-finite (the trainer then skips the optimizer step and counts it, as the
        official code does); NaN/Inf advantages there raise ValueError (they come from the
        rewards, so they are a bug, never a numerical accident).
    """
    config = _check_config(config)
    coefs = _resolve_coefficients(config, coefficients)
    if not isinstance(logp, Tensor):
        raise TypeError(f"logp must be a torch.Tensor, got {type(logp).__name__}")
    if logp.dim() != 2 or not logp.dtype.is_floating_point:
        raise ValueError(f"logp must be a floating [B, T] tensor, got {logp.dtype} {tuple(logp.shape)}")
    shape = logp.shape
    for name, t in (("old_logp", old_logp), ("masked_logp", masked_logp), ("entropy", entropy),
                    ("masked_entropy", masked_entropy), ("kl_prcp", kl_prcp), ("ref_logp", ref_logp)):
        _check_token_tensor(t, name, shape, "logp", logp.device, "logp")
    adv = _check_advantages(advantages, shape, "logp", logp.device, "logp")
    m = _check_mask(mask, shape, "mask", logp.device, "logp")
    # Advantages come from rewards, never from the model: a NaN there is a bug upstream, not a
    # numerical accident the trainer's non-finite-gradient skip is meant to absorb.
    bad_adv = m & ~torch.isfinite(adv)
    if bool(bad_adv.any()):
        _raise_nonfinite_advantages(advantages, bad_adv)

    required = _required(config)
    given = dict(masked_logp=masked_logp, entropy=entropy, masked_entropy=masked_entropy,
                 kl_prcp=kl_prcp, ref_logp=ref_logp)
    if config.estimator == "sampled":
        _check_missing(config, required, given, "masked_logp")
    else:
        _check_missing(config, dict(required, masked=False), given, "masked_logp")
        for name, need in (("kl_prcp", config.gamma > 0), ("entropy", config.eta_full > 0),
                           ("masked_entropy", config.eta_masked > 0)):
            if need and given[name] is None:
                raise ValueError(f"{name} is required with estimator='exact' "
                                 f"(gamma={config.gamma}, eta_full={config.eta_full}, "
                                 f"eta_masked={config.eta_masked})")

    # half-precision statistics are upcast, as the official compute_kl does with .float()
    dtype = torch.promote_types(logp.dtype, torch.float32)

    # One nonzero (one host sync) compacts the completion tokens; boolean-mask indexing would
    # sync once per tensor.
    rows = m.reshape(-1).nonzero().squeeze(-1)

    def pick(t: Tensor | None, detach: bool = False) -> Tensor | None:
        if t is None:
            return None
        return (t.detach() if detach else t).reshape(-1).index_select(0, rows).to(dtype)

    # Only masked_view="live" lets gradients through the masked view (as PAPOLoss does).
    frozen_masked = config.masked_view != "live"

    seq_index = rows // shape[1]
    counts = dict(num_valid_tokens=num_valid_tokens, num_valid_sequences=num_valid_sequences,
                  num_micro_batches=num_micro_batches)
    weights = _token_weights(config, seq_index, m.sum(-1), **counts).to(dtype)
    token_loss, entropy_loss, metric_values = _token_terms(
        config, coefs, logp=pick(logp), old_logp=pick(old_logp), advantages=pick(adv),
        masked_logp=pick(masked_logp, frozen_masked), ref_logp=pick(ref_logp), entropy=pick(entropy),
        masked_entropy=pick(masked_entropy, frozen_masked), kl_exact=pick(kl_prcp),
    )
    entropy_weights = None
    if entropy_loss is not None:
        entropy_weights = _token_weights(config, seq_index, m.sum(-1), agg="token-mean", **counts).to(dtype)
    loss = _weighted_sum(token_loss, weights, entropy_loss, entropy_weights)
    count = float(max(int(seq_index.numel()), 1))
    metrics = {k: v.sum() / count for k, v in metric_values.items()}
    metrics["tokens/count"] = metrics["tokens/count"] * count
    metrics["loss/total"] = loss.detach()
    return LossOutput(loss, metrics)


# ---------------------------------------------------------------------- PAPOLoss


class PAPOLoss(nn.Module):
    """The PAPO loss from last hidden states and the lm_head weight, through the fused kernels.

    Never materializes [tokens x vocab] logits: completion tokens are compacted once, then
    `papo_kernels.fused_token_loss` (one view) or `fused_two_view_loss` (original and masked
    views sharing W) computes the per-token statistics chunk by chunk and this module's
    `loss_fn` turns them into the weighted loss of `papo_loss`. The gradients w.r.t. hidden,
    masked_hidden ("live") and the weight are computed in the forward and applied on
    loss.backward().

    Args:
        config: PAPOConfig.
        backend, strategy, chunk_tokens: passed to the papo_kernels fused calls ("auto",
            "torch", "triton", "cpp"; "auto", "workspace"; rows per chunk or None).
    """

    def __init__(self, config: PAPOConfig, *, backend: str = "auto", strategy: str = "auto",
                 chunk_tokens: int | None = None) -> None:
        super().__init__()
        self.config = _check_config(config)
        self.backend = backend
        self.strategy = strategy
        self.chunk_tokens = chunk_tokens

    def extra_repr(self) -> str:
        c = self.config
        return (f"estimator={c.estimator!r}, masked_view={c.masked_view!r}, gamma={c.gamma}, "
                f"eta=({c.eta_full}, {c.eta_masked}), beta={c.beta}, loss_agg={c.loss_agg!r}, "
                f"loss_scale={c.loss_scale!r}, backend={self.backend!r}")

    def forward(
        self,
        hidden: Tensor,
        lm_head_weight: Tensor,
        completion_ids: Tensor,
        completion_mask: Tensor,
        advantages: Tensor,
        *,
        old_logp: Tensor | None = None,
        masked_hidden: Tensor | None = None,
        masked_logp: Tensor | None = None,
        ref_logp: Tensor | None = None,
        num_valid_tokens: int | float | Tensor | None = None,
        num_valid_sequences: int | float | Tensor | None = None,
        num_micro_batches: int | None = None,
        coefficients: Coefficients | Mapping | tuple | None = None,
    ) -> LossOutput:
        """Loss of one micro-batch.

        Args:
            hidden: [B, T, H] float16/bfloat16/float32/float64 last hidden states with the
                original image; hidden[b, t] predicts completion_ids[b, t] (already shifted).
            lm_head_weight: [V, H] lm_head weight, same dtype and device as hidden.
            completion_ids: [B, T] integer sampled token ids (any value where the mask is 0).
            completion_mask: [B, T] bool or 0/1: 1 on completion tokens.
            advantages: [B] or [B, T] float.
            old_logp: [B, T] float rollout-policy log-probs, or None for on-policy.
            masked_hidden: [B, T, H] hidden states with the masked image, for
                masked_view "current_no_grad" (detached here) or "live" (must require grad
                when hidden does). Not accepted with "rollout_no_grad".
            masked_logp: [B, T] float rollout-time masked log-probs, for
                masked_view="rollout_no_grad" (estimator "sampled") only.
            ref_logp: [B, T] float reference log-probs; needed when beta > 0.
            num_valid_tokens, num_valid_sequences, num_micro_batches, coefficients: as in
                `papo_loss`.

        Returns:
            LossOutput(loss, metrics) equal to `papo_loss` on the same statistics computed
            from dense logits hidden @ W.T / temperature. Non-finite hidden states on completion
            tokens give a non-finite loss (see `papo_loss`); completion_ids outside [0, V) or
            non-finite advantages on completion tokens raise ValueError.
        """
        from papo_kernels import fused_token_loss, fused_two_view_loss

        config = self.config
        coefs = _resolve_coefficients(config, coefficients)
        for name, t in (("hidden", hidden), ("lm_head_weight", lm_head_weight),
                        ("completion_ids", completion_ids)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if hidden.dim() != 3:
            raise ValueError(f"hidden must be [B, T, H], got shape {tuple(hidden.shape)}")
        if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
            raise ValueError(f"lm_head_weight must be [V, H={hidden.shape[-1]}], got "
                             f"{tuple(lm_head_weight.shape)}")
        shape = hidden.shape[:2]
        if completion_ids.shape != shape:
            raise ValueError(f"completion_ids must have shape {tuple(shape)} (hidden.shape[:2]), "
                             f"got {tuple(completion_ids.shape)}")
        if completion_ids.dtype.is_floating_point or completion_ids.dtype.is_complex \
                or completion_ids.dtype == torch.bool:
            raise TypeError(f"completion_ids must be an integer tensor, got {completion_ids.dtype}")
        if completion_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"completion_ids must be int64 or int32 token ids, got {completion_ids.dtype} "
                            "(too narrow for a vocabulary index; convert with completion_ids.long())")
        if lm_head_weight.dtype != hidden.dtype:
            raise TypeError(f"lm_head_weight has dtype {lm_head_weight.dtype} but hidden has dtype "
                            f"{hidden.dtype}: they must match")
        _check_device(lm_head_weight, "lm_head_weight", hidden.device, "hidden")
        _check_device(completion_ids, "completion_ids", hidden.device, "hidden")
        m = _check_mask(completion_mask, shape, "completion_mask", hidden.device, "hidden")
        adv = _check_advantages(advantages, shape, "hidden.shape[:2]", hidden.device, "hidden")
        for name, t in (("old_logp", old_logp), ("masked_logp", masked_logp), ("ref_logp", ref_logp)):
            _check_token_tensor(t, name, shape, "hidden.shape[:2]", hidden.device, "hidden")
        if masked_hidden is not None:
            if not isinstance(masked_hidden, Tensor):
                raise TypeError(f"masked_hidden must be a torch.Tensor, got {type(masked_hidden).__name__}")
            if masked_hidden.shape != hidden.shape:
                raise ValueError(f"masked_hidden must have the shape of hidden {tuple(hidden.shape)}, "
                                 f"got {tuple(masked_hidden.shape)}")
            if masked_hidden.dtype != hidden.dtype:
                raise TypeError(f"masked_hidden has dtype {masked_hidden.dtype} but hidden has dtype "
                                f"{hidden.dtype}: they must match")
            _check_device(masked_hidden, "masked_hidden", hidden.device, "hidden")
        # Token ids outside the vocabulary would give NaN rows where the kernels skip their own
        # range check (accelerators, to avoid a sync); checked here on completion tokens only, in
        # the same host sync as the advantages, before the compaction below syncs anyway.
        vocab = lm_head_weight.shape[0]
        bad_ids = m & ((completion_ids < 0) | (completion_ids >= vocab))
        bad_adv = m & ~torch.isfinite(adv)
        any_bad_ids, any_bad_adv = torch.stack([bad_ids.any(), bad_adv.any()]).tolist()
        if any_bad_ids:
            b, t = (int(i) for i in bad_ids.nonzero()[0])
            raise ValueError(f"completion_ids must be in [0, {vocab}) (lm_head_weight has V={vocab} rows) on "
                             f"completion tokens; completion_ids[{b}, {t}] = {int(completion_ids[b, t])}")
        if any_bad_adv:
            _raise_nonfinite_advantages(advantages, bad_adv)

        required = _required(config)
        given = dict(masked_logp=masked_logp, masked_hidden=masked_hidden, ref_logp=ref_logp)
        if config.masked_view == "rollout_no_grad":
            if masked_hidden is not None:
                raise ValueError(
                    "masked_hidden is not used with masked_view='rollout_no_grad': pass the "
                    "rollout-time masked log-probs as masked_logp (or choose masked_view="
                    "'current_no_grad' / 'live')"
                )
            _check_missing(config, required, given, "masked_logp")
        else:
            if masked_logp is not None:
                raise ValueError(
                    f"masked_logp is not used with masked_view={config.masked_view!r}: the masked "
                    "log-probs come from masked_hidden with the current weights"
                )
            _check_missing(config, required, given, "masked_hidden")
            if masked_hidden is not None:
                if config.masked_view == "current_no_grad":
                    masked_hidden = masked_hidden.detach()
                elif ((hidden.requires_grad or lm_head_weight.requires_grad)
                      and not masked_hidden.requires_grad):
                    raise ValueError(
                        "masked_hidden must require grad with masked_view='live' (compute it with "
                        "the policy in grad mode), or use masked_view='current_no_grad'"
                    )

        # compact the completion tokens once: the kernels never see padding rows
        B, T, H = hidden.shape
        rows = m.reshape(-1).nonzero().squeeze(-1)
        n = int(rows.numel())
        h_a = hidden.reshape(B * T, H).index_select(0, rows)
        h_b = masked_hidden.reshape(B * T, H).index_select(0, rows) if masked_hidden is not None else None
        targets = completion_ids.reshape(-1).index_select(0, rows).long()
        seq_index = rows // T
        counts = dict(num_valid_tokens=num_valid_tokens, num_valid_sequences=num_valid_sequences,
                      num_micro_batches=num_micro_batches)
        weights = _token_weights(config, seq_index, m.sum(-1), **counts)
        # the entropy terms are token means whatever loss_agg is (see the module docstring)
        entropy_weights = None
        if config.loss_agg != "token-mean" and (coefs.eta_full != 0 or coefs.eta_masked != 0):
            entropy_weights = _token_weights(config, seq_index, m.sum(-1), agg="token-mean", **counts)

        def gather(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.reshape(-1).index_select(0, rows).detach()

        adv_rows = gather(adv.reshape(B * T))
        old_rows, mlogp_rows, ref_rows = gather(old_logp), gather(masked_logp), gather(ref_logp)
        two_view = h_b is not None
        estimator, direction = config.estimator, config.kl_prcp_direction

        def loss_fn(stats, index: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            dtype = stats[0].dtype

            def at(t: Tensor | None) -> Tensor | None:
                return None if t is None else t.index_select(0, index).to(dtype)

            if two_view:
                kl = stats.kl_ba if direction == "masked_to_full" else stats.kl_ab
                # the sampled k3 estimates KL(pi_theta || pi_masked): monitor that one there
                kl_monitor = kl if estimator == "exact" else stats.kl_ab
                token_loss, entropy_loss, values = _token_terms(
                    config, coefs, logp=stats.logp_a, old_logp=at(old_rows), advantages=at(adv_rows),
                    masked_logp=stats.logp_b, ref_logp=at(ref_rows), entropy=stats.entropy_a,
                    masked_entropy=stats.entropy_b, kl_exact=kl_monitor,
                )
            else:
                token_loss, entropy_loss, values = _token_terms(
                    config, coefs, logp=stats.logp, old_logp=at(old_rows), advantages=at(adv_rows),
                    masked_logp=at(mlogp_rows), ref_logp=at(ref_rows), entropy=stats.entropy,
                )
            loss = _weighted_sum(token_loss, at(weights), entropy_loss, at(entropy_weights))
            return loss, {k: v.sum() for k, v in values.items()}

        common = dict(temperature=config.temperature, backend=self.backend, strategy=self.strategy,
                      chunk_tokens=self.chunk_tokens)
        # an all-masked micro-batch (n == 0) still goes through the kernels, which call loss_fn
        # once on empty stats: loss 0, zero gradients and the usual metric keys
        if two_view:
            loss, sums = fused_two_view_loss(h_a, h_b, lm_head_weight, targets, loss_fn, **common)
        else:
            loss, sums = fused_token_loss(h_a, lm_head_weight, targets, loss_fn, **common)
        count = float(max(n, 1))
        metrics = {k: torch.as_tensor(v).detach() / count for k, v in sums.items()}
        metrics["tokens/count"] = metrics["tokens/count"] * count
        metrics["loss/total"] = loss.detach()
        return LossOutput(loss, metrics)
