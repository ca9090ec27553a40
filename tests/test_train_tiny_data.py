"""train/tiny.py and train/data.py: the offline tiny Qwen2.5-VL and the ViRL39K-format data."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from train import data as D
from train.tiny import QWEN_SPECIAL_TOKENS, VISION_SPECIAL_TOKENS, TinyModelSpec, build_tiny_model_dir

SMALL = dict(min_pixels=56 * 56, max_pixels=112 * 112)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny"), TinyModelSpec())


@pytest.fixture(scope="module")
def processor(tiny_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_dir, local_files_only=True)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    D.write_synthetic(out, n_train=24, n_val=8, seed=3)
    return out


# --------------------------------------------------------------------------- tiny model


def test_tiny_model_loads_offline_with_qwen_specials(tiny_dir, processor):
    from transformers import Qwen2_5_VLForConditionalGeneration

    tok = processor.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS]
    # Qwen's order, contiguous right after the BPE vocabulary, as 151643..151656 in Qwen
    assert ids == list(range(ids[0], ids[0] + 14)) and ids[-1] == len(tok) - 1
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir, local_files_only=True)
    cfg = model.config
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.text_config.vocab_size == len(tok)
    head_dim = cfg.text_config.hidden_size // cfg.text_config.num_attention_heads
    assert sum(cfg.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    assert model.generation_config.eos_token_id == [tok.convert_tokens_to_ids("<|im_end|>"),
                                                    tok.convert_tokens_to_ids("<|endoftext|>")]
    # text the corpus never saw still round-trips through the byte-level BPE
    text = "Zebra 42 ünïcode <|im_start|>"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_chat_template_is_qwen25vl(processor):
    msgs = D.build_messages("<image>How many?")
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>How many?<|im_end|>\n<|im_start|>assistant\n")


def test_tied_head_variant(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    d = build_tiny_model_dir(tmp_path, TinyModelSpec(tie_word_embeddings=True, vocab_size=300), corpus=["a b c"] * 5)
    m = Qwen2_5_VLForConditionalGeneration.from_pretrained(d, local_files_only=True)
    assert m.lm_head.weight.data_ptr() == m.model.language_model.embed_tokens.weight.data_ptr()


def test_tiny_spec_validation_names_field():
    with pytest.raises(ValueError, match="hidden_size"):
        TinyModelSpec(hidden_size=63)
    with pytest.raises(ValueError, match="num_kv_heads"):
        TinyModelSpec(num_heads=4, num_kv_heads=3)


# --------------------------------------------------------------------------- prompt


def test_prompt_template_and_image_segments():
    p = D.format_prompt("  <image>What is shown? <image> Compare.  ")
    assert p.startswith("<image>What is shown? <image> Compare.\n\nYou first think through")
    assert p.endswith("final answer enclosed within \\boxed{}.")
    msgs = D.build_messages(p)
    kinds = [c["type"] for c in msgs[0]["content"]]
    assert kinds == ["image", "text", "image", "text"]
    with pytest.raises(TypeError, match="problem"):
        D.format_prompt(None)


# --------------------------------------------------------------------------- synthetic task


def test_synthetic_task_answers_need_the_image():
    rng = np.random.default_rng(0)
    for task in D.SYNTH_TASKS:
        answers = set()
        for _ in range(40):
            q, a, img = D.make_synthetic_item(rng, task)
            assert q == D.QUESTIONS[task] and a in D.ANSWERS[task] and img.size == (84, 84)
            answers.add(a)
        assert answers == set(D.ANSWERS[task])  # the question alone never fixes the answer
    # the same answer never comes with a constant image: images carry the information
    rng = np.random.default_rng(1)
    red = [np.asarray(D.make_synthetic_item(rng, "colour")[2]) for _ in range(3)]
    assert not all((r == red[0]).all() for r in red)


def test_write_synthetic_splits_and_summary(synth_dir):
    summary = json.loads((synth_dir / "summary.json").read_text())
    assert summary["train"]["rows"] == 24 and summary["validation"]["rows"] == 8
    assert 0 < summary["validation"]["question_aware_majority_rate"] <= 1
    rows = D.load_records(synth_dir, "val")  # "val" finds the "validation" split
    assert len(rows) == 8
    row = rows[0]
    assert set(row) >= {"problem", "answer", "images"} and "<image>" in row["problem"]
    assert isinstance(row["images"][0], dict) and row["images"][0]["bytes"][:4] == b"\x89PNG"
    train_ids = {r["id"] for r in D.load_records(synth_dir, "train")}
    assert not train_ids & {r["id"] for r in rows}


def test_pandas_fallback_matches_datasets(synth_dir, monkeypatch):
    via_datasets = D.load_records(synth_dir, "train")

    def broken(path, split):
        raise TypeError("'List' feature type issue")

    monkeypatch.setattr(D, "_load_with_datasets", broken)
    via_pandas = D.load_records(synth_dir, "train")
    assert isinstance(via_pandas, list) and len(via_pandas) == len(via_datasets)
    for a, b in zip(via_pandas[:3], [via_datasets[i] for i in range(3)]):
        assert a["problem"] == b["problem"] and a["answer"] == b["answer"]
        assert D.decode_image(a["images"][0]).tobytes() == D.decode_image(b["images"][0]).tobytes()


def test_dataset_items_and_prompt_length_matches_processor(synth_dir, processor):
    from train.batching import encode_prompt

    ds = D.load_dataset_for(str(synth_dir), "train", processor, **SMALL)
    assert len(ds) == 24 and ds.stats.kept == 24
    item = ds[0]
    assert isinstance(item["images"][0], Image.Image) and item["category"] in D.SYNTH_TASKS
    enc = encode_prompt(processor, item["prompt"], item["images"], **SMALL)
    row = ds.records[item["uid"]]
    sizes = [D.image_size(im) for im in row["images"]]
    assert ds._prompt_tokens(item["prompt"], sizes) == len(enc)


def _png(color=(255, 0, 0), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _truncated_png() -> bytes:
    """A PNG whose header is intact (size readable) but whose pixel data is cut."""
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="PNG")
    data = buf.getvalue()
    return data[: len(data) // 2]


def test_bad_rows_are_skipped_and_counted(processor):
    good = {"problem": "<image>What colour?", "answer": "red", "images": [{"bytes": _png(), "path": None}]}
    truncated = {"problem": "<image>What colour?", "answer": "red",
                 "images": [{"bytes": _truncated_png(), "path": None}]}
    garbage = {"problem": "<image>x", "answer": "1", "images": [{"bytes": b"not an image", "path": None}]}
    mismatch = {"problem": "no placeholder", "answer": "1", "images": [{"bytes": _png(), "path": None}]}
    long = {"problem": "<image>" + "word " * 300, "answer": "1", "images": [{"bytes": _png(), "path": None}]}
    ds = D.VisionRLDataset([good, truncated, garbage, mismatch, long], processor, max_prompt_length=200, **SMALL)
    assert ds.stats.undecodable == 1 and ds.stats.bad_rows == 1 and ds.stats.overlong == 1
    # the truncated PNG passes the header check but fails the full decode: skipped at access
    assert len(ds) == 2
    items = [ds[0], ds[1]]
    assert all(it["answer"] == "red" for it in items) and ds.stats.skipped_at_access >= 1


def test_missing_field_error_names_it(processor):
    with pytest.raises(KeyError, match="'question'.*prompt_key"):
        D.VisionRLDataset([{"problem": "x", "answer": "1", "images": []}], processor, prompt_key="question")


def test_process_image_bounds():
    img = Image.new("L", (2000, 1000))
    out = D.process_image(img, min_pixels=56 * 56, max_pixels=112 * 112)
    assert out.mode == "RGB" and out.width * out.height <= 112 * 112
    small = D.process_image(Image.new("RGB", (10, 10)), min_pixels=56 * 56, max_pixels=112 * 112)
    assert small.width * small.height >= 50 * 50


def test_synth_cli(tmp_path, capsys):
    D.main(["synth", "--out", str(tmp_path / "s"), "--train", "8", "--val", "4", "--tasks", "colour,bar"])
    out = json.loads(capsys.readouterr().out)
    assert out["tasks"] == ["colour", "bar"] and out["train"]["rows"] == 8
    with pytest.raises(ValueError, match="unknown task"):
        D.synthetic_rows(2, seed=0, tasks=["shapes"])


def test_suppressed_generation_never_emits_vision_tokens(tiny_dir, processor):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from train.batching import encode_prompt
    from train.rollout import HFRolloutEngine, SamplingParams

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir, local_files_only=True)
    # make the image token the most likely one: without suppression it would be sampled
    with torch.no_grad():
        model.lm_head.weight[processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")] *= 50
    _, _, img = D.make_synthetic_item(np.random.default_rng(0), "colour")
    enc = encode_prompt(processor, D.format_prompt(D.QUESTIONS["colour"]), [img], **SMALL)
    engine = HFRolloutEngine(model, processor.tokenizer, batch_size=4)
    out = engine.generate([enc], SamplingParams(n=4, max_new_tokens=12, seed=0))
    banned = {processor.tokenizer.convert_tokens_to_ids(t) for t in VISION_SPECIAL_TOKENS}
    assert all(not (set(c.token_ids.tolist()) & banned) for c in out[0])
