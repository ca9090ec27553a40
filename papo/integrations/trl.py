"""PAPO in TRL: `PAPOTrainer`, a GRPOTrainer subclass, and its arguments `PAPOTrainerConfig`.

Written and tested against TRL 1.16.0 (the `papo-kernels[trl]` extra pins it), which had removed
its own experimental PAPOTrainer. What this adds to GRPOTrainer, as the paper does it:

- the masked view: `papo.masking.mask_images` on the raw images of each prompt (14-px tiles
  blackened with p = 0.6), one draw per prompt, shared by all its rollouts, then the same
  image processor as the originals; the originals are never modified;
- the masked log-probs: with the default (official) `masked_view="rollout_no_grad"` one no-grad
  two-view pass per generation batch, right after generation, with the rollout-time weights
  (which also logs the exact full-vocabulary KL and both entropies, the paper's collapse
  monitors); with `masked_view="current_no_grad"` (for `estimator="exact"`) a no-grad pass on
  the masked images at every loss computation;
- the loss: `papo.PAPOLoss` on the last hidden states and the lm_head weight (our kernels, no
  [tokens x vocab] logits), called inside the model's forward so that wrappers that gather
  parameters in forward (DeepSpeed ZeRO-3, FSDP) see the head used there.

What is overridden, and why:

- `_generate_and_score_completions` extends (calls) the parent: the raw images are masked
  before the parent runs, the masked view is processed and scored after it.
- `_compute_loss` is replaced: the parent computes per-token log-probs through TRL's fused head
  and its own loss; PAPO needs the hidden states for `PAPOLoss`. It copies from the parent only
  the concatenation of prompt and completion and the list of multimodal model inputs
  (`_MODEL_INPUT_KEYS`, the keys `_get_per_token_logps_and_entropies` forwards).
- the model's forward gets one keyword, `papo_head`, on top of TRL's fused head (the same
  instance-level patch TRL uses for `fused_lm_head`): with it the forward runs the backbone and
  returns `papo_head(last_hidden_state, lm_head.weight)`.

The loss equals GRPOTrainer's for the loss types it supports when gamma = eta = 0 and
dual_clip=None (tested): "bnpo" (the paper's token mean per micro-batch, our default), "grpo",
"dr_grpo" and "dapo". The removed port's defects do not come back: every term is a mean over
completion tokens only, normalized like the policy term; the images are masked on copies; the
entropy terms (exact estimator) carry gradient; the defaults are the paper's.
"""

from __future__ import annotations

import functools
import hashlib
import types
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

try:
    import transformers
    from packaging.version import Version
    from trl import GRPOConfig, GRPOTrainer
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "papo.integrations.trl needs TRL (tested with trl==1.16.0): pip install 'papo-kernels[trl]'"
    ) from exc

from papo.config import PAPOConfig
from papo.losses import PAPOLoss
from papo.masking import load_image, mask_images
from papo_kernels import two_view_stats

TESTED_TRL_VERSION = "1.16.0"

# GRPOTrainer's loss types that are a weighted token sum PAPOLoss can express, and how
LOSS_TYPES = ("bnpo", "grpo", "dr_grpo", "dapo")

# Multimodal model inputs that GRPOTrainer stores per batch and forwards to the model
# (GRPOTrainer._get_per_token_logps_and_entropies, TRL 1.16).
_MODEL_INPUT_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes",
                     "token_type_ids", "mm_token_type_ids", "image_position_ids", "spatial_shapes")

# The removed TRL port's argument names: (ours, the paper's value, the port's default).
_DEPRECATED = {
    "perception_loss_weight": ("gamma", "0.01 (7B) / 0.02 (3B)", "0.1"),
    "mask_ratio": ("mask_prob", "0.6", "0.3"),
    "der_loss_weight1": ("eta_full", "0.03", "0.03"),
    "der_loss_weight2": ("eta_masked", "0.03", "0.03"),
}


