"""Plain helpers of the tests that train the tiny model (train/configs/tiny.yaml).

The fixtures built from them (`tiny_assets`, `assets`) live in tests/conftest.py; the test modules
import these functions, never fixtures or helpers from each other.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from train.config import RunConfig, load_config
from train.data import write_synthetic
from train.distributed import free_port
from train.tiny import TinyModelSpec, ensure_tiny_model_dir

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "train" / "configs" / "tiny.yaml"
# Fields that legitimately differ between runs (wall clock, memory, throughput).
VOLATILE = ("time/", "perf/", "memory/")
RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# The trainer tests' run: a few prompts, short responses, no warm start, evaluation or exports.
FAST = [
    "data.synthetic.n_train=32", "data.synthetic.n_val=8", "trainer.rollout_batch_size=8",
    "trainer.mini_batch_size=4", "trainer.micro_batch_size=2", "trainer.log_prob_micro_batch_size=8",
    "rollout.n=2", "data.max_response_length=6", "eval.every=0", "sft.steps=0",
    "checkpoint.export_hf=false", "tensorboard=false", "deterministic=true", "optim.lr=1e-2",
]
# One PAPO step on 16 + 4 questions (`tiny_assets(16, 4)`) and nothing else: no warm start,
# evaluation, checkpoint, export or plot; a module adds its batch and response sizes.
ONE_STEP = [
    "data.synthetic.n_train=16", "data.synthetic.n_val=4", "trainer.mini_batch_size=4",
    "trainer.micro_batch_size=4", "trainer.log_prob_micro_batch_size=8", "rollout.n=2", "eval.every=0",
    "sft.steps=0", "checkpoint.save_every=0", "checkpoint.save_final=false", "checkpoint.export_hf=false",
    "tensorboard=false", "plot=false", "deterministic=true", "trainer.max_steps=1",
]


def tiny_config(out: Path | str, *overrides: str) -> RunConfig:
    """tiny.yaml with `out_dir=out` and `overrides` applied in order."""
    return load_config(TINY, [f"out_dir={out}", *overrides])


def make_cfg(out: Path | str, *extra: str) -> RunConfig:
    """The trainer tests' run (`FAST`) in `out`, with `extra` overrides."""
    return tiny_config(out, *FAST, *extra)


def stable(rec: dict) -> dict:
    """A metrics record without its `VOLATILE` fields."""
    return {k: v for k, v in rec.items() if not k.startswith(VOLATILE)}


def build_tiny_assets(root: Path, *, n_train: int, n_val: int) -> Path:
    """The tiny model (root/tiny_model) and `n_train`/`n_val` synthetic questions (root/data)."""
    cfg = tiny_config(root, f"data.synthetic.n_train={n_train}", f"data.synthetic.n_val={n_val}")
    ensure_tiny_model_dir(root / "tiny_model", TinyModelSpec(**vars(cfg.model.tiny)))
    s = cfg.data.synthetic
    write_synthetic(root / "data", n_train=s.n_train, n_val=s.n_val, seed=s.seed, tasks=s.tasks,
                    image_size=s.image_size)
    return root


def fresh_dir(assets: Path, tmp_path: Path, name: str) -> Path:
    """A new run directory `tmp_path/name` holding a copy of the assets (a run writes into its model
    and data directories, so runs never share them)."""
    out = tmp_path / name
    out.mkdir()
    shutil.copytree(assets / "tiny_model", out / "tiny_model")
    shutil.copytree(assets / "data", out / "data")
    return out


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a training process a test starts: this one's, with the repository on
    PYTHONPATH, `extra` set, and without the rendezvous variables an in-process Trainer leaves in
    os.environ (`train.distributed.init_distributed` sets them): a child inheriting them would bind
    the port this process's group holds."""
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
    env.update(PYTHONPATH=str(ROOT), **extra)
    return env


def launch_ranks(worker: str, out: Path, world: int, *args: Any, timeout_s: float = 300) -> list[Any]:
    """Run `worker(str(out), rank, world, *args)` in `world` fresh interpreters, one per rank of a
    process group on a free local port; returns what each rank saved to `out/result_<rank>.pt`.

    `worker` is "module:function" (importable from the repository root; `args` must be JSON). The
    launch has one deadline for all ranks, so a collective that some rank never enters fails the test
    instead of blocking the suite.
    """
    module, function = worker.split(":")
    env = child_env(WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    procs = []
    for rank in range(world):
        code = (f"import json; from {module} import {function}; "
                f"{function}({str(out)!r}, {rank}, {world}, *json.loads({json.dumps(list(args))!r}))")
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=ROOT,
                                      env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + timeout_s
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        tails = [(p.communicate()[0] or "")[-1500:] for p in procs]
        pytest.fail(f"{worker}: ranks still running after {timeout_s} s (a collective some rank never "
                    "entered?)\n" + "\n---\n".join(tails))
    failed = [f"rank {rank} (exit {p.returncode}):\n{text[-3000:]}"
              for rank, (p, text) in enumerate(zip(procs, logs)) if p.returncode != 0]
    assert not failed, "\n---\n".join(failed)
    return [torch.load(out / f"result_{rank}.pt", weights_only=False) for rank in range(world)]
