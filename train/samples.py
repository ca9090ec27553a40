"""What one rollout step works on: the prompt order (`PromptStream`, resumable across restarts) and
one sampled response with everything its update needs (`Sample`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from train.batching import EncodedPrompt, Sequence
from train.config import ConfigError


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


def to_device(t: torch.Tensor | None, device) -> torch.Tensor | None:
    """`t` on `device`; None stays None."""
    return None if t is None else t.to(device)
