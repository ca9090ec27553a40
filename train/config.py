"""The trainer's configuration: typed sections, YAML loading, `key=value` overrides.

A run is described by one `RunConfig` made of `@dataclass(kw_only=True)`
sections (torchtitan style), each field documented by the string under it and
validated in `__post_init__`. `load_config(path, overrides)` reads a YAML file
whose top-level keys are the section names, applies command-line overrides
such as `optim.lr=1e-6` or `papo.gamma=0.02`, and raises `ConfigError` naming
the dotted key for unknown keys, wrong types and out-of-range values. The
resolved config is written with the run (`save_config`) so a run can be
reproduced from its directory alone.

The `papo` section holds a preset name plus any `papo.PAPOConfig` field; it is
validated by building the PAPOConfig (`RunConfig.papo_config()`).

`python -m train.config [--config FILE]` prints every field with its doc.
"""

import ast
import dataclasses
import inspect
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from papo import PAPOConfig
from train.tiny import TinyModelSpec


class ConfigError(ValueError):
    """A bad configuration value or key; the message names the dotted key."""


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


# --------------------------------------------------------------------------- sections


@dataclass(kw_only=True)
class LoRAConfig:
    """Low-rank adapters (peft) on the language model's linear layers; rank 0 disables them.

    With LoRA only the adapters train: the vision tower, the embeddings and the lm_head stay
    frozen (so the fused loss computes no dW), the HF export merges the adapters into plain
    Qwen2.5-VL weights, and checkpoints hold the adapters with the frozen base. The supervised
    warm start (`sft.steps` > 0) runs before the adapters exist and is full fine-tuning."""

    rank: int = 0
    """Adapter rank r (0: full fine-tuning, no adapters)."""
    alpha: float = 16.0
    """Scaling numerator: the update is (alpha / r) * B @ A."""
    dropout: float = 0.0
    """Dropout on the adapters' input (keep 0 for exact on-policy ratios on the first
    mini-batch: dropout makes the update forward differ from the no-grad log-prob pass)."""
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Names of the language model's linear layers that get adapters (the vision tower's
    layers of the same names are never adapted)."""

    def __post_init__(self) -> None:
        _require(self.rank >= 0, "model.lora.rank", f"must be >= 0, got {self.rank}")
        _require(self.alpha > 0, "model.lora.alpha", f"must be > 0, got {self.alpha}")
        _require(0 <= self.dropout < 1, "model.lora.dropout", f"must be in [0, 1), got {self.dropout}")
        allowed = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        _require(len(self.target_modules) > 0, "model.lora.target_modules", "must not be empty")
        for name in self.target_modules:
            _require(name in allowed, "model.lora.target_modules",
                     f"unknown layer {name!r}; choose from {allowed}")


@dataclass(kw_only=True)
class ModelConfig:
    """Which model to train and how its weights are held."""

    path: str = ""
    """Local directory of a Qwen2.5-VL checkpoint (config, weights, processor). Empty: build
    the tiny random-init model of `tiny` into `<out_dir>/tiny_model` (never downloads)."""
    tiny: TinyModelSpec = field(default_factory=TinyModelSpec)
    """Shape of the tiny model (used only when `path` is empty)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype. "bfloat16" runs DeepSpeed bf16 with fp32 master weights (lr 1e-6
    updates vanish if the weights themselves are bf16). Micro-batch gradients are summed in
    the dtype DeepSpeed picks for the ZeRO stage (bf16 at ZeRO-0, where its FP16_Optimizer
    path holds the fp32 masters); the 3B/7B recipes use ZeRO-3."""
    freeze_vision_tower: bool = False
    """Freeze the vision encoder (the official recipe trains it)."""
    gradient_checkpointing: bool = False
    """Recompute decoder activations in backward (the official recipe enables it at 7B)."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel; packed micro-batches need "sdpa" or "flash_attention_2"."""
    fp32_lm_head: bool = False
    """Compute the head in fp32 in bf16 runs: every log-prob, entropy and KL pass (and the
    loss) multiplies fp32 upcasts of the hidden states and of the head's bf16 working weight,
    so the [tokens x vocab] logits are fp32 GEMM results instead of bf16-input GEMMs with fp32
    accumulation; the head's update still lands in DeepSpeed's fp32 master weight. Costs an
    fp32 copy of the head weight per call (2.2 GB at 7B) and fp32 GEMM speed. No effect in
    float32 runs. Rollouts sample from the model's own head."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """Optional LoRA adapters (`lora.rank` > 0)."""
    ref_offload: bool = False
    """Presets with a reference KL (papo.beta > 0): keep the reference policy's parameters in
    CPU memory (DeepSpeed ZeRO-3 parameter offload, whatever trainer.zero_stage is) and fetch
    them layer by layer for its forward. Off: the reference sits on the device, in the
    policy's dtype, sharded over the ranks under ZeRO-3 and replicated under ZeRO 0-2."""

    def __post_init__(self) -> None:
        if isinstance(self.tiny, dict):  # YAML gives a mapping; keep the spec's own validation
            self.tiny = TinyModelSpec(**self.tiny)
        if isinstance(self.lora, dict):
            self.lora = _build(LoRAConfig, self.lora, "model.lora")


