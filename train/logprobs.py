"""The no-grad passes of a rollout step, with the weights that sampled the responses: old and masked
log-probs (and the exact perception KLs and entropies as monitors) from the policy, and reference
log-probs from the reference policy when there is one."""

from __future__ import annotations

import torch
from torch import nn

from train.batching import pack, plan_micro_batches
from train.distributed import all_reduce_, equalize_plan
from train.samples import Sample


@torch.no_grad()
def logprob_pass(engine, ref_model, policy: nn.Module, samples: list[Sample], *, device: torch.device,
                 temperature: float, max_seqs: int, max_tokens: int, equalize: bool) -> None:
    """Fill each sample's old_logp, masked_logp, monitors and (with `ref_model`) ref_logp.

    `engine` runs `PolicyWithLoss` in "stats" mode (so does `ref_model`); `policy` is the HF model
    whose trunk packs the batches; micro-batches hold at most `max_seqs` sequences and
    `max_tokens` tokens. `equalize` (ZeRO-3, or a sharded reference) pads this rank's passes to
    the most of any rank, since every forward gathers parameters collectively.

    The masked pass runs when any sample of the rollout batch, on any rank, has an image
    (the number of forwards must match across ranks under ZeRO-3); a text-only sample's
    masked view is its original one, so without any image the masked log-probs are the
    old ones.
    """
    has_image = any(s.prompt.masked_pixel_values is not None for s in samples)
    two_view = bool(all_reduce_(torch.tensor([int(has_image)]), "max").item())
    plan = plan_micro_batches([len(s) for s in samples], max_seqs=max_seqs, max_tokens=max_tokens)
    plan = equalize_plan(plan) if equalize else plan
    engine.eval()
    for group in plan:
        # a padding pass (None) reruns this rank's first micro-batch and is discarded
        members = [samples[i] for i in (group if group is not None else plan[0])]
        batch = pack(policy.model, [s.seq() for s in members]).to(device)
        stats = engine(batch, mode="stats", temperature=temperature, two_view=two_view)
        ref_stats = None
        if ref_model is not None:
            ref_stats = ref_model(batch, mode="stats", temperature=temperature, two_view=False)
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
    engine.train()
