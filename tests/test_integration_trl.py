"""papo.integrations.trl: PAPOTrainer on the bundled tiny random Qwen2.5-VL, offline, on CPU.

Checks the trainer's per-token statistics against log_softmax over materialized logits, its
loss and gradients against stock GRPOTrainer with gamma = eta = 0, the masked view (raw-image
masking, one draw per prompt, originals untouched, same processing as the originals), the
removed port's argument names, and a few training steps. TRL is installed in CI: there a missing
TRL fails the suite instead of skipping it.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

try:
    import trl  # noqa: F401
except ImportError:
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("TRL is not installed (pip install 'papo-kernels[trl]')", allow_module_level=True)

from PIL import Image  # noqa: E402

from papo.integrations.trl import PAPOTrainer, PAPOTrainerConfig  # noqa: E402
from train.tiny import VISION_SPECIAL_TOKENS, TinyModelSpec, build_tiny_model_dir  # noqa: E402

NUM_PROMPTS = 4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_trl"), TinyModelSpec())


def _dataset():
    from datasets import Dataset

    rng = np.random.default_rng(0)
    rows = []
    for i in range(NUM_PROMPTS):
        # 56 x 56 is the tiny processor's min_pixels: no resize, 4 x 4 tiles of 14 px
        pixels = rng.integers(40, 256, (56, 56, 3), dtype=np.uint8)
        rows.append({"prompt": [{"role": "user", "content": [{"type": "image"},
                                                              {"type": "text", "text": f"How many? {i}"}]}],
                     "image": Image.fromarray(pixels)})
    return Dataset.from_list(rows)


def _reward(completions, **kwargs):
    return [float(len(c[0]["content"])) for c in completions]


def _make(tiny_dir, tmp_path, trainer_cls=PAPOTrainer, config_cls=PAPOTrainerConfig, **overrides):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_dir)
    suppress = processor.tokenizer.convert_tokens_to_ids(list(VISION_SPECIAL_TOKENS))
    kwargs = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2,
                  max_completion_length=8, max_steps=2, logging_steps=1, report_to=[], use_cpu=True,
                  save_strategy="no", seed=0, learning_rate=1e-2, bf16=False,
                  generation_kwargs={"suppress_tokens": suppress})
    kwargs.update(overrides)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir)
    return trainer_cls(model=model, reward_funcs=_reward, args=config_cls(**kwargs), train_dataset=_dataset(),
                       processing_class=processor)


def _batch_rows(trainer):
    """A generation batch as GRPOTrainer's sampler yields it: each prompt num_generations times."""
    ds = trainer.train_dataset
    return [dict(ds[i]) for i in range(2) for _ in range(trainer.num_generations)]


def _pixels(image):
    return np.asarray(image).copy()


# ---------------------------------------------------------------------- arguments


def test_config_defaults_are_the_papers():
    c = PAPOTrainerConfig(output_dir="unused", report_to=[], use_cpu=True).to_papo_config()
    assert (c.gamma, c.eta_full, c.eta_masked, c.beta) == (0.01, 0.03, 0.03, 0.0)
    assert (c.clip_low, c.clip_high, c.dual_clip) == (0.2, 0.3, 3.0)
    assert (c.loss_agg, c.loss_scale, c.estimator, c.masked_view) == ("token-mean", "microbatch", "sampled",
                                                                      "rollout_no_grad")
    assert (c.mask_prob, c.mask_patch_size) == (0.6, 14)


def test_removed_port_names_warn_and_map():
    with pytest.warns(FutureWarning) as record:
        args = PAPOTrainerConfig(output_dir="unused", report_to=[], use_cpu=True,
                                 perception_loss_weight=0.02, mask_ratio=0.5,
                                 der_loss_weight1=0.01, der_loss_weight2=0.04, mask_type="patch")
    text = " ".join(str(w.message) for w in record)
    for expected in ("use gamma", "0.01 (7B) / 0.02 (3B)", "use mask_prob", "0.6", "use eta_full",
                     "use eta_masked", "mask_type='patch'", "ignored"):
        assert expected in text
    c = args.to_papo_config()
    assert (c.gamma, c.mask_prob, c.eta_full, c.eta_masked) == (0.02, 0.5, 0.01, 0.04)
    with pytest.raises(ValueError, match="perception_loss_weight=0.1 and gamma=0.02 disagree"):
        with pytest.warns(FutureWarning):
            PAPOTrainerConfig(output_dir="unused", report_to=[], use_cpu=True, perception_loss_weight=0.1,
                              gamma=0.02)


def test_unsupported_options_are_refused(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="loss_type must be one of"):
        PAPOTrainerConfig(output_dir="unused", report_to=[], use_cpu=True, loss_type="sapo")
    with pytest.raises(ValueError, match="entropy_coef must be 0"):
        _make(tiny_dir, tmp_path, entropy_coef=0.1)


# ---------------------------------------------------------------------- masked view


def test_masked_images_one_draw_per_prompt_originals_untouched(tiny_dir, tmp_path):
    trainer = _make(tiny_dir, tmp_path)
    rows = _batch_rows(trainer)
    before = [_pixels(r["image"]) for r in rows]
    masked = trainer.mask_prompt_images(rows)
    for row, original, m in zip(rows, before, masked):
        np.testing.assert_array_equal(_pixels(row["image"]), original)  # untouched
        out = _pixels(m[0])
        assert out.shape == original.shape and not np.array_equal(out, original)
        blackened = (out == 0).all(-1) & (original != 0).any(-1)
        assert blackened.any()
        # what is not blackened is the original
        np.testing.assert_array_equal(out[~blackened], original[~blackened])
    # the rollouts of a prompt share its mask; the two prompts' masks differ
    same = [np.array_equal(_pixels(masked[i][0]) == 0, _pixels(masked[j][0]) == 0)
            for i, j in ((0, 1), (2, 3), (0, 2))]
    assert same == [True, True, False]


