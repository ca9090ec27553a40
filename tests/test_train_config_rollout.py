"""train/config.py, train/rollout.py and train/batching.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from train import data as D
from train.config import ConfigError, RunConfig, config_from_dict, describe, field_docs, load_config, save_config
from train.tiny import TinyModelSpec, build_tiny_model_dir

CONFIGS = Path(__file__).resolve().parent.parent / "train" / "configs"
SMALL = dict(min_pixels=56 * 56, max_pixels=112 * 112)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("name", ["tiny", "papo_g_nref_7b", "papo_g_3b", "papo_d_7b", "random_3b"])
def test_shipped_configs_load_and_build_papo(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    papo = cfg.papo_config()
    if name in ("tiny", "random_3b"):
        assert papo.preset == "papo-g-nref-7b"
    else:
        assert papo.preset == name.replace("_", "-")


def test_recipe_matches_spec_section_3():
    cfg = load_config(CONFIGS / "papo_g_nref_7b.yaml")
    t, r, o, d = cfg.trainer, cfg.rollout, cfg.optim, cfg.data
    assert (t.rollout_batch_size, t.mini_batch_size, t.micro_batch_size, t.total_epochs) == (384, 128, 4, 2)
    assert (r.n, r.temperature, r.top_p) == (5, 1.0, 0.99)
    assert (o.lr, o.weight_decay, o.max_grad_norm, o.lr_schedule) == (1e-6, 1e-2, 1.0, "constant")
    assert (d.min_pixels, d.max_pixels, d.max_prompt_length, d.max_response_length) == (200704, 1003520, 4096, 2048)
    p = cfg.papo_config()
    assert (p.gamma, p.beta, p.eta_full, p.eta_masked, p.clip_low, p.clip_high, p.dual_clip) == \
        (0.01, 0.0, 0.03, 0.03, 0.2, 0.3, 3.0)


def test_overrides_types_and_roundtrip(tmp_path):
    cfg = load_config(CONFIGS / "tiny.yaml", ["optim.lr=1e-5", "papo.gamma=0.02", "trainer.zero_stage=2",
                                              "model.tiny.tie_word_embeddings=true", "optim.betas=[0.9, 0.95]"])
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)  # YAML reads "1e-5" as a string
    assert cfg.papo_config().gamma == 0.02 and cfg.trainer.zero_stage == 2
    assert cfg.model.tiny.tie_word_embeddings is True and cfg.optim.betas == [0.9, 0.95]
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg


@pytest.mark.parametrize("override, match", [
    (["optim.lrr=1"], r"optim\.lrr"),
    (["nope=1"], r"unknown key.*'nope'"),
    (["trainer.zero_stage=5"], r"trainer\.zero_stage"),
    (["rollout.top_p=1.5"], r"rollout\.top_p"),
    (["trainer.micro_batch_size=abc"], r"trainer\.micro_batch_size: must be an integer"),
    (["model.dtype=float16"], r"model\.dtype: must be one of"),
    (["trainer.mini_batch_size=7"], r"trainer\.mini_batch_size"),
    (["model.tiny.hidden_size=63"], r"hidden_size"),
    (["lr"], r"key=value"),
])
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(CONFIGS / "tiny.yaml", override)


def test_papo_section_is_validated_by_papoconfig():
    with pytest.raises(ConfigError, match=r"papo\.gama"):
        config_from_dict({"papo": {"preset": "grpo", "gama": 0.1}}).papo_config()
    with pytest.raises(ConfigError, match="gamma"):
        config_from_dict({"papo": {"gamma": -1.0}}).papo_config()
    with pytest.raises(ConfigError, match="preset"):
        config_from_dict({"papo": {"preset": "papo-x"}}).papo_config()
    cfg = config_from_dict({"papo": {"preset": "papo-d-7b", "online_filter": [0.1, 0.9]}})
    assert cfg.papo_config().online_filter == (0.1, 0.9)


def test_every_field_is_documented():
    import dataclasses

    def walk(obj):
        docs = field_docs(type(obj))
        for f in dataclasses.fields(obj):
            assert docs.get(f.name), f"{type(obj).__name__}.{f.name} has no docstring"
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(v)

    walk(RunConfig())
    assert any(line.startswith("optim.lr = ") for line in describe(RunConfig()))


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config("/nonexistent/x.yaml")


# --------------------------------------------------------------------------- rollout & packing


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    d = build_tiny_model_dir(tmp_path_factory.mktemp("tiny"), TinyModelSpec())
    return (Qwen2_5_VLForConditionalGeneration.from_pretrained(d, local_files_only=True),
            AutoProcessor.from_pretrained(d, local_files_only=True))


def _prompts(processor, n, sizes=(84, 112, 56)):
    from train.batching import encode_prompt

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        task = D.SYNTH_TASKS[i % 4]
        q, _, img = D.make_synthetic_item(rng, task, size=sizes[i % len(sizes)])
        masked = [img.point(lambda v: v // 2)]
        out.append(encode_prompt(processor, D.format_prompt(q), [img], masked_images=masked, **SMALL))
    return out


def test_rollout_is_seeded_ordered_and_stops_at_eos(tiny):
    from train.rollout import HFRolloutEngine, SamplingParams

    model, processor = tiny
    prompts = _prompts(processor, 3)
    assert len({len(p) for p in prompts}) == 3  # different lengths: sorting reorders them
    engine = HFRolloutEngine(model, processor.tokenizer, batch_size=4)
    params = SamplingParams(n=2, max_new_tokens=10, seed=5)
    model.train()
    a = engine.generate(prompts, params)
    b = engine.generate(prompts, params)
    assert [[c.token_ids.tolist() for c in r] for r in a] == [[c.token_ids.tolist() for c in r] for r in b]
    assert len(a) == 3 and all(len(r) == 2 for r in a)
    eos = set(engine.eos_ids)
    for r in a:
        for c in r:
            ids = c.token_ids.tolist()
            assert len(ids) <= 10
            if c.finished:
                assert ids[-1] in eos and not (set(ids[:-1]) & eos)
    assert model.training  # generate restores the mode it found

    # a checkpoint's sampling defaults (Qwen2.5-VL ships repetition_penalty 1.05) must not reshape
    # the distribution the log-probs are taken from
    saved = model.generation_config.repetition_penalty
    try:
        model.generation_config.repetition_penalty = 50.0
        c = engine.generate(prompts, params)
    finally:
        model.generation_config.repetition_penalty = saved
    assert [[x.token_ids.tolist() for x in r] for r in c] == [[x.token_ids.tolist() for x in r] for r in a]


def test_truncate_at_eos():
    from train.rollout import truncate_at_eos

    c = truncate_at_eos(torch.tensor([5, 6, 9, 7, 9]), [9, 8])
    assert c.token_ids.tolist() == [5, 6, 9] and c.finished
    c = truncate_at_eos(torch.tensor([5, 6]), [9])
    assert c.token_ids.tolist() == [5, 6] and not c.finished


def test_sampling_params_validation():
    from train.rollout import SamplingParams

    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=0)


def test_packed_forward_matches_per_sequence_forward(tiny):
    """Packed, padding-free micro-batches with per-sample 3-D rope positions give the same
    response log-probs as separate forwards (original and masked views)."""
    from train.batching import Sequence, gather_response_hidden, pack, plan_micro_batches

    model, processor = tiny
    model.eval()
    prompts = _prompts(processor, 3)
    seqs = [Sequence(p, torch.randint(0, 400, (4 + i,))) for i, p in enumerate(prompts)]
    batch = pack(model.model, seqs)
    for masked in (False, True):
        with torch.no_grad():
            h = gather_response_hidden(model.model(**batch.model_inputs(masked=masked)).last_hidden_state, batch)
            packed = torch.log_softmax(h @ model.lm_head.weight.T, -1)
            for b, s in enumerate(seqs):
                p = s.prompt
                ids = torch.cat([p.input_ids, s.response_ids]).view(1, -1)
                mm = torch.cat([p.mm_token_type_ids, torch.zeros_like(s.response_ids)]).view(1, -1)
                pix = p.masked_pixel_values if masked else p.pixel_values
                logits = model(input_ids=ids, mm_token_type_ids=mm, pixel_values=pix,
                               image_grid_thw=p.image_grid_thw).logits[0]
                R, P = len(s.response_ids), len(p)
                ref = torch.log_softmax(logits[P - 1: P - 1 + R], -1)
                torch.testing.assert_close(packed[b, :R], ref, atol=1e-5, rtol=1e-5)
    assert batch.response_mask.sum().item() == sum(len(s.response_ids) for s in seqs)
    assert plan_micro_batches([5, 5, 5, 20, 5], max_seqs=2, max_tokens=12) == [[0, 1], [2], [3], [4]]
    assert plan_micro_batches([5] * 5, max_seqs=2) == [[0, 1], [2, 3], [4]]


def test_random_3b_config_has_the_3b_shape():
    """The GPU smoke config builds a model of the Qwen2.5-VL-3B shape (checked on the meta device)."""
    from train.tiny import build_model, train_tokenizer

    spec = load_config(CONFIGS / "random_3b.yaml").model.tiny
    tokenizer = train_tokenizer(["a b c d e f g"] * 4, spec.vocab_size)
    with torch.device("meta"):
        model = build_model(tokenizer, spec)
    assert model.lm_head.weight.shape == (151936, 2048) and len(tokenizer) < 151936
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # tied, as the 3B
    n = sum(p.numel() for p in model.parameters())
    assert 3.6e9 < n < 3.8e9, n
