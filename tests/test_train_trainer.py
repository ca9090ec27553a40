"""train/trainer.py end to end on the tiny model: smoke, on-policy ratio, kill-and-resume, ZeRO-3."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests._tiny_runs import FAST, ROOT, TINY, child_env, fresh_dir, launch_ranks, make_cfg, stable
from train.distributed import free_port


def run_trainer(cfg, *, steps_then_kill: int | None = None):
    """Train to the end, or run `steps_then_kill` steps, checkpoint and drop the trainer (a kill
    right after a checkpoint). Returns (records, final parameters)."""
    from train.trainer import Trainer

    tr = Trainer(cfg)
    try:
        if steps_then_kill is None:
            recs = tr.train()
        else:
            tr.maybe_resume()
            recs = [tr.train_step() for _ in range(steps_then_kill)]
            for r in recs:
                tr.metrics.log(r)
            tr.save_checkpoint()
        params = tr.full_state_dict()
    finally:
        tr.close()
    return recs, params


def test_smoke_metrics_checkpoints_and_on_policy_ratio(assets, tmp_path):
    # one mini-batch per step: the update is on-policy, so ratio == 1 and nothing is clipped
    out = fresh_dir(assets, tmp_path, "smoke")
    cfg = make_cfg(out, "trainer.max_steps=2", "trainer.mini_batch_size=8", "eval.every=2", "eval.k=2",
                   "eval.limit=4", "checkpoint.save_every=1", "checkpoint.keep_last=1",
                   "checkpoint.export_hf=true")
    recs, params = run_trainer(cfg)
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        assert abs(r["ratio/mean"] - 1.0) <= 1e-5
        assert r["clip/frac_low"] == r["clip/frac_high"] == r["clip/frac_dual"] == 0.0
        for key in ("reward/accuracy", "reward/format", "loss/total", "kl/perception", "entropy/full",
                    "entropy/masked", "rollout/kl_perception_exact", "grad_norm", "lr", "memory/peak_mb"):
            assert key in r and math.isfinite(r[key]), key  # present, not NaN, not inf
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "reward/accuracy" in x] == [1, 2]
    assert any("eval/avg@2" in x for x in lines)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_000002"]  # keep_last=1 pruned step 1, no temp dirs left
    assert (out / "hf_model" / "config.json").exists() and (out / "config.yaml").exists()
    assert (out / "eval_final.json").exists()
    from train.plot import plot_run

    pngs = {p.name for p in plot_run(out)}
    assert {"rewards.png", "collapse_signals.png", "eval.png"} <= pngs


def test_kill_and_resume_is_bitwise_identical(assets, tmp_path):
    steps = ["trainer.max_steps=3", "checkpoint.save_every=1"]
    full_dir = fresh_dir(assets, tmp_path, "full")
    full, full_params = run_trainer(make_cfg(full_dir, *steps))

    cut_dir = fresh_dir(assets, tmp_path, "cut")
    first, _ = run_trainer(make_cfg(cut_dir, *steps), steps_then_kill=2)
    # a kill during the next checkpoint write leaves a partial temp dir: it must be ignored
    (cut_dir / "checkpoints" / ".tmp-step_000003").mkdir()
    rest, resumed_params = run_trainer(make_cfg(cut_dir, *steps))

    assert [r["step"] for r in rest] == [3]
    for a, b in zip(full, first + rest):
        assert stable(a) == stable(b)
    for k in full_params:
        assert torch.equal(full_params[k], resumed_params[k]), k
    records = [json.loads(x) for x in (cut_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]


@pytest.mark.parametrize("tied", [False, True])
def test_zero3_matches_zero0(assets, tmp_path, tied):
    extra = ["trainer.max_steps=1", "checkpoint.save_every=0",
             f"model.tiny.tie_word_embeddings={str(tied).lower()}",
             # eps >> |g| makes Adam's first step lr * g / (|g| + eps) ~ lr * g (SGD-like), and no
             # clipping: a wrong gradient scale shows in the weights instead of being normalized away
             "optim.eps=1.0", "optim.lr=1.0", "optim.max_grad_norm=1e6"]
    results = []
    for stage in (0, 3):
        out = tmp_path / f"z{stage}"
        out.mkdir()
        shutil.copytree(assets / "data", out / "data")  # the model is built with the tied/untied spec
        results.append(run_trainer(make_cfg(out, *extra, f"trainer.zero_stage={stage}")))
    (r0, p0), (r3, p3) = results
    for key in ("loss/total", "reward/mean", "kl/perception", "entropy/full"):
        assert r0[0][key] == pytest.approx(r3[0][key], abs=1e-6), key
    assert r0[0]["grad_norm"] == pytest.approx(r3[0]["grad_norm"], rel=1e-4)
    for k in p0:
        assert p0[k].shape == p3[k].shape, (k, p0[k].shape, p3[k].shape)
        # the update is ~ the gradient itself: ZeRO-3's other summation order moves it by fp32
        # rounding, a wrong gradient scale (or an ungathered head) by O(|g|)
        torch.testing.assert_close(p0[k], p3[k], atol=1e-6, rtol=1e-5, msg=lambda m: f"{k}: {m}")
    assert any((p0[k] != 0).any() for k in p0)


@pytest.mark.distributed
def test_deepspeed_launcher_smoke(assets, tmp_path):
    """Two steps through the `deepspeed` launcher, as CI and the README run it."""
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable))
    if launcher is None:
        pytest.skip("the deepspeed launcher is not installed next to this python")
    out = fresh_dir(assets, tmp_path, "launch")
    # a free port, not a fixed one: another run of the suite on this machine may hold a fixed port
    cmd = [launcher, "--num_gpus", "1", "--master_port", str(free_port()), str(ROOT / "train" / "run.py"),
           "--config", str(TINY), f"out_dir={out}", *FAST, "trainer.max_steps=2", "checkpoint.save_every=2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "reward/accuracy" in x] == [1, 2]
    assert (out / "checkpoints" / "step_000002" / "COMPLETE").exists()


def test_bad_model_dir_is_a_clear_error(tmp_path):
    from train.config import ConfigError
    from train.policy import load_policy

    with pytest.raises(FileNotFoundError, match="model.path"):
        load_policy(tmp_path, dtype=torch.float32, attn_implementation="sdpa")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="qwen2_5_vl"):
        load_policy(tmp_path, dtype=torch.float32, attn_implementation="sdpa")


# --------------------------------------------------------------------------- data parallel vs one process


class FixedRollouts:
    """A rollout engine whose responses depend only on the prompt's image and the sample index,
    so every process count samples the same responses (some right, some wrong, some unfinished)."""

    def __init__(self, model_dir: Path):
        from transformers import AutoProcessor

        from train.data import ANSWERS

        tok = AutoProcessor.from_pretrained(model_dir, local_files_only=True).tokenizer
        self.eos = tok.convert_tokens_to_ids("<|im_end|>")
        answers = sorted({a for v in ANSWERS.values() for a in v})
        self.responses = [tok(f"<think> The answer is {a}. </think> \\boxed{{{a}}}",
                              add_special_tokens=False)["input_ids"] for a in answers]

    def generate(self, prompts, params):
        from train.rollout import Completion

        out = []
        for p in prompts:
            key = int(p.pixel_values.double().sum().mul(1e3).round().item())
            comps = []
            for j in range(params.n):
                ids = list(self.responses[(key + 5 * j) % len(self.responses)])
                finished = (key + j) % 3 != 0
                ids = ids + [self.eos] if finished else ids[: len(ids) - key % 4]
                ids = ids[: params.max_new_tokens]
                done = finished and ids[-1] == self.eos
                comps.append(Completion(torch.tensor(ids, dtype=torch.long), done))
            out.append(comps)
        return out


def _dp_worker(out: str, rank: int, world: int, extra: list[str]) -> None:
    """One rank of `test_two_processes_match_one` (started by `launch_ranks`)."""
    from train.trainer import Trainer

    cfg = make_cfg(Path(out), *extra)
    tr = Trainer(cfg, rollout_engine=FixedRollouts(Path(out) / "tiny_model"))
    try:
        recs = tr.train()
        params = tr.full_state_dict()
    finally:
        tr.close()
    torch.save({"records": recs, "params": params} if rank == 0 else {}, Path(out) / f"result_{rank}.pt")


def _launch(out: Path, world: int, extra: list[str]) -> dict:
    """What rank 0 of `world` ranks training `extra` in `out` saved."""
    return launch_ranks("tests.test_train_trainer:_dp_worker", out, world, extra, timeout_s=600)[0]


@pytest.mark.distributed
def test_two_processes_match_one(assets, tmp_path):
    """loss_scale="global": 2 processes x 2 micro-batches == 1 process on the whole mini-batch."""
    common = ["trainer.max_steps=1", "checkpoint.save_every=0", "papo.loss_scale=global",
              "data.max_response_length=24", "trainer.rollout_batch_size=8", "trainer.mini_batch_size=4",
              "rollout.n=2"]
    one = _launch(fresh_dir(assets, tmp_path, "one"), 1, [*common, "trainer.micro_batch_size=8"])
    two = _launch(fresh_dir(assets, tmp_path, "two"), 2, [*common, "trainer.micro_batch_size=2"])
    (r1,), (r2,) = one["records"], two["records"]
    assert r1["optimizer_steps"] == r2["optimizer_steps"] == 2  # the second mini-batch is off-policy
    for key in ("reward/mean", "reward/accuracy", "reward/format", "response/length_mean",
                "rollout/kl_perception_exact", "rollout/entropy_full_exact"):
        assert r1[key] == pytest.approx(r2[key], rel=1e-5, abs=1e-6), key
    # update metrics are token-weighted over every rank's micro-batches, not rank 0's alone
    for key in ("loss/total", "kl/perception", "entropy/full", "entropy/masked"):
        assert r1[key] == pytest.approx(r2[key], rel=1e-4, abs=1e-6), key
    assert 0 < r1["reward/accuracy"] < 1  # non-zero advantages: the test exercises the policy gradient
    # the pre-clip norm of the data-parallel mean gradient: a wrong loss scale changes it (Adam's
    # update is nearly scale-free, so the weights alone would not show a global factor)
    assert r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=1e-4)
    p1, p2 = one["params"], two["params"]
    for k in p1:
        # Adam's first steps, lr * g / (|g| + eps), turn fp32 summation-order differences into up to
        # ~1e-3 * lr on weights whose gradient is ~eps; a wrong normalization moves weights by O(lr).
        torch.testing.assert_close(p1[k], p2[k], atol=1e-2 * 1e-2, rtol=1e-5, msg=lambda m: f"{k}: {m}")


def test_loss_metric_does_not_depend_on_micro_batching(assets, tmp_path):
    """loss/total is the mini-batch objective, not a token-weighted mean of micro-batch shares."""
    from train.trainer import Trainer

    recs = []
    for micro in (8, 2):
        out = fresh_dir(assets, tmp_path, f"mb{micro}")
        cfg = make_cfg(out, "trainer.max_steps=1", "checkpoint.save_every=0", "trainer.mini_batch_size=8",
                       "data.max_response_length=24", f"trainer.micro_batch_size={micro}")
        tr = Trainer(cfg, rollout_engine=FixedRollouts(out / "tiny_model"))  # right and wrong answers
        try:
            recs += tr.train()
        finally:
            tr.close()
    r1, r4 = recs
    assert r1["loss/total"] != 0 and r1["loss/policy"] != 0
    # "microbatch" scaling: 4 micro-batch means / 4 equal the whole mean only when the micro-batches
    # hold equal token counts (here nearly: 1e-4 apart); the old token-weighted mean of the shares
    # was 4x smaller
    assert r4["loss/total"] == pytest.approx(r1["loss/total"], rel=0.01)
    assert r4["loss/policy"] == pytest.approx(r1["loss/policy"], rel=1e-4, abs=1e-7)


def test_padded_vocabulary(tmp_path):
    """A head with more rows than the tokenizer has tokens (Qwen pads 151,665 to 151,936; the
    random 3B config relies on it): sampled ids past the tokenizer decode to nothing."""
    out = tmp_path / "padded"
    cfg = make_cfg(out, "trainer.max_steps=1", "checkpoint.save_every=0", "model.tiny.model_vocab_size=4096",
                   "rollout.temperature=3.0", "papo.temperature=3.0")
    recs, params = run_trainer(cfg)
    head = params["lm_head.weight"]
    assert head.shape[0] == 4096
    assert torch.isfinite(torch.tensor(recs[0]["loss/total"]))
