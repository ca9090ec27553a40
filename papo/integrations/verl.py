"""PAPO in verl 0.9.1: our kernels for the actor's log-probs and entropies, and the PAPO loss.

verl 0.9.1 has no data-parallel actor file any more (actors are engines); this module hooks two
of its extension points, and names a third that it does not use:

1. The fused-kernel forward of Qwen2-VL models (hooked). With `use_fused_kernels`, verl's
   `verl.models.transformers.monkey_patch.patch_forward_with_backends` replaces the model class's
   forward by one that returns per-token `log_probs` and `entropy` instead of logits
   (`verl.models.transformers.qwen2_vl.forward_with_{triton,torch}_backend`), and the engine's
   `FSDPEngineWithLMHead.prepare_model_outputs` reads `output.log_probs` / `output.entropy`.
   `enable()` wraps `patch_forward_with_backends` so that
   `actor_rollout_ref.model.fused_kernel_options.impl_backend=papo` installs `papo_fused_forward`
   for model types "qwen2_vl" and "qwen2_5_vl": the same contract (rolled labels or
   `shift_labels`, `temperature`), computed by `papo_kernels.token_stats` (exact full-vocabulary
   entropy, no [tokens x vocab] logits, gradients to hidden states and lm_head). It runs the
   stock transformers backbone (`self.model`), so it does not need verl's own qwen2_vl module,
   which does not import with transformers >= 5.11.
2. The engine's loss-function interface (hooked): `TrainingWorker.set_loss_fn(fn)` with
   `fn(model_output, data, dp_group)`, which `ActorRolloutRefWorker` fills with
   `functools.partial(verl.workers.utils.losses.ppo_loss, config=actor_config)`. `papo_ppo_loss`
   has that signature and computes `papo.papo_loss` (the official "sampled" estimator) from the
   model output and the batch; `enable()` makes it the `ppo_loss` that the workers bind.
3. The policy-loss registry (`verl.trainer.ppo.core_algos.register_policy_loss`): not hooked.
   A registered PolicyLossFn receives only old/new log-probs, advantages, the response mask, the
   aggregation mode and the actor config, so the masked-image log-probs cannot reach it.

The masked view itself is the driver's job, as in the official code (`compute_log_probs_aug`):
mask each prompt's raw images once (`masked_multi_modal_inputs`, shared by the prompt's
rollouts), run `compute_log_prob` on the batch with those multi-modal inputs (rollout-time
weights, no grad), and store the result as `masked_log_probs` in the batch.

In each verl worker process call `enable(papo_config)` (for instance from a module named in
`actor_rollout_ref.model.external_lib`). Importing this module never imports verl.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
from torch import Tensor

from papo.config import PAPOConfig
from papo.losses import papo_loss
from papo.masking import mask_images

TESTED_VERL_VERSION = "0.9.1"
PAPO_BACKEND = "papo"
QWEN2_VL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")

# verl loss_agg_mode -> papo loss_agg
_LOSS_AGG = {"token-mean": "token-mean", "seq-mean-token-mean": "seq-mean-token-mean",
             "seq-mean-token-sum": "seq-mean-token-sum", "seq-mean-token-sum-norm": "seq-sum-norm"}
# verl kl_loss_type -> papo ref_kl_estimator
_KL_TYPES = {"low_var_kl": "k3", "k3": "k3", "kl": "k1", "k1": "k1", "mse": "k2", "k2": "k2"}

_state: dict[str, Any] = {}


# ---------------------------------------------------------------------- fused forward


@functools.cache
def _output_class():
    from transformers.utils import ModelOutput

    @dataclasses.dataclass
    class PAPOOutputForPPO(ModelOutput):
        """What verl's engine reads from a fused forward: per-token log-probs and entropies."""

        log_probs: Tensor | None = None
        entropy: Tensor | None = None
        hidden_states: tuple[Tensor, ...] | None = None

    return PAPOOutputForPPO


