"""The policy model: loading a local Qwen2.5-VL checkpoint, what of it trains, and the module
DeepSpeed wraps (`PolicyWithLoss`: the trunk, then the PAPO loss or the no-grad statistics inside
lm_head's forward), with the link to DeepSpeed's fp32 master copy of the head weight."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from torch import nn

from papo_kernels import token_stats, two_view_stats
from train.batching import PackedBatch, gather_response_hidden
from train.config import ConfigError, ModelConfig
from train.lora import apply_lora

log = logging.getLogger("train")


def load_policy(path: str | Path, *, dtype: torch.dtype, attn_implementation: str):
    """Load a Qwen2.5-VL model and processor from a local directory (never the network)."""
    from transformers import AutoConfig, AutoProcessor, Qwen2_5_VLForConditionalGeneration  # heavy: on use

    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"model.path {p} has no config.json (expected a local Qwen2.5-VL checkpoint)")
    config = AutoConfig.from_pretrained(p, local_files_only=True)
    if config.model_type != "qwen2_5_vl":
        raise ConfigError(f"model.path {p} holds a {config.model_type!r} model; this trainer needs "
                          "Qwen2.5-VL (model_type 'qwen2_5_vl')")
    processor = AutoProcessor.from_pretrained(p, local_files_only=True)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        p, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True)
    return model, processor


def configure_policy(policy, m: ModelConfig, *, adapters: bool, verbose: bool = False) -> None:
    """What to train and how: a frozen vision tower, gradient checkpointing and, with
    `adapters` (the policy PAPO starts from, after any warm start), LoRA adapters, after
    which only they train. `verbose`: log the LoRA summary (rank 0)."""
    if adapters and m.lora.rank:
        adapted = apply_lora(policy, m.lora)
        if verbose:
            trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
            log.info("LoRA rank %d on %d layers: %d trainable parameters", m.lora.rank, len(adapted),
                     trainable)
    elif m.freeze_vision_tower:
        policy.model.visual.requires_grad_(False)
    if m.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.config.use_cache = False


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
