"""The trainer's parts alone (train/*.py besides trainer.py), without a model or a process group:
each module imports by itself, and what each holds does what the trainer relies on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from papo.config import Coefficients
from train.checkpoint import COMPLETE_MARKER, TEMP_PREFIX, newest_checkpoint
from train.config import ConfigError, OptimConfig
from train.distributed import equalize_plan
from train.engine import lr_factor
from train.metrics import MetricsLogger, StepTimes, rollout_step_record
from train.online_filter import collect_until_full, spread_groups
from train.report import blind_baseline, write_final_report
from train.samples import PromptStream, Sample, pad_stack

ROOT = Path(__file__).resolve().parent.parent


def test_every_train_module_imports_alone():
    """Each module of train/ imports in an interpreter where none of our modules was imported before
    it (an import that works only after another module set things up fails here)."""
    names = sorted(f"train.{p.stem}" for p in (ROOT / "train").glob("*.py") if p.stem != "__init__")
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    for m in [m for m in sys.modules if m.split('.')[0] in ('train', 'papo', 'papo_kernels')]:\n"
            "        del sys.modules[m]\n"
            "    importlib.import_module(name)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"train.trainer", "train.checkpoint", "train.update", "train.policy"} <= set(names)


# --------------------------------------------------------------------------- samples


def test_prompt_stream_drops_the_last_partial_batch_and_resumes_exactly():
    stream = PromptStream(10, seed=3, batch=4)  # 2 batches per epoch; 2 prompts never drawn per epoch
    first = stream.take(4) + stream.take(4)
    assert len(set(first)) == 8 and stream.epoch == 0
    resumed = PromptStream(10, seed=3, batch=4)
    resumed.load(json.loads(json.dumps(stream.state())))
    later = [stream.take(4) for _ in range(2)]
    assert [resumed.take(4) for _ in range(2)] == later
    assert stream.epoch == resumed.epoch == 1 and later != [first[:4], first[4:]]  # a new permutation
    with pytest.raises(ConfigError, match=r"rollout_batch_size \(11\) exceeds the training set size \(10\)"):
        PromptStream(10, seed=0, batch=11)


def test_pad_stack():
    rows = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])]
    assert torch.equal(pad_stack(rows, 3), torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]]))
    assert pad_stack([rows[0], None], 3) is None


def _sample(uid: int, accuracy: float, finished: bool = True, **kw) -> Sample:
    return Sample(uid=uid, prompt=None, answer="a", response_ids=torch.arange(3), finished=finished,
                  accuracy=accuracy, reward=accuracy, **kw)


# --------------------------------------------------------------------------- the online filter on one rank


def test_the_online_filter_tries_until_full_and_keeps_draw_order():
    stream = PromptStream(8, seed=0, batch=4)
    tries = []

    def rollout_round(indices, attempt):
        tries.append(list(indices))
        # try 0: only the second prompt's group is mixed; try 1: all four are
        return [_sample(i, float(j == 0 and (attempt == 1 or k == 1))) for k, i in enumerate(indices)
                for j in range(2)]

    samples, stats = collect_until_full(
        stream, rollout_round, lambda kept, target: spread_groups(kept, target, rank=0, world=1, encode=None),
        bounds=(0.0, 1.0), n=2, target=4, max_tries=5, rank=0, world=1)
    assert stats == {"filter/tries": 2.0, "filter/kept_groups": 5.0, "filter/prompts_seen": 8.0,
                     "filter/raw_accuracy": 5 / 16}
    # the first 4 kept groups in draw order: try 0's second prompt, then try 1's first three
    assert [s.uid for s in samples[::2]] == [tries[0][1], *tries[1][:3]]

    with pytest.raises(RuntimeError, match=r"papo.online_filter \(0.0, 1.0\): only 1 of 4 prompt groups "
                                           r"passed the filter in trainer.online_filter_max_tries=1 tries"):
        collect_until_full(PromptStream(8, seed=0, batch=4), lambda idx, a: rollout_round(idx, 0), None,
                           bounds=(0.0, 1.0), n=2, target=4, max_tries=1, rank=0, world=1)


def test_equalize_plan_is_the_identity_on_one_rank():
    assert equalize_plan([[0, 1], [2]]) == [[0, 1], [2]]


# --------------------------------------------------------------------------- engine, metrics, report


def test_lr_schedule():
    o = OptimConfig(lr=1.0, warmup_ratio=0.2, lr_schedule="cosine", min_lr_ratio=0.1)
    assert [lr_factor(s, 10, o) for s in (0, 1)] == [0.5, 1.0]  # two warm-up steps
    assert lr_factor(2, 10, o) == 1.0 and lr_factor(10, 10, o) == pytest.approx(0.1)
    assert lr_factor(6, 10, o) == pytest.approx(0.55)  # half way: the mean of 1 and min_lr_ratio
    linear = OptimConfig(lr=1.0, lr_schedule="linear", min_lr_ratio=0.0)
    assert lr_factor(5, 10, linear) == pytest.approx(0.5)
    assert lr_factor(7, 10, OptimConfig(lr=1.0, lr_schedule="constant")) == 1.0


def test_metrics_logger_truncates_the_steps_a_kill_lost(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    for step in (0, 1, 2, 3):
        logger.log({"step": step, "x": float(step)})
    logger.truncate_after(1)
    assert [json.loads(x)["step"] for x in logger.path.read_text().splitlines()] == [0, 1]
    MetricsLogger(tmp_path / "off", enabled=False, tensorboard=False).log({"step": 1})
    assert not (tmp_path / "off").exists()


def test_rollout_step_record_on_one_rank():
    samples = [_sample(1, 1.0, format=1.0, monitors={"kl_full_to_masked": 0.5, "entropy_full": 2.0}),
               _sample(1, 0.0, finished=False, format=0.0, monitors={"kl_full_to_masked": 1.5})]
    update = {"update_tokens": 30.0, "loss/total": 0.25}
    rec = rollout_step_record(4, 1, samples, Coefficients(0.01, 0.03, 0.02), StepTimes(0.0, 1.0, 1.5, 3.5),
                              update, torch.device("cpu"),
                              SimpleNamespace(overlong=2, undecodable=1, skipped_at_access=1))
    assert rec["step"] == 5 and rec["epoch"] == 1 and rec["loss/total"] == 0.25 and "update_tokens" not in rec
    assert (rec["reward/accuracy"], rec["response/truncated_frac"]) == (0.5, 0.5)
    assert rec["response/length_mean"] == 3.0
    assert (rec["rollout/kl_perception_exact"], rec["rollout/entropy_full_exact"]) == (1.0, 1.0)
    assert (rec["time/rollout_s"], rec["time/logprob_s"], rec["time/update_s"], rec["time/step_s"]) == \
        (1.0, 0.5, 2.0, 3.5)
    assert rec["perf/update_tokens_per_s"] == 15.0 and rec["perf/rollout_tokens_per_s"] == 6.0
    assert (rec["data/overlong_skipped"], rec["data/undecodable_skipped"]) == (2, 2)
    assert (rec["coef/gamma"], rec["coef/eta_full"], rec["coef/eta_masked"]) == (0.01, 0.03, 0.02)
    assert update == {"update_tokens": 30.0, "loss/total": 0.25}  # the caller's dict is left alone


def test_newest_checkpoint_skips_partial_copies_and_orders_by_step(tmp_path):
    for name in ("step_000009", "step_000010", "step_000011", f"{TEMP_PREFIX}step_000012"):
        (tmp_path / name).mkdir()
    for name in ("step_000009", "step_000010"):
        (tmp_path / name / COMPLETE_MARKER).write_text("ok\n")
    (tmp_path / f"{TEMP_PREFIX}step_000012" / COMPLETE_MARKER).write_text("ok\n")
    assert newest_checkpoint(tmp_path, rank=1).name == "step_000010"  # step_000011 is not complete
    assert (tmp_path / f"{TEMP_PREFIX}step_000012").exists()  # only rank 0 deletes partial copies
    assert newest_checkpoint(tmp_path, rank=0).name == "step_000010"
    assert not (tmp_path / f"{TEMP_PREFIX}step_000012").exists()
    assert newest_checkpoint(tmp_path / "none", rank=0) is None


def test_final_report_compares_step_0_with_the_end_and_the_blind_baseline(tmp_path):
    rows = [{"problem": "q1", "answer": "red", "category": "colour"},
            {"problem": "q2", "answer": "red", "category": "colour"},
            {"problem": "q3", "answer": "blue", "category": "colour"},
            {"problem": "q4", "answer": "3", "category": "count"}]
    val_ds = type("Val", (), {"records": rows, "indices": [0, 1, 2, 3], "__len__": lambda self: 4})()
    cfg = SimpleNamespace(eval=SimpleNamespace(limit=0),
                          data=SimpleNamespace(prompt_key="problem", answer_key="answer"))
    baseline = blind_baseline(val_ds, cfg)
    assert baseline == 0.75  # "red" for colour (2 of 3), "3" for count
    metrics = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    metrics.log({"step": 0, "eval/avg@2": 0.25, "eval/format": 0.5, "eval/questions": 4})
    final = {"step": 3, "eval/avg@2": 0.75, "eval/format": 1.0, "eval/questions": 4}
    black = {"avg@2": 0.5, "format": 1.0, "questions": 4}
    report = write_final_report(tmp_path, metrics, final, k=2, step=3, black=black, baseline=baseline)
    assert report["delta_avg@2"] == 0.5 and report["black_images_margin"] == -0.25
    assert json.loads((tmp_path / "eval_final.json").read_text()) == report
    md = (tmp_path / "eval.md").read_text()
    assert "avg@2 change: +50.00 points on 4 questions" in md and "blind baseline 75.00%" in md
    assert json.loads(metrics.path.read_text().splitlines()[-1]) == {
        "step": 3, "eval_black/avg@2": 0.5, "eval_black/format": 1.0, "eval_black/questions": 4}
