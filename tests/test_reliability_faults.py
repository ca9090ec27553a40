"""Faults injected deterministically (papo/faults.py) into a tiny training run and into the grader:
after each, the restart resumes from the newest complete checkpoint, no partial checkpoint is ever
loaded, and the run ends with the metrics and weights of an uninterrupted run."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from papo import faults
from tests._tiny_runs import ROOT, child_env, fresh_dir, make_cfg, stable

STEPS = 4
# 8 prompts per rollout step in mini-batches of 4: two optimizer steps per rollout step
RUN = ["plot=false", f"trainer.max_steps={STEPS}", "checkpoint.save_every=1", f"checkpoint.keep_last={STEPS}"]


def _cfg(out: Path):
    return make_cfg(out, *RUN)


def _records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [stable(json.loads(x)) for x in lines if x.strip()]


def _checkpoints(out: Path) -> tuple[list[str], list[str]]:
    """(complete checkpoint names, names of other entries) under <out>/checkpoints."""
    from train.checkpoint import complete_checkpoints

    root = out / "checkpoints"
    complete = [p.name for p in complete_checkpoints(root)]
    others = sorted(p.name for p in root.iterdir() if p.name not in complete) if root.is_dir() else []
    return complete, others


def train_in_subprocess(out: str) -> None:
    """Entry point of the killed runs (`python -c`): train to the end, resuming if possible."""
    from train.trainer import Trainer

    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    trainer = Trainer(_cfg(Path(out)))
    try:
        trainer.train()
    finally:
        trainer.close()


def _killed_run(out: Path, fault: str) -> str:
    """Run training in a fresh interpreter with `fault` armed; it must die by SIGKILL. Returns its log."""
    # a one-process group of its own: not the rendezvous this process's trainer tests left in os.environ
    env = child_env(PAPO_FAULTS=fault)
    env.pop("PAPO_FAULTS_ONCE", None)
    code = f"from tests.test_reliability_faults import train_in_subprocess; train_in_subprocess({str(out)!r})"
    proc = subprocess.run([sys.executable, "-c", code],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == -signal.SIGKILL, f"{fault}: exit {proc.returncode}\n{log[-3000:]}"
    return log


@pytest.mark.slow
@pytest.mark.distributed  # the killed runs are training processes of their own
def test_faults_then_resume_match_an_uninterrupted_run(assets, tmp_path, monkeypatch, caplog):
    from train.checkpoint import CheckpointError
    from train.trainer import Trainer

    # the uninterrupted run, with the checkpoint points armed (at an unreachable count) to count the
    # files one checkpoint writes
    full = fresh_dir(assets, tmp_path, "full")
    with faults.inject("checkpoint.written:1000000:kill"):
        trainer = Trainer(_cfg(full))
        try:
            trainer.train()
            full_params = trainer.full_state_dict()
        finally:
            trainer.close()
        files_per_checkpoint = faults.arrivals("checkpoint.written") // STEPS
    assert files_per_checkpoint >= 3  # DeepSpeed's shard(s), the RNG state, the trainer state, COMPLETE
    reference = _records(full)
    assert [r["step"] for r in reference] == [1, 2, 3, 4]

    cut = fresh_dir(assets, tmp_path, "cut")
    # 1. SIGKILL right after the first file of step 2's checkpoint is written
    _killed_run(cut, f"checkpoint.written:{files_per_checkpoint + 1}:kill")
    complete, others = _checkpoints(cut)
    assert complete == ["step_000001"] and others == [".tmp-step_000002"]
    partial = [p for p in (cut / "checkpoints" / ".tmp-step_000002").rglob("*") if p.is_file()]
    assert len(partial) == 1 and partial[0].suffix == ".pt", partial  # one shard, no COMPLETE marker

    # 2. SIGKILL before the second optimizer step of rollout step 3 (its first one applied in memory)
    log = _killed_run(cut, "optimizer.step:4:kill")
    assert "step_000001 at step 1" in log, log[-3000:]  # resumed from the newest complete checkpoint
    assert _checkpoints(cut) == (["step_000001", "step_000002"], [])  # the partial copy was deleted
    assert [r["step"] for r in _records(cut)] == [1, 2]

    # 3. another world size is refused before anything is loaded; then ENOSPC from the checkpoint
    #    writer at the second file of step 3's checkpoint
    trainer = Trainer(_cfg(cut))
    try:
        trainer.world = 2
        with pytest.raises(CheckpointError, match="world size 1 but this run has world size 2"):
            trainer.maybe_resume()
        assert trainer.step == 0
        trainer.world = 1
        with faults.inject("checkpoint.write:2:enospc"), caplog.at_level(logging.INFO, logger="train"):
            with pytest.raises(CheckpointError,
                               match=r"step_000003 failed \(\[Errno 28\].*step_000002, is intact"):
                trainer.train()
        assert "step_000002 at step 2" in caplog.text
    finally:
        trainer.close()
    assert _checkpoints(cut) == (["step_000001", "step_000002"], [])  # its partial copy was removed
    assert [r["step"] for r in _records(cut)] == [1, 2, 3]  # step 3 ran; its checkpoint failed

    # 4. the last restart, with a grading worker killed at its third answer (graded again)
    monkeypatch.setenv("PAPO_FAULTS", "grader.request:3:kill")
    monkeypatch.setenv("PAPO_FAULTS_ONCE", str(tmp_path))
    caplog.clear()
    trainer = Trainer(_cfg(cut))
    try:
        with caplog.at_level(logging.INFO, logger="train"):
            trainer.train()
        stats = trainer.grader.stats
        params = trainer.full_state_dict()
    finally:
        trainer.close()
    assert "step_000002 at step 2" in caplog.text
    assert (stats.worker_deaths, stats.retries, stats.timeouts) == (1, 1, 0)

    assert _records(cut) == reference  # step 3's record of the failed attempt was dropped on resume
    assert _checkpoints(cut)[0] == ["step_000001", "step_000002", "step_000003", "step_000004"]
    for name, value in full_params.items():
        assert torch.equal(value, params[name]), name


def _children() -> int:
    me = os.getpid()
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            count += int(fields[1]) == me
    return count


def test_grader_worker_that_dies_or_hangs_changes_no_grade(tmp_path, monkeypatch):
    from papo.rewards import AnswerGrader

    # answers that differ from their truth as text, so each one reaches a worker (and sympy)
    pairs = [("1/2", "0.5"), ("3", "4"), ("\\frac{1}{2}", "0.5"), ("2\\sqrt{2}", "\\sqrt{8}"),
             ("0.25", "1/4"), ("x+1", "1+x"), ("7", "7.0")]
    with AnswerGrader() as grader:
        expected = grader.grade_many(pairs)
    children, fds = _children(), len(os.listdir("/proc/self/fd"))

    monkeypatch.setenv("PAPO_FAULTS", "grader.request:2:kill,grader.request:4:hang")
    monkeypatch.setenv("PAPO_FAULTS_ONCE", str(tmp_path))
    # a hung worker is only ever stopped by its deadline; a grader that missed it would hang this test,
    # so an alarm turns that into a failure
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the grader did not stop a hung worker"))
    signal.alarm(300)
    try:
        with AnswerGrader() as grader:
            got = grader.grade_many(pairs)
            stats = grader.stats
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
    assert got == expected
    # worker 1 dies at its 2nd answer, worker 2 hangs at its 4th: each of those answers is graded again
    assert (stats.worker_deaths, stats.timeouts, stats.retries) == (1, 1, 2)
    assert stats.attempts == len(pairs) + 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grader.request-2-kill-None",
                                                          "grader.request-4-hang-None"]
    assert _children() == children and len(os.listdir("/proc/self/fd")) == fds
