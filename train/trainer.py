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

Checkpoints (train/checkpoint.py) are written atomically; `train()` resumes from the newest
complete one and refuses one written by another number of ranks or under another value of a
setting its contents depend on. Metrics go to `<out_dir>/metrics.jsonl` (and TensorBoard). At the
end, `<out_dir>/eval.md` and `eval_final.json` compare the step-0 (warm-started) and final avg@k on
the same validation questions, with the black-image check when `eval.black_images` is set
(train/report.py), and `<out_dir>/plots/` holds the curves of `python -m train.plot`.

This module is the wiring; the parts live beside it, each importable alone:

    train/distributed.py   process group, collectives, seeds
    train/policy.py        loading the model, what trains, PolicyWithLoss (loss inside lm_head)
    train/engine.py        DeepSpeed config, optimizer and schedule, reference policy, fp32 masters
    train/samples.py       PromptStream (resumable prompt order), Sample
    train/online_filter.py the DAPO online filter's tries and the spread of kept groups over ranks
    train/logprobs.py      the no-grad passes (step 6)
    train/update.py        the update phase (step 7)
    train/metrics.py       the step record and the metrics logger
    train/checkpoint.py    atomic checkpoints, resume checks, fault points
    train/report.py        the end-of-run evaluation report
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from papo import PAPOLoss
from papo.advantages import dr_grpo_advantages, grpo_advantages
from papo.masking import mask_images
from papo.rewards import AnswerGrader, compute_score
from train.batching import EncodedPrompt, encode_prompt
from train.checkpoint import (
    CHECKPOINT_PREFIX,
    load_checkpoint,
    newest_checkpoint,
    resume_fingerprint,
    save_checkpoint,
)
from train.config import ConfigError, RunConfig, save_config
from train.data import load_dataset_for, write_synthetic
from train.distributed import barrier, init_distributed, set_deterministic
from train.engine import build_engine, build_reference, fp32_master_weight, full_state_dict, gathered
from train.eval import evaluate_dataset
from train.logprobs import logprob_pass
from train.lora import merged_state_dict
from train.metrics import MetricsLogger, StepTimes, rollout_step_record
from train.online_filter import Kept, collect_until_full, spread_groups
from train.plot import plot_run
from train.policy import PolicyWithLoss, configure_policy, load_policy
from train.report import blind_baseline, write_final_report
from train.rollout import HFRolloutEngine, RolloutEngine, SamplingParams
from train.samples import PromptStream, Sample
from train.sft import run_sft
from train.tiny import ensure_tiny_model_dir
from train.update import PolicyUpdate
from train.vllm_engine import VLLMRolloutEngine

log = logging.getLogger("train")