def test_masked_view_is_processed_like_the_originals(tiny_dir, tmp_path):
    # p = 0 masks nothing: the masked pixel_values must then be the originals, bit for bit
    trainer = _make(tiny_dir, tmp_path, mask_prob=0.0, estimator="exact", masked_view="current_no_grad")
    rows = _batch_rows(trainer)
    before = [_pixels(r["image"]) for r in rows]
    out = trainer._generate_and_score_completions(rows)
    torch.testing.assert_close(torch.cat(out["masked_pixel_values"]), out["pixel_values"], rtol=0, atol=0)
    for row, original in zip(rows, before):
        np.testing.assert_array_equal(_pixels(row["image"]), original)


# ---------------------------------------------------------------------- per-token statistics


def _dense_stats(model, trainer, inputs, pixel_values, temperature):
    model_inputs = trainer._model_inputs(inputs, pixel_values)
    logits = model(**model_inputs).logits.double()
    n = inputs["completion_ids"].size(1)
    logp = torch.log_softmax(logits[:, -n - 1:-1] / temperature, dim=-1)
    return logp


def test_token_stats_equal_log_softmax_of_materialized_logits(tiny_dir, tmp_path):
    temperature = 0.7
    trainer = _make(tiny_dir, tmp_path, temperature=temperature)
    rows = _batch_rows(trainer)
    out = trainer._generate_and_score_completions(rows)
    masked_pv = trainer._process_masked(trainer.mask_prompt_images(rows), out)
    assert not torch.equal(masked_pv, out["pixel_values"])
    model = trainer.model
    with torch.no_grad():
        stats = trainer.papo_token_stats(model, out, masked_pv)
        dense_a = _dense_stats(model, trainer, out, None, temperature)
        dense_b = _dense_stats(model, trainer, out, masked_pv, temperature)
    mask = out["completion_mask"].bool()
    ids = out["completion_ids"].unsqueeze(-1)
    expect = {
        "logp_a": dense_a.gather(-1, ids).squeeze(-1),
        "logp_b": dense_b.gather(-1, ids).squeeze(-1),
        "entropy_a": -(dense_a.exp() * dense_a).sum(-1),
        "entropy_b": -(dense_b.exp() * dense_b).sum(-1),
        "kl_ab": (dense_a.exp() * (dense_a - dense_b)).sum(-1),
        "kl_ba": (dense_b.exp() * (dense_b - dense_a)).sum(-1),
    }
    assert mask.sum() > 0
    for name, value in expect.items():
        got = getattr(stats, name)
        torch.testing.assert_close(got[mask].double(), value[mask], rtol=1e-5, atol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")
        assert (got[~mask] == 0).all(), name
    # the rollout-time masked log-probs the loss uses are the same masked view's
    torch.testing.assert_close(out["masked_per_token_logps"][mask].double(), expect["logp_b"][mask],
                               rtol=1e-5, atol=1e-5)
    assert expect["kl_ab"][mask].mean() > 1e-4  # the masked view changes the predictions


# ---------------------------------------------------------------------- loss vs GRPOTrainer


@pytest.mark.parametrize("loss_type", ["bnpo", "grpo", "dr_grpo", "dapo"])
def test_loss_and_grads_equal_grpo_trainer_without_papo_terms(tiny_dir, tmp_path, loss_type):
    from trl import GRPOConfig, GRPOTrainer

    common = dict(loss_type=loss_type, epsilon=0.2, epsilon_high=0.3, beta=0.0, temperature=0.9)
    papo = _make(tiny_dir, tmp_path, gamma=0.0, eta_full=0.0, eta_masked=0.0, dual_clip=None, **common)
    stock = _make(tiny_dir, tmp_path, trainer_cls=GRPOTrainer, config_cls=GRPOConfig, **common)
    batch = papo._generate_and_score_completions(_batch_rows(papo))
    g = torch.Generator().manual_seed(3)
    batch["advantages"] = torch.randn(batch["advantages"].shape, generator=g)
    # off-policy ratios, so that clipping is exercised
    batch["old_per_token_logps"] = torch.randn(batch["completion_ids"].shape, generator=g) * 0.3 - 3.0
    losses, grads = [], []
    for trainer in (papo, stock):
        trainer.current_gradient_accumulation_steps = 2
        trainer.model.train()
        trainer.model.zero_grad()
        loss = trainer._compute_loss(trainer.model, copy.copy(batch))
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-7)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")
    assert any(g.abs().max() > 0 for g in grads[0].values())


# ---------------------------------------------------------------------- training


@pytest.mark.parametrize("options", [{}, {"estimator": "exact", "masked_view": "current_no_grad"}],
                         ids=["official", "exact"])
def test_a_few_training_steps(tiny_dir, tmp_path, options):
    trainer = _make(tiny_dir, tmp_path, **options)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert np.isfinite(entry["loss"])
        for key in ("kl/perception", "entropy/full", "entropy/masked", "loss/policy", "clip/frac_high"):
            assert np.isfinite(entry[key]), key
    if not options:
        assert all(np.isfinite(entry["rollout/kl_perception_exact"]) for entry in logs)
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert "lm_head.weight" in changed and len(changed) > len(before) // 2
