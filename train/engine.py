"""DeepSpeed for the policy and its reference: the engine's configuration (filled from the run's
config), the optimizer and its learning-rate schedule, the frozen reference policy (sharded under
ZeRO-3), the fp32 master weights the optimizer holds, and the full weights gathered from shards."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param
from torch import nn

from train.config import OptimConfig, RunConfig
from train.policy import PolicyWithLoss, load_policy


def deepspeed_config(cfg: RunConfig, world: int, dtype: torch.dtype) -> dict:
    """The DeepSpeed config: `trainer.ds_config` or train/ds_configs/zero<stage>.json, with batch,
    accumulation, precision and clipping filled from `cfg` (gradient accumulation is the trainer's:
    one micro-batch per engine call, `engine.step()` once per mini-batch)."""
    t, o = cfg.trainer, cfg.optim
    default = Path(__file__).parent / "ds_configs" / f"zero{t.zero_stage}.json"
    path = Path(t.ds_config) if t.ds_config else default
    if not path.is_file():
        raise FileNotFoundError(f"trainer.ds_config: {path} not found")
    ds = json.loads(path.read_text())
    # Fill batch/accumulation/precision/clipping from our config: the "auto" values of such
    # templates are resolved by HF/Accelerate integrations, not by deepspeed.initialize.
    ds["train_micro_batch_size_per_gpu"] = 1
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = world
    ds["managed_gradient_accumulation"] = False
    ds["gradient_clipping"] = o.max_grad_norm
    ds["bf16"] = {"enabled": dtype == torch.bfloat16}
    ds.setdefault("zero_optimization", {})["stage"] = t.zero_stage
    ds["zero_allow_untested_optimizer"] = True
    return ds


def lr_factor(step: int, total: int, o: OptimConfig) -> float:
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


def build_engine(module: nn.Module, cfg: RunConfig, *, world: int, dtype: torch.dtype, optimizer_steps: int):
    """AdamW over `module`'s trainable parameters with the lr schedule over `optimizer_steps` steps,
    wrapped by DeepSpeed; returns (engine, optimizer, scheduler)."""
    params = [p for p in module.parameters() if p.requires_grad]
    o = cfg.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                  weight_decay=o.weight_decay)
    total_opt = max(1, optimizer_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_opt, o))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, world, dtype))
    return engine, optimizer, scheduler


def build_reference(path: Path, cfg: RunConfig, *, dtype: torch.dtype, device: torch.device,
                    world: int) -> tuple[Any, bool]:
    """The frozen reference policy, held like the policy; returns (module, sharded).

    It is loaded in the policy's dtype (bf16 in bf16 runs: never an fp32 copy) and, under
    ZeRO-3, sharded over the ranks by a DeepSpeed engine without optimizer, so each rank
    holds 1/world of it; ZeRO 0-2 replicate the policy's weights, and the reference too.
    `model.ref_offload` keeps its shards in CPU memory (ZeRO-3 parameter offload, whatever
    the policy's stage); each forward then fetches them layer by layer.
    """
    m = cfg.model
    ref, _ = load_policy(path, dtype=dtype, attn_implementation=m.attn_implementation)
    ref.eval().requires_grad_(False)
    ref.config.use_cache = False
    module = PolicyWithLoss(ref, None).eval()
    # model.fp32_lm_head: the reference's head multiplies in fp32 as the policy's does
    module.upcast_head = m.fp32_lm_head and dtype == torch.bfloat16
    if not (cfg.trainer.zero_stage == 3 or m.ref_offload):
        return module.to(device), False
    ds = deepspeed_config(cfg, world, dtype)
    for key in ("optimizer", "scheduler"):  # a template's training sections do not apply
        ds.pop(key, None)
    zero = {k: v for k, v in ds["zero_optimization"].items() if not k.startswith("offload_optimizer")}
    zero["stage"] = 3
    if m.ref_offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    ds["zero_optimization"] = zero
    engine, *_ = deepspeed.initialize(model=module, config=ds)
    engine.eval()
    return engine, True


def fp32_master_weight(optimizer, param: torch.Tensor) -> torch.Tensor | None:
    """The fp32 master copy of a bf16 parameter held by DeepSpeed's optimizer, or None.

    ZeRO 1-3 and the BF16 optimizer expose it (`safe_get_full_fp32_param`, a collective);
    ZeRO 0 with bf16 uses DeepSpeed's FP16_Optimizer, which keeps one flat fp32 copy per
    parameter group (the group's parameters concatenated in order), or (where fused
    optimizers are unavailable, e.g. on CPU) FP16_UnfusedOptimizer, one fp32 copy per parameter.
    """
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


def gathered(module: nn.Module):
    """A context in which `module`'s ZeRO-3 partitioned parameters are whole on every rank (a
    collective); without ZeRO-3 it changes nothing."""
    return deepspeed.zero.GatheredParameters(list(module.parameters()))


def full_state_dict(module: nn.Module, *, zero3: bool) -> dict[str, torch.Tensor]:
    """`module`'s full weights on CPU (ZeRO-3 partitions gathered; then a collective call)."""
    if zero3:
        with gathered(module):
            return {k: v.detach().clone().cpu() for k, v in module.state_dict().items()}
    return {k: v.detach().clone().cpu() for k, v in module.state_dict().items()}