def papo_fused_forward(self, input_ids: Tensor | None = None, labels: Tensor | None = None,
                       temperature: float = 1.0, shift_labels: Tensor | None = None, **kwargs):
    """Forward of a Qwen2-VL / Qwen2.5-VL model for verl's fused-kernel path, by papo_kernels.

    The contract of verl 0.9.1's `qwen2_vl.forward_with_triton_backend`: the label of position t
    is `shift_labels[t]` if given, else `labels[t + 1]`, else `input_ids[t + 1]` (rolled); the
    backbone gets every other keyword (attention_mask, position_ids, pixel_values,
    image_grid_thw, ...).

    Returns:
        An output with `log_probs` and `entropy` shaped like input_ids (float32; float64 for a
        float64 model), differentiable w.r.t. the backbone and the lm_head weight.
    """
    from papo_kernels import token_stats

    if shift_labels is not None:
        rolled = shift_labels
    elif labels is not None:
        rolled = torch.roll(labels, shifts=-1, dims=-1)
    elif input_ids is not None:
        rolled = torch.roll(input_ids, shifts=-1, dims=-1)
    else:
        raise ValueError("papo_fused_forward needs input_ids, labels or shift_labels")
    kwargs.pop("use_cache", None)
    outputs = self.model(input_ids=input_ids, use_cache=False, **kwargs)
    hidden = outputs.last_hidden_state
    backend = _state.get("backend", "auto")
    stats = token_stats(hidden, self.lm_head.weight, rolled.to(hidden.device), temperature=float(temperature),
                        backend=backend)
    return _output_class()(log_probs=stats.logp, entropy=stats.entropy, hidden_states=outputs.hidden_states)


def install_fused_forward(model) -> None:
    """Make `model`'s class forward `papo_fused_forward` (verl patches the class as well)."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in QWEN2_VL_MODEL_TYPES:
        raise ValueError(f"fused_kernels_backend='{PAPO_BACKEND}' supports model types "
                         f"{QWEN2_VL_MODEL_TYPES}, "
                         f"got {model_type!r}")
    model._verl_fused_kernels_backend = PAPO_BACKEND
    model.__class__.forward = papo_fused_forward


# ---------------------------------------------------------------------- loss


def _papo_config_for(config, papo_config: PAPOConfig, response_length: int) -> PAPOConfig:
    """papo_config with verl's actor settings for the PPO parts (clip, aggregation, reference KL)."""
    if papo_config.estimator != "sampled" or papo_config.masked_view != "rollout_no_grad":
        raise ValueError("verl's loss interface sees per-token log-probs, not hidden states: use "
                         "estimator='sampled' with masked_view='rollout_no_grad' (the official PAPO)")
    policy_loss = config.policy_loss
    loss_mode = "vanilla" if policy_loss is None else policy_loss.get("loss_mode", "vanilla")
    if loss_mode != "vanilla":
        raise ValueError("papo_ppo_loss replaces the vanilla PPO objective; got "
                         f"policy_loss.loss_mode={loss_mode!r}")
    if config.entropy_coeff != 0:
        raise ValueError(f"actor entropy_coeff must be 0 with PAPO (got {config.entropy_coeff}): PAPO "
                         "minimizes "
                         "entropy with eta_full / eta_masked")
    if config.loss_agg_mode not in _LOSS_AGG:
        raise ValueError(f"loss_agg_mode must be one of {sorted(_LOSS_AGG)} with PAPO, "
                         f"got {config.loss_agg_mode!r}")
    if config.use_kl_loss and config.kl_loss_type not in _KL_TYPES:
        raise ValueError(f"kl_loss_type must be one of {sorted(_KL_TYPES)} with PAPO, "
                         f"got {config.kl_loss_type!r}")
    clip = config.clip_ratio
    agg = _LOSS_AGG[config.loss_agg_mode]
    return dataclasses.replace(
        papo_config,
        clip_low=clip if config.clip_ratio_low is None else config.clip_ratio_low,
        clip_high=clip if config.clip_ratio_high is None else config.clip_ratio_high,
        dual_clip=config.get("clip_ratio_c", 3.0),
        loss_agg=agg,
        seq_sum_norm_divisor=(config.loss_scale_factor or response_length) if agg == "seq-sum-norm" else None,
        beta=config.kl_loss_coef if config.use_kl_loss else 0.0,
        ref_kl_estimator=_KL_TYPES.get(config.kl_loss_type, "k3"),
    )


