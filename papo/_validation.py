"""Input validation of the PAPO loss's two entry points (`papo_loss` and `PAPOLoss.forward`), kept
apart from the loss so that papo/losses.py reads as the objective. Every check raises a TypeError or
ValueError that names the argument and what was expected (tests/reliability_catalog.py holds the
messages); nothing here changes a value except to normalize it (a 0/1 mask to bool, [B] advantages
broadcast to [B, T], coefficients to `Coefficients`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from papo.config import Coefficients, PAPOConfig


def resolve_coefficients(config: PAPOConfig, coefficients: Any) -> Coefficients:
    """The step's (gamma, eta_full, eta_masked): `coefficients` checked, or the config's values."""
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


def check_count(name: str, value: Any) -> None:
    """A normalization count: a finite number >= 0 or a one-element tensor."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return  # may live on an accelerator after an all-reduce: not synced to check its sign
    # 0 is allowed: a step without completion tokens gives loss 0 (the divisor is clamped to 1);
    # inf is not: it would silently zero the loss
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number >= 0 (or a scalar tensor), got {value!r}")


def check_counts(config: PAPOConfig, agg: str | None, *, num_valid_tokens: Any, num_valid_sequences: Any,
                 num_micro_batches: Any) -> None:
    """The normalization counts that `config.loss_scale` and the aggregation `agg` (default
    config.loss_agg) need are given and valid."""
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
        check_count("num_valid_tokens", num_valid_tokens)
    else:
        if num_valid_sequences is None:
            raise ValueError(
                f"num_valid_sequences is required with loss_scale='global' and loss_agg={agg!r} "
                "(the all-reduced number of sequences of the optimizer step)"
            )
        check_count("num_valid_sequences", num_valid_sequences)


def required_inputs(config: PAPOConfig) -> dict[str, bool]:
    """Which per-token inputs the configured loss needs (coefficient > 0 in the config)."""
    need_masked = config.gamma > 0 or config.eta_masked > 0
    return dict(masked=need_masked, ref=config.beta > 0)


def check_config(config: Any) -> PAPOConfig:
    """`config` itself, if it is a PAPOConfig."""
    if not isinstance(config, PAPOConfig):
        raise TypeError(f"config must be a papo.PAPOConfig, got {type(config).__name__}")
    return config


def check_device(t: Tensor, name: str, device: torch.device, ref_name: str) -> None:
    """`t` is on the device of the argument `ref_name`."""
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {device}: they must match")


def check_mask(mask: Any, shape: torch.Size, name: str, device: torch.device, ref_name: str) -> Tensor:
    """A bool or 0/1 mask of `shape` on `device`, returned as bool."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    check_device(mask, name, device, ref_name)
    if mask.dtype != torch.bool:
        if mask.dtype.is_complex:
            raise TypeError(f"{name} must be a bool or 0/1 numeric tensor, got {mask.dtype}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{name} must contain only 0 and 1")
        mask = mask != 0
    return mask


def check_token_tensor(t: Any, name: str, shape: torch.Size, ref_name: str, device: torch.device,
                       device_name: str) -> None:
    """An optional floating per-token tensor of `shape` (that of `ref_name`) on `device`."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if t.shape != shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(shape)}, got {tuple(t.shape)}")
    check_device(t, name, device, device_name)


def check_advantages(advantages: Any, shape: torch.Size, ref_name: str, device: torch.device,
                     device_name: str) -> Tensor:
    """Return advantages as [B, T] (a [B] tensor is broadcast over each sequence's tokens)."""
    if not isinstance(advantages, Tensor):
        raise TypeError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
    if not advantages.dtype.is_floating_point:
        raise TypeError(f"advantages must be a floating tensor, got {advantages.dtype}")
    check_device(advantages, "advantages", device, device_name)
    if advantages.shape == shape[:1]:
        return advantages.unsqueeze(-1).expand(shape)
    if advantages.shape == shape:
        return advantages
    raise ValueError(
        f"advantages must have shape [B] = {tuple(shape[:1])} or [B, T] = {tuple(shape)} "
        f"(from {ref_name}), got {tuple(advantages.shape)}"
    )


