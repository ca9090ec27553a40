"""Several ranks (gloo on CPU, one process each): every collective is entered by every rank.

- the DAPO online filter under ZeRO-3 with the HF engine, rank 0 keeping fewer groups than rank 1
  (a per-rank "enough groups" decision left rank 0 regenerating, i.e. gathering ZeRO-3 weights,
  while rank 1 went on: a hang or a gloo size mismatch);
- the reference policy under ZeRO-3 in bf16: each rank holds half of it, in bf16;
- evaluation with uneven shards (257 questions on 4 ranks): the same number of engine calls.

Each launch has a timeout, so a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests._tiny_runs import ONE_STEP, fresh_dir, launch_ranks, tiny_config

pytestmark = pytest.mark.distributed

FAST = [*ONE_STEP, "trainer.rollout_batch_size=8", "data.max_response_length=4", "trainer.zero_stage=3"]


@pytest.fixture(scope="module")
def assets(tiny_assets):
    return tiny_assets(16, 4)


def launch(worker: str, out: Path, world: int, *args) -> list[dict]:
    """Run this module's `worker(out, rank, world, *args)` on `world` ranks; returns each rank's result."""
    return launch_ranks(f"tests.test_train_multirank:{worker}", out, world, *args)


def _start(out: str, *extra: str, rollout_engine=None):
    from train.trainer import Trainer

    cfg = tiny_config(out, *FAST, *extra)
    return Trainer(cfg, rollout_engine=rollout_engine)


# --------------------------------------------------------------------------- DAPO online filter


def _group_signature(samples) -> tuple:
    """What must survive a move to another rank: prompt (both views), responses and rewards."""
    p = samples[0].prompt
    return (samples[0].uid, float(p.pixel_values.double().sum()), float(p.masked_pixel_values.double().sum()),
            tuple(tuple(s.response_ids.tolist()) for s in samples), tuple(s.accuracy for s in samples))


def filter_worker(out: str, rank: int, world: int) -> None:
    from train.trainer import Trainer

    original_score = Trainer._score
    original_spread = getattr(Trainer, "_spread_groups", None)

    def score(self, samples):
        # rank 1: every group has one right and one wrong answer (passes); rank 0: only its first
        original_score(self, samples)
        n = self.cfg.rollout.n
        for i, s in enumerate(samples):
            passes = self.rank == 1 or i // n == 0
            s.accuracy = float(passes and i % n == 0)
            s.reward = 0.9 * s.accuracy + 0.1 * s.format

    seen = {}

    def spread(self, kept, target, step):
        seen["kept"] = {key: _group_signature(group) for key, (_, group) in kept.items()}
        samples = original_spread(self, kept, target, step)
        n = self.cfg.rollout.n
        seen["mine"] = [_group_signature(samples[i:i + n]) for i in range(0, len(samples), n)]
        return samples

    Trainer._score = score
    if original_spread is not None:
        Trainer._spread_groups = spread
    tr = _start(out, "papo.preset=papo-d-7b")  # the HF engine: each try gathers the ZeRO-3 weights
    try:
        rec = tr.train_step()
    finally:
        tr.close()
    torch.save({"rec": rec, **seen}, Path(out) / f"result_{rank}.pt")


def test_online_filter_on_two_ranks_under_zero3(assets, tmp_path):
    r0, r1 = launch("filter_worker", fresh_dir(assets, tmp_path, "filter"), 2)
    for r in (r0, r1):
        # try 1: 1 + 4 groups pass, fewer than 8: both ranks retry; try 2: 10 >= 8
        rec = r["rec"]
        assert (rec["filter/tries"], rec["filter/prompts_seen"], rec["filter/kept_groups"]) == (2, 16, 10)
        assert rec["optimizer_steps"] == 2 and math.isfinite(rec["loss/total"])
        assert len(r["mine"]) == 4  # the batch is spread evenly
    # the first 8 kept groups in draw order (try, position), whichever rank rolled them out
    kept = {**r0["kept"], **r1["kept"]}
    first = [kept[k] for k in sorted(kept)[:8]]
    assert sorted(r0["mine"] + r1["mine"]) == sorted(first)
    # rank 0 kept only 2 groups itself: 2 moved from rank 1, re-encoded (same pixels, same masks)
    assert len(set(r0["mine"]) - set(r0["kept"].values())) == 2


# --------------------------------------------------------------------------- reference policy


def ref_worker(out: str, rank: int, world: int, *extra: str) -> None:
    tr = _start(out, "papo.preset=papo-g-7b", "model.dtype=bfloat16", *extra)  # beta 0.01
    try:
        params = list(tr.ref_model.parameters())
        held = {
            "local": sum(getattr(p, "ds_tensor", p).numel() for p in params),
            "total": sum(getattr(p, "ds_numel", p.numel()) for p in params),
            "tensors": len(params),
            "dtypes": sorted({str(getattr(p, "ds_tensor", p).dtype) for p in params}),
            "policy_dtype": str(next(tr.engine.module.parameters()).ds_tensor.dtype),
        }
        rec = tr.train_step()
    finally:
        tr.close()
    torch.save({"rec": rec, **held}, Path(out) / f"result_{rank}.pt")


def test_reference_policy_is_sharded_in_the_policy_dtype(assets, tmp_path):
    results = launch("ref_worker", fresh_dir(assets, tmp_path, "ref"), 2)
    for r in results:
        # ZeRO-3 pads each tensor to a multiple of the world size: at most one element per tensor over half
        assert r["total"] / 2 <= r["local"] <= r["total"] / 2 + r["tensors"], r
        assert r["dtypes"] == ["torch.bfloat16"] == [r["policy_dtype"]]
        assert math.isfinite(r["rec"]["kl/ref"]) and math.isfinite(r["rec"]["loss/total"])
    assert results[0]["total"] == results[1]["total"]


# --------------------------------------------------------------------------- evaluation


class _CollectiveEngine:
    """A rollout engine that joins a collective in every call, as the HF engine's ZeRO-3 gather does;
    it answers question i correctly when i is even. Prompts and responses are plain text here
    (`_TextProcessor`): what is counted is the calls, not the model."""

    def __init__(self):
        self.calls = 0

    def generate(self, prompts, params):
        from train.rollout import Completion

        self.calls += 1
        torch.distributed.all_reduce(torch.ones(1))
        out = []
        for prompt in prompts:
            q = int(prompt.split("Question ")[1].split(":")[0])
            answer = f"<think> ok </think> \\boxed{{{'yes' if q % 2 == 0 else 'no'}}}"
            out.append([Completion(answer, True) for _ in range(params.n)])
        return out


class _TextProcessor:
    """Stands in for the Qwen processor: a prompt "encodes" to its text, a response "decodes" to itself."""

    class tokenizer:  # noqa: N801 - the attribute name of a processor
        @staticmethod
        def decode(text, skip_special_tokens=True):
            return text


def _encode_as_text(processor, prompt, images, *, min_pixels, max_pixels):
    assert len(images) == 1
    return prompt


class _Questions:
    """n tiny image questions whose answer is always "yes"."""

    def __init__(self, n: int):
        from PIL import Image

        from train.data import format_prompt

        red = Image.new("RGB", (28, 28), (200, 0, 0))
        self.items = [{"uid": i, "prompt": format_prompt(f"<image>Question {i}: is it red?"), "answer": "yes",
                       "images": [red], "category": "red"} for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class _ExactGrader:
    """Exact string match (no grader subprocess per rank: the answers here are plain words)."""

    def grade_many(self, pairs):
        return [given == truth for given, truth in pairs]


def eval_worker(out: str, rank: int, world: int, n: int) -> None:
    import train.eval

    train.eval.encode_prompt = _encode_as_text
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    engine = _CollectiveEngine()
    res = train.eval.evaluate_dataset(engine, _TextProcessor(), _Questions(n), k=2, rank=rank, world=world,
                                      batch_questions=16, grader=_ExactGrader())
    torch.distributed.destroy_process_group()
    torch.save({"calls": engine.calls, "res": res}, Path(out) / f"result_{rank}.pt")


def test_evaluation_with_uneven_shards_makes_the_same_calls_on_every_rank(tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    results = launch("eval_worker", out, 4, 257)  # shards of 65, 64, 64, 64 questions
    assert [r["calls"] for r in results] == [5] * 4  # ceil(65 / 16) on every rank
    for r in results:
        assert r["res"]["questions"] == 257
        assert r["res"]["avg@2"] == pytest.approx(129 / 257)  # the even-numbered questions
