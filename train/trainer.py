"""The PAPO trainer: rollouts, rewards, advantages, no-grad statistics, DeepSpeed updates.

`Trainer(cfg).train()` runs the official step (docs/algorithm.md) once per rollout step:

 1. sample `rollout_batch_size` prompts (this rank's share);
 2. mask each prompt's raw images once (`papo.masking.mask_images`, shared by its rollouts);
 3. roll out `rollout.n` responses per prompt (`RolloutEngine`);
 4. rewards (`papo.rewards.compute_score`: 0.9 accuracy + 0.1 format);
 5. group advantages (`papo.advantages`), with the DAPO online filter and its
    regenerate-until-full loop when `papo.online_filter` is set (decided on counts over
    all ranks, the kept groups then spread evenly over the ranks);
 6. one no-grad pass per view with the rollout weights: old log-probs and the
    masked log-probs from `papo_kernels.two_view_stats` (which also yields the
    exact perception KL and both full-vocabulary entropies as monitors), and
    reference log-probs when beta > 0;
 7. mini-batches of `mini_batch_size` prompts, each split into packed,
    padding-free micro-batches; `forward_backward_step` runs the trunk, gathers
    the hidden states that predict response tokens and calls `papo.PAPOLoss`
    inside the lm_head module's forward (so ZeRO-3 gathers the possibly tied
    head weight for it); gradient accumulation is explicit (DeepSpeed's
    `managed_gradient_accumulation: false`, backward without GAS scaling,
    `engine.step()` once per mini-batch), so `PAPOConfig.loss_scale` alone
    decides the normalization.

Checkpoints (DeepSpeed state + trainer state: step, data cursor, RNG) are
written to a temporary directory and renamed into place, so a kill during a
write never replaces the previous good one; a failed write (a full disk) removes
its partial copy and stops the run with `CheckpointError`. `train()` resumes from
the newest complete checkpoint, and refuses one written by another number of
ranks or under another value of a setting its contents depend on
(`RESUME_INVARIANT_KEYS`). Metrics go to `<out_dir>/metrics.jsonl` (and TensorBoard). At the end,
`<out_dir>/eval.md` and `eval_final.json` compare the step-0 (warm-started) and final avg@k
on the same validation questions, with the black-image check when `eval.black_images` is
set, and `<out_dir>/plots/` holds the curves of `python -m train.plot`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import resource
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from papo.faults import armed as faults_armed
from papo.faults import fault_point
from train.batching import EncodedPrompt, PackedBatch, Sequence, encode_prompt, gather_response_hidden, pack, \
    plan_micro_batches
from train.config import ConfigError, RunConfig, save_config
from train.data import VisionRLDataset, load_dataset_for, write_synthetic
from train.policy import load_policy
from train.rollout import HFRolloutEngine, RolloutEngine, SamplingParams

log = logging.getLogger("train")

CHECKPOINT_PREFIX = "step_"
COMPLETE_MARKER = "COMPLETE"
TEMP_PREFIX = ".tmp-"
# Settings a checkpoint's contents depend on (the weights' shapes, the ZeRO layout, the data order,
# the objective and the optimizer state): resuming under other values would quietly continue a
# different run, so it is refused unless `checkpoint.allow_changed_keys` names the key. Everything
# else (micro-batch sizes, evaluation, logging, the number of steps) may change between restarts.
RESUME_INVARIANT_KEYS = (
    "seed", "model.path", "model.tiny", "model.dtype", "model.lora", "model.freeze_vision_tower",
    "data.train_path", "data.train_split", "data.prompt_key", "data.answer_key", "data.image_key",
    "data.min_pixels", "data.max_pixels", "data.max_prompt_length", "data.max_response_length",
    "data.shuffle_seed", "data.synthetic", "rollout.n", "rollout.temperature", "rollout.top_p",
    "rollout.top_k", "papo", "optim", "trainer.rollout_batch_size", "trainer.mini_batch_size",
    "trainer.zero_stage", "trainer.advantage", "sft",
)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or may not be resumed from; the message says why and what to do."""


# --------------------------------------------------------------------------- distributed setup


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Initialize torch.distributed through DeepSpeed; returns (rank, world_size).

    Works under the `deepspeed` launcher and as a plain `python` process (then
    a one-process group on a free local port is created).
    """
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if not torch.cuda.is_available():
        # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op on first use
        # (45-51 s measured on a 2-core machine); gloo gives identical results without it.
        comm_torch = sys.modules.get("deepspeed.comm.torch")
        if comm_torch is not None:
            comm_torch.build_shm_op = lambda: None
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def barrier() -> None:
    """Barrier across ranks (no-op without a process group)."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum or max) across ranks; identity on one rank."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        red = torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX
        if t.device.type == "cpu" and torch.distributed.get_backend() == "nccl":
            # NCCL reduces device tensors only; the trainer's counters live on the CPU
            buf = t.to(torch.device("cuda", torch.cuda.current_device()))
            torch.distributed.all_reduce(buf, op=red)
            t.copy_(buf)
        else:
            torch.distributed.all_reduce(t, op=red)
    return t


def combine_across_ranks(sums: dict[str, float], weight: float, tokens: int) -> tuple[dict[str, float], float, int]:
    """Token-weighted metric sums, their weight and the token count summed over all ranks
    (a rank without real micro-batches contributes nothing, so the key sets may differ)."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return sums, weight, tokens
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, (sums, weight, tokens))
    total: dict[str, float] = {}
    for part_sums, _, _ in parts:
        for k, v in part_sums.items():
            total[k] = total.get(k, 0.0) + v
    return total, sum(w for _, w, _ in parts), sum(t for _, _, t in parts)


def set_deterministic(enabled: bool, seed: int, num_threads: int = 0) -> None:
    """Seed every generator; set the thread count; in deterministic mode also fix algorithms."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if num_threads:
        torch.set_num_threads(num_threads)
    if enabled:
        # A fixed thread count fixes the order of CPU reductions; with deterministic
        # algorithms a resumed run reproduces an uninterrupted one bit for bit.
        if not num_threads:
            torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


# --------------------------------------------------------------------------- model loading


def fp32_master_weight(optimizer, param: torch.Tensor) -> torch.Tensor | None:
    """The fp32 master copy of a bf16 parameter held by DeepSpeed's optimizer, or None.

    ZeRO 1-3 and the BF16 optimizer expose it (`safe_get_full_fp32_param`, a collective);
    ZeRO 0 with bf16 uses DeepSpeed's FP16_Optimizer, which keeps one flat fp32 copy per
    parameter group (the group's parameters concatenated in order), or (where fused
    optimizers are unavailable, e.g. on CPU) FP16_UnfusedOptimizer, one fp32 copy per parameter.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    master = safe_get_full_fp32_param(param)
    if master is not None:
        return master
    for group, copies in zip(getattr(optimizer, "fp16_groups", ()), getattr(optimizer, "fp32_groups", ())):
        for p, q in zip(group, copies):
            if p is param:
                return q
    for group, flat in zip(getattr(optimizer, "fp16_groups", ()), getattr(optimizer, "fp32_groups_flat", ())):
        offset = 0
        for p in group:
            if p is param:
                return flat[offset: offset + p.numel()].view_as(p)
            offset += p.numel()
    return None


def call_in_module(module: nn.Module, fn, *inputs):
    """Run `fn(module, *inputs)` as `module`'s forward.

    ZeRO-3 gathers a module's partitioned parameters only around its own
    forward (and its backward, through hooks on the forward's inputs and
    outputs). Computing the fused loss from `lm_head.weight` inside lm_head's
    forward makes the (possibly tied) weight whole there, as CCE's and Liger's
    patched forwards do; without ZeRO-3 this is a plain call.
    """
    original = module.forward
    module.forward = lambda *args: fn(module, *args)
    try:
        return module(*inputs)
    finally:
        module.forward = original


class _MasterWithGradToWorking(torch.autograd.Function):
    """Forward: the fp32 master (a view, no copy). Backward: its gradient, in the working
    weight's dtype, to the working weight (the master is not a leaf of the graph)."""

    @staticmethod
    def forward(ctx, working: torch.Tensor, master: torch.Tensor) -> torch.Tensor:
        ctx.working_dtype = working.dtype
        return master.view_as(master)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.working_dtype), None


