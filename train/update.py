"""The policy update of a rollout step: mini-batches of prompts, each split into packed, padding-free
micro-batches whose PAPO loss is backpropagated without DeepSpeed's accumulation scaling, then one
optimizer step per mini-batch (skipped when the gradient norm is not finite, as the official code
does). `PAPOConfig.loss_scale` alone decides the normalization.

Under ZeRO-3 or several ranks every rank runs the same number of forwards (dummy zero-loss passes
pad the shorter plans), since each forward gathers parameters collectively.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import nn

from papo import PAPOConfig
from papo.faults import fault_point
from train.batching import pack, plan_micro_batches
from train.config import RunConfig
from train.distributed import all_reduce_, combine_across_ranks, equalize_plan
from train.samples import Sample, pad_stack, to_device


class PolicyUpdate:
    """Runs the update phase on a DeepSpeed `engine` wrapping `module` (a `PolicyWithLoss`).

    Args:
        engine, module, scheduler: what `train.engine.build_engine` returned, and the module.
        cfg, papo: the run's config and its resolved PAPOConfig.
        rank, world, device: this process's place.
        refresh_head: called before each mini-batch's passes (model.fp32_lm_head: fetch the
            head's fp32 master weight, which the previous optimizer step changed).
    """

    def __init__(self, engine, module: nn.Module, scheduler, cfg: RunConfig, papo: PAPOConfig, *, rank: int,
                 world: int, device: torch.device, refresh_head: Callable[[], None]):
        self.engine, self.module, self.scheduler = engine, module, scheduler
        self.cfg, self.papo = cfg, papo
        self.rank, self.world, self.device = rank, world, device
        self.zero3 = cfg.trainer.zero_stage == 3
        self.refresh_head = refresh_head

    def forward_backward_step(self, members: list[Sample], *, num_micro_batches: int,
                              num_valid_tokens: float, num_valid_sequences: float, coefficients,
                              dummy: bool = False) -> dict[str, float]:
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
            old_logp=to_device(pad_stack([s.old_logp for s in members], T), self.device),
            ref_logp=(to_device(pad_stack([s.ref_logp for s in members], T), self.device)
                      if self.papo.beta > 0 else None),
            num_micro_batches=num_micro_batches,
            num_valid_tokens=num_valid_tokens,
            num_valid_sequences=num_valid_sequences,
            coefficients=coefficients,
        )
        if self.papo.masked_view == "rollout_no_grad":
            kw["masked_logp"] = to_device(pad_stack([s.masked_logp for s in members], T), self.device)
        loss, metrics = self.engine(batch, mode="loss", **kw)
        if self.papo.loss_scale == "global":
            # DeepSpeed averages gradients over data-parallel ranks; the global normalization
            # already divides by the all-reduced count, so undo the average.
            loss = loss * self.world
        self.engine.backward(loss, scale_wrt_gas=False)
        if dummy:
            return {}
        return {k: float(v) for k, v in metrics.items()}

    def run(self, samples: list[Sample], coefficients) -> dict[str, float]:
        """All mini-batches of this rollout step; returns token-weighted mean metrics."""
        t = self.cfg.trainer
        n_prompts = len({s.uid for s in samples})
        uids = []
        for s in samples:
            if s.uid not in uids:
                uids.append(s.uid)
        local_mb = max(1, math.ceil(len(range(self.rank, t.mini_batch_size, self.world))))
        n_local = math.ceil(n_prompts / local_mb) if n_prompts else 0
        n_mini = int(all_reduce_(torch.tensor([n_local]), "max").item())
        sums: dict[str, float] = {}
        weight_total = 0.0
        grad_norms, lrs, skipped = [], [], 0
        tokens = 0
        loss_sum = 0.0  # this rank's micro-batch losses: each is already its share of the mini-batch
        for j in range(n_mini):
            self.refresh_head()  # the head changed at the previous optimizer step
            mb_uids = set(uids[j * local_mb: (j + 1) * local_mb])
            mb = [s for s in samples if s.uid in mb_uids]
            plan = plan_micro_batches([len(s) for s in mb], max_seqs=t.micro_batch_size,
                                      max_tokens=t.micro_batch_tokens)
            n_real = len(plan)
            if self.zero3 or self.world > 1:
                plan = equalize_plan(plan)
            counts = torch.tensor([sum(int(s.response_ids.numel()) for s in mb), len(mb)],
                                  dtype=torch.float64)
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
            norm = self.grad_norm_precheck()
            engine_skipped = getattr(self.engine, "skipped_steps", 0)
            if norm is not None and not math.isfinite(norm):
                self.engine.zero_grad()
                skipped += 1
                self.engine.step()  # still closes the accumulation window (grads are None -> no-op)
            else:
                self.engine.step()
                skipped += int(getattr(self.engine, "skipped_steps", 0) > engine_skipped)
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

    def grad_norm_precheck(self) -> float | None:
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
