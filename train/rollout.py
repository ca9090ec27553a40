"""Rollout engines: sample responses for encoded prompts.

`RolloutEngine` is the interface the trainer uses; `HFRolloutEngine` runs
transformers' `generate` on the training model itself. What it does that
matters for RL throughput and correctness:

- the model is gathered once per rollout phase (ZeRO-3: one
  `GatheredParameters` around all generate calls, not one per decode step);
- requests are sorted by prompt length before batching, so a batch pads
  little, and results come back in request order;
- the vision special tokens are suppressed (an untrained policy otherwise
  samples `<|image_pad|>` and the re-forward fails);
- temperature / top_p / top_k / max tokens, stop at the first EOS
  (`<|im_end|>` or `<|endoftext|>`), the EOS kept in the response;
- sampling is seeded per call, so rollouts are reproducible and a resumed run
  samples what the uninterrupted run sampled.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from train.batching import EncodedPrompt
from train.tiny import VISION_SPECIAL_TOKENS


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to sample. top_k 0 disables top-k."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if not self.temperature > 0:
            raise ValueError(f"SamplingParams.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Completion:
    """One sampled response: token ids (through the first EOS, inclusive) and whether it ended."""

    token_ids: torch.Tensor
    finished: bool


class RolloutEngine(Protocol):
    """Samples `params.n` responses for every prompt.

    `generate(prompts, params)` returns a list (one per prompt, in order) of
    lists of `params.n` Completions. Engines must not keep references to the
    prompts' tensors after returning.
    """

    def generate(self, prompts: list[EncodedPrompt], params: SamplingParams) -> list[list[Completion]]:
        ...


def eos_ids_of(model, tokenizer) -> list[int]:
    """Stop ids: the generation config's eos ids, else the tokenizer's (Qwen: im_end, endoftext)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def truncate_at_eos(ids: torch.Tensor, eos_ids: list[int]) -> Completion:
    """Cut a generated row after its first EOS (kept); a row without EOS is unfinished."""
    is_eos = torch.isin(ids, torch.tensor(eos_ids, dtype=ids.dtype))
    if bool(is_eos.any()):
        end = int(is_eos.nonzero()[0, 0]) + 1
        return Completion(ids[:end].clone(), True)
    return Completion(ids.clone(), False)


class HFRolloutEngine:
    """Rollouts with `model.generate` on the training weights.

    Args:
        model: a Qwen2_5_VLForConditionalGeneration (the DeepSpeed engine's module).
        tokenizer: its tokenizer (pad / eos / vision special token ids).
        batch_size: sequences (prompt x sample) generated together.
        gather: optional callable returning a context manager that makes the full
            weights available (ZeRO-3 `GatheredParameters`); entered once per `generate`.
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 64,
                 gather: Callable[[], contextlib.AbstractContextManager] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.gather = gather or contextlib.nullcontext
        self.eos_ids = eos_ids_of(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.suppress_ids = [tokenizer.convert_tokens_to_ids(t) for t in VISION_SPECIAL_TOKENS]

    def _batches(self, requests: list[tuple[int, EncodedPrompt]]) -> Iterator[list[tuple[int, EncodedPrompt]]]:
        # longest first: a slow long batch starts early and batches are length-homogeneous
        order = sorted(requests, key=lambda r: (-len(r[1]), r[0]))
        for i in range(0, len(order), self.batch_size):
            yield order[i: i + self.batch_size]

    def _collate(self, batch: list[tuple[int, EncodedPrompt]], device) -> dict:
        """Left-pad prompts into one generate batch (images concatenated in batch order)."""
        L = max(len(p) for _, p in batch)
        ids = torch.full((len(batch), L), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(batch), L), dtype=torch.long)
        mm = torch.zeros((len(batch), L), dtype=torch.long)
        pix, grids = [], []
        for row, (_, p) in enumerate(batch):
            n = len(p)
            ids[row, L - n:] = p.input_ids
            attn[row, L - n:] = 1
            mm[row, L - n:] = p.mm_token_type_ids
            if p.pixel_values is not None:
                pix.append(p.pixel_values)
                grids.append(p.image_grid_thw)
        out = dict(input_ids=ids, attention_mask=attn, mm_token_type_ids=mm)
        if pix:
            out["pixel_values"] = torch.cat(pix)
            out["image_grid_thw"] = torch.cat(grids)
        return {k: v.to(device) for k, v in out.items()}

    @torch.no_grad()
    def generate(self, prompts: list[EncodedPrompt], params: SamplingParams) -> list[list[Completion]]:
        """Sample `params.n` responses per prompt; see the class docstring."""
        requests = [(i * params.n + j, p) for i, p in enumerate(prompts) for j in range(params.n)]
        results: dict[int, Completion] = {}
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            with self.gather(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                for b, batch in enumerate(self._batches(requests)):
                    # one seed per batch: reproducible regardless of earlier RNG use
                    torch.manual_seed(params.seed * 1_000_003 + b)
                    inputs = self._collate(batch, device)
                    out = self.model.generate(
                        **inputs,
                        do_sample=True,
                        temperature=params.temperature,
                        top_p=params.top_p,
                        top_k=params.top_k,  # 0 disables (None would fall back to the default 50)
                        # a checkpoint's generation_config (Qwen2.5-VL: 1.05) must not reshape the
                        # sampling distribution: log-probs are taken from the plain softmax
                        repetition_penalty=1.0,
                        max_new_tokens=params.max_new_tokens,
                        eos_token_id=self.eos_ids,
                        pad_token_id=self.pad_id,
                        suppress_tokens=self.suppress_ids,
                        use_cache=True,
                    )
                    new = out[:, inputs["input_ids"].shape[1]:].cpu()
                    for row, (rid, _) in enumerate(batch):
                        results[rid] = truncate_at_eos(new[row], self.eos_ids)
        finally:
            self.model.train(was_training)
        return [[results[i * params.n + j] for j in range(params.n)] for i in range(len(prompts))]
