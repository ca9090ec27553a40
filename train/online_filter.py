"""The DAPO online filter over all ranks: roll out tries of `rollout_batch_size` prompts until that
many prompt groups with mixed accuracy are kept, then spread the kept groups evenly over the ranks.

Every decision that leads to a collective is taken on all-reduced counts, so all ranks retry
together (the rollout gathers ZeRO-3 weights; the update equalizes its passes).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from papo.advantages import online_filter
from train.batching import EncodedPrompt
from train.distributed import all_reduce_
from train.samples import PromptStream, Sample

# (try, position in the try's draw) -> (dataset index, the group's samples)
Kept = dict[tuple[int, int], tuple[int, list[Sample]]]


def collect_until_full(stream: PromptStream, rollout_round: Callable[[list[int], int], list[Sample]],
                       spread: Callable[[Kept, int], list[Sample]], *, bounds, n: int, target: int,
                       max_tries: int, rank: int, world: int) -> tuple[list[Sample], dict[str, float]]:
    """DAPO dynamic sampling, as the official `_make_batch_data` does it.

    `rollout_round(indices, attempt)` rolls out and scores `n` responses per dataset index;
    `spread(kept, target)` is `spread_groups` with this step's re-encoding; `bounds` is
    `papo.online_filter`, `target` `trainer.rollout_batch_size` and `max_tries`
    `trainer.online_filter_max_tries`. Returns this rank's samples and the filter's statistics.

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
    low, high = bounds
    kept: Kept = {}
    acc_sum = acc_count = 0.0
    tries = total_kept = 0
    while total_kept < target:
        if tries == max_tries:
            raise RuntimeError(
                f"papo.online_filter {bounds}: only {total_kept} of {target} prompt "
                f"groups passed the filter in trainer.online_filter_max_tries="
                f"{max_tries} tries (the official trainer stops too); check the data, "
                "or raise the limit")
        draw = stream.take(target)
        positions = list(range(rank, target, world))
        samples = rollout_round([draw[p] for p in positions], tries)
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
    samples = spread(kept, target)
    stats = {"filter/tries": float(tries), "filter/kept_groups": float(total_kept),
             "filter/prompts_seen": float(tries * target),
             "filter/raw_accuracy": acc_sum / max(acc_count, 1.0)}
    return samples, stats


def spread_groups(kept: Kept, target: int, *, rank: int, world: int,
                  encode: Callable[[int], tuple[dict, EncodedPrompt]]) -> list[Sample]:
    """The first `target` kept groups of all ranks (by draw order), `target / world` per rank.

    A rank keeps its own groups up to its share; the others move to ranks short of theirs,
    as (dataset index, responses, rewards), and are re-encoded there by `encode(index)`, which
    returns the dataset item and its encoded prompt (masks drawn from the run's seed, as the
    sending rank drew them).
    """
    if world == 1:
        chosen = sorted(kept)[:target]
        return [s for key in chosen for s in kept[key][1]]
    keys: list[Any] = [None] * world
    torch.distributed.all_gather_object(keys, sorted(kept))
    chosen = sorted((key, r) for r, rank_keys in enumerate(keys) for key in rank_keys)[:target]
    share = [len(range(r, target, world)) for r in range(world)]
    own: list[list[tuple[int, int]]] = [[] for _ in range(world)]
    surplus: list[tuple[int, int]] = []
    for key, r in chosen:
        (own[r] if len(own[r]) < share[r] else surplus).append(key)
    moves: dict[tuple[int, int], int] = {}  # key -> receiving rank
    for r in range(world):
        while len(own[r]) < share[r]:
            key = surplus.pop(0)
            own[r].append(key)
            moves[key] = r
    outgoing = [(key, moves[key], kept[key][0],
                 [(s.response_ids.tolist(), s.finished, s.text, s.reward, s.accuracy, s.format)
                  for s in kept[key][1]])
                for key in sorted(kept) if key in moves]
    parcels: list[Any] = [None] * world
    torch.distributed.all_gather_object(parcels, outgoing)
    mine = {key: kept[key] for key in own[rank] if key in kept}  # keys name their rank
    for parcel in parcels:
        for key, dest, idx, responses in parcel:
            if dest != rank:
                continue
            item, enc = encode(idx)
            mine[key] = (idx, [Sample(uid=item["uid"], prompt=enc, answer=item["answer"],
                                      response_ids=torch.tensor(ids, dtype=torch.long), finished=done,
                                      text=text, reward=reward, accuracy=accuracy, format=fmt)
                               for ids, done, text, reward, accuracy, fmt in responses])
    return [s for key in sorted(mine) for s in mine[key][1]]