class Trainer:
    """PAPO on Qwen2.5-VL through DeepSpeed; see the module docstring.

    Args:
        cfg: the resolved RunConfig.
        rollout_engine: optional RolloutEngine to use instead of the HF engine
            (tests inject fixed rollouts through it).
    """

    def __init__(self, cfg: RunConfig, *, rollout_engine: RolloutEngine | None = None):
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
                         min_pixels=d.min_pixels, max_pixels=d.max_pixels,
                         max_prompt_length=d.max_prompt_length)
        self.train_ds = load_dataset_for(data_path["train"], d.train_split, self.processor, **ds_kwargs)
        self.val_ds = load_dataset_for(data_path["val"], d.val_split, self.processor, **ds_kwargs)

        if cfg.sft.steps > 0:
            # freeze / checkpointing apply to the warm start too; it is full fine-tuning even
            # with LoRA configured (the adapters are added to the warm-started policy)
            configure_policy(policy, cfg.model, adapters=False)
            policy = self._warm_start(policy, dtype)
        configure_policy(policy, cfg.model, adapters=True, verbose=self.rank == 0)

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

        self.engine, self.optimizer, self.scheduler = build_engine(
            self.module, cfg, world=self.world, dtype=dtype,
            optimizer_steps=self.total_steps * self.opt_steps_per_step)
        self.zero3 = t.zero_stage == 3
        # the reference policy (beta > 0) is the policy PAPO starts from: the warm-started one, if any
        self.ref_model, self.ref_sharded = None, False
        if self.papo.beta > 0:
            ref_dir = self.out / "sft_model" if cfg.sft.steps > 0 else model_dir
            self.ref_model, self.ref_sharded = build_reference(ref_dir, cfg, dtype=dtype, device=self.device,
                                                               world=self.world)

        gather = (lambda: gathered(self.module.policy)) if self.zero3 else None
        if rollout_engine is None and cfg.rollout.engine == "vllm":
            # started from the policy's directory (the warm start's, if any); its weights are
            # replaced by the policy's at the start of every rollout phase (`_sync_rollout`)
            policy_dir = self.out / "sft_model" if cfg.sft.steps > 0 else model_dir
            rollout_engine = VLLMRolloutEngine.from_config(cfg, policy_dir, self.tokenizer, gather=gather)
        self.rollout = rollout_engine or HFRolloutEngine(self.module.policy, self.tokenizer,
                                                         batch_size=cfg.rollout.batch_size, gather=gather)
        self.updater = PolicyUpdate(self.engine, self.module, self.scheduler, cfg, self.papo,
                                    rank=self.rank, world=self.world, device=self.device,
                                    refresh_head=self._refresh_fp32_head)
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
        sft_dir = self.out / "sft_model"
        if self.rank == 0 and not (sft_dir / "config.json").exists():
            run_sft(policy, self.processor, self.train_ds, self.cfg, out_dir=sft_dir)
        barrier()
        policy, _ = load_policy(sft_dir, dtype=torch.float32,
                                attn_implementation=self.cfg.model.attn_implementation)
        return policy

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

    @property
    def grader(self) -> AnswerGrader:
        if self._grader is None:
            self._grader = AnswerGrader()
        return self._grader

    # ------------------------------------------------------------------ rollout phase (steps 1-5)

    def _encode(self, idx: int, step: int) -> tuple[dict, EncodedPrompt]:
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
        """The DAPO online filter's tries (train/online_filter.py)."""
        t = self.cfg.trainer
        return collect_until_full(self.stream, lambda idx, attempt: self._rollout_round(idx, step, attempt),
                                  lambda kept, target: self._spread_groups(kept, target, step),
                                  bounds=self.papo.online_filter, n=self.cfg.rollout.n,
                                  target=t.rollout_batch_size, max_tries=t.online_filter_max_tries,
                                  rank=self.rank, world=self.world)

    def _spread_groups(self, kept: Kept, target: int, step: int) -> list[Sample]:
        """This rank's share of the first `target` kept groups; moved ones are re-encoded here."""
        return spread_groups(kept, target, rank=self.rank, world=self.world,
                             encode=lambda i: self._encode(i, step))

    def _advantages(self, samples: list[Sample]) -> None:
        if not samples:
            return
        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
        groups = [s.uid for s in samples]
        fn = grpo_advantages if self.cfg.trainer.advantage == "grpo" else dr_grpo_advantages
        for s, a in zip(samples, fn(rewards, groups).tolist()):
            s.advantage = a

    # ------------------------------------------------------------------ no-grad passes and update (6-7)

    def _logprob_pass(self, samples: list[Sample]) -> None:
        """Old and masked log-probs (+ exact monitors) and reference log-probs (train/logprobs.py)."""
        t = self.cfg.trainer
        self._refresh_fp32_head()
        logprob_pass(self.engine, self.ref_model, self.module.policy, samples, device=self.device,
                     temperature=self.papo.temperature, max_seqs=t.log_prob_micro_batch_size,
                     max_tokens=t.micro_batch_tokens, equalize=self.zero3 or self.ref_sharded)

    def _update(self, samples: list[Sample], coefficients) -> dict[str, float]:
        """All mini-batches of this rollout step (train/update.py); returns their metrics."""
        out = self.updater.run(samples, coefficients)
        self._optimizer_steps += int(out["optimizer_steps"])
        return out

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
        times = StepTimes(start=t0, rollout=t_rollout, logprobs=t_stats, update=time.perf_counter())
        rec = rollout_step_record(step, self.stream.epoch, samples, coefs, times, upd, self.device,
                                  self.train_ds.stats)
        rec.update(filter_stats)
        self.step += 1
        return rec

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, *, black_images: bool = False) -> dict[str, float]:
        """avg@k accuracy on the validation split (protocol: docs/algorithm.md "Evaluation")."""
        self._sync_rollout()
        e = self.cfg.eval
        return evaluate_dataset(self.rollout, self.processor, self.val_ds, k=e.k, temperature=e.temperature,
                                top_p=e.top_p,
                                max_new_tokens=min(e.max_new_tokens, self.cfg.data.max_response_length),
                                min_pixels=e.min_pixels, max_pixels=e.max_pixels, limit=e.limit,
                                seed=self.cfg.seed, black_images=black_images, grader=self.grader,
                                rank=self.rank, world=self.world)

    def _log_eval(self, final: bool = False) -> dict[str, float]:
        res = self.evaluate()
        rec = {"step": self.step, **{f"eval/{k}": v for k, v in res.items()}}
        self.metrics.log(rec)
        if self.rank == 0:
            log.info("eval at step %d: %s", self.step, json.dumps(res))
        if final:
            self._final_report(rec)
        return res

    def _final_report(self, final: dict[str, Any]) -> None:
        """eval_final.json and eval.md (train/report.py); the black-image evaluation runs on every rank."""
        black = self.evaluate(black_images=True) if self.cfg.eval.black_images else None
        if self.rank != 0:
            return
        baseline = blind_baseline(self.val_ds, self.cfg) if black is not None else None
        write_final_report(self.out, self.metrics, final, k=self.cfg.eval.k, step=self.step, black=black,
                           baseline=baseline)

    # ------------------------------------------------------------------ checkpoints and weights

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Write checkpoint `step_<n>` atomically and prune old ones (train/checkpoint.py)."""
        state = {"step": self.step, "stream": self.stream.state(), "world_size": self.world,
                 "total_steps": self.total_steps, "config": resume_fingerprint(self.cfg)}
        return save_checkpoint(self.engine, self.ckpt_root, self.step, rank=self.rank, trainer_state=state,
                               keep_last=self.cfg.checkpoint.keep_last)

    def maybe_resume(self) -> bool:
        """Load the newest complete checkpoint, if any; returns whether it resumed."""
        if not self.cfg.checkpoint.resume:
            return False
        path = newest_checkpoint(self.ckpt_root, rank=self.rank)
        if path is None:
            return False
        state = load_checkpoint(self.engine, path, rank=self.rank, world=self.world, cfg=self.cfg)
        self.step = int(state["step"])
        self.stream.load(state["stream"])
        self.metrics.truncate_after(self.step)
        if self.rank == 0:
            log.info("resumed from %s at step %d", path, self.step)
        return True

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The policy's full weights on CPU (ZeRO-3 partitions gathered; collective call)."""
        return full_state_dict(self.module.policy, zero3=self.zero3)

    def export_hf(self, out_dir: Path) -> Path:
        """Save the policy in HF format (ZeRO-3 shards consolidated) with its processor."""
        state = self.full_state_dict()
        if self.cfg.model.lora.rank and self.rank == 0:
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
        resumed = self.maybe_resume()
        records = []
        c = self.cfg
        if c.eval.before_training and c.eval.every and not resumed and self.step == 0:
            self._log_eval()
        progress = Progress(TextColumn("[bold]PAPO"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("{task.description}"),
                            disable=self.rank != 0 or not sys.stderr.isatty())
        with progress:
            task = progress.add_task("", total=self.total_steps, completed=self.step)
            while self.step < self.total_steps:
                rec = self.train_step()
                records.append(rec)
                self.metrics.log(rec)
                progress.update(task, completed=self.step, description=(
                    f"acc {rec['reward/accuracy']:.3f} loss {rec.get('loss/total', 0):.4f}"))
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
                plot_run(self.out)
            except ImportError as e:  # matplotlib is optional
                log.warning("no plots (%s); install matplotlib, then `python -m train.plot %s`", e, self.out)
        return records

    def close(self) -> None:
        """Release the grader workers and the metrics writer."""
        if self._grader is not None:
            self._grader.close()
        self.metrics.close()
