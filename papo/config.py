"""PAPOConfig: every knob of the PAPO loss, validated, plus the presets of the released checkpoints.

The defaults are the official code's, i.e. the PAPO-G NRef 7B recipe (docs/algorithm.md,
"Presets" and "Recipe defaults").
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, NamedTuple

ESTIMATORS = ("sampled", "exact")
KL_PRCP_DIRECTIONS = ("masked_to_full", "full_to_masked")
MASKED_VIEWS = ("rollout_no_grad", "current_no_grad", "live")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-sum-norm")
LOSS_SCALES = ("microbatch", "global")
GAMMA_SCHEDULES = ("fixed", "linear")
REF_KL_ESTIMATORS = ("k1", "k2", "k3")


class Coefficients(NamedTuple):
    """The step-dependent loss coefficients (see `PAPOConfig.coefficients`)."""

    gamma: float
    eta_full: float
    eta_masked: float


@dataclass(kw_only=True, frozen=True)
class PAPOConfig:
    """Configuration of the PAPO loss (`papo.papo_loss`, `papo.PAPOLoss`).

    Build one directly, or from a released recipe with `PAPOConfig.from_preset(name)`.
    Every field is validated in `__post_init__`; a bad value raises ValueError/TypeError
    naming the field.
    """

    estimator: str = "sampled"
    """"sampled": the official code bit for bit (k3 of the sampled token for KL_prcp, mean of
    -logp of sampled tokens as "entropy"). "exact": full-vocabulary KL_prcp and entropies
    (the expected gradients of the unclamped sampled terms, without sampling noise; the official k3
    is clamped at 10, so its expected gradient differs: docs/algorithm.md "Two estimators")."""

    kl_prcp_direction: str = "masked_to_full"
    """exact only. "masked_to_full": KL(pi_masked || pi_theta), whose gradient (masked view
    detached) is the expected gradient of the official sampled k3 without its clamp. "full_to_masked":
    KL(pi_theta || pi_masked), the paper's literal form; experimental with masked_view="live"."""

    masked_view: str = "rollout_no_grad"
    """Where the masked-image distribution comes from. "rollout_no_grad": log-probs computed
    once per rollout step with the pre-update weights, no grad (official; pass masked_logp).
    "current_no_grad": the current weights, no grad (pass masked_hidden computed without grad).
    "live": the current weights with gradient through the masked pass (experimental)."""

    clip_low: float = 0.2
    """PPO lower clip: ratios are clipped at 1 - clip_low. In [0, 1)."""

    clip_high: float = 0.3
    """PPO upper clip (DAPO clip-higher): ratios are clipped at 1 + clip_high. >= 0."""

    dual_clip: float | None = 3.0
    """Dual-clip constant c (> 1) bounding the loss of negative-advantage tokens by -c * A;
    None disables it."""

    loss_agg: str = "token-mean"
    """How per-token losses are averaged (the same weights apply to every term except the two
    entropy terms, which are token means whatever this says, as in the official code):
    "token-mean": sum over tokens / number of tokens (official);
    "seq-mean-token-mean": mean over sequences of each sequence's token mean (the paper's
    1/|o_i| formula); "seq-mean-token-sum": mean over sequences of each sequence's token sum;
    "seq-sum-norm": Dr.GRPO, token sum / (number of sequences * seq_sum_norm_divisor)."""

    loss_scale: str = "microbatch"
    """"microbatch" (official): normalize within the micro-batch, then divide by
    num_micro_batches (gradient accumulation). "global": normalize by the optimizer step's
    all-reduced count (num_valid_tokens for token-mean, num_valid_sequences for the
    sequence-level aggregations) so micro-batches accumulate to the full-batch gradient."""

    gamma: float = 0.01
    """Weight of the perception KL (maximized: the loss has -gamma * KL_prcp). >= 0."""

    gamma_schedule: str = "fixed"
    """"fixed" or "linear" (official "annealing": gamma goes linearly to gamma_end over
    gamma_anneal_ratio * total_steps, and the same discount gamma_t / gamma scales both etas)."""

    gamma_end: float = 0.0
    """Final gamma of the linear schedule (official default end_value 0.0). >= 0."""

    gamma_anneal_ratio: float = 0.5
    """Fraction of total_steps over which gamma is annealed (official default 0.5). In (0, 1]."""

    online_filter: tuple[float, float] | None = None
    """DAPO dynamic sampling: keep groups whose mean accuracy is strictly inside (low, high);
    None disables it. Applied by the trainer with `papo.advantages.online_filter`."""

    seq_sum_norm_divisor: int | None = None
    """Dr.GRPO's constant divisor for loss_agg="seq-sum-norm" (the max response length);
    required with that aggregation, unused otherwise."""

    eta_full: float = 0.03
    """Weight of the entropy of the full-image distribution (minimized). >= 0."""

    eta_masked: float = 0.03
    """Weight of the entropy of the masked-image distribution (minimized). >= 0. With the
    official masked_view="rollout_no_grad" this term is a constant (no gradient)."""

    beta: float = 0.0
    """Weight of the reference-policy KL (0: no reference model, the "NRef" recipe). >= 0."""

    ref_kl_estimator: str = "k3"
    """Estimator of KL(pi_theta || pi_ref) on sampled tokens: "k1" (logp - ref), "k2"
    (0.5 (logp - ref)^2), "k3" (official low_var_kl, with its clamps)."""

    temperature: float = 1.0
    """Logits are divided by it in every log-prob pass (the rollout temperature). > 0."""

    mask_patch_size: int = 14
    """Side in pixels of the square tiles blackened by `papo.masking.mask_images`. > 0."""

    mask_prob: float = 0.6
    """Probability that each tile is blackened (official black_prob 0.6). In [0, 1]."""

    preset: str | None = field(default=None, compare=False)
    """Name of the preset this config was built from (informational)."""

    def __post_init__(self) -> None:
        _check_choice("estimator", self.estimator, ESTIMATORS)
        _check_choice("kl_prcp_direction", self.kl_prcp_direction, KL_PRCP_DIRECTIONS)
        _check_choice("masked_view", self.masked_view, MASKED_VIEWS)
        _check_choice("loss_agg", self.loss_agg, LOSS_AGGS)
        _check_choice("loss_scale", self.loss_scale, LOSS_SCALES)
        _check_choice("gamma_schedule", self.gamma_schedule, GAMMA_SCHEDULES)
        _check_choice("ref_kl_estimator", self.ref_kl_estimator, REF_KL_ESTIMATORS)
        # log(1 - clip_low) must exist, hence the open upper bound.
        _check_float("clip_low", self.clip_low, lo=0.0, hi=1.0, hi_open=True)
        _check_float("clip_high", self.clip_high, lo=0.0)
        if self.dual_clip is not None:
            _check_float("dual_clip", self.dual_clip, lo=1.0, lo_open=True)
        for name in ("gamma", "gamma_end", "eta_full", "eta_masked", "beta"):
            _check_float(name, getattr(self, name), lo=0.0)
        _check_float("gamma_anneal_ratio", self.gamma_anneal_ratio, lo=0.0, hi=1.0, lo_open=True)
        _check_float("temperature", self.temperature, lo=0.0, lo_open=True)
        _check_float("mask_prob", self.mask_prob, lo=0.0, hi=1.0)
        _check_int("mask_patch_size", self.mask_patch_size, lo=1)
        if self.seq_sum_norm_divisor is not None:
            _check_int("seq_sum_norm_divisor", self.seq_sum_norm_divisor, lo=1)
        elif self.loss_agg == "seq-sum-norm":
            # A per-micro-batch fallback (the padded length) would vary between micro-batches
            # and defeat Dr.GRPO's constant normalization.
            raise ValueError(
                "seq_sum_norm_divisor must be set with loss_agg='seq-sum-norm' (Dr.GRPO's "
                "constant divisor; use the maximum response length)"
            )
        if self.online_filter is not None:
            of = self.online_filter
            if not isinstance(of, (tuple, list)) or len(of) != 2:
                raise ValueError(f"online_filter must be None or a (low, high) pair, got {of!r}")
            _check_float("online_filter[0]", of[0], lo=0.0, hi=1.0)
            _check_float("online_filter[1]", of[1], lo=0.0, hi=1.0)
            if not of[0] < of[1]:
                raise ValueError(f"online_filter must have low < high, got {tuple(of)}")
            object.__setattr__(self, "online_filter", (float(of[0]), float(of[1])))  # frozen
        if self.estimator == "exact" and self.masked_view == "rollout_no_grad":
            # The rollout-time weights are gone after the first mini-batch, so the full masked
            # distribution cannot be recomputed; only its sampled log-probs were stored.
            raise ValueError(
                "masked_view='rollout_no_grad' is not available with estimator='exact': "
                "use masked_view='current_no_grad' (detached) or 'live'"
            )

    # ------------------------------------------------------------------ schedule

    def coefficients(self, step: int, total_steps: int) -> Coefficients:
        """gamma and the etas for a rollout step (official `AnnealingKLController`).

        Args:
            step: number of rollout steps already taken (0 for the first step), int >= 0.
            total_steps: total rollout steps of the run, int >= 1.

        Returns:
            Coefficients(gamma, eta_full, eta_masked). With gamma_schedule="linear",
            gamma_t = gamma + (gamma_end - gamma) * min(step / A, 1) with
            A = max(1, int(total_steps * gamma_anneal_ratio)), and both etas are scaled by
            gamma_t / gamma (as the official code does); "fixed" returns the fields as they are.
        """
        _check_int("step", step, lo=0)
        _check_int("total_steps", total_steps, lo=1)
        if self.gamma_schedule == "fixed" or self.gamma == 0.0:
            return Coefficients(self.gamma, self.eta_full, self.eta_masked)
        anneal_steps = max(1, int(total_steps * self.gamma_anneal_ratio))
        progress = min(step / anneal_steps, 1.0)
        gamma_t = self.gamma + (self.gamma_end - self.gamma) * progress
        discount = gamma_t / self.gamma
        return Coefficients(gamma_t, self.eta_full * discount, self.eta_masked * discount)

    # ------------------------------------------------------------------ presets

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> PAPOConfig:
        """Build the config of a released recipe; keyword overrides replace its fields.

        Args:
            name: one of `PAPOConfig.presets()`: "papo-g-nref-7b", "papo-g-3b", "papo-g-7b",
                "papo-g-h-7b", "papo-d-7b", "grpo" (see each `_preset_*` docstring for the
                paper table row it reproduces).
            **overrides: PAPOConfig fields to change.

        Returns:
            A validated PAPOConfig.
        """
        if not isinstance(name, str) or name not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(_PRESETS)}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown PAPOConfig field(s) in overrides: {sorted(unknown)}")
        fields = dict(_PRESETS[name]())
        fields.update(overrides)
        fields["preset"] = name
        return cls(**fields)

    @staticmethod
    def presets() -> tuple[str, ...]:
        """Names accepted by `from_preset`."""
        return tuple(_PRESETS)


