"""Supervised warm start: teach a random-init policy the answer format before PAPO.

A random-init policy never writes `<think>...</think> ... \\boxed{...}`, so
every reward is 0 and every GRPO advantage is 0. The tiny config therefore
first fine-tunes on the training questions with the target
`sft.response_template` (by default `<think> The answer is X. </think>
\\boxed{X}`), optionally with label noise so that the warm-started policy is
not already perfect. The loss is the mean negative log-likelihood of the
response tokens, computed from hidden states by `papo_kernels.token_stats`
(no [tokens x vocab] logits), on the same packed micro-batches as PAPO.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from papo_kernels import token_stats
from train.batching import Sequence, encode_prompt, gather_response_hidden, pack, plan_micro_batches
from train.data import ANSWERS

log = logging.getLogger("train.sft")


def sft_target(answer: str, category: str, template: str, rng: np.random.Generator, noise: float) -> str:
    """The warm-start response for one question (a wrong same-type answer with prob `noise`)."""
    if noise > 0 and category in ANSWERS and rng.random() < noise:
        others = [a for a in ANSWERS[category] if a != answer]
        if others:
            answer = others[int(rng.integers(len(others)))]
    return template.format(answer=answer)


def run_sft(policy, processor, dataset, cfg, *, out_dir: str | Path) -> list[float]:
    """Fine-tune `policy` in place for `cfg.sft.steps` steps and save it with the processor.

    Returns the per-step losses. Deterministic given `cfg.seed`.
    """
    s, d = cfg.sft, cfg.data
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    rng = np.random.default_rng([cfg.seed, 17])
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    policy.train()
    losses = []
    cache: dict[int, object] = {}
    for step in range(s.steps):
        idx = rng.choice(len(dataset), size=min(s.batch_size, len(dataset)), replace=False)
        seqs = []
        for i in idx.tolist():
            item = dataset[i]
            if i not in cache:  # encoding (resize + patchify) dominates on CPU: do it once
                cache[i] = encode_prompt(processor, item["prompt"], item["images"], min_pixels=d.min_pixels,
                                         max_pixels=d.max_pixels)
            target = sft_target(item["answer"], item.get("category", ""), s.response_template, rng,
                                s.label_noise)
            ids = tok(target, add_special_tokens=False)["input_ids"] + [eos]
            seqs.append(Sequence(cache[i], torch.tensor(ids, dtype=torch.long)))
        # The same packed micro-batches as PAPO (a packed row's attention mask is dense, so its
        # cost grows with the square of the row length: small micro-batches are much faster).
        # The loss is the step's token mean, accumulated over micro-batches.
        plan = plan_micro_batches([len(q) for q in seqs], max_seqs=cfg.trainer.micro_batch_size,
                                  max_tokens=cfg.trainer.micro_batch_tokens)
        n_tokens = sum(int(q.response_ids.numel()) for q in seqs)
        opt.zero_grad(set_to_none=True)
        loss_value = 0.0
        for group in plan:
            batch = pack(policy.model, [seqs[i] for i in group])
            hidden = gather_response_hidden(policy.model(**batch.model_inputs()).last_hidden_state, batch)
            targets = batch.response_ids.masked_fill(batch.response_mask == 0, -100)
            w = policy.lm_head.weight
            st = token_stats(hidden, w, targets)
            loss = -(st.logp * batch.response_mask).sum() / n_tokens
            loss.backward()
            loss_value += loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss_value)
        if step % 20 == 0 or step == s.steps - 1:
            log.info("sft step %d/%d nll %.4f", step + 1, s.steps, losses[-1])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "sft_losses.txt").write_text("".join(f"{x:.6f}\n" for x in losses))
    return losses
