"""What a real Qwen2.5-VL run would hit, in one process on the tiny model: image resolution in every
path, the DAPO online filter's retries, text-only samples and non-finite gradients at every ZeRO
stage (the multi-rank cases are in test_train_multirank.py)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests._tiny_runs import ONE_STEP, fresh_dir, tiny_config

FAST = [*ONE_STEP, "trainer.rollout_batch_size=4", "data.max_response_length=6", "optim.lr=1e-2"]
# Qwen2.5-VL's released image processor (preprocessor_config.json) and the official data bounds
QWEN_PROCESSOR = dict(min_pixels=3136, max_pixels=12845056)
OFFICIAL_DATA = dict(min_pixels=256 * 28 * 28, max_pixels=1280 * 28 * 28)


@pytest.fixture(scope="module")
def assets(tiny_assets):
    return tiny_assets(16, 4)


class EchoRollouts:
    """Rollouts without a model: every response is the same short formatted answer."""

    def __init__(self, tokenizer):
        text = "<think> The answer is red. </think> \\boxed{red}"
        self.ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        self.ids.append(tokenizer.convert_tokens_to_ids("<|im_end|>"))
        self.calls = 0

    def generate(self, prompts, params):
        from train.rollout import Completion

        self.calls += 1
        ids = torch.tensor(self.ids[: params.max_new_tokens], dtype=torch.long)
        return [[Completion(ids.clone(), len(self.ids) <= params.max_new_tokens) for _ in range(params.n)]
                for _ in prompts]


def trainer(out: Path, *extra: str, engine: str = "echo"):
    from transformers import AutoProcessor

    from train.trainer import Trainer

    cfg = tiny_config(out, *FAST, *extra)
    rollouts = None
    if engine == "echo":
        tok = AutoProcessor.from_pretrained(out / "tiny_model", local_files_only=True).tokenizer
        rollouts = EchoRollouts(tok)
    return Trainer(cfg, rollout_engine=rollouts)


# --------------------------------------------------------------------------- resolution


def official_grid(width: int, height: int, *, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The official pipeline's patch grid (docs/algorithm.md): EasyR1's `process_image` bounds
    the raw image (integer truncation), then the Qwen processor's defaults `smart_resize` it."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    for bound, cmp in ((max_pixels, lambda a: a > max_pixels), (min_pixels, lambda a: a < min_pixels)):
        if cmp(width * height):
            f = math.sqrt(bound / (width * height))
            width, height = int(width * f), int(height * f)
    h, w = smart_resize(height, width, factor=28, **QWEN_PROCESSOR)
    return h // 14, w // 14


def _big_image_data(out: Path, size: int) -> Path:
    from train.data import _write_parquet

    ramp = np.linspace(0, 255, size, dtype=np.float64)
    channels = [np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size))]
    arr = np.stack(channels, -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    rows = [{"id": f"big-{i}", "problem": "<image>What colour is the corner?", "answer": "red",
             "images": [{"bytes": buf.getvalue(), "path": None}], "category": "colour"} for i in range(2)]
    for split in ("train", "validation"):
        _write_parquet(rows, out / "big" / "data" / f"{split}-00000-of-00001.parquet")
    return out / "big"


def test_a_1001_px_image_gets_the_official_grid_in_every_path(tmp_path):
    """1001 x 1001 px is inside the official [200,704, 1,003,520] pixel bounds, so the raw image is
    not resized; Qwen's processor (its defaults: up to 12.8 M pixels) rounds it to 1008 x 1008 px,
    72 x 72 patches. Handing the processor the data bounds instead (max 1,003,520) gave 70 x 70."""
    from train.eval import evaluate_dataset
    from train.rollout import SamplingParams
    from train.samples import Sample
    from train.tiny import TinyModelSpec, ensure_tiny_model_dir

    assert official_grid(1001, 1001, **OFFICIAL_DATA) == (72, 72)
    out = tmp_path / "run"
    model_dir = ensure_tiny_model_dir(out / "model", TinyModelSpec(**QWEN_PROCESSOR))
    data = _big_image_data(tmp_path, 1001)
    tr = trainer(out, f"model.path={model_dir}", f"data.train_path={data}", "data.max_prompt_length=2048",
                 *(f"data.{k}={v}" for k, v in OFFICIAL_DATA.items()),
                 "trainer.rollout_batch_size=1", "trainer.mini_batch_size=1", "data.max_response_length=2",
                 engine="hf")
    try:
        # the trainer's encoding: both views, then the HF engine and the log-prob pass consume it
        item, enc = tr._encode(0, 0)
        assert item["images"][0].size == (1001, 1001)
        assert enc.image_grid_thw.tolist() == [[1, 72, 72]]
        assert enc.masked_pixel_values.shape == enc.pixel_values.shape == (72 * 72, 3 * 2 * 14 * 14)
        (comps,) = tr.rollout.generate([enc], SamplingParams(n=1, max_new_tokens=2, seed=0))
        samples = [Sample(uid=item["uid"], prompt=enc, answer="red", response_ids=comps[0].token_ids,
                          finished=comps[0].finished)]
        tr._logprob_pass(samples)
        assert samples[0].old_logp.numel() == comps[0].token_ids.numel()
        assert torch.isfinite(samples[0].old_logp).all() and torch.isfinite(samples[0].masked_logp).all()

        # evaluation, with the training bounds and with PAPO-Eval's (768 x 768 max)
        class Recorder:
            def __init__(self):
                self.grids = []

            def generate(self, prompts, params):
                self.grids += [p.image_grid_thw.tolist() for p in prompts]
                return EchoRollouts(tr.tokenizer).generate(prompts, params)

        for bounds in (OFFICIAL_DATA, dict(min_pixels=32 * 32, max_pixels=768 * 768)):
            rec = Recorder()
            evaluate_dataset(rec, tr.processor, tr.val_ds, k=1, max_new_tokens=2, grader=tr.grader, **bounds)
            gh, gw = official_grid(1001, 1001, **bounds)
            assert rec.grids == [[[1, gh, gw]]] * 2
        assert official_grid(1001, 1001, min_pixels=32 * 32, max_pixels=768 * 768) == (54, 54)

        # vLLM: the image it gets, run through the processor's defaults (as vLLM does), gives the grid
        from train.vllm_engine import VLLMRolloutEngine, image_limits_of, image_processor_config

        limits = image_limits_of(image_processor_config(model_dir))
        assert limits["image_limits"] == (QWEN_PROCESSOR["min_pixels"], QWEN_PROCESSOR["max_pixels"])
        vllm = VLLMRolloutEngine(object(), tr.tokenizer, **limits)
        (sent,) = vllm.request(enc)["multi_modal_data"]["image"]
        again = tr.processor.image_processor(images=[sent], return_tensors="pt")
        assert again["image_grid_thw"].tolist() == [[1, 72, 72]]
        assert torch.equal(again["pixel_values"], enc.pixel_values)
    finally:
        tr.close()


# --------------------------------------------------------------------------- DAPO online filter


def _score_by(rule):
    """A Trainer._score replacement: accuracy of response j of group g on rank r = rule(r, g, j)."""
    from train.trainer import Trainer

    original = Trainer._score

    def score(self, samples):
        original(self, samples)
        n = self.cfg.rollout.n
        for i, s in enumerate(samples):
            s.accuracy = float(rule(self.rank, i // n, i % n))
            s.reward = 0.9 * s.accuracy + 0.1 * s.format

    return score


def test_online_filter_raises_at_its_retry_limit(assets, tmp_path, monkeypatch):
    from train.trainer import Trainer

    # one group in each try of 4 prompts passes (mixed answers), the others are all wrong
    monkeypatch.setattr(Trainer, "_score", _score_by(lambda r, g, j: g == 0 and j == 0))
    tr = trainer(fresh_dir(assets, tmp_path, "limit"), "papo.preset=papo-d-7b",
                 "trainer.online_filter_max_tries=3")
    try:
        with pytest.raises(RuntimeError, match=r"online_filter.*3 of 4 .*online_filter_max_tries=3"):
            tr.train_step()
        # every try drew a full rollout batch (official: one dataloader batch per try)
        assert tr.rollout.calls == 3 and tr.stream.pos == 3 * 4
    finally:
        tr.close()


def test_online_filter_keeps_a_try_whole_when_nothing_passes_and_draws_full_batches(assets, tmp_path,
                                                                                 monkeypatch):
    from train.trainer import Trainer

    tries = []

    def rule(r, g, j):
        # first try: every group all wrong (nothing passes: kept whole); later tries would pass
        if g == 0 and j == 0:
            tries.append(1)
        return len(tries) > 1 and j == 0

    monkeypatch.setattr(Trainer, "_score", _score_by(rule))
    tr = trainer(fresh_dir(assets, tmp_path, "whole"), "papo.preset=papo-d-7b",
                 "trainer.online_filter_max_tries=3")
    try:
        rec = tr.train_step()
    finally:
        tr.close()
    assert rec["filter/tries"] == 1 and rec["filter/prompts_seen"] == 4 and rec["filter/kept_groups"] == 4
    assert rec["reward/accuracy"] == 0.0 and rec["optimizer_steps"] == 1


def test_online_filter_fills_the_batch_across_tries(assets, tmp_path, monkeypatch):
    from train.trainer import Trainer

    # 3 of 4 groups pass in each try: the second try fills the batch, which keeps the first 4 in draw order
    monkeypatch.setattr(Trainer, "_score", _score_by(lambda r, g, j: g != 1 and j == 0))
    tr = trainer(fresh_dir(assets, tmp_path, "fill"), "papo.preset=papo-d-7b")
    try:
        samples, stats = tr._collect(0)
        assert stats == {"filter/tries": 2.0, "filter/kept_groups": 6.0, "filter/prompts_seen": 8.0,
                         "filter/raw_accuracy": 3 / 8}
        order = np.random.default_rng([tr.cfg.data.shuffle_seed, 0]).permutation(len(tr.train_ds))
        draws = order[:8].tolist()
        expected = [tr.train_ds[i]["uid"] for i in (draws[0], draws[2], draws[3], draws[4])]
        assert [s.uid for s in samples[::2]] == expected and len(samples) == 8
        assert all(0 < sum(s.accuracy for s in samples[k:k + 2]) < 2 for k in range(0, 8, 2))
    finally:
        tr.close()


# --------------------------------------------------------------------------- text-only samples


def test_text_only_samples_never_break_the_masked_pass(assets, tmp_path):
    """Whether the masked pass runs is decided from all samples; a text-only sample's masked view is
    its original one (masked log-probs = old log-probs, perception KL 0)."""
    from train.batching import encode_prompt
    from train.data import format_prompt
    from train.samples import Sample

    tr = trainer(fresh_dir(assets, tmp_path, "text"))
    try:
        d = tr.cfg.data
        text = encode_prompt(tr.processor, format_prompt("What is one plus one?"), [],
                             min_pixels=d.min_pixels, max_pixels=d.max_pixels)
        item, image = tr._encode(0, 0)
        response = torch.tensor(tr.rollout.ids, dtype=torch.long)

        def batch(prompts):
            out = [Sample(uid=u, prompt=p, answer="red", response_ids=response.clone(), finished=True,
                          reward=float(j), accuracy=float(j)) for u, p in prompts for j in (0, 1)]
            tr._advantages(out)
            return out

        for prompts in ([(10_000, text), (item["uid"], image)], [(10_000, text), (10_001, text)]):
            samples = batch(prompts)  # the first sample is text-only
            tr._logprob_pass(samples)
            for s in samples:
                assert s.masked_logp is not None and torch.isfinite(s.old_logp).all()
                if s.prompt.pixel_values is None:
                    assert torch.equal(s.masked_logp, s.old_logp)
                else:
                    assert not torch.equal(s.masked_logp, s.old_logp)  # the image was masked
            out = tr._update(samples, tr.papo.coefficients(0, 1))
            assert math.isfinite(out["loss/total"]) and out["skipped_steps"] == 0
            if all(s.prompt.pixel_values is None for s in samples):
                assert out["kl/perception"] == pytest.approx(0.0, abs=1e-9)
    finally:
        tr.close()


# --------------------------------------------------------------------------- non-finite gradients


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_non_finite_gradients_skip_the_step_at_every_zero_stage(assets, tmp_path, stage):
    tr = trainer(fresh_dir(assets, tmp_path, f"nan{stage}"), f"trainer.zero_stage={stage}",
                 "trainer.mini_batch_size=2")
    try:
        before = {k: v.clone() for k, v in tr.full_state_dict().items()}
        backward = tr.engine.backward
        calls = []

        def poisoned(loss, **kw):
            # the first micro-batch's loss times NaN: the first mini-batch's gradient is NaN (a NaN
            # advantage would be refused by papo_loss's input check before it reached the gradient)
            calls.append(1)
            return backward(loss * float("nan") if len(calls) == 1 else loss, **kw)

        tr.engine.backward = poisoned
        rec = tr.train_step()
        after = tr.full_state_dict()
    finally:
        tr.close()
    assert rec["optimizer_steps"] == 2 and rec["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in after.values())
    # the second mini-batch (finite) was applied
    assert any(not torch.equal(before[k], after[k]) for k in before)


# --------------------------------------------------------------------------- reference policy


def test_reference_policy_in_the_policy_dtype_and_offloaded(assets, tmp_path):
    """ZeRO-0 replicates the policy, and the reference with it, in the policy's dtype (bf16 here,
    never an fp32 copy); model.ref_offload holds it in a ZeRO-3 engine with its parameters in CPU
    memory (test_train_multirank.py checks the sharding on two ranks)."""
    for offload in (False, True):
        extra = ["papo.preset=papo-g-7b", "model.dtype=bfloat16"]
        extra += ["model.ref_offload=true"] if offload else []
        tr = trainer(fresh_dir(assets, tmp_path, f"ref{offload}"), *extra)
        try:
            params = list(tr.ref_model.parameters())
            stored = [getattr(p, "ds_tensor", p) for p in params]
            assert {t.dtype for t in stored} == {torch.bfloat16} and not any(p.requires_grad for p in params)
            assert tr.ref_sharded is offload
            if offload:
                assert tr.ref_model.zero_optimization_stage() == 3
                assert tr.ref_model.zero_offload_param().device == "cpu"
                assert {t.device.type for t in stored} == {"cpu"}
            rec = tr.train_step()
            assert math.isfinite(rec["kl/ref"]) and math.isfinite(rec["loss/total"])
        finally:
            tr.close()