class PolicyWithLoss(nn.Module):
    """The module DeepSpeed wraps: the policy plus the PAPO loss and statistics heads.

    `forward(batch, mode=...)`:
      - "loss": trunk with grad (+ masked trunk for estimator "exact"), then
        `PAPOLoss` inside lm_head's forward; returns (loss, metrics);
      - "stats": no-grad trunk for both views, then `two_view_stats` (or
        `token_stats` without masked pixels); returns the per-token stats [B, T].
    """

    def __init__(self, policy: nn.Module, loss_fn: nn.Module | None):
        super().__init__()
        self.policy = policy
        self.loss_fn = loss_fn
        # model.fp32_lm_head: the fp32 master copy of the head weight, refreshed by the trainer
        # after each optimizer step (a plain attribute, so DeepSpeed never casts it to bf16)
        self.head_fp32: torch.Tensor | None = None
        # a frozen module without fp32 master (the reference) upcasts its working weight instead
        self.upcast_head = False

    def head_weight(self, mod: nn.Module) -> torch.Tensor:
        """The weight the kernels multiply: lm_head's own, or (fp32 head) the fp32 master,
        whose gradient is routed to the working weight so that dW still reaches the optimizer."""
        w = mod.weight
        if self.head_fp32 is None:
            return w.float() if self.upcast_head else w
        if not (torch.is_grad_enabled() and w.requires_grad):
            return self.head_fp32
        return _MasterWithGradToWorking.apply(w, self.head_fp32)

    def trunk(self, batch: PackedBatch, *, masked: bool = False) -> torch.Tensor:
        out = self.policy.model(**batch.model_inputs(masked=masked))
        return gather_response_hidden(out.last_hidden_state, batch)

    def forward(self, batch: PackedBatch, mode: str = "loss", **loss_kwargs):
        if mode == "loss":
            return self._loss(batch, **loss_kwargs)
        if mode == "stats":
            return self._stats(batch, **loss_kwargs)
        raise ValueError(f"mode must be 'loss' or 'stats', got {mode!r}")

    def _loss(self, batch: PackedBatch, *, masked_view: str, **kw):
        hidden = self.trunk(batch)
        masked_hidden = None
        if masked_view in ("current_no_grad", "live"):
            ctx = torch.no_grad() if masked_view == "current_no_grad" else contextlib.nullcontext()
            with ctx:
                masked_hidden = self.trunk(batch, masked=True)
        head = self.policy.lm_head

        def head_loss(mod, h, *rest):
            mh = rest[0] if rest else None
            # the weight's dtype must match the hidden states' for the kernels
            w = self.head_weight(mod)
            out = self.loss_fn(h.to(w.dtype), w, batch.response_ids, batch.response_mask,
                               masked_hidden=None if mh is None else mh.to(w.dtype), **kw)
            return out.loss, out.metrics  # a plain tuple: ZeRO-3 hooks rebuild outputs by type

        inputs = (hidden,) if masked_hidden is None else (hidden, masked_hidden)
        return call_in_module(head, head_loss, *inputs)

    @torch.no_grad()
    def _stats(self, batch: PackedBatch, *, temperature: float, two_view: bool):
        from papo_kernels import token_stats, two_view_stats

        hidden = self.trunk(batch)
        masked = self.trunk(batch, masked=True) if two_view else None
        targets = batch.response_ids.masked_fill(batch.response_mask == 0, -100)

        def head_stats(mod, h, *rest):
            w = self.head_weight(mod)
            if rest:
                return tuple(two_view_stats(h.to(w.dtype), rest[0].to(w.dtype), w, targets,
                                            temperature=temperature))
            return tuple(token_stats(h.to(w.dtype), w, targets, temperature=temperature))

        inputs = (hidden,) if masked is None else (hidden, masked)
        return call_in_module(self.policy.lm_head, head_stats, *inputs)


# --------------------------------------------------------------------------- samples


@dataclass
class Sample:
    """One response with everything the update needs."""

    uid: int
    prompt: EncodedPrompt
    answer: str
    response_ids: torch.Tensor
    finished: bool
    text: str = ""
    reward: float = 0.0
    accuracy: float = 0.0
    format: float = 0.0
    advantage: float = 0.0
    old_logp: torch.Tensor | None = None
    masked_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    monitors: dict[str, float] = field(default_factory=dict)

    def seq(self) -> Sequence:
        return Sequence(self.prompt, self.response_ids)

    def __len__(self) -> int:
        return len(self.prompt) + int(self.response_ids.numel())


def pad_stack(rows: list[torch.Tensor | None], T: int) -> torch.Tensor | None:
    """Stack 1-D tensors into [B, T], zero padded; None if any row is None."""
    if any(r is None for r in rows):
        return None
    out = torch.zeros(len(rows), T, dtype=torch.float32)
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r.float()
    return out