@dataclass(kw_only=True)
class SyntheticDataConfig:
    """The bundled synthetic visual task (written once into `<out_dir>/data` when used)."""

    n_train: int = 2000
    """Training questions."""
    n_val: int = 256
    """Validation questions (the held-out set of the acceptance check)."""
    seed: int = 0
    """Seed of the generator (validation uses a disjoint derived seed)."""
    image_size: int = 84
    """Square image side in pixels."""
    tasks: list[str] = field(default_factory=lambda: ["count", "colour", "size", "bar"])
    """Subset of the tasks count, colour, size, bar."""
    variant: Literal["standard", "misleading"] = "standard"
    """"standard": the bundled task. "misleading": text that misleads a policy that does not
    look at the image: training answers favour one answer per task (`skew`) and every prompt
    carries a hint naming an answer (right with probability `hint_accuracy` in training);
    validation answers are uniform and its hints always wrong (`train.data`)."""
    skew: float = 0.5
    """misleading only: skew of training answers towards their task's favoured answer: it has
    probability 1/m + skew * (1 - 1/m) for m answers (0: uniform, 1: always)."""
    hint_accuracy: float = 0.5
    """misleading only: probability that a training prompt's hint names the right answer."""

    def __post_init__(self) -> None:
        _require(0 <= self.skew <= 1, "data.synthetic.skew", f"must be in [0, 1], got {self.skew}")
        _require(0 <= self.hint_accuracy <= 1, "data.synthetic.hint_accuracy",
                 f"must be in [0, 1], got {self.hint_accuracy}")
        _require(self.n_train > 0, "data.synthetic.n_train", f"must be > 0, got {self.n_train}")
        _require(self.n_val > 0, "data.synthetic.n_val", f"must be > 0, got {self.n_val}")
        _require(self.seed >= 0, "data.synthetic.seed", f"must be >= 0, got {self.seed}")
        _require(self.image_size >= 28, "data.synthetic.image_size", f"must be >= 28, got {self.image_size}")
        allowed = ("count", "colour", "size", "bar")
        for t in self.tasks:
            _require(t in allowed, "data.synthetic.tasks", f"unknown task {t!r}; choose from {allowed}")
        _require(len(self.tasks) > 0, "data.synthetic.tasks", "must not be empty")


@dataclass(kw_only=True)
class DataConfig:
    """Training and validation data in ViRL39K format (problem / answer / images)."""

    train_path: str = ""
    """Local parquet/arrow/jsonl file or directory of the training set. Empty: the synthetic
    task (`synthetic`) is generated into `<out_dir>/data`."""
    val_path: str = ""
    """Validation set (same formats); empty uses `train_path` with `val_split`."""
    train_split: str = "train"
    """Split name of the training set."""
    val_split: str = "validation"
    """Split name of the validation set ("val" also finds "validation")."""
    prompt_key: str = "problem"
    """Field with the question text and its `<image>` placeholders."""
    answer_key: str = "answer"
    """Field with the ground-truth answer."""
    image_key: str = "images"
    """Field with the list of images."""
    min_pixels: int = 256 * 28 * 28
    """Images are upscaled to at least this many pixels (official 200,704)."""
    max_pixels: int = 1280 * 28 * 28
    """Images are downscaled to at most this many pixels (official 1,003,520)."""
    max_prompt_length: int = 4096
    """Prompts longer than this (tokens, image tokens included) are dropped and counted."""
    max_response_length: int = 2048
    """Maximum generated tokens per rollout (official 2048)."""
    shuffle_seed: int = 1
    """Seed of the sampler's per-epoch permutation (official RandomSampler seed 1)."""
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    """The synthetic task, used when `train_path` is empty."""

    def __post_init__(self) -> None:
        if isinstance(self.synthetic, dict):
            self.synthetic = _build(SyntheticDataConfig, self.synthetic, "data.synthetic")
        _require(0 < self.min_pixels <= self.max_pixels, "data.min_pixels",
                 f"need 0 < min_pixels <= max_pixels, got {self.min_pixels} and {self.max_pixels}")
        _require(self.max_prompt_length > 0, "data.max_prompt_length", "must be > 0")
        _require(self.max_response_length > 0, "data.max_response_length", "must be > 0")
        # numpy's generators take non-negative seeds only (the sampler seeds with [seed, epoch])
        _require(self.shuffle_seed >= 0, "data.shuffle_seed", f"must be >= 0, got {self.shuffle_seed}")


