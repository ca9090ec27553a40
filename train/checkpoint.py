"""Checkpoints: written atomically, found, checked and loaded again.

A checkpoint `<out_dir>/checkpoints/step_<n>` holds DeepSpeed's state (weights, optimizer,
scheduler), each rank's RNG state and the trainer's state (step, data cursor, world size, the
settings the checkpoint's contents depend on). It is written into a temporary directory, fsynced,
marked COMPLETE and renamed into place, so a kill during a write never replaces the previous good
one; a failed write (a full disk) removes its partial copy and raises `CheckpointError`. Every file
passes the `checkpoint.write` / `checkpoint.written` fault points (papo/faults.py) when a fault is
armed. Resuming refuses a checkpoint written by another number of ranks or under another value of a
setting its contents depend on (`RESUME_INVARIANT_KEYS`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from papo.faults import armed as faults_armed
from papo.faults import fault_point
from train.config import RunConfig
from train.distributed import barrier

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


def save_checkpoint(engine, root: Path, step: int, *, rank: int, trainer_state: dict[str, Any],
                    keep_last: int) -> Path:
    """Write checkpoint `step_<step>` under `root` atomically (temp dir + rename) and prune all but
    the newest `keep_last` (a collective: every rank calls it). `trainer_state` (step, stream,
    world_size, total_steps, config: see `read_trainer_state`) is written by rank 0.

    Raises CheckpointError when a file cannot be written (e.g. ENOSPC): the partial copy is
    removed and the previous checkpoints are untouched, so a rerun resumes from the newest.
    """
    final = root / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = root / f"{TEMP_PREFIX}{CHECKPOINT_PREFIX}{step:06d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    if faults_armed():
        _route_through_fault_points(engine.checkpoint_engine)
    try:
        engine.save_checkpoint(str(tmp), tag="ds", save_latest=False)
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        _write_checkpoint_file(tmp / f"rng_rank{rank}.pt", lambda p: torch.save(rng, p))
        barrier()
        if rank == 0:
            _write_checkpoint_file(tmp / "trainer_state.json",
                                   lambda p: p.write_text(json.dumps(trainer_state, indent=2)))
            _write_checkpoint_file(tmp / COMPLETE_MARKER, lambda p: p.write_text("ok\n"))
            _fsync_tree(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)  # free what the partial copy took (a full disk)
        newest = complete_checkpoints(root)
        kept = f"the newest complete checkpoint, {newest[-1].name}, is intact" if newest else \
            "there is no complete checkpoint yet"
        raise CheckpointError(f"writing checkpoint {final.name} failed ({e}); its partial copy was removed "
                              f"and {kept}: fix the cause and rerun to resume") from e
    if rank == 0:
        if final.exists():  # re-saving the same step: move the old copy aside first
            old = root / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(root)
        for old in complete_checkpoints(root)[: -keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def newest_checkpoint(root: Path, *, rank: int) -> Path | None:
    """The newest complete checkpoint under `root`, or None. Rank 0 first deletes the partial copies
    of killed or failed writes: never loaded, only taking space."""
    if rank == 0 and root.is_dir():
        for partial in root.glob(f"{TEMP_PREFIX}*"):
            shutil.rmtree(partial, ignore_errors=True)
    ckpts = complete_checkpoints(root)
    return ckpts[-1] if ckpts else None


def load_checkpoint(engine, path: Path, *, rank: int, world: int, cfg: RunConfig) -> dict[str, Any]:
    """Check that the checkpoint at `path` may be resumed by this run (`check_resumable`), load it into
    `engine` (optimizer and scheduler included) and restore this rank's RNG states; returns its
    trainer state."""
    state = read_trainer_state(path)
    check_resumable(state, path, world=world, cfg=cfg)
    engine.load_checkpoint(str(path), tag="ds", load_optimizer_states=True, load_lr_scheduler_states=True)
    rng_file = path / f"rng_rank{rank}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
    return state