class PromptStream:
    """Epoch-wise shuffled prompt order with a resumable cursor (drop_last per epoch)."""

    def __init__(self, n: int, *, seed: int, batch: int):
        if n < batch:
            raise ConfigError(f"trainer.rollout_batch_size ({batch}) exceeds the training set size ({n})")
        self.n, self.seed, self.batch = n, seed, batch
        self.epoch, self.pos = 0, 0

    def _perm(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def take(self, k: int) -> list[int]:
        """Next k indices; an epoch ends where fewer than a full rollout batch remain."""
        out: list[int] = []
        while len(out) < k:
            usable = (self.n // self.batch) * self.batch
            if self.pos >= usable:
                self.epoch, self.pos = self.epoch + 1, 0
            perm = self._perm()
            m = min(k - len(out), usable - self.pos)
            out += perm[self.pos: self.pos + m].tolist()
            self.pos += m
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


# --------------------------------------------------------------------------- metrics


class MetricsLogger:
    """JSONL (+ optional TensorBoard) metrics of rank 0."""

    def __init__(self, out_dir: Path, *, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"))
            except ImportError:
                log.warning("tensorboard not installed: metrics go to JSONL only")

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (they belong to steps lost by a kill)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", -1) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(k, v, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: GPU allocator peak on CUDA, max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """PAPO on Qwen2.5-VL through DeepSpeed; see the module docstring.

    Args:
        cfg: the resolved RunConfig.
        rollout_engine: optional RolloutEngine to use instead of the HF engine
            (tests inject fixed rollouts through it).
    """

    def __init__(self, cfg: RunConfig, *, rollout_engine: RolloutEngine | None = None):
        import deepspeed
        from papo import PAPOLoss

        self.cfg = cfg
        self.papo = cfg.papo_config()
        if self.papo.temperature != cfg.rollout.temperature:
            raise ConfigError(f"papo.temperature ({self.papo.temperature}) must equal rollout.temperature "
                              f"({cfg.rollout.temperature}): log-probs are taken at the sampling temperature")
        if cfg.rollout.n < 2 and cfg.trainer.advantage == "grpo":
            raise ConfigError("rollout.n must be >= 2 for GRPO advantages (group std)")
        self.rank, self.world = init_distributed()
        set_deterministic(cfg.deterministic, cfg.seed, cfg.num_threads)
        self.out = Path(cfg.out_dir)
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) \
            if torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # NCCL collectives of CPU values go through it
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        barrier()

        model_dir, data_path = self._prepare_assets()
        dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
        # DeepSpeed keeps fp32 master weights and runs bf16 compute when bf16 is enabled:
        # load fp32 and let it cast.
        policy, self.processor = load_policy(model_dir, dtype=torch.float32,
                                             attn_implementation=cfg.model.attn_implementation)
        self.tokenizer = self.processor.tokenizer
        if cfg.trainer.rollout_batch_size < self.world:
            raise ConfigError(f"trainer.rollout_batch_size ({cfg.trainer.rollout_batch_size}) must be at "
                              f"least the number of ranks ({self.world}): every rank needs prompts")

        d = cfg.data
        ds_kwargs = dict(prompt_key=d.prompt_key, answer_key=d.answer_key, image_key=d.image_key,
                         min_pixels=d.min_pixels, max_pixels=d.max_pixels, max_prompt_length=d.max_prompt_length)
        self.train_ds = load_dataset_for(data_path["train"], d.train_split, self.processor, **ds_kwargs)
        self.val_ds = load_dataset_for(data_path["val"], d.val_split, self.processor, **ds_kwargs)

        if cfg.sft.steps > 0:
            # freeze / checkpointing apply to the warm start too; it is full fine-tuning even
            # with LoRA configured (the adapters are added to the warm-started policy)
            self._configure_policy(policy, adapters=False)
            policy = self._warm_start(policy, dtype)
        self._configure_policy(policy, adapters=True)

        self.loss_fn = PAPOLoss(self.papo)
        self.module = PolicyWithLoss(policy, self.loss_fn)
        if cfg.model.fp32_lm_head and dtype == torch.bfloat16 and not policy.lm_head.weight.requires_grad:
            # a frozen head (LoRA) has no fp32 master in the optimizer: keep the loaded fp32
            # weight before DeepSpeed casts the module to bf16 (it never changes)
            self.module.head_fp32 = policy.lm_head.weight.detach().to(self.device, torch.float32, copy=True)
        t = cfg.trainer
        self.steps_per_epoch = len(self.train_ds) // t.rollout_batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(f"trainer.rollout_batch_size ({t.rollout_batch_size}) exceeds the training "
                              f"set size ({len(self.train_ds)})")
        self.total_steps = t.total_epochs * self.steps_per_epoch
        if t.max_steps:
            self.total_steps = min(self.total_steps, t.max_steps)
        self.opt_steps_per_step = t.rollout_batch_size // t.mini_batch_size

        params = [p for p in self.module.parameters() if p.requires_grad]
        o = cfg.optim
        optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                      weight_decay=o.weight_decay)
        total_opt = max(1, self.total_steps * self.opt_steps_per_step)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_opt, o))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.module, optimizer=optimizer, lr_scheduler=scheduler, config=self._ds_config(dtype))
        self.zero3 = t.zero_stage == 3
        # the reference policy (beta > 0) is the policy PAPO starts from: the warm-started one, if any
        self.ref_model, self.ref_sharded = None, False
        if self.papo.beta > 0:
            ref_dir = self.out / "sft_model" if cfg.sft.steps > 0 else model_dir
            self.ref_model, self.ref_sharded = self._build_reference(ref_dir, dtype)

        gather = self._gather_all if self.zero3 else None
        if rollout_engine is None and cfg.rollout.engine == "vllm":
            from train.vllm_engine import VLLMRolloutEngine

            # started from the policy's directory (the warm start's, if any); its weights are
            # replaced by the policy's at the start of every rollout phase (`_sync_rollout`)
            policy_dir = self.out / "sft_model" if cfg.sft.steps > 0 else model_dir
            rollout_engine = VLLMRolloutEngine.from_config(cfg, policy_dir, self.tokenizer, gather=gather)
        self.rollout = rollout_engine or HFRolloutEngine(self.module.policy, self.tokenizer,
                                                         batch_size=cfg.rollout.batch_size, gather=gather)
        self.stream = PromptStream(len(self.train_ds), seed=d.shuffle_seed, batch=t.rollout_batch_size)
        self.step = 0
        self._optimizer_steps = 0  # in this process; with `step`, names the weights' version
        self._synced_version: tuple[int, int] | None = None
        self.metrics = MetricsLogger(self.out, enabled=self.rank == 0, tensorboard=cfg.tensorboard)
        self._grader = None

    # ------------------------------------------------------------------ setup helpers

    def _prepare_assets(self) -> tuple[Path, dict[str, str]]:
        """Model dir and data paths; rank 0 builds the tiny model / synthetic data if needed."""
        cfg = self.cfg
        model_dir = Path(cfg.model.path) if cfg.model.path else self.out / "tiny_model"
        train_path = cfg.data.train_path or str(self.out / "data")
        val_path = cfg.data.val_path or train_path
        if self.rank == 0:
            if not cfg.model.path:
                from train.tiny import ensure_tiny_model_dir

                ensure_tiny_model_dir(model_dir, cfg.model.tiny)
            if not cfg.data.train_path and not (self.out / "data" / "summary.json").exists():
                s = cfg.data.synthetic
                write_synthetic(self.out / "data", n_train=s.n_train, n_val=s.n_val, seed=s.seed,
                                tasks=s.tasks, image_size=s.image_size, variant=s.variant, skew=s.skew,
                                hint_accuracy=s.hint_accuracy)
        barrier()
        return model_dir, {"train": train_path, "val": val_path}

    def _warm_start(self, policy, dtype):
        """Run (rank 0) or reuse the supervised warm start; every rank loads its result."""
        from train.sft import run_sft

        sft_dir = self.out / "sft_model"
        if self.rank == 0 and not (sft_dir / "config.json").exists():
            run_sft(policy, self.processor, self.train_ds, self.cfg, out_dir=sft_dir)
        barrier()
        policy, _ = load_policy(sft_dir, dtype=torch.float32, attn_implementation=self.cfg.model.attn_implementation)
        return policy

    def _build_reference(self, path: Path, dtype: torch.dtype) -> tuple[Any, bool]:
        """The frozen reference policy, held like the policy; returns (module, sharded).

        It is loaded in the policy's dtype (bf16 in bf16 runs: never an fp32 copy) and, under
        ZeRO-3, sharded over the ranks by a DeepSpeed engine without optimizer, so each rank
        holds 1/world of it; ZeRO 0-2 replicate the policy's weights, and the reference too.
        `model.ref_offload` keeps its shards in CPU memory (ZeRO-3 parameter offload, whatever
        the policy's stage); each forward then fetches them layer by layer.
        """
        import deepspeed

        m = self.cfg.model
        ref, _ = load_policy(path, dtype=dtype, attn_implementation=m.attn_implementation)
        ref.eval().requires_grad_(False)
        ref.config.use_cache = False
        module = PolicyWithLoss(ref, None).eval()
        # model.fp32_lm_head: the reference's head multiplies in fp32 as the policy's does
        module.upcast_head = m.fp32_lm_head and dtype == torch.bfloat16
        if not (self.zero3 or m.ref_offload):
            return module.to(self.device), False
        ds = self._ds_config(dtype)
        for key in ("optimizer", "scheduler"):  # a template's training sections do not apply
            ds.pop(key, None)
        zero = {k: v for k, v in ds["zero_optimization"].items() if not k.startswith("offload_optimizer")}
        zero["stage"] = 3
        if m.ref_offload:
            zero["offload_param"] = {"device": "cpu", "pin_memory": self.device.type == "cuda"}
        ds["zero_optimization"] = zero
        engine, *_ = deepspeed.initialize(model=module, config=ds)
        engine.eval()
        return engine, True

    def _configure_policy(self, policy, *, adapters: bool) -> None:
        """What to train and how: a frozen vision tower, gradient checkpointing and, with
        `adapters` (the policy PAPO starts from, after any warm start), LoRA adapters, after
        which only they train."""
        m = self.cfg.model
        if adapters and m.lora.rank:
            from train.lora import apply_lora

            adapted = apply_lora(policy, m.lora)
            if self.rank == 0:
                trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
                log.info("LoRA rank %d on %d layers: %d trainable parameters", m.lora.rank, len(adapted), trainable)
        elif m.freeze_vision_tower:
            policy.model.visual.requires_grad_(False)
        if m.gradient_checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy.config.use_cache = False

    def _refresh_fp32_head(self) -> None:
        """model.fp32_lm_head in bf16 runs: fetch the head's fp32 master weight from the
        optimizer (a collective under ZeRO; every rank calls this at the same points)."""
        if not (self.cfg.model.fp32_lm_head and self.cfg.model.dtype == "bfloat16"):
            return
        if not self.module.policy.lm_head.weight.requires_grad:
            return  # frozen: the copy taken at construction stays exact
        master = fp32_master_weight(self.engine.optimizer, self.module.policy.lm_head.weight)
        if master is None:
            raise RuntimeError("model.fp32_lm_head: DeepSpeed holds no fp32 master weight for lm_head "
                               "(this optimizer/ZeRO setup does not expose one)")
        self.module.head_fp32 = master.detach().to(self.device, torch.float32)

    def _ds_config(self, dtype: torch.dtype) -> dict:
        t, o = self.cfg.trainer, self.cfg.optim
        path = Path(t.ds_config) if t.ds_config else Path(__file__).parent / "ds_configs" / f"zero{t.zero_stage}.json"
        if not path.is_file():
            raise FileNotFoundError(f"trainer.ds_config: {path} not found")
        ds = json.loads(path.read_text())
        # Fill batch/accumulation/precision/clipping from our config: the "auto" values of such
        # templates are resolved by HF/Accelerate integrations, not by deepspeed.initialize.
        ds["train_micro_batch_size_per_gpu"] = 1
        ds["gradient_accumulation_steps"] = 1
        ds["train_batch_size"] = self.world
        ds["managed_gradient_accumulation"] = False
        ds["gradient_clipping"] = o.max_grad_norm
        ds["bf16"] = {"enabled": dtype == torch.bfloat16}
        ds.setdefault("zero_optimization", {})["stage"] = t.zero_stage
        ds["zero_allow_untested_optimizer"] = True
        return ds

    def _gather_all(self):
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.module.policy.parameters()))

    @property
    def grader(self):
        if self._grader is None:
            from papo.rewards import AnswerGrader

            self._grader = AnswerGrader()
        return self._grader

    # ------------------------------------------------------------------ rollout phase

    def _encode(self, idx: int, step: int) -> tuple[dict, EncodedPrompt]:
        from papo.masking import mask_images

        d = self.cfg.data
        item = self.train_ds[idx]
        # one mask draw per prompt, shared by its rollouts, reproducible from (seed, step, uid)
        rng = np.random.default_rng([self.cfg.seed, step, item["uid"]])
        masked = mask_images(item["images"], patch_size=self.papo.mask_patch_size, prob=self.papo.mask_prob,
                             generator=rng) if item["images"] else []
        enc = encode_prompt(self.processor, item["prompt"], item["images"], min_pixels=d.min_pixels,
                            max_pixels=d.max_pixels, masked_images=masked if item["images"] else None)
        return item, enc

    def _rollout_round(self, indices: list[int], step: int, attempt: int) -> list[Sample]:
        r = self.cfg.rollout
        encoded = [self._encode(i, step) for i in indices]
        params = SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                max_new_tokens=self.cfg.data.max_response_length,
                                seed=(self.cfg.seed * 100_003 + step) * 1_009 + self.rank * 31 + attempt)
        completions = self.rollout.generate([e for _, e in encoded], params)
        samples = []
        for (item, enc), comps in zip(encoded, completions):
            for c in comps:
                samples.append(Sample(uid=item["uid"], prompt=enc, answer=item["answer"],
                                      response_ids=c.token_ids, finished=c.finished))
        self._score(samples)
        return samples

    def _score(self, samples: list[Sample]) -> None:
        from papo.rewards import compute_score

        texts = self.tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
        scores = compute_score(texts, [s.answer for s in samples], grader=self.grader)
        for s, t, sc in zip(samples, texts, scores):
            s.text, s.reward, s.accuracy, s.format = t, sc["overall"], sc["accuracy"], sc["format"]

    def _collect(self, step: int) -> tuple[list[Sample], dict[str, float]]:
        """Roll out this rank's prompts; with the online filter, regenerate until full."""
        t = self.cfg.trainer
        if self.papo.online_filter is None:
            idx = self.stream.take(t.rollout_batch_size)[self.rank::self.world]
            return self._rollout_round(idx, step, 0), {}
        return self._collect_filtered(step)

    def _collect_filtered(self, step: int) -> tuple[list[Sample], dict[str, float]]:
        """DAPO dynamic sampling, as the official `_make_batch_data` does it.

        Each try draws `rollout_batch_size` prompts (every rank rolls out its share) and keeps
        the groups whose mean accuracy lies strictly inside `papo.online_filter`; a try whose
        filter keeps no group at all is kept whole. Tries go on until `rollout_batch_size`
        groups are kept, over all ranks, and fail after `trainer.online_filter_max_tries`.
        Every decision that leads to a collective (the rollout gathers ZeRO-3 weights, the
        update equalizes passes) is taken on all-reduced counts, so all ranks retry together.
        The first `rollout_batch_size` kept groups, in draw order, are then spread evenly over
        the ranks: a rank with surplus groups sends their responses and rewards (not their
        pixels: the receiver re-encodes the prompt, masks included, from its seed).
        """
        from papo.advantages import online_filter

        t, n = self.cfg.trainer, self.cfg.rollout.n
        low, high = self.papo.online_filter
        target = t.rollout_batch_size
        # (try, position in the try's draw) -> (dataset index, the group's samples)
        kept: dict[tuple[int, int], tuple[int, list[Sample]]] = {}
        acc_sum = acc_count = 0.0
        tries = total_kept = 0
        while total_kept < target:
            if tries == t.online_filter_max_tries:
                raise RuntimeError(
                    f"papo.online_filter {self.papo.online_filter}: only {total_kept} of {target} prompt "
                    f"groups passed the filter in trainer.online_filter_max_tries="
                    f"{t.online_filter_max_tries} tries (the official trainer stops too); check the data, "
                    "or raise the limit")
            draw = self.stream.take(target)
            positions = list(range(self.rank, target, self.world))
            samples = self._rollout_round([draw[p] for p in positions], step, tries)
            groups = [samples[i * n:(i + 1) * n] for i in range(len(positions))]
            acc = torch.tensor([s.accuracy for s in samples], dtype=torch.float64)
            keep = online_filter(acc, [i // n for i in range(len(samples))], low=low, high=high)
            passing = [i for i in range(len(groups)) if bool(keep[i * n])]
            counts = all_reduce_(torch.tensor([len(passing), float(acc.sum()), float(acc.numel())],
                                              dtype=torch.float64))
            acc_sum, acc_count = acc_sum + counts[1].item(), acc_count + counts[2].item()
            if counts[0].item() == 0:  # official: a try whose filter keeps nothing is kept whole
                passing = list(range(len(groups)))
                counts[0] = target
            for i in passing:
                kept[(tries, positions[i])] = (draw[positions[i]], groups[i])
            total_kept += int(counts[0].item())
            tries += 1
        samples = self._spread_groups(kept, target, step)
        stats = {"filter/tries": float(tries), "filter/kept_groups": float(total_kept),
                 "filter/prompts_seen": float(tries * target),
                 "filter/raw_accuracy": acc_sum / max(acc_count, 1.0)}
        return samples, stats

    def _spread_groups(self, kept: dict[tuple[int, int], tuple[int, list[Sample]]], target: int,
                       step: int) -> list[Sample]:
        """The first `target` kept groups of all ranks (by draw order), `target / world` per rank.

        A rank keeps its own groups up to its share; the others move to ranks short of theirs,
        as (dataset index, responses, rewards), and are re-encoded there.
        """
        if self.world == 1:
            chosen = sorted(kept)[:target]
            return [s for key in chosen for s in kept[key][1]]
        keys: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(keys, sorted(kept))
        chosen = sorted((key, r) for r, rank_keys in enumerate(keys) for key in rank_keys)[:target]
        share = [len(range(r, target, self.world)) for r in range(self.world)]
        own: list[list[tuple[int, int]]] = [[] for _ in range(self.world)]
        surplus: list[tuple[int, int]] = []
        for key, r in chosen:
            (own[r] if len(own[r]) < share[r] else surplus).append(key)
        moves: dict[tuple[int, int], int] = {}  # key -> receiving rank
        for r in range(self.world):
            while len(own[r]) < share[r]:
                key = surplus.pop(0)
                own[r].append(key)
                moves[key] = r
        outgoing = [(key, moves[key], kept[key][0],
                     [(s.response_ids.tolist(), s.finished, s.text, s.reward, s.accuracy, s.format)
                      for s in kept[key][1]])
                    for key in sorted(kept) if key in moves]
        parcels: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(parcels, outgoing)
        mine = {key: kept[key] for key in own[self.rank] if key in kept}  # keys name their rank
        for parcel in parcels:
            for key, dest, idx, responses in parcel:
                if dest != self.rank:
                    continue
                item, enc = self._encode(idx, step)
                mine[key] = (idx, [Sample(uid=item["uid"], prompt=enc, answer=item["answer"],
                                          response_ids=torch.tensor(ids, dtype=torch.long), finished=done,
                                          text=text, reward=reward, accuracy=accuracy, format=fmt)
                                   for ids, done, text, reward, accuracy, fmt in responses])
        return [s for key in sorted(mine) for s in mine[key][1]]

    def _advantages(self, samples: list[Sample]) -> None:
        from papo.advantages import dr_grpo_advantages, grpo_advantages

        if not samples:
            return
        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
        groups = [s.uid for s in samples]
        fn = grpo_advantages if self.cfg.trainer.advantage == "grpo" else dr_grpo_advantages
        for s, a in zip(samples, fn(rewards, groups).tolist()):
            s.advantage = a

    # ------------------------------------------------------------------ no-grad statistics

    def _equalize(self, plan: list[list[int]]) -> list[list[int] | None]:
        """Pad this rank's micro-batch plan to the max count over ranks (None = dummy pass).

        ZeRO-3 gathers parameters collectively in every forward, so every rank must run
        the same number of forwards; a dummy pass reruns a real micro-batch with zero loss.
        """
        n = all_reduce_(torch.tensor([len(plan)], dtype=torch.long), "max").item()
        return plan + [None] * (int(n) - len(plan))

    @torch.no_grad()
    def _logprob_pass(self, samples: list[Sample]) -> None:
        """Old and masked log-probs (+ exact monitors) and reference log-probs, no grad.

        The masked pass runs when any sample of the rollout batch, on any rank, has an image
        (the number of forwards must match across ranks under ZeRO-3); a text-only sample's
        masked view is its original one, so without any image the masked log-probs are the
        old ones.
        """
        t = self.cfg.trainer
        has_image = any(s.prompt.masked_pixel_values is not None for s in samples)
        two_view = bool(all_reduce_(torch.tensor([int(has_image)]), "max").item())
        plan = plan_micro_batches([len(s) for s in samples], max_seqs=t.log_prob_micro_batch_size,
                                  max_tokens=t.micro_batch_tokens)
        plan = self._equalize(plan) if self.zero3 or self.ref_sharded else plan
        self._refresh_fp32_head()
        self.engine.eval()
        for group in plan:
            # a padding pass (None) reruns this rank's first micro-batch and is discarded
            members = [samples[i] for i in (group if group is not None else plan[0])]
            batch = pack(self.module.policy.model, [s.seq() for s in members]).to(self.device)
            stats = self.engine(batch, mode="stats", temperature=self.papo.temperature, two_view=two_view)
            ref_stats = None
            if self.ref_model is not None:
                ref_stats = self.ref_model(batch, mode="stats", temperature=self.papo.temperature,
                                           two_view=False)
            if group is None:
                continue
            lengths = batch.response_mask.sum(-1).long().tolist()
            for b, (s, R) in enumerate(zip(members, lengths)):
                if two_view:
                    lpa, lpb, ha, hb, kab, kba = (x[b, :R].float().cpu() for x in stats)
                    s.old_logp, s.masked_logp = lpa, lpb
                    s.monitors = {"kl_full_to_masked": kab.mean().item(), "kl_masked_to_full": kba.mean().item(),
                                  "entropy_full": ha.mean().item(), "entropy_masked": hb.mean().item()}
                else:
                    lp, h = (x[b, :R].float().cpu() for x in stats)
                    s.old_logp, s.masked_logp = lp, lp
                    s.monitors = {"entropy_full": h.mean().item()}
                if ref_stats is not None:
                    s.ref_logp = ref_stats[0][b, :R].float().cpu()
        self.engine.train()

    # ------------------------------------------------------------------ update phase

    def forward_backward_step(self, members: list[Sample], *, num_micro_batches: int, num_valid_tokens: float,
                              num_valid_sequences: float, coefficients, dummy: bool = False) -> dict[str, float]:
        """One micro-batch: packed forward, PAPOLoss, backward (no DeepSpeed GAS scaling)."""
        seqs = [s.seq() for s in members]
        batch = pack(self.module.policy.model, seqs)
        if dummy:  # same shapes, no loss: keeps ZeRO-3 collectives in step across ranks
            batch.response_mask.zero_()
        batch = batch.to(self.device)
        T = batch.response_ids.shape[1]
        adv = torch.tensor([s.advantage for s in members], dtype=torch.float32, device=self.device)
        kw = dict(
            masked_view=self.papo.masked_view,
            advantages=adv,
            old_logp=_dev(pad_stack([s.old_logp for s in members], T), self.device),
            ref_logp=_dev(pad_stack([s.ref_logp for s in members], T), self.device) if self.papo.beta > 0 else None,
            num_micro_batches=num_micro_batches,
            num_valid_tokens=num_valid_tokens,
            num_valid_sequences=num_valid_sequences,
            coefficients=coefficients,
        )
        if self.papo.masked_view == "rollout_no_grad":
            kw["masked_logp"] = _dev(pad_stack([s.masked_logp for s in members], T), self.device)
        loss, metrics = self.engine(batch, mode="loss", **kw)
        if self.papo.loss_scale == "global":
            # DeepSpeed averages gradients over data-parallel ranks; the global normalization
            # already divides by the all-reduced count, so undo the average.
            loss = loss * self.world
        self.engine.backward(loss, scale_wrt_gas=False)
        if dummy:
            return {}
        return {k: float(v) for k, v in metrics.items()}

    def _update(self, samples: list[Sample], coefficients) -> dict[str, float]:
        """All mini-batches of this rollout step; returns token-weighted mean metrics."""
        t = self.cfg.trainer
        n_prompts = len({s.uid for s in samples})
        uids = []
        for s in samples:
            if s.uid not in uids:
                uids.append(s.uid)
        local_mb = max(1, math.ceil(len(range(self.rank, t.mini_batch_size, self.world))))
        n_mini = int(all_reduce_(torch.tensor([math.ceil(n_prompts / local_mb) if n_prompts else 0]), "max").item())
        sums: dict[str, float] = {}
        weight_total = 0.0
        grad_norms, lrs, skipped = [], [], 0
        tokens = 0
        loss_sum = 0.0  # this rank's micro-batch losses: each is already its share of the mini-batch
        for j in range(n_mini):
            self._refresh_fp32_head()  # the head changed at the previous optimizer step
            mb_uids = set(uids[j * local_mb: (j + 1) * local_mb])
            mb = [s for s in samples if s.uid in mb_uids]
            plan = plan_micro_batches([len(s) for s in mb], max_seqs=t.micro_batch_size,
                                      max_tokens=t.micro_batch_tokens)
            n_real = len(plan)
            if self.zero3 or self.world > 1:
                plan = self._equalize(plan)
            counts = torch.tensor([sum(int(s.response_ids.numel()) for s in mb), len(mb)], dtype=torch.float64)
            all_reduce_(counts)
            for group in plan:
                dummy = group is None
                members = [mb[i] for i in (plan[0] if dummy and plan[0] else group or [])]
                if not members:
                    members = samples[:1]  # a rank without samples still joins with a zero-loss pass
                    dummy = True
                m = self.forward_backward_step(members, num_micro_batches=max(n_real, 1),
                                               num_valid_tokens=max(counts[0].item(), 1.0),
                                               num_valid_sequences=max(counts[1].item(), 1.0),
                                               coefficients=coefficients, dummy=dummy)
                if m:
                    loss_sum += m["loss/total"]
                    w = m.get("tokens/count", 0.0)
                    weight_total += w
                    tokens += sum(len(s) for s in members)
                    for k, v in m.items():
                        if k != "tokens/count":
                            sums[k] = sums.get(k, 0.0) + v * w
            # official: skip the update when the gradient norm is not finite. Where the gradients
            # are whole on each rank (ZeRO 0/1) the norm is checked here; ZeRO 2/3 (and DeepSpeed's
            # bf16 optimizers) check the norm of their partitioned gradients inside step() and
            # skip it themselves, counted in the engine's skipped_steps.
            fault_point("optimizer.step")
            norm = self._grad_norm_precheck()
            engine_skipped = getattr(self.engine, "skipped_steps", 0)
            if norm is not None and not math.isfinite(norm):
                self.engine.zero_grad()
                skipped += 1
                self.engine.step()  # still closes the accumulation window (grads are None -> no-op)
            else:
                self.engine.step()
                skipped += int(getattr(self.engine, "skipped_steps", 0) > engine_skipped)
            self._optimizer_steps += 1
            # the pre-clip norm (what the official code logs); DeepSpeed's own where grads are partitioned
            gn = norm if norm is not None else self.engine.get_global_grad_norm()
            grad_norms.append(float(gn) if gn is not None else float("nan"))
            lrs.append(self.scheduler.get_last_lr()[0] if self.scheduler is not None else self.cfg.optim.lr)
        sums, weight_total, tokens = combine_across_ranks(sums, weight_total, tokens)
        out = {k: v / max(weight_total, 1.0) for k, v in sums.items()}
        # The objective each optimizer step minimized, averaged over the step's mini-batches:
        # micro-batch losses sum to the rank's share; "global" shares sum over ranks, otherwise
        # DeepSpeed averages the ranks' gradients, so their losses average too.
        loss_sum = float(all_reduce_(torch.tensor([loss_sum], dtype=torch.float64)).item())
        per_step = loss_sum if self.papo.loss_scale == "global" else loss_sum / self.world
        out["loss/total"] = per_step / max(n_mini, 1)
        out["grad_norm"] = float(np.mean(grad_norms)) if grad_norms else 0.0
        out["lr"] = lrs[-1] if lrs else self.cfg.optim.lr
        out["optimizer_steps"] = float(n_mini)
        out["skipped_steps"] = float(skipped)
        out["update_tokens"] = float(tokens)
        return out

    def _grad_norm_precheck(self) -> float | None:
        """Global grad norm before the step where gradients are materialized (ZeRO 0/1)."""
        if self.cfg.trainer.zero_stage >= 2:
            return None
        grads = [p.grad.detach() for p in self.module.parameters() if p.grad is not None]
        if self.world > 1:
            # ZeRO 0/1 average the ranks' gradients inside engine.step(); the norm that clipping
            # uses is the mean's, so form the mean here (one extra all-reduce of the gradients;
            # the sum of per-rank squared norms would be a different number).
            # (every trainable parameter, zeros where this rank has no gradient: same length on all ranks)
            flat = torch.cat([torch.zeros(1, dtype=torch.float64, device=self.device)] + [
                (p.grad.detach() if p.grad is not None else torch.zeros_like(p)).reshape(-1).double()
                for p in self.module.parameters() if p.requires_grad])
            all_reduce_(flat)
            return float(flat.div_(self.world).norm())
        sq = torch.zeros((), dtype=torch.float64)
        for g in grads:
            sq += g.double().pow(2).sum().cpu()
        return float(sq.sqrt())

    def _sync_rollout(self) -> None:
        """Push the policy's current weights into a rollout engine that holds its own copy
        (vLLM), unless they have not changed since the last push."""
        sync = getattr(self.rollout, "sync_weights", None)
        version = (self.step, self._optimizer_steps)
        if callable(sync) and version != self._synced_version:
            sync(self.module.policy)
            self._synced_version = version

    # ------------------------------------------------------------------ one rollout step

    def train_step(self) -> dict[str, Any]:
        """One rollout step (docs/algorithm.md, "Order of one training step"); returns its metrics."""
        t0 = time.perf_counter()
        step = self.step
        self._sync_rollout()
        samples, filter_stats = self._collect(step)
        t_rollout = time.perf_counter()
        self._advantages(samples)
        self._logprob_pass(samples)
        t_stats = time.perf_counter()
        coefs = self.papo.coefficients(step, self.total_steps)
        upd = self._update(samples, coefs)
        t_update = time.perf_counter()

        # batch statistics over all ranks
        vals = torch.tensor([
            sum(s.reward for s in samples), sum(s.accuracy for s in samples), sum(s.format for s in samples),
            sum(int(s.response_ids.numel()) for s in samples), float(len(samples)),
            sum(1.0 for s in samples if not s.finished),
            sum(s.monitors.get("kl_full_to_masked", 0.0) for s in samples),
            sum(s.monitors.get("kl_masked_to_full", 0.0) for s in samples),
            sum(s.monitors.get("entropy_full", 0.0) for s in samples),
            sum(s.monitors.get("entropy_masked", 0.0) for s in samples),
        ], dtype=torch.float64)
        all_reduce_(vals)
        n = max(vals[4].item(), 1.0)
        gen_tokens = vals[3].item()
        rec: dict[str, Any] = {
            "step": step + 1,
            "epoch": self.stream.epoch,
            "reward/mean": vals[0].item() / n,
            "reward/accuracy": vals[1].item() / n,
            "reward/format": vals[2].item() / n,
            "response/length_mean": gen_tokens / n,
            "response/max": max((int(s.response_ids.numel()) for s in samples), default=0),
            "response/truncated_frac": vals[5].item() / n,
            "rollout/kl_perception_exact": vals[6].item() / n,
            "rollout/kl_masked_to_full_exact": vals[7].item() / n,
            "rollout/entropy_full_exact": vals[8].item() / n,
            "rollout/entropy_masked_exact": vals[9].item() / n,
            "coef/gamma": coefs.gamma, "coef/eta_full": coefs.eta_full, "coef/eta_masked": coefs.eta_masked,
            "time/rollout_s": t_rollout - t0,
            "time/logprob_s": t_stats - t_rollout,
            "time/update_s": t_update - t_stats,
            "time/step_s": t_update - t0,
            "perf/rollout_tokens_per_s": gen_tokens / max(t_rollout - t0, 1e-9),
            "perf/update_tokens_per_s": upd.pop("update_tokens") / max(t_update - t_stats, 1e-9),  # all ranks
            "memory/peak_mb": peak_memory_mb(self.device),
            "data/overlong_skipped": self.train_ds.stats.overlong,
            "data/undecodable_skipped": self.train_ds.stats.undecodable + self.train_ds.stats.skipped_at_access,
        }
        rec.update(upd)
        rec.update(filter_stats)
        self.step += 1
        return rec

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, *, black_images: bool = False) -> dict[str, float]:
        """avg@k accuracy on the validation split (protocol: docs/algorithm.md "Evaluation")."""
        from train.eval import evaluate_dataset

        self._sync_rollout()
        e = self.cfg.eval
        return evaluate_dataset(self.rollout, self.processor, self.val_ds, k=e.k, temperature=e.temperature,
                                top_p=e.top_p, max_new_tokens=min(e.max_new_tokens, self.cfg.data.max_response_length),
                                min_pixels=e.min_pixels, max_pixels=e.max_pixels, limit=e.limit,
                                seed=self.cfg.seed, black_images=black_images, grader=self.grader,
                                rank=self.rank, world=self.world)

    # ------------------------------------------------------------------ checkpoints

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Write checkpoint `step_<n>` atomically (temp dir + rename) and prune old ones.

        Raises CheckpointError when a file cannot be written (e.g. ENOSPC): the partial copy is
        removed and the previous checkpoints are untouched, so a rerun resumes from the newest.
        """
        final = self.ckpt_root / f"{CHECKPOINT_PREFIX}{self.step:06d}"
        tmp = self.ckpt_root / f"{TEMP_PREFIX}{CHECKPOINT_PREFIX}{self.step:06d}"
        if self.rank == 0:
            self.ckpt_root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        if faults_armed():
            _route_through_fault_points(self.engine.checkpoint_engine)
        try:
            self.engine.save_checkpoint(str(tmp), tag="ds", save_latest=False)
            rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
            _write_checkpoint_file(tmp / f"rng_rank{self.rank}.pt", lambda p: torch.save(rng, p))
            barrier()
            if self.rank == 0:
                state = {"step": self.step, "stream": self.stream.state(), "world_size": self.world,
                         "total_steps": self.total_steps, "config": resume_fingerprint(self.cfg)}
                _write_checkpoint_file(tmp / "trainer_state.json",
                                       lambda p: p.write_text(json.dumps(state, indent=2)))
                _write_checkpoint_file(tmp / COMPLETE_MARKER, lambda p: p.write_text("ok\n"))
                _fsync_tree(tmp)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)  # free what the partial copy took (a full disk)
            newest = complete_checkpoints(self.ckpt_root)
            kept = f"the newest complete checkpoint, {newest[-1].name}, is intact" if newest else \
                "there is no complete checkpoint yet"
            raise CheckpointError(f"writing checkpoint {final.name} failed ({e}); its partial copy was removed "
                                  f"and {kept}: fix the cause and rerun to resume") from e
        if self.rank == 0:
            if final.exists():  # re-saving the same step: move the old copy aside first
                old = self.ckpt_root / f".old-{final.name}"
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(final)
            _fsync_dir(self.ckpt_root)
            for old in complete_checkpoints(self.ckpt_root)[: -self.cfg.checkpoint.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def maybe_resume(self) -> bool:
        """Load the newest complete checkpoint, if any; returns whether it resumed."""
        if not self.cfg.checkpoint.resume:
            return False
        if self.rank == 0 and self.ckpt_root.is_dir():
            # partial copies of killed or failed writes: never loaded, only taking space
            for partial in self.ckpt_root.glob(f"{TEMP_PREFIX}*"):
                shutil.rmtree(partial, ignore_errors=True)
        ckpts = complete_checkpoints(self.ckpt_root)
        if not ckpts:
            return False
        path = ckpts[-1]
        state = read_trainer_state(path)
        check_resumable(state, path, world=self.world, cfg=self.cfg)
        self.engine.load_checkpoint(str(path), tag="ds", load_optimizer_states=True, load_lr_scheduler_states=True)
        self.step = int(state["step"])
        self.stream.load(state["stream"])
        rng_file = path / f"rng_rank{self.rank}.pt"
        if rng_file.exists():
            rng = torch.load(rng_file, weights_only=False)
            torch.set_rng_state(rng["torch"])
            np.random.set_state(rng["numpy"])
            random.setstate(rng["python"])
        self.metrics.truncate_after(self.step)
        if self.rank == 0:
            log.info("resumed from %s at step %d", path, self.step)
        return True

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The policy's full weights on CPU (ZeRO-3 partitions gathered; collective call)."""
        if self.zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.policy.parameters())):
                return {k: v.detach().clone().cpu() for k, v in self.module.policy.state_dict().items()}
        return {k: v.detach().clone().cpu() for k, v in self.module.policy.state_dict().items()}

    def export_hf(self, out_dir: Path) -> Path:
        """Save the policy in HF format (ZeRO-3 shards consolidated) with its processor."""
        state = self.full_state_dict()
        if self.cfg.model.lora.rank and self.rank == 0:
            from train.lora import merged_state_dict

            state = merged_state_dict(state, self.cfg.model.lora)  # plain Qwen2.5-VL weights
        if self.rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.module.policy.save_pretrained(out_dir, state_dict=state)
            self.processor.save_pretrained(out_dir)
        barrier()
        return out_dir

    # ------------------------------------------------------------------ the loop

    def train(self) -> list[dict[str, Any]]:
        """Run (or resume) training to `total_steps`; returns the step records of this process."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        resumed = self.maybe_resume()
        records = []
        c = self.cfg
        if c.eval.before_training and c.eval.every and not resumed and self.step == 0:
            self._log_eval()
        progress = Progress(TextColumn("[bold]PAPO"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("{task.description}"), disable=self.rank != 0 or not sys.stderr.isatty())
        with progress:
            task = progress.add_task("", total=self.total_steps, completed=self.step)
            while self.step < self.total_steps:
                rec = self.train_step()
                records.append(rec)
                self.metrics.log(rec)
                progress.update(task, completed=self.step,
                                description=f"acc {rec['reward/accuracy']:.3f} loss {rec.get('loss/total', 0):.4f}")
                if self.rank == 0 and (self.step % c.log_every == 0):
                    log.info("step %d/%d acc %.3f reward %.3f len %.1f loss %.4f kl_prcp %.4f (%.1fs)",
                             self.step, self.total_steps, rec["reward/accuracy"], rec["reward/mean"],
                             rec["response/length_mean"], rec.get("loss/total", float("nan")),
                             rec.get("kl/perception", float("nan")), rec["time/step_s"])
                if c.eval.every and self.step % c.eval.every == 0 and self.step < self.total_steps:
                    self._log_eval()
                if c.checkpoint.save_every and self.step % c.checkpoint.save_every == 0:
                    self.save_checkpoint()
        if c.checkpoint.save_final and self.step and \
                not (self.ckpt_root / f"{CHECKPOINT_PREFIX}{self.step:06d}").exists():
            self.save_checkpoint()
        if c.eval.every:
            self._log_eval(final=True)
        if c.checkpoint.export_hf:
            self.export_hf(self.out / "hf_model")
        if c.plot and self.rank == 0:
            try:
                from train.plot import plot_run

                plot_run(self.out)
            except ImportError as e:  # matplotlib is optional
                log.warning("no plots (%s); install matplotlib, then `python -m train.plot %s`", e, self.out)
        return records

    def _log_eval(self, final: bool = False) -> dict[str, float]:
        res = self.evaluate()
        rec = {"step": self.step, **{f"eval/{k}": v for k, v in res.items()}}
        self.metrics.log(rec)
        if self.rank == 0:
            log.info("eval at step %d: %s", self.step, json.dumps(res))
        if final:
            self._final_report(rec)
        return res

    def _blind_baseline(self) -> float:
        """Question-aware majority-answer rate of the evaluated validation questions."""
        from collections import Counter

        n = min(self.cfg.eval.limit, len(self.val_ds)) if self.cfg.eval.limit else len(self.val_ds)
        by_q: dict[str, list[str]] = {}
        for i in range(n):
            row = self.val_ds.records[self.val_ds.indices[i]]
            key = str(row.get("category") or row[self.cfg.data.prompt_key])
            by_q.setdefault(key, []).append(str(row[self.cfg.data.answer_key]))
        return sum(Counter(a).most_common(1)[0][1] for a in by_q.values()) / max(n, 1)

    def _final_report(self, final: dict[str, Any]) -> None:
        """eval_final.json and eval.md: warm-started (step 0) vs final avg@k, black-image check."""
        from train.eval import to_markdown

        k = self.cfg.eval.k
        key = f"eval/avg@{k}"
        black = self.evaluate(black_images=True) if self.cfg.eval.black_images else None
        if self.rank != 0:
            return
        report: dict[str, Any] = dict(final)
        start = None
        if self.metrics.path.exists():
            for line in self.metrics.path.read_text().splitlines():
                r = json.loads(line) if line.strip() else {}
                if r.get("step") == 0 and key in r:
                    start = r
        rows = {}
        if start is not None:
            report["initial"] = {k2[5:]: v for k2, v in start.items() if k2.startswith("eval/")}
            report[f"delta_avg@{k}"] = final[key] - start[key]
            rows["initial policy (step 0)"] = report["initial"]
        rows[f"final policy (step {self.step})"] = {k2[5:]: v for k2, v in final.items()
                                                    if k2.startswith("eval/")}
        if black is not None:
            baseline = self._blind_baseline()
            report["black_images"] = black
            report["blind_baseline"] = baseline
            report["black_images_margin"] = black[f"avg@{k}"] - baseline
            rows[f"final policy, black images (blind baseline {100 * baseline:.2f}%)"] = black
            self.metrics.log({"step": self.step, **{f"eval_black/{k2}": v for k2, v in black.items()}})
        (self.out / "eval_final.json").write_text(json.dumps(report, indent=2) + "\n")
        md = to_markdown(rows, k).rsplit("| **overall**", 1)[0]
        if start is not None:
            delta = 100 * report[f"delta_avg@{k}"]
            md += f"\navg@{k} change: {delta:+.2f} points on {final['eval/questions']} questions\n"
        (self.out / "eval.md").write_text(md)
        log.info("evaluation (avg@%d, %d questions):\n%s", k, final["eval/questions"], md)

    def close(self) -> None:
        """Release the grader workers and the metrics writer."""
        if self._grader is not None:
            self._grader.close()
        self.metrics.close()


# --------------------------------------------------------------------------- helpers


def lr_factor(step: int, total: int, o) -> float:
    """Multiplier of the peak lr at optimizer step `step` (warm-up, then the schedule)."""
    warm = int(o.warmup_ratio * total)
    if step < warm:
        return (step + 1) / warm
    if o.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warm) / max(1, total - warm))
    if o.lr_schedule == "linear":
        return 1.0 - (1.0 - o.min_lr_ratio) * progress
    return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _dev(t: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def resume_fingerprint(cfg: RunConfig) -> dict[str, Any]:
    """The values under `RESUME_INVARIANT_KEYS` in `cfg` as {dotted leaf key: plain JSON value}, stored
    with each checkpoint (the papo section as the resolved PAPOConfig, so a preset and its spelled-out
    values compare equal)."""
    tree = cfg.to_dict()
    tree["papo"] = asdict(cfg.papo_config())
    out: dict[str, Any] = {}

    def flatten(key: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                flatten(f"{key}.{k}", v)
        else:
            out[key] = json.loads(json.dumps(value))

    for key in RESUME_INVARIANT_KEYS:
        value: Any = tree
        for part in key.split("."):
            value = value[part]
        flatten(key, value)
    return out


def read_trainer_state(path: Path) -> dict[str, Any]:
    """The trainer_state.json of a complete checkpoint; CheckpointError if it is missing or unreadable."""
    state_file = path / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text())
        if not isinstance(state, dict):
            raise ValueError(f"a JSON object was expected, got {type(state).__name__}")
        for key in ("step", "stream", "world_size"):
            if key not in state:
                raise ValueError(f"the key {key!r} is missing")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is marked complete but its trainer_state.json cannot be "
                              f"read ({e}); move the directory aside to resume from the previous "
                              "checkpoint") from e
    return state


def check_resumable(state: dict[str, Any], path: Path, *, world: int, cfg: RunConfig) -> None:
    """Refuse (CheckpointError) a checkpoint written by another number of ranks or under other
    values of `RESUME_INVARIANT_KEYS` than `cfg`'s (keys named in checkpoint.allow_changed_keys
    may differ). Checkpoints that predate the stored config are checked for the world size only."""
    if state["world_size"] != world:
        raise CheckpointError(f"checkpoint {path} was written with world size {state['world_size']} but "
                              f"this run has world size {world}: ZeRO partitions and RNG states are per "
                              f"rank; resume with world size {state['world_size']}")
    saved = state.get("config")
    if saved is None:
        return
    now = resume_fingerprint(cfg)
    allowed = set(cfg.checkpoint.allow_changed_keys)

    def is_allowed(key: str) -> bool:  # the key itself or a section above it
        parts = key.split(".")
        return any(".".join(parts[:i]) in allowed for i in range(1, len(parts) + 1))

    missing = "(absent)"
    changed = [k for k in sorted(set(saved) | set(now))
               if saved.get(k, missing) != now.get(k, missing) and not is_allowed(k)]
    if changed:
        diffs = "; ".join(f"{k}: {json.dumps(saved.get(k, missing))} in the checkpoint, "
                          f"{json.dumps(now.get(k, missing))} now" for k in changed)
        raise CheckpointError(f"checkpoint {path} was written under another configuration ({diffs}). "
                              "Resume with the checkpoint's values, use another out_dir, or list the keys "
                              "in checkpoint.allow_changed_keys to continue with the new values on purpose")


def _write_checkpoint_file(path: Path, write) -> None:
    """write(path) between the checkpoint fault points (free when no fault is armed)."""
    fault_point("checkpoint.write")
    write(path)
    fault_point("checkpoint.written")


def _route_through_fault_points(checkpoint_engine) -> None:
    """Make each file DeepSpeed's checkpoint engine writes pass the checkpoint fault points."""
    save = checkpoint_engine.save
    if getattr(save, "_through_fault_points", False):
        return

    def save_through_fault_points(state_dict, path):
        _write_checkpoint_file(path, lambda p: save(state_dict, p))

    save_through_fault_points._through_fault_points = True
    checkpoint_engine.save = save_through_fault_points


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories with their COMPLETE marker, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / COMPLETE_MARKER).exists()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))