@dataclass(kw_only=True)
class VLLMConfig:
    """The vLLM rollout engine (`rollout.engine: vllm`; needs `pip install vllm`)."""

    gpu_memory_utilization: float = 0.5
    """Fraction of the GPU's memory vLLM may take (weights + KV cache); the training state
    shares the same GPU."""
    tensor_parallel_size: int = 1
    """GPUs per vLLM engine. Only 1 is supported: every rank runs its own engine on its own
    prompts (tensor parallelism would need the ranks of a group to submit identical requests)."""
    enforce_eager: bool = False
    """Disable CUDA graphs (slower decoding, less memory, faster start)."""
    max_model_len: int = 0
    """Longest prompt + response vLLM accepts (0: data.max_prompt_length +
    data.max_response_length)."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "bfloat16"
    """Weight / compute dtype inside vLLM ("auto": the checkpoint's)."""
    max_images_per_prompt: int = 4
    """vLLM's limit_mm_per_prompt for images (it reserves memory for this many)."""

    def __post_init__(self) -> None:
        _require(0 < self.gpu_memory_utilization <= 1, "rollout.vllm.gpu_memory_utilization",
                 f"must be in (0, 1], got {self.gpu_memory_utilization}")
        _require(self.tensor_parallel_size == 1, "rollout.vllm.tensor_parallel_size",
                 "only 1 is supported (one engine per rank on its own prompts), "
                 f"got {self.tensor_parallel_size}")
        _require(self.max_model_len >= 0, "rollout.vllm.max_model_len",
                 f"must be >= 0, got {self.max_model_len}")
        _require(self.max_images_per_prompt >= 1, "rollout.vllm.max_images_per_prompt",
                 f"must be >= 1, got {self.max_images_per_prompt}")


@dataclass(kw_only=True)
class RolloutConfig:
    """How responses are sampled."""

    engine: Literal["hf", "vllm"] = "hf"
    """Rollout engine: "hf" (transformers generate on the training weights) or "vllm" (a vLLM
    engine on the same GPU, settings in `vllm`; the trainer pushes the policy's weights into it
    at the start of every rollout phase and before every evaluation)."""
    n: int = 5
    """Responses per prompt (GRPO group size; official 5)."""
    temperature: float = 1.0
    """Sampling temperature (also divides the logits of every log-prob pass)."""
    top_p: float = 0.99
    """Nucleus sampling threshold (official 0.99)."""
    top_k: int = 0
    """Top-k sampling (0 disables, the official -1)."""
    batch_size: int = 64
    """Sequences generated together (prompts are sorted by length so a batch pads little;
    "hf" engine only: vLLM schedules all requests itself)."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """Settings of the vLLM engine (used when `engine` is "vllm")."""

    def __post_init__(self) -> None:
        if isinstance(self.vllm, dict):
            self.vllm = _build(VLLMConfig, self.vllm, "rollout.vllm")
        _require(self.n >= 1, "rollout.n", f"must be >= 1, got {self.n}")
        _require(self.temperature > 0, "rollout.temperature", f"must be > 0, got {self.temperature}")
        _require(0 < self.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {self.top_p}")
        _require(self.top_k >= 0, "rollout.top_k", f"must be >= 0, got {self.top_k}")
        _require(self.batch_size >= 1, "rollout.batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW and the learning-rate schedule (official: lr 1e-6 constant, wd 0.01, clip 1.0)."""

    lr: float = 1e-6
    """Peak learning rate."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 1e-2
    """AdamW decoupled weight decay."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip; a step with a non-finite norm is skipped (official)."""
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Schedule after warm-up, over optimizer steps."""
    warmup_ratio: float = 0.0
    """Fraction of optimizer steps of linear warm-up from 0."""
    min_lr_ratio: float = 0.0
    """Final lr of the cosine/linear schedules as a fraction of `lr`."""

    def __post_init__(self) -> None:
        _require(self.lr > 0 and math.isfinite(self.lr), "optim.lr", f"must be > 0, got {self.lr}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
                 f"must be two values in [0, 1), got {self.betas}")
        _require(self.eps > 0, "optim.eps", f"must be > 0, got {self.eps}")
        _require(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(self.max_grad_norm > 0, "optim.max_grad_norm", f"must be > 0, got {self.max_grad_norm}")
        _require(0 <= self.warmup_ratio < 1, "optim.warmup_ratio",
                 f"must be in [0, 1), got {self.warmup_ratio}")
        _require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio",
                 f"must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(kw_only=True)
class TrainerConfig:
    """Batch sizes, steps and the DeepSpeed engine."""

    rollout_batch_size: int = 384
    """Prompts sampled per rollout step (official 384)."""
    mini_batch_size: int = 128
    """Prompts per optimizer step; rollout_batch_size / mini_batch_size optimizer steps per
    rollout step (official 128 -> 3 steps of 640 responses)."""
    micro_batch_size: int = 4
    """Sequences per update micro-batch per rank (official 4). With `micro_batch_tokens` > 0
    this is only an upper bound."""
    micro_batch_tokens: int = 0
    """Token budget of a packed, padding-free micro-batch (0: pack by `micro_batch_size`
    sequences only)."""
    log_prob_micro_batch_size: int = 16
    """Sequences per no-grad log-prob micro-batch (old / masked / reference passes)."""
    total_epochs: int = 2
    """Passes over the training set (official 2)."""
    max_steps: int = 0
    """Stop after this many rollout steps (0: run all epochs)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3 (train/ds_configs/zero{stage}.json)."""
    advantage: Literal["grpo", "dr_grpo"] = "grpo"
    """Advantage estimator: "grpo" (group mean/std, official) or "dr_grpo" (no std)."""
    online_filter_max_tries: int = 20
    """With papo.online_filter, generate at most this many prompt batches per step to fill the
    rollout batch with groups that pass the filter (official max_try_make_batch 20)."""
    ds_config: str = ""
    """Optional DeepSpeed JSON template replacing train/ds_configs/zero{stage}.json; its batch,
    accumulation, precision and clipping fields are filled from this config."""

    def __post_init__(self) -> None:
        for name in ("rollout_batch_size", "mini_batch_size", "micro_batch_size",
                     "log_prob_micro_batch_size", "total_epochs"):
            _require(getattr(self, name) >= 1, f"trainer.{name}", f"must be >= 1, got {getattr(self, name)}")
        _require(self.rollout_batch_size % self.mini_batch_size == 0, "trainer.mini_batch_size",
                 f"must divide rollout_batch_size ({self.rollout_batch_size}), got {self.mini_batch_size}")
        _require(self.micro_batch_tokens >= 0, "trainer.micro_batch_tokens", "must be >= 0")
        _require(self.max_steps >= 0, "trainer.max_steps", "must be >= 0")
        _require(self.online_filter_max_tries >= 1, "trainer.online_filter_max_tries", "must be >= 1")
        _require(self.zero_stage in (0, 1, 2, 3), "trainer.zero_stage", f"must be 0-3, got {self.zero_stage}")


@dataclass(kw_only=True)
class CheckpointConfig:
    """Checkpointing and resumption."""

    save_every: int = 5
    """Save every N rollout steps (official 5); 0 disables periodic saves (the final step is
    still saved unless `save_final` is false)."""
    save_final: bool = True
    """Save the final step (smoke runs of large shapes may skip it: a 3B checkpoint with its
    fp32 masters and Adam states is ~50 GB)."""
    keep_last: int = 3
    """Keep the newest K checkpoints (official save_limit 3)."""
    resume: bool = True
    """Continue from the newest complete checkpoint in `<out_dir>/checkpoints` if any."""
    export_hf: bool = True
    """Write the final weights in HF format to `<out_dir>/hf_model` (ZeRO-3 shards consolidated)."""
    allow_changed_keys: list[str] = field(default_factory=list)
    """Settings (dotted keys of train.checkpoint.RESUME_INVARIANT_KEYS, e.g. "optim.lr") allowed to differ
    from the checkpoint's when resuming; without them a resume under other values is refused."""

    def __post_init__(self) -> None:
        _require(self.save_every >= 0, "checkpoint.save_every", "must be >= 0")
        _require(self.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {self.keep_last}")


@dataclass(kw_only=True)
class EvalConfig:
    """Validation during training (avg@k, docs/algorithm.md "Evaluation")."""

    every: int = 5
    """Evaluate every N rollout steps (official 5); 0 disables periodic evaluation."""
    before_training: bool = True
    """Also evaluate before the first step (official val_before_train)."""
    k: int = 8
    """Samples per question for avg@k (official 8)."""
    temperature: float = 1.0
    """Evaluation sampling temperature (official 1.0)."""
    top_p: float = 1.0
    """Evaluation top_p (PAPO-Eval uses 1.0)."""
    max_new_tokens: int = 2048
    """Evaluation generation budget."""
    min_pixels: int = 32 * 32
    """Evaluation min pixels (PAPO-Eval 32*32)."""
    max_pixels: int = 768 * 768
    """Evaluation max pixels (PAPO-Eval 768*768, smaller than training's)."""
    limit: int = 0
    """Evaluate only the first N validation questions (0: all)."""
    black_images: bool = False
    """After training, also evaluate the final policy with every image replaced by a black one
    and report it next to the blind baseline (the evaluated questions' question-aware
    majority-answer rate): a policy that reads the image falls to about that rate."""

    def __post_init__(self) -> None:
        _require(self.every >= 0, "eval.every", "must be >= 0")
        _require(self.k >= 1, "eval.k", f"must be >= 1, got {self.k}")
        _require(self.temperature > 0, "eval.temperature", "must be > 0")
        _require(0 < self.top_p <= 1, "eval.top_p", "must be in (0, 1]")
        _require(self.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1")
        _require(0 < self.min_pixels <= self.max_pixels, "eval.min_pixels",
                 "need 0 < min_pixels <= max_pixels")
        _require(self.limit >= 0, "eval.limit", "must be >= 0")


@dataclass(kw_only=True)
class SFTConfig:
    """Supervised warm start before PAPO (a random-init policy never produces the answer format)."""

    steps: int = 0
    """Optimizer steps of supervised fine-tuning on the training set (0: no warm start)."""
    lr: float = 1e-3
    """AdamW learning rate of the warm start."""
    batch_size: int = 16
    """Questions per warm-start step."""
    response_template: str = "<think> The answer is {answer}. </think> \\boxed{{{answer}}}"
    """Target response; `{answer}` is replaced by the ground truth."""
    label_noise: float = 0.0
    """Fraction of warm-start targets whose answer is replaced by a random other answer of the
    same question type, so the warm-started policy learns the format but is left room to
    improve through RL (synthetic data only)."""

    def __post_init__(self) -> None:
        _require(self.steps >= 0, "sft.steps", "must be >= 0")
        _require(self.lr > 0, "sft.lr", "must be > 0")
        _require(self.batch_size >= 1, "sft.batch_size", "must be >= 1")
        _require("{answer}" in self.response_template, "sft.response_template", "must contain {answer}")
        _require(0 <= self.label_noise <= 1, "sft.label_noise", "must be in [0, 1]")


@dataclass(kw_only=True)
class RunConfig:
    """One training run. Sections: model, data, rollout, papo, optim, trainer, checkpoint, eval."""

    out_dir: str = "runs/tiny"
    """Run directory: resolved config, metrics, checkpoints, evaluations, plots."""
    seed: int = 1
    """Seed of every random generator (torch, numpy, masking, sampling)."""
    deterministic: bool = False
    """Deterministic mode: fixed thread count, deterministic torch algorithms and reductions,
    so that a resumed run matches an uninterrupted one bitwise on CPU."""
    num_threads: int = 0
    """torch intra-op CPU threads per process (0: torch's default, one per core). Small models
    on a shared CPU run far faster with 1: with more, every op's parallel region waits for
    descheduled threads (measured 10-40x slower per step under load on 2 cores). Deterministic
    mode uses 1 unless this is set."""
    log_every: int = 1
    """Print a metrics line every N rollout steps (JSONL records every step)."""
    plot: bool = True
    """Render the PNG curves of `python -m train.plot` into `<out_dir>/plots` at the end."""
    tensorboard: bool = True
    """Also write metrics to TensorBoard (`<out_dir>/tb`) when tensorboard is installed."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and validation data."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling of responses."""
    papo: dict[str, Any] = field(default_factory=lambda: {"preset": "papo-g-nref-7b"})
    """The PAPO loss: `preset` (a `papo.PAPOConfig.presets()` name, or null for the plain
    defaults) plus any `papo.PAPOConfig` field as an override."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Batching, steps and DeepSpeed."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint / resume / export."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Validation."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Supervised warm start (run once, before the first PAPO step)."""

    def __post_init__(self) -> None:
        _require(isinstance(self.papo, dict), "papo", f"must be a mapping, got {type(self.papo).__name__}")
        # numpy's generators take non-negative seeds only (masks and sampling seed with [seed, ...])
        _require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        _require(self.log_every >= 1, "log_every", "must be >= 1")
        _require(self.num_threads >= 0, "num_threads", "must be >= 0")
        _require((self.trainer.rollout_batch_size * self.rollout.n) >= 1, "rollout.n", "must be >= 1")
        self.papo_config()  # a bad papo key or value fails when the config loads, not at the first step

    def papo_config(self):
        """The validated `papo.PAPOConfig` of the `papo` section."""
        spec = dict(self.papo)
        preset = spec.pop("preset", None)
        known = {f.name for f in dataclasses.fields(PAPOConfig)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ConfigError(f"papo: unknown key(s) {['papo.' + k for k in unknown]}; "
                              f"PAPOConfig fields are {sorted(known - {'preset'})}")
        if isinstance(spec.get("online_filter"), list):
            spec["online_filter"] = tuple(spec["online_filter"])
        try:
            if preset is None:
                return PAPOConfig(**spec)
            return PAPOConfig.from_preset(preset, **spec)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"papo: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (YAML/JSON serializable)."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one value to the annotated type, raising ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: must be a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: must be a number, got {value!r}")
        # no field means anything by inf or nan; both would pass a "> 0" check and fail later
        if not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Instantiate dataclass `cls` from a mapping, checking keys and types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        where = prefix or "top level"
        raise ConfigError(
            f"unknown key(s) {[f'{prefix}.{k}' if prefix else k for k in unknown]} at {where}; "
            f"valid keys: {sorted(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from e


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `a.b.c=value` (value in YAML syntax) into (["a", "b", "c"], value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. optim.lr=1e-6)")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from e
    return key.split("."), value


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part!r} is not a section")
        node = nxt
    node[path[-1]] = value


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """Build a RunConfig from a nested mapping plus `key=value` overrides."""
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a mapping at the top level, got {type(data).__name__}")
    data = json.loads(json.dumps(data))  # deep copy; also rejects non-plain values early
    for ov in overrides or []:
        path, value = parse_override(ov)
        _set_path(data, path, value)
    return _build(RunConfig, data, "")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key].start_mark.line + 1})",
                    key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """Parse a YAML config file, raising ConfigError naming the file for invalid YAML."""
    try:
        with path.open(encoding="utf-8") as f:  # a stream, so that YAML errors name the file and line
            return yaml.load(f, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or the defaults if `path` is None) and apply overrides.

    Raises ConfigError naming the dotted key for unknown keys, wrong types or bad values
    (and naming the file for invalid YAML or a repeated key), and FileNotFoundError for a
    missing file.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        data = read_yaml(p) or {}
    return config_from_dict(data, overrides)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with `load_config`)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------- docs


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (attribute docstrings via the AST)."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body  # the ClassDef
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe(cfg: Any, prefix: str = "") -> list[str]:
    """Lines `key = value  # doc` for every field of a config, recursively."""
    lines = []
    docs = field_docs(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            lines.append(f"[{key}]  # {docs.get(f.name, '')}")
            lines += describe(value, key + ".")
        else:
            lines.append(f"{key} = {value!r}  # {docs.get(f.name, '')}")
    return lines


def main(argv: list[str] | None = None) -> None:
    """CLI: print the resolved config with the documentation of every field."""
    import argparse

    parser = argparse.ArgumentParser(description="Print a resolved trainer config with field docs.")
    parser.add_argument("--config", default=None, help="YAML file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    print("\n".join(describe(load_config(args.config, args.overrides))))


if __name__ == "__main__":
    main()