# ---------------------------------------------------------------------- presets


def _preset_papo_g_nref_7b() -> dict:
    """PAPO-G NRef 7B (`PAPO-G-NRef-Qwen2.5-VL-7B`, the target model).

    Script `examples/papo_grpo/qwen2_5_vl_7b_grpo_papo_no_kl_ref.sh`: gamma 0.01, no reference
    model, double entropy eta 0.03/0.03, clip 0.2/0.3, dual clip 3. Reproduces the paper's
    "PAPO + No KL_ref 7B" row (remove-KL_ref table: 61.47 overall avg@8).
    """
    return dict(gamma=0.01, beta=0.0, eta_full=0.03, eta_masked=0.03)


def _preset_papo_g_3b() -> dict:
    """PAPO-G 3B (`PAPO-G-Qwen2.5-VL-3B`).

    Script `examples/papo_grpo/qwen2_5_vl_3b_grpo_papo.sh`: gamma 0.01, reference KL
    (low_var_kl) 0.01, no entropy terms. Reproduces the gamma-sweep row "gamma = 0.01" (3B,
    49.26 overall); the main table's PAPO_G-3B row (49.92) is the gamma = 0.02 run
    (override gamma=0.02).
    """
    return dict(gamma=0.01, beta=0.01, eta_full=0.0, eta_masked=0.0)