def papo_ppo_loss(config, model_output: dict, data, dp_group=None, *, papo_config: PAPOConfig):
    """The PAPO loss in verl's engine loss-function interface (replaces `verl...losses.ppo_loss`).

    Args:
        config: verl's ActorConfig (clip ratios, loss_agg_mode, use_kl_loss, kl_loss_coef, ...).
        model_output: the engine's output: "log_probs" (with grad) and, if computed, "entropy"
            (logged as the exact entropy), in verl's no-padding layout.
        data: the micro-batch TensorDict: "response_mask", "old_log_probs", "advantages",
            "masked_log_probs" (needed when gamma > 0 or eta_masked > 0), "ref_log_prob" (with
            use_kl_loss), and the global batch info "dp_size", "batch_num_tokens",
            "global_batch_size".
        dp_group: unused (the normalizers come in the batch).
        papo_config: the PAPO terms (gamma, etas; estimator "sampled", masked_view
            "rollout_no_grad"); verl's config sets the clip, aggregation and reference KL.

    Returns:
        (loss, metrics) as verl's ppo_loss: the loss of the micro-batch normalized by the global
        token (or sequence) count times dp_size, so that FSDP's gradient average gives the
        global mean; metrics under "actor/..." names, including the official
        "actor/kl_prcp_loss" (= -KL_prcp), "actor/ori_entropy_loss", "actor/aug_entropy_loss".
    """
    from verl.utils.metric import AggregationType, Metric
    from verl.workers.utils.padding import no_padding_2_padding

    log_prob = no_padding_2_padding(model_output["log_probs"], data)
    entropy = model_output.get("entropy")
    if entropy is not None:
        entropy = no_padding_2_padding(entropy, data)
    dp_size = data["dp_size"]
    batch_num_tokens = data["batch_num_tokens"]
    global_batch_size = data["global_batch_size"]

    fields = ["response_mask", "old_log_probs", "advantages"]
    if "masked_log_probs" in data.keys():
        fields.append("masked_log_probs")
    if config.use_kl_loss:
        fields.append("ref_log_prob")
    batch = data.select(*fields).to_padded_tensor()
    mask = batch["response_mask"].to(torch.bool)
    effective = _papo_config_for(config, papo_config, mask.shape[-1])
    # as verl's agg_loss: the global count when the batch carries it, else this micro-batch's
    count = batch_num_tokens if effective.loss_agg == "token-mean" else global_batch_size
    effective = dataclasses.replace(effective, loss_scale="microbatch" if count is None else "global")
    # verl's agg_loss: local sum / global count * dp_size, then FSDP averages over dp ranks
    tokens = None if batch_num_tokens is None else batch_num_tokens / dp_size
    sequences = None if global_batch_size is None else global_batch_size / dp_size
    out = papo_loss(
        log_prob, batch["old_log_probs"], batch["advantages"], mask, config=effective,
        masked_logp=batch["masked_log_probs"] if "masked_log_probs" in fields else None, entropy=entropy,
        ref_logp=batch["ref_log_prob"] if config.use_kl_loss else None,
        num_valid_tokens=tokens, num_valid_sequences=sequences, num_micro_batches=1,
    )
    mean = AggregationType.MEAN
    m = out.metrics
    metrics = {f"actor/papo/{k}": Metric(value=float(v), aggregation=mean) for k, v in m.items()}
    metrics["actor/pg_loss"] = Metric(value=float(m["loss/policy"]), aggregation=mean)
    clipped = float(m["clip/frac_low"] + m["clip/frac_high"])
    metrics["actor/pg_clipfrac"] = Metric(value=clipped, aggregation=mean)
    metrics["actor/pg_clipfrac_lower"] = Metric(value=float(m["clip/frac_dual"]), aggregation=mean)
    metrics["actor/ppo_kl"] = Metric(value=float(m["kl/old"]), aggregation=mean)
    for name, key, sign in (("actor/kl_prcp_loss", "kl/perception", -1.0),
                            ("actor/ori_entropy_loss", "entropy/full", 1.0),
                            ("actor/aug_entropy_loss", "entropy/masked", 1.0)):
        if key in m:
            metrics[name] = Metric(value=sign * float(m[key]), aggregation=mean)
    return out.loss, metrics