@dataclass
class PAPOTrainerConfig(GRPOConfig):
    """GRPOConfig plus the PAPO terms; defaults are the paper's PAPO-G NRef 7B recipe.

    The clip and aggregation arguments of GRPOConfig keep their meaning and feed the loss:
    `epsilon` / `epsilon_high` are PAPO's clip_low / clip_high, `beta` the reference KL (k3),
    `temperature` the log-prob temperature, `loss_type` one of LOSS_TYPES. Their defaults here
    are the paper's: epsilon_high 0.3 and loss_type "bnpo" (token mean per micro-batch, divided
    by the gradient-accumulation steps, as the official code).
    """

    papo_preset: str = field(default="papo-g-nref-7b", metadata={"help": "papo.PAPOConfig preset the "
                             "PAPO terms start from (gamma 0.01, eta 0.03/0.03, no reference)."})
    gamma: float | None = field(default=None, metadata={"help": "Perception-KL weight (maximized); "
                                "None: the preset's (0.01)."})
    eta_full: float | None = field(default=None, metadata={"help": "Entropy weight, original image "
                                   "(minimized); None: the preset's (0.03)."})
    eta_masked: float | None = field(default=None, metadata={"help": "Entropy weight, masked image "
                                     "(minimized); None: the preset's (0.03)."})
    estimator: str = field(default="sampled", metadata={"help": "'sampled' (official k3 on the sampled "
                           "token) or 'exact' (full-vocabulary KL and entropies)."})
    masked_view: str = field(default="rollout_no_grad", metadata={"help": "'rollout_no_grad' (official: "
                             "masked log-probs once per generation batch) or 'current_no_grad'."})
    kl_prcp_direction: str = field(default="masked_to_full", metadata={"help": "exact estimator only: "
                                   "'masked_to_full' or 'full_to_masked'."})
    dual_clip: float | None = field(default=3.0, metadata={"help": "Dual-clip constant (> 1) for negative "
                                    "advantages (official 3.0); None disables it."})
    mask_patch_size: int = field(default=14, metadata={"help": "Side in pixels of the blackened tiles."})
    mask_prob: float = field(default=0.6, metadata={"help": "Probability that a tile is blackened."})
    papo_backend: str = field(default="auto", metadata={"help": "papo_kernels backend."})
    papo_chunk_tokens: int | None = field(default=None, metadata={"help": "Rows per kernel chunk."})
    # paper defaults for GRPOConfig fields
    epsilon_high: float | None = field(default=0.3, metadata={"help": "Upper clip (official 0.3)."})
    loss_type: str = field(default="bnpo", metadata={"help": f"One of {LOSS_TYPES}."})
    use_bias_correction_kl: bool = field(default=False, metadata={"help": "Must stay False with beta > 0: "
                                         "the official reference KL is plain k3."})
    # the removed TRL PAPOTrainer's names, accepted with a deprecation warning
    perception_loss_weight: float | None = field(default=None, metadata={"help": "Deprecated: gamma."})
    mask_ratio: float | None = field(default=None, metadata={"help": "Deprecated: mask_prob."})
    mask_type: str | None = field(default=None, metadata={"help": "Deprecated and ignored."})
    der_loss_weight1: float | None = field(default=None, metadata={"help": "Deprecated: eta_full."})
    der_loss_weight2: float | None = field(default=None, metadata={"help": "Deprecated: eta_masked."})

    def __post_init__(self) -> None:
        super().__post_init__()
        for old, (new, paper, port) in _DEPRECATED.items():
            value = getattr(self, old)
            if value is None:
                continue
            warnings.warn(
                f"{old} (TRL's removed PAPOTrainer) is deprecated: use {new} (the paper's value: {paper}; "
                f"the removed port defaulted to {port})", FutureWarning, stacklevel=3)
            current = getattr(self, new)
            default = None if new in ("gamma", "eta_full", "eta_masked") else 0.6
            if current is not None and current != default and current != value:
                raise ValueError(f"{old}={value} and {new}={current} disagree; set only {new}")
            setattr(self, new, value)
            setattr(self, old, None)
        if self.mask_type is not None:
            warnings.warn(
                f"mask_type={self.mask_type!r} (TRL's removed PAPOTrainer) is deprecated and ignored: the "
                "masked view is always the paper's (mask_patch_size=14 px black tiles, each with probability "
                "mask_prob=0.6, on the raw images)", FutureWarning, stacklevel=3)
            self.mask_type = None
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES} for PAPOTrainer, got {self.loss_type!r}")
        if self.masked_view == "live":
            raise ValueError("masked_view='live' is not supported by PAPOTrainer (two forwards with "
                             "gradient per micro-batch); use 'rollout_no_grad' or 'current_no_grad'")
        self.to_papo_config()  # validate now: errors name the field

    def to_papo_config(self) -> PAPOConfig:
        """The papo.PAPOConfig of the loss these arguments describe."""
        overrides = {k: getattr(self, k) for k in ("gamma", "eta_full", "eta_masked")
                     if getattr(self, k) is not None}
        agg, scale = {"bnpo": ("token-mean", "microbatch"), "grpo": ("seq-mean-token-mean", "microbatch"),
                      "dr_grpo": ("seq-sum-norm", "microbatch"),
                      "dapo": ("token-mean", "global")}[self.loss_type]
        return PAPOConfig.from_preset(
            self.papo_preset, **overrides,
            estimator=self.estimator, masked_view=self.masked_view, kl_prcp_direction=self.kl_prcp_direction,
            clip_low=self.epsilon, clip_high=self.epsilon if self.epsilon_high is None else self.epsilon_high,
            dual_clip=self.dual_clip, loss_agg=agg, loss_scale=scale,
            seq_sum_norm_divisor=self.max_completion_length if agg == "seq-sum-norm" else None,
            beta=self.beta, ref_kl_estimator="k3", temperature=self.temperature,
            mask_patch_size=self.mask_patch_size, mask_prob=self.mask_prob,
        )