def _preset_papo_g_7b() -> dict:
    """PAPO-G 7B (`PAPO-G-Qwen2.5-VL-7B`).

    Script `examples/papo_grpo/qwen2_5_vl_7b_grpo_papo.sh`: gamma 0.01, reference KL 0.01, no
    entropy terms. Reproduces the masking ablation's "random @ 0.6" 7B row (60.86 overall).
    """
    return dict(gamma=0.01, beta=0.01, eta_full=0.0, eta_masked=0.0)


def _preset_papo_g_h_7b() -> dict:
    """PAPO-G high-gamma 7B with double entropy ("PAPO_H w/ Double Ent").

    `..._grpo_papo_high.sh` (gamma 0.02, reference KL 0.01) plus both entropy terms at 0.03,
    which the released script does not set. Reproduces the paper's headline main-table
    PAPO_G-7B row (61.66 overall), equal to the regularization table's double-entropy row.
    """
    return dict(gamma=0.02, beta=0.01, eta_full=0.03, eta_masked=0.03)


def _preset_papo_d_7b() -> dict:
    """PAPO-D 7B (`examples/papo_dapo/qwen2_5_vl_7b_dapo_papo.sh` + `config_dapo_papo.yaml`).

    gamma 0.01, no reference model, eta 0.03/0.03, clip-high 0.28, online filtering of groups
    with mean accuracy outside (0.01, 0.99). Reproduces the main-table PAPO_D-7B row (63.16).
    """
    return dict(gamma=0.01, beta=0.0, eta_full=0.03, eta_masked=0.03, clip_high=0.28,
                online_filter=(0.01, 0.99))


def _preset_grpo() -> dict:
    """GRPO baseline: no PAPO terms (gamma = eta = 0), reference KL 0.01 (EasyR1's default
    kl_coef with low_var_kl), clip 0.2/0.3, dual clip 3. Reproduces the main-table GRPO-3B and
    GRPO-7B rows (47.92 / 58.78 overall); override beta=0.0 for "GRPO + No KL_ref".
    """
    return dict(gamma=0.0, beta=0.01, eta_full=0.0, eta_masked=0.0)


_PRESETS = {
    "papo-g-nref-7b": _preset_papo_g_nref_7b,
    "papo-g-3b": _preset_papo_g_3b,
    "papo-g-7b": _preset_papo_g_7b,
    "papo-g-h-7b": _preset_papo_g_h_7b,
    "papo-d-7b": _preset_papo_d_7b,
    "grpo": _preset_grpo,
}


# ---------------------------------------------------------------------- validation helpers


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_float(name: str, value: Any, *, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, hi_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and (value >= hi if hi_open else value > hi):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {value}")


def _check_int(name: str, value: Any, *, lo: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