# ---------------------------------------------------------------------- masked view


def masked_multi_modal_inputs(images, processor, *, generator, patch_size: int = 14, prob: float = 0.6):
    """The multi-modal model inputs of one prompt's masked images (the paper's raw-image masking).

    Args:
        images: the prompt's raw images (PIL, bytes, {"bytes", "path"} dicts or paths).
        processor: the model's processor (its `image_processor` is applied, as to the originals).
        generator: numpy Generator / RandomState or int seed (one draw per prompt: reuse the
            result for all rollouts of the prompt).
        patch_size, prob: the tiles and their masking probability (official 14, 0.6).

    Returns:
        dict with "pixel_values" and "image_grid_thw" (the same grid as the originals').
    """
    masked = mask_images(list(images), patch_size=patch_size, prob=prob, generator=generator)
    processed = processor.image_processor(images=masked, return_tensors="pt")
    return {k: processed[k] for k in ("pixel_values", "image_grid_thw")}


# ---------------------------------------------------------------------- enable / disable


def enable(papo_config: PAPOConfig | None = None, *, backend: str = "auto") -> list[str]:
    """Hook verl (in this process): the "papo" fused-kernel backend and the PAPO loss.

    Args:
        papo_config: the PAPO terms for `papo_ppo_loss`; None: PAPOConfig.from_preset("papo-g-nref-7b").
        backend: papo_kernels backend of the fused forward.

    Returns:
        The names of the verl attributes that were replaced. `disable()` restores them.
    """
    import sys

    import verl
    import verl.models.transformers.monkey_patch as monkey_patch
    import verl.workers.utils.losses as losses

    if verl.__version__ != TESTED_VERL_VERSION:
        import warnings

        warnings.warn(f"papo.integrations.verl was tested with verl {TESTED_VERL_VERSION}, this is "
                      f"{verl.__version__}", RuntimeWarning, stacklevel=2)
    disable()
    papo_config = papo_config or PAPOConfig.from_preset("papo-g-nref-7b")
    _state["backend"] = backend
    original_patch = monkey_patch.patch_forward_with_backends

    @functools.wraps(original_patch)
    def patch_forward_with_backends(model, use_fused_kernels=False, fused_kernels_backend=None):
        if use_fused_kernels and fused_kernels_backend == PAPO_BACKEND:
            return install_fused_forward(model)
        return original_patch(model, use_fused_kernels=use_fused_kernels,
                              fused_kernels_backend=fused_kernels_backend)

    loss = functools.partial(papo_ppo_loss, papo_config=papo_config)
    patches = [(monkey_patch, "patch_forward_with_backends", patch_forward_with_backends),
               (losses, "ppo_loss", loss)]
    # modules that already bound `ppo_loss` by name (the workers, the distillation loss)
    for name in ("verl.workers.engine_workers", "verl.trainer.distillation.losses"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "ppo_loss"):
            patches.append((module, "ppo_loss", loss))
    replaced = []
    for module, attr, value in patches:
        _state.setdefault("saved", []).append((module, attr, getattr(module, attr)))
        setattr(module, attr, value)
        replaced.append(f"{module.__name__}.{attr}")
    return replaced


def disable() -> None:
    """Undo `enable()` (the model classes already patched keep their forward)."""
    for module, attr, value in reversed(_state.pop("saved", [])):
        setattr(module, attr, value)
    _state.pop("backend", None)
