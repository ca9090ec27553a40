"""The PAPO loss: `papo_loss` on per-token statistics and `PAPOLoss` from hidden states.

Per completion token t of response i the loss to minimize is, term by term in the order the
official code adds them (docs/algorithm.md, "The loss"):

    l_t =   PPOclip_dual(r_t, A_i)        the clipped policy surrogate
          - gamma      KL_prcp_t          the implicit perception loss (maximized)
          + eta_full   H_t                the double entropy regularizer, original image ...
          + eta_masked Hm_t               ... and masked image
          + beta       KL_ref_t           the reference KL, when a reference policy is used

`_token_terms` below computes exactly these terms, in this order. Every aggregation is a weighted
sum  loss = sum_t w_t l_t  with weights fixed up front (`_token_weights`), which is what lets
`PAPOLoss` hand the whole loss to the fused kernels as a per-chunk `loss_fn` without
[tokens x vocab] logits. The entropy terms are token means whatever `loss_agg` says (the official
code averages them with `masked_mean` however the policy loss is averaged), so they carry
token-mean weights u_t:  loss = sum_t w_t l_t + sum_t u_t e_t. Both entry points share
`_token_terms`, so PAPOLoss equals papo_loss applied to the dense statistics of the same logits;
their input checks live in papo/_validation.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from papo._validation import check_config, check_counts, check_module_inputs, check_papo_loss_inputs
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


# ---------------------------------------------------------------------- the objective


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
    # PPOclip_dual(r_t, A_i)
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

    # the values of KL_prcp_t, H_t and Hm_t under the configured estimator
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
    # - gamma KL_prcp_t
    if coefs.gamma != 0:  # skip zero-weight terms: 0 * inf would poison the loss with NaN
        loss = loss - coefs.gamma * kl_prcp
    # + eta_full H_t + eta_masked Hm_t
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
    # + beta KL_ref_t
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


# ---------------------------------------------------------------------- aggregation


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
    check_counts(config, agg, num_valid_tokens=num_valid_tokens, num_valid_sequences=num_valid_sequences,
                 num_micro_batches=num_micro_batches)
    agg, scale = agg or config.loss_agg, config.loss_scale
    token_level = agg == "token-mean"
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


def _weighted_sum(loss: Tensor, weights: Tensor, entropy_loss: Tensor | None,
                  entropy_weights: Tensor | None) -> Tensor:
    """sum_t w_t l_t (+ sum_t u_t e_t when the entropy terms carry their own weights)."""
    total = (weights * loss).sum()
    if entropy_loss is not None:
        total = total + (entropy_weights * entropy_loss).sum()
    return total


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
    config, coefs, adv, m = check_papo_loss_inputs(
        logp, old_logp, advantages, mask, config=config, coefficients=coefficients, masked_logp=masked_logp,
        entropy=entropy, masked_entropy=masked_entropy, kl_prcp=kl_prcp, ref_logp=ref_logp)
    shape = logp.shape
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
        self.config = check_config(config)
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
        # here, not at module top: light users of papo (the grading workers import papo.rewards)
        # never pay for importing the kernels
        from papo_kernels import fused_token_loss, fused_two_view_loss

        config = self.config
        coefs, m, adv, masked_hidden = check_module_inputs(
            config, coefficients, hidden, lm_head_weight, completion_ids, completion_mask, advantages,
            old_logp=old_logp, masked_hidden=masked_hidden, masked_logp=masked_logp, ref_logp=ref_logp)

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