def _unsupported(args: PAPOTrainerConfig) -> list[str]:
    """GRPOConfig options whose loss terms PAPOLoss does not implement."""
    problems = []
    if args.importance_sampling_level != "token":
        problems.append("importance_sampling_level must be 'token'")
    if args.top_entropy_quantile < 1.0:
        problems.append("top_entropy_quantile must be 1.0")
    if args.off_policy_mask_threshold is not None:
        problems.append("off_policy_mask_threshold must be None")
    if args.entropy_coef != 0.0 or args.use_adaptive_entropy:
        problems.append("entropy_coef must be 0 and use_adaptive_entropy False (PAPO minimizes entropy "
                        "with eta_full / eta_masked)")
    if args.delta is not None:
        problems.append("delta (two-sided clipping) must be None; PAPO uses dual_clip")
    if args.use_bias_correction_kl and args.beta != 0.0:
        problems.append("use_bias_correction_kl must be False (the official reference KL is plain k3)")
    if args.use_vllm and args.vllm_importance_sampling_correction:
        problems.append("vllm_importance_sampling_correction must be False")
    return problems


def _add_papo_head(model) -> None:
    """Let `model(..., papo_head=fn)` return fn(last_hidden_state, lm_head.weight).

    Wraps the forward TRL installed (`add_fused_lm_head`), at the instance level as TRL does;
    without `papo_head` the forward is unchanged.
    """
    previous = model.forward
    text_config = model.config.get_text_config()
    # As TRL's fused head: before transformers 5, VLMs expose their language backbone as `model`.
    backbone_attr = "base_model"
    if text_config is not model.config and Version(transformers.__version__) < Version("5.0.0"):
        backbone_attr = "model"

    @functools.wraps(type(model).forward)
    def forward(self, *args, papo_head=None, **kwargs):
        if papo_head is None:
            return previous(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = getattr(self, backbone_attr)(*args, **kwargs).last_hidden_state
        return papo_head(hidden, self.get_output_embeddings().weight)

    model.forward = types.MethodType(forward, model)


def _prompt_images(inputs: list[dict]) -> list[list[Any]] | None:
    """Each example's images, read the way GRPOTrainer reads them ("images" or "image")."""
    if "images" in inputs[0]:
        images = [x.get("images") or [] for x in inputs]
    elif "image" in inputs[0]:
        images = [[x["image"]] if x.get("image") is not None else [] for x in inputs]
    else:
        return None
    return None if all(len(i) == 0 for i in images) else images


def _prompt_digest(example: dict, images: list) -> bytes:
    """Content hash of a prompt and its images: the rollouts of a prompt, which may sit on
    different processes, draw the same mask from it."""
    h = hashlib.sha256(repr(example.get("prompt")).encode())
    for image in images:
        pil = load_image(image)
        h.update(f"{pil.mode}{pil.size}".encode())
        h.update(np.asarray(pil).tobytes())
    return h.digest()


class PAPOTrainer(GRPOTrainer):
    """GRPOTrainer with the PAPO masked view and loss (see the module docstring).

    Takes GRPOTrainer's arguments; `args` must be a PAPOTrainerConfig. The dataset needs
    conversational prompts with images (an "image" or "images" column), as GRPOTrainer's
    multimodal training does.
    """

    def __init__(self, model, reward_funcs=None, args: PAPOTrainerConfig | None = None, **kwargs):
        if args is None:
            args = PAPOTrainerConfig("papo-trainer")
        if not isinstance(args, PAPOTrainerConfig):
            raise TypeError(f"args must be a PAPOTrainerConfig, got {type(args).__name__}")
        problems = _unsupported(args)
        if problems:
            raise ValueError("PAPOTrainer does not implement these GRPOConfig options: "
                             + "; ".join(problems))
        super().__init__(model, reward_funcs, args=args, **kwargs)
        self.papo_config = args.to_papo_config()
        self.papo_loss = PAPOLoss(self.papo_config, backend=args.papo_backend,
                                  chunk_tokens=args.papo_chunk_tokens)
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        _add_papo_head(base)

    # ------------------------------------------------------------------ masked view

    @property
    def _needs_masked_view(self) -> bool:
        c = self.papo_config
        return c.gamma > 0 or c.eta_masked > 0

    def mask_prompt_images(self, inputs: list[dict]) -> list[list[Any]] | None:
        """Masked copies of each example's raw images (the originals are not modified).

        One draw per prompt and step: examples with the same prompt and images (the rollouts of
        a prompt) get the same mask, seeded by (args.seed, global step, content hash).
        """
        images = _prompt_images(inputs)
        if images is None:
            return None
        out = []
        for example, prompt_images in zip(inputs, images):
            if not prompt_images:
                out.append([])
                continue
            digest = _prompt_digest(example, prompt_images)
            rng = np.random.default_rng([self.args.seed, self.state.global_step,
                                         int.from_bytes(digest[:8], "little")])
            out.append(mask_images(list(prompt_images), patch_size=self.args.mask_patch_size,
                                   prob=self.args.mask_prob, generator=rng))
        return out

    def _process_masked(self, masked: list[list[Any]], output: dict) -> Tensor:
        """pixel_values of the masked images through the processor's image processor."""
        flat = [im for prompt_images in masked for im in prompt_images]
        processed = self.processing_class.image_processor(images=flat, return_tensors="pt")
        grid = processed.get("image_grid_thw")
        if grid is None or "image_grid_thw" not in output:
            raise ValueError("PAPOTrainer supports Qwen2-VL-style models (pixel_values with image_grid_thw)")
        if not torch.equal(grid.to(output["image_grid_thw"].device), output["image_grid_thw"]):
            raise RuntimeError("the masked images were processed to a different image grid than the "
                               "originals")
        original = output["pixel_values"]
        return processed["pixel_values"].to(device=original.device, dtype=original.dtype)

    def _generate_and_score_completions(self, inputs: list[dict]) -> dict[str, Any]:
        masked = self.mask_prompt_images(inputs) if self._needs_masked_view else None
        if self._needs_masked_view and masked is None:
            raise ValueError("PAPOTrainer needs prompts with images (an 'image' or 'images' column)")
        output = super()._generate_and_score_completions(inputs)
        if masked is None:
            return output
        masked_pixel_values = self._process_masked(masked, output)
        if self.papo_config.masked_view == "rollout_no_grad":
            mode = "train" if self.model.training else "eval"
            # in chunks of the training micro-batch, as GRPOTrainer's own no-grad passes
            chunks = []
            with torch.no_grad():
                for sub, sub_masked in self._split_batch(output, masked_pixel_values,
                                                         self.args.per_device_train_batch_size):
                    chunks.append(self.papo_token_stats(self.model, sub, sub_masked))
            stats = type(chunks[0])(*(torch.cat(parts) for parts in zip(*chunks)))
            mask = self._completion_mask(output).bool()
            output["masked_per_token_logps"] = stats.logp_b
            for name, values in (("kl_perception_exact", stats.kl_ab),
                                 ("entropy_full_exact", stats.entropy_a),
                                 ("entropy_masked_exact", stats.entropy_b)):
                local = torch.stack([values[mask].sum(), mask.sum().to(values.dtype)])
                totals = self.accelerator.reduce(local, reduction="sum")
                self._metrics[mode][f"rollout/{name}"].append((totals[0] / totals[1].clamp(min=1)).item())
        else:
            # one tensor per example, so that TRL's shuffle and split of the batch keep it aligned
            rows = output["image_grid_thw"].prod(-1).split(output["num_images"])
            output["masked_pixel_values"] = list(masked_pixel_values.split([int(r.sum()) for r in rows]))
        return output

    # ------------------------------------------------------------------ forward passes

    @staticmethod
    def _split_batch(inputs: dict, masked_pixel_values: Tensor, size: int):
        """(sub-batch, its masked pixel_values) for consecutive groups of `size` examples."""
        n = inputs["prompt_ids"].size(0)
        num_images = list(inputs["num_images"])
        rows = inputs["image_grid_thw"].prod(-1).tolist()
        image_bounds = np.cumsum([0, *num_images]).tolist()
        row_bounds = np.cumsum([0, *rows]).tolist()
        per_example = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "tool_mask",
                       "token_type_ids", "mm_token_type_ids")
        for start in range(0, n, size):
            end = min(start + size, n)
            i0, i1 = image_bounds[start], image_bounds[end]
            r0, r1 = row_bounds[i0], row_bounds[i1]
            sub = {k: inputs[k][start:end] for k in per_example if inputs.get(k) is not None}
            sub.update(pixel_values=inputs["pixel_values"][r0:r1],
                       image_grid_thw=inputs["image_grid_thw"][i0:i1], num_images=num_images[start:end])
            yield sub, masked_pixel_values[r0:r1]

    @staticmethod
    def _completion_mask(inputs: dict) -> Tensor:
        mask = inputs["completion_mask"]
        return mask if "tool_mask" not in inputs else mask * inputs["tool_mask"]

    @staticmethod
    def _model_inputs(inputs: dict, pixel_values: Tensor | None = None) -> dict[str, Any]:
        model_inputs = {
            "input_ids": torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1),
            "attention_mask": torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
        }
        for key in _MODEL_INPUT_KEYS:
            if inputs.get(key) is not None:
                model_inputs[key] = inputs[key]
        if pixel_values is not None:
            model_inputs["pixel_values"] = pixel_values
        return model_inputs

    def _completion_hidden(self, model, inputs: dict, pixel_values: Tensor | None = None, head=None):
        """model forward with papo_head: `head(hidden [B, C, H] predicting the completion, weight)`,
        or the hidden states themselves when head is None."""
        n = inputs["completion_ids"].size(1)

        def papo_head(hidden: Tensor, weight: Tensor):
            hidden = hidden[:, -n - 1:-1]  # position t predicts token t + 1
            return hidden if head is None else head(hidden, weight)

        with self.accelerator.autocast():
            return model(**self._model_inputs(inputs, pixel_values), papo_head=papo_head)

    def papo_token_stats(self, model, inputs: dict, masked_pixel_values: Tensor):
        """Per-token statistics of both views on a batch (papo_kernels.two_view_stats, [B, C] each).

        Args:
            model: the policy (possibly wrapped); inputs: a batch as _generate_and_score_completions
                returns it; masked_pixel_values: the processed masked images.

        Returns:
            TwoViewStats(logp_a, logp_b, entropy_a, entropy_b, kl_ab, kl_ba) at the trainer's
            temperature, 0 outside the completion mask; a = original, b = masked image.
        """
        masked_hidden = self._completion_hidden(model, inputs, masked_pixel_values)
        targets = inputs["completion_ids"].masked_fill(self._completion_mask(inputs) == 0, -100)

        def head(hidden, weight):
            return two_view_stats(hidden, masked_hidden.to(hidden.dtype), weight, targets,
                                  temperature=self.papo_config.temperature, backend=self.args.papo_backend)

        return self._completion_hidden(model, inputs, head=head)

    # ------------------------------------------------------------------ loss

    def _compute_loss(self, model, inputs: dict) -> Tensor:
        mode = "train" if self.model.training else "eval"
        mask = self._completion_mask(inputs)
        masked_hidden = None
        if self.papo_config.masked_view == "current_no_grad" and self._needs_masked_view:
            with torch.no_grad():
                masked_pixel_values = torch.cat(inputs["masked_pixel_values"])
                masked_hidden = self._completion_hidden(model, inputs, masked_pixel_values)
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        # GRPOTrainer's "dapo" normalizer: the generation batch's token count, per process and
        # accumulation window
        num_valid_tokens = None
        if self.loss_type == "dapo":
            num_valid_tokens = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                num_valid_tokens = num_valid_tokens * accumulation / self.args.steps_per_generation

        def head(hidden: Tensor, weight: Tensor):
            return self.papo_loss(
                hidden, weight, inputs["completion_ids"], mask, inputs["advantages"],
                old_logp=inputs.get("old_per_token_logps"), masked_hidden=masked_hidden,
                masked_logp=inputs.get("masked_per_token_logps") if masked_hidden is None else None,
                ref_logp=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
                num_valid_tokens=num_valid_tokens, num_micro_batches=accumulation,
            )

        out = self._completion_hidden(model, inputs, head=head)
        count = mask.sum().to(torch.float64)
        for key, value in out.metrics.items():
            if key in ("tokens/count", "loss/total"):
                continue
            # token means of this micro-batch -> token mean over the processes
            totals = self.accelerator.reduce(torch.stack([value.double() * count, count]), reduction="sum")
            self._metrics[mode][key].append((totals[0] / totals[1].clamp(min=1.0)).item())
        return out.loss


__all__ = ["LOSS_TYPES", "PAPOTrainer", "PAPOTrainerConfig", "TESTED_TRL_VERSION"]