def raise_nonfinite_advantages(advantages: Tensor, bad: Tensor) -> None:
    """ValueError naming the first completion token whose advantage is NaN/Inf (`bad` [B, T])."""
    b, t = (int(i) for i in bad.nonzero()[0])
    where = f"advantages[{b}]" if advantages.dim() == 1 else f"advantages[{b}, {t}]"
    value = advantages[b] if advantages.dim() == 1 else advantages[b, t]
    raise ValueError(f"advantages must be finite on completion tokens; {where} = {float(value)} "
                     f"(completion token [{b}, {t}]): the loss would be NaN")


def check_missing(config: PAPOConfig, required: dict[str, bool], given: dict[str, Any],
                  masked_hint: str) -> None:
    """The inputs the configured terms need (`required`, from `required_inputs`) are in `given`;
    `masked_hint` names the argument that carries the masked view."""
    if required["ref"] and given.get("ref_logp") is None:
        raise ValueError(f"ref_logp is required when config.beta > 0 (beta={config.beta})")
    if required["masked"] and given.get(masked_hint) is None:
        raise ValueError(
            f"{masked_hint} is required with estimator={config.estimator!r}, "
            f"masked_view={config.masked_view!r}, gamma={config.gamma} and "
            f"eta_masked={config.eta_masked}"
        )


def check_papo_loss_inputs(logp: Any, old_logp: Any, advantages: Any, mask: Any, *, config: Any,
                           coefficients: Any, masked_logp: Any, entropy: Any, masked_entropy: Any,
                           kl_prcp: Any, ref_logp: Any) -> tuple[PAPOConfig, Coefficients, Tensor, Tensor]:
    """Validate `papo_loss`'s arguments; returns (config, coefficients, advantages as [B, T], the mask
    as bool)."""
    config = check_config(config)
    coefs = resolve_coefficients(config, coefficients)
    if not isinstance(logp, Tensor):
        raise TypeError(f"logp must be a torch.Tensor, got {type(logp).__name__}")
    if logp.dim() != 2 or not logp.dtype.is_floating_point:
        raise ValueError(f"logp must be a floating [B, T] tensor, got {logp.dtype} {tuple(logp.shape)}")
    shape = logp.shape
    for name, t in (("old_logp", old_logp), ("masked_logp", masked_logp), ("entropy", entropy),
                    ("masked_entropy", masked_entropy), ("kl_prcp", kl_prcp), ("ref_logp", ref_logp)):
        check_token_tensor(t, name, shape, "logp", logp.device, "logp")
    adv = check_advantages(advantages, shape, "logp", logp.device, "logp")
    m = check_mask(mask, shape, "mask", logp.device, "logp")
    # Advantages come from rewards, never from the model: a NaN there is a bug upstream, not a
    # numerical accident the trainer's non-finite-gradient skip is meant to absorb.
    bad_adv = m & ~torch.isfinite(adv)
    if bool(bad_adv.any()):
        raise_nonfinite_advantages(advantages, bad_adv)

    required = required_inputs(config)
    given = dict(masked_logp=masked_logp, entropy=entropy, masked_entropy=masked_entropy,
                 kl_prcp=kl_prcp, ref_logp=ref_logp)
    if config.estimator == "sampled":
        check_missing(config, required, given, "masked_logp")
    else:
        check_missing(config, dict(required, masked=False), given, "masked_logp")
        for name, need in (("kl_prcp", config.gamma > 0), ("entropy", config.eta_full > 0),
                           ("masked_entropy", config.eta_masked > 0)):
            if need and given[name] is None:
                raise ValueError(f"{name} is required with estimator='exact' "
                                 f"(gamma={config.gamma}, eta_full={config.eta_full}, "
                                 f"eta_masked={config.eta_masked})")

    return config, coefs, adv, m


def check_module_inputs(config: Any, coefficients: Any, hidden: Any, lm_head_weight: Any,
                        completion_ids: Any, completion_mask: Any, advantages: Any, *, old_logp: Any,
                        masked_hidden: Any, masked_logp: Any,
                        ref_logp: Any) -> tuple[Coefficients, Tensor, Tensor, Tensor | None]:
    """Validate `PAPOLoss.forward`'s arguments; returns (coefficients, the completion mask as bool,
    advantages as [B, T], masked_hidden: detached for masked_view "current_no_grad")."""
    config = check_config(config)
    coefs = resolve_coefficients(config, coefficients)
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
    check_device(lm_head_weight, "lm_head_weight", hidden.device, "hidden")
    check_device(completion_ids, "completion_ids", hidden.device, "hidden")
    m = check_mask(completion_mask, shape, "completion_mask", hidden.device, "hidden")
    adv = check_advantages(advantages, shape, "hidden.shape[:2]", hidden.device, "hidden")
    for name, t in (("old_logp", old_logp), ("masked_logp", masked_logp), ("ref_logp", ref_logp)):
        check_token_tensor(t, name, shape, "hidden.shape[:2]", hidden.device, "hidden")
    if masked_hidden is not None:
        if not isinstance(masked_hidden, Tensor):
            raise TypeError(f"masked_hidden must be a torch.Tensor, got {type(masked_hidden).__name__}")
        if masked_hidden.shape != hidden.shape:
            raise ValueError(f"masked_hidden must have the shape of hidden {tuple(hidden.shape)}, "
                             f"got {tuple(masked_hidden.shape)}")
        if masked_hidden.dtype != hidden.dtype:
            raise TypeError(f"masked_hidden has dtype {masked_hidden.dtype} but hidden has dtype "
                            f"{hidden.dtype}: they must match")
        check_device(masked_hidden, "masked_hidden", hidden.device, "hidden")
    # Token ids outside the vocabulary would give NaN rows where the kernels skip their own
    # range check (accelerators, to avoid a sync); checked here on completion tokens only, in
    # the same host sync as the advantages, before the loss compacts the tokens (a sync anyway).
    vocab = lm_head_weight.shape[0]
    bad_ids = m & ((completion_ids < 0) | (completion_ids >= vocab))
    bad_adv = m & ~torch.isfinite(adv)
    any_bad_ids, any_bad_adv = torch.stack([bad_ids.any(), bad_adv.any()]).tolist()
    if any_bad_ids:
        b, t = (int(i) for i in bad_ids.nonzero()[0])
        raise ValueError(f"completion_ids must be in [0, {vocab}) (lm_head_weight has V={vocab} rows) on "
                         f"completion tokens; completion_ids[{b}, {t}] = {int(completion_ids[b, t])}")
    if any_bad_adv:
        raise_nonfinite_advantages(advantages, bad_adv)

    required = required_inputs(config)
    given = dict(masked_logp=masked_logp, masked_hidden=masked_hidden, ref_logp=ref_logp)
    if config.masked_view == "rollout_no_grad":
        if masked_hidden is not None:
            raise ValueError(
                "masked_hidden is not used with masked_view='rollout_no_grad': pass the "
                "rollout-time masked log-probs as masked_logp (or choose masked_view="
                "'current_no_grad' / 'live')"
            )
        check_missing(config, required, given, "masked_logp")
    else:
        if masked_logp is not None:
            raise ValueError(
                f"masked_logp is not used with masked_view={config.masked_view!r}: the masked "
                "log-probs come from masked_hidden with the current weights"
            )
        check_missing(config, required, given, "masked_hidden")
        if masked_hidden is not None:
            if config.masked_view == "current_no_grad":
                masked_hidden = masked_hidden.detach()
            elif ((hidden.requires_grad or lm_head_weight.requires_grad)
                  and not masked_hidden.requires_grad):
                raise ValueError(
                    "masked_hidden must require grad with masked_view='live' (compute it with "
                    "the policy in grad mode), or use masked_view='current_no_grad'"
                )

    return coefs, m, adv, masked_hidden
