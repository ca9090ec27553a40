"""train/vllm_engine.py against a fake vLLM on CPU (vLLM itself is not installed here).

The fake `LLM` records every request and returns RequestOutput-like objects whose token ids
are a deterministic function of the request (prompt, per-sample seed, max_tokens), some ending
at an EOS, some cut at max_tokens, with the samples of a request returned out of order.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from train.config import ConfigError, describe, load_config, save_config

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "train" / "configs" / "tiny.yaml"
SMALL = dict(min_pixels=56 * 56, max_pixels=112 * 112)

# ids of the fake tokenizer (the tiny model's are looked up through its own tokenizer)
SPECIAL = {"<|endoftext|>": 448, "<|im_end|>": 450, "<|vision_start|>": 457, "<|vision_end|>": 458,
           "<|vision_pad|>": 459, "<|image_pad|>": 460, "<|video_pad|>": 461}
IM_END, ENDOFTEXT, VSTART, VEND, PAD = 450, 448, 457, 458, 460

SAMPLING_KEYS = {"n", "temperature", "top_p", "top_k", "max_tokens", "seed", "stop_token_ids", "detokenize",
                 "logit_bias"}


class FakeTokenizer:
    def convert_tokens_to_ids(self, token):
        return SPECIAL[token]


class FakeSamplingParams:
    """Accepts only keyword arguments the engine is meant to use (a typo fails loudly)."""

    def __init__(self, **kw):
        unknown = set(kw) - SAMPLING_KEYS
        if unknown:
            raise TypeError(f"unexpected SamplingParams arguments {sorted(unknown)}")
        self.__dict__.update(kw)


def script(prompt_key: int, seed: int, max_tokens: int, eos: int):
    """(token_ids, finish_reason, stop_reason) the fake engine 'samples' for one child request."""
    key = prompt_key + seed
    if key % 3 == 0:  # never stops: cut at max_tokens
        return [20 + (key + t) % 40 for t in range(max_tokens)], "length", None
    ids = [20 + (key + t) % 40 for t in range(1 + key % 5)] + [eos]
    if len(ids) > max_tokens:
        return ids[:max_tokens], "length", None
    return ids, "stop", eos


def prompt_key(req: dict) -> int:
    if "prompt_token_ids" in req:
        return sum(req["prompt_token_ids"])
    return len(req["prompt"])


class FakeModel:
    def __init__(self):
        self.loaded: list[list[tuple[str, torch.Tensor]]] = []

    def load_weights(self, weights):
        self.loaded.append([(n, t.detach().clone()) for n, t in weights])


class FakeLLM:
    """`vllm.LLM` stand-in: records requests, scripted outputs, V0-style model path for weights."""

    instances: list[FakeLLM] = []

    def __init__(self, eos: int = IM_END, **init_kwargs):
        self.eos = eos
        self.init_kwargs = init_kwargs
        self.calls: list[tuple[list[dict], list]] = []
        self.outputs: list = []
        self.prefix_resets = 0
        self.model = FakeModel()
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=SimpleNamespace(
            worker=SimpleNamespace(model_runner=SimpleNamespace(model=self.model)))))
        FakeLLM.instances.append(self)

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        assert isinstance(sampling_params, list) and len(sampling_params) == len(prompts)
        self.calls.append((prompts, sampling_params))
        outs = []
        for req, sp in zip(prompts, sampling_params):
            assert sp.detokenize is False
            samples = []
            for j in range(sp.n):  # vLLM seeds child j with seed + j
                ids, reason, stop = script(prompt_key(req), sp.seed + j, sp.max_tokens, self.eos)
                samples.append(SimpleNamespace(index=j, token_ids=tuple(ids), finish_reason=reason,
                                               stop_reason=stop, text=""))
            outs.append(SimpleNamespace(outputs=samples[::-1]))  # children may finish in any order
        self.outputs.append(outs)
        return outs

    def reset_prefix_cache(self):
        self.prefix_resets += 1


def make_engine(**kw):
    from train.vllm_engine import VLLMRolloutEngine

    return VLLMRolloutEngine(FakeLLM(), FakeTokenizer(), sampling_params_cls=FakeSamplingParams, **kw)


def fake_prompt(text_ids: list[int], grids: list[tuple[int, int, int]],
                image_sizes: list[tuple[int, int]] | None):
    """An EncodedPrompt with `<|vision_start|> pad*N <|vision_end|>` per image (N = h*w/4)."""
    from train.batching import EncodedPrompt

    ids = list(text_ids[:2])
    for _, h, w in grids:
        ids += [VSTART] + [PAD] * (h * w // 4) + [VEND]
    ids += text_ids[2:]
    t = torch.tensor(ids)
    images = None
    if image_sizes is not None:
        images = [Image.new("RGB", s, (10 * i, 20, 30)) for i, s in enumerate(image_sizes)]
    return EncodedPrompt(input_ids=t, mm_token_type_ids=(t == PAD).long(),
                         pixel_values=torch.zeros(sum(h * w for _, h, w in grids), 8) if grids else None,
                         image_grid_thw=torch.tensor(grids) if grids else None, raw_images=images,
                         prompt_text="text " * len(ids))


def expected(prompt_ids: list[int], seed: int, max_tokens: int):
    """What the engine must return for one sample, from the script (independent of the engine)."""
    ids, reason, _ = script(sum(prompt_ids), seed, max_tokens, IM_END)
    return ids, reason == "stop"


# --------------------------------------------------------------------------- generate


def test_sampling_parameters_are_mapped():
    from train.rollout import SamplingParams

    eng = make_engine()
    prompts = [fake_prompt([1, 2, 3], [], None), fake_prompt([4, 5, 6, 7], [], None)]
    eng.generate(prompts, SamplingParams(n=3, temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=9, seed=11))
    (reqs, sps), = eng.llm.calls  # one vLLM call for all prompts
    assert len(reqs) == 2
    for i, sp in enumerate(sps):
        assert (sp.n, sp.temperature, sp.top_p, sp.top_k, sp.max_tokens) == (3, 0.7, 0.9, -1, 9)
        assert sp.stop_token_ids == [IM_END, ENDOFTEXT] and sp.detokenize is False
        assert set(sp.logit_bias) == {457, 458, 459, 460, 461} and set(sp.logit_bias.values()) == {-100.0}
    # every (prompt, sample) has its own seed: vLLM seeds child j with seed + j
    assert sps[1].seed - sps[0].seed == 3
    eng.generate(prompts, SamplingParams(n=3, top_k=5, max_new_tokens=9, seed=12))
    sp2 = eng.llm.calls[1][1][0]
    assert sp2.top_k == 5 and sp2.seed != sps[0].seed and abs(sp2.seed - sps[0].seed) >= 2 * 3


def test_results_in_request_order_with_eos_kept_and_truncation():
    from train.rollout import SamplingParams

    eng = make_engine()
    prompts = [fake_prompt(list(range(1, 4 + k)), [], None) for k in range(5)]
    params = SamplingParams(n=4, max_new_tokens=4, seed=3)
    res = eng.generate(prompts, params)
    sps = eng.llm.calls[0][1]
    assert len(res) == 5 and all(len(r) == 4 for r in res)
    seen_finished = seen_length_cut = seen_never_stops = 0
    for i, (p, comps) in enumerate(zip(prompts, res)):
        for j, c in enumerate(comps):
            ids, finished = expected(p.input_ids.tolist(), sps[i].seed + j, 4)
            assert c.token_ids.tolist() == ids and c.finished == finished, (i, j)
            assert c.token_ids.dtype == torch.int64
            assert len(ids) <= 4
            if finished:
                assert ids[-1] == IM_END and IM_END not in ids[:-1]
                seen_finished += 1
            elif len(ids) == 4 and IM_END not in ids:
                seen_never_stops += 1
            else:
                seen_length_cut += 1
    assert seen_finished and seen_never_stops  # the script produced both kinds
    assert seen_length_cut == 0  # a cut response has exactly max_new_tokens tokens


def test_completion_keeps_first_eos_and_restores_a_dropped_stop_token():
    eng = make_engine()
    c = eng.completion(SimpleNamespace(token_ids=[5, 6, ENDOFTEXT, 7, IM_END], finish_reason="stop",
                                       stop_reason=None))
    assert c.token_ids.tolist() == [5, 6, ENDOFTEXT] and c.finished
    c = eng.completion(SimpleNamespace(token_ids=[5, 6], finish_reason="stop", stop_reason=IM_END))
    assert c.token_ids.tolist() == [5, 6, IM_END] and c.finished
    c = eng.completion(SimpleNamespace(token_ids=[5, 6], finish_reason="length", stop_reason=None))
    assert c.token_ids.tolist() == [5, 6] and not c.finished


def test_images_and_placeholders_are_passed_per_prompt():
    from train.rollout import SamplingParams

    eng = make_engine()
    two = fake_prompt([1, 2, 3, 4], [(1, 4, 6), (1, 2, 2)], [(90, 60), (20, 30)])
    none = fake_prompt([1, 2, 3], [], None)
    one = fake_prompt([7, 8, 9], [(1, 6, 4)], [(56, 84)])
    eng.generate([two, none, one], SamplingParams(n=1, max_new_tokens=3))
    reqs = eng.llm.calls[0][0]
    # image_pad runs collapsed to one placeholder per image, the rest unchanged
    assert reqs[0]["prompt_token_ids"] == [1, 2, VSTART, PAD, VEND, VSTART, PAD, VEND, 3, 4]
    assert reqs[1] == {"prompt_token_ids": [1, 2, 3]}
    assert reqs[2]["prompt_token_ids"] == [7, 8, VSTART, PAD, VEND, 9]
    # the images go as the trainer's processor received them: vLLM's processor resizes them with
    # the same defaults (PIL sizes are width, height)
    assert reqs[0]["multi_modal_data"]["image"] == two.raw_images
    assert all(a is b for a, b in zip(reqs[0]["multi_modal_data"]["image"], two.raw_images))
    assert reqs[2]["multi_modal_data"]["image"][0] is one.raw_images[0]
    # with vLLM's processor limits known, every grid is checked before anything is sent
    checked = make_engine(image_limits=(28 * 28, 10**7))
    checked.generate([two, none, one], SamplingParams(n=1, max_new_tokens=3))
    assert len(checked.llm.calls) == 1
    grids = r"prompt 0, image 1: .* 6 x 4 patch grid, the trainer's processor gave 2 x 2"
    with pytest.raises(ValueError, match=grids):
        make_engine(image_limits=(56 * 56, 10**7)).generate([two], SamplingParams(n=1, max_new_tokens=3))

    text_eng = make_engine(prompt_format="text")
    text_eng.generate([one], SamplingParams(n=1, max_new_tokens=3))
    req = text_eng.llm.calls[0][0][0]
    assert req["prompt"] == one.prompt_text and len(req["multi_modal_data"]["image"]) == 1


def test_missing_or_inconsistent_images_are_clear_errors():
    from train.rollout import SamplingParams

    eng = make_engine()
    params = SamplingParams(n=1, max_new_tokens=3)
    with pytest.raises(ValueError, match=r"prompt 1 has 1 image\(s\) but no raw_images"):
        eng.generate([fake_prompt([1, 2, 3], [], None), fake_prompt([1, 2, 3], [(1, 2, 2)], None)], params)
    with pytest.raises(ValueError, match="2 raw_images for 1 image grids"):
        eng.generate([fake_prompt([1, 2, 3], [(1, 2, 2)], [(28, 28), (28, 28)])], params)
    no_text = fake_prompt([1, 2, 3], [], None)
    no_text.prompt_text = None
    with pytest.raises(ValueError, match="no prompt_text"):
        make_engine(prompt_format="text").generate([no_text], params)
    assert eng.llm.calls == []  # nothing was sent


def test_sent_image_gives_the_processor_the_same_grid(tiny):
    """vLLM runs the HF processor, with the model directory's defaults, on the image we send: it must
    give the grid and the pixels the trainer's processor produced from the same prompt."""
    from train.batching import encode_prompt
    from train.data import format_prompt
    from train.rollout import SamplingParams
    from train.vllm_engine import VLLMRolloutEngine

    model_dir, _, processor = tiny
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (70, 100, 3), dtype=np.uint8))  # 100 x 70: grid 4 x 8
    masked = [img.point(lambda v: v // 2)]
    enc = encode_prompt(processor, format_prompt("<image>How many shapes?"), [img], masked_images=masked,
                        **SMALL)
    assert enc.raw_images is not None and len(enc.raw_images) == 1
    assert enc.raw_images[0].size == img.size and enc.raw_images[0].tobytes() == img.tobytes()  # the original
    assert enc.prompt_text.count("<|vision_start|><|image_pad|><|vision_end|>") == 1

    eng = VLLMRolloutEngine(FakeLLM(), processor.tokenizer, sampling_params_cls=FakeSamplingParams)
    eng.generate([enc], SamplingParams(n=1, max_new_tokens=2))
    req = eng.llm.calls[0][0][0]
    sent = req["multi_modal_data"]["image"][0]
    again = processor.image_processor(images=[sent], return_tensors="pt")  # vLLM runs it with its defaults
    assert torch.equal(again["image_grid_thw"], enc.image_grid_thw)
    assert torch.equal(again["pixel_values"], enc.pixel_values)
    # the prompt ids vLLM gets re-expand to ours: one placeholder -> grid/4 image tokens
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    n_tokens = int(enc.image_grid_thw.prod()) // 4
    ids = req["prompt_token_ids"]
    k = ids.index(pad)
    assert ids[:k] + [pad] * n_tokens + ids[k + 1:] == enc.input_ids.tolist()


# --------------------------------------------------------------------------- weights


def test_sync_weights_sends_every_parameter_with_checkpoint_names(tiny):
    from train.vllm_engine import VLLMRolloutEngine, vllm_param_name

    _, model, processor = tiny
    entered = []

    class Gather:
        def __enter__(self):
            entered.append(1)

        def __exit__(self, *a):
            return False

    llm = FakeLLM()
    eng = VLLMRolloutEngine(llm, processor.tokenizer, gather=Gather)
    assert eng.sync_weights(model) == len(list(model.named_parameters()))
    (loaded,) = llm.model.loaded  # the default loader found the in-process model, one call
    names = [n for n, _ in loaded]
    params = dict(model.named_parameters())
    assert names == [vllm_param_name(n) for n in params]
    assert len(set(names)) == len(names)
    assert not any(n.startswith(("model.language_model.", "model.visual.")) for n in names)
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names
    assert any(n.startswith("visual.blocks.0.") for n in names)
    assert any(n.startswith("model.layers.1.") for n in names)
    for (_, t), p in zip(loaded, params.values()):
        assert torch.equal(t, p)
    assert entered == [1] and llm.prefix_resets == 1
    assert vllm_param_name("model.language_model.layers.0.mlp.up_proj.weight") == \
        "model.layers.0.mlp.up_proj.weight"
    assert vllm_param_name("model.visual.merger.mlp.0.bias") == "visual.merger.mlp.0.bias"
    assert vllm_param_name("lm_head.weight") == "lm_head.weight"


def test_weight_loader_choice_transform_and_lora_guard():
    from train.vllm_engine import VLLMRolloutEngine, _load_weights_on_worker, default_weight_loader

    net = torch.nn.Module()
    net.model = torch.nn.Module()
    net.model.language_model = torch.nn.Linear(2, 2)
    calls = []
    eng = VLLMRolloutEngine(FakeLLM(), FakeTokenizer(), weight_loader=lambda w: calls.append(list(w)),
                            state_transform=lambda s: {k: v * 2 for k, v in s.items()})
    assert eng.sync_weights(net) == 2
    assert [n for n, _ in calls[0]] == ["model.weight", "model.bias"]
    assert torch.equal(calls[0][0][1], net.model.language_model.weight * 2)

    # vLLM V1 without an in-process model: collective_rpc runs the loader on each worker
    worker_model = FakeModel()
    worker = SimpleNamespace(model_runner=SimpleNamespace(model=worker_model))
    rpc = SimpleNamespace(collective_rpc=lambda fn, args=(): [fn(worker, *args)])
    default_weight_loader(rpc)([("a", torch.ones(1))])
    assert [n for n, _ in worker_model.loaded[0]] == ["a"]
    _load_weights_on_worker(SimpleNamespace(worker=worker), [("b", torch.ones(1))])
    assert [n for n, _ in worker_model.loaded[1]] == ["b"]
    with pytest.raises(RuntimeError, match="weight_loader="):
        default_weight_loader(object())

    lora = torch.nn.Module()
    lora.q = torch.nn.Module()
    lora.q.lora_A = torch.nn.Linear(2, 1, bias=False)
    with pytest.raises(ValueError, match="LoRA adapter"):
        VLLMRolloutEngine(FakeLLM(), FakeTokenizer(), weight_loader=lambda w: None).sync_weights(lora)


# --------------------------------------------------------------------------- no vLLM, config


def test_missing_vllm_is_a_clear_error(monkeypatch, tmp_path):
    from train.rollout import SamplingParams
    from train.vllm_engine import VLLMRolloutEngine

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` fails as if not installed
    with pytest.raises(ImportError, match=r'rollout\.engine="vllm".*pip install vllm'):
        VLLMRolloutEngine.from_pretrained(tmp_path, FakeTokenizer())
    eng = VLLMRolloutEngine(FakeLLM(), FakeTokenizer())  # no SamplingParams class given: needs vllm
    with pytest.raises(ImportError, match="pip install vllm"):
        eng.generate([fake_prompt([1, 2, 3], [], None)], SamplingParams(n=1))


def test_vllm_config_fields(tmp_path):
    cfg = load_config(TINY, ["rollout.engine=vllm", "rollout.vllm.gpu_memory_utilization=0.7",
                             "rollout.vllm.enforce_eager=true",
                             "rollout.vllm.max_model_len=1024", "rollout.vllm.dtype=auto",
                             "rollout.vllm.max_images_per_prompt=2"])
    v = cfg.rollout.vllm
    assert cfg.rollout.engine == "vllm"
    assert (v.gpu_memory_utilization, v.tensor_parallel_size, v.enforce_eager, v.max_model_len, v.dtype,
            v.max_images_per_prompt) == (0.7, 1, True, 1024, "auto", 2)
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert load_config(TINY).rollout.engine == "hf"
    lines = describe(load_config(TINY))
    assert any(line.startswith("rollout.vllm.gpu_memory_utilization = 0.5") for line in lines)
    mem = r"rollout\.vllm\.gpu_memory_utilization"
    for override, match in [("rollout.engine=sglang", r"rollout\.engine: must be one of \['hf', 'vllm'\]"),
                            ("rollout.vllm.gpu_memory_utilization=0", mem),
                            ("rollout.vllm.gpu_memory_utilization=1.5", mem),
                            ("rollout.vllm.tensor_parallel_size=0", r"rollout\.vllm\.tensor_parallel_size"),
                            ("rollout.vllm.tensor_parallel_size=2", r"tensor_parallel_size: only 1 is supported"),
                            ("rollout.vllm.max_model_len=-1", r"rollout\.vllm\.max_model_len"),
                            ("rollout.vllm.max_images_per_prompt=0", r"rollout\.vllm\.max_images_per_prompt"),
                            ("rollout.vllm.dtype=int8", r"rollout\.vllm\.dtype: must be one of"),
                            ("rollout.vllm.gpu_mem=0.5", r"rollout\.vllm\.gpu_mem")]:
        with pytest.raises(ConfigError, match=match):
            load_config(TINY, [override])


# --------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from train.tiny import TinyModelSpec, build_tiny_model_dir

    d = Path(build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "tiny_model", TinyModelSpec()))
    return (d, Qwen2_5_VLForConditionalGeneration.from_pretrained(d, local_files_only=True),
            AutoProcessor.from_pretrained(d, local_files_only=True))


def test_trainer_step_with_the_fake_vllm_engine(tiny, tmp_path, monkeypatch):
    """rollout.engine=vllm end to end: the trainer starts the (fake) vllm.LLM on the policy's
    directory, pushes the policy's weights before the rollout phase, and trains on its samples."""
    import shutil

    from train.rollout import eos_ids_of
    from train.trainer import Trainer

    model_dir = tiny[0]
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(model_dir, out / "tiny_model")
    fake_vllm = types.ModuleType("vllm")
    fake_vllm.LLM = FakeLLM
    fake_vllm.SamplingParams = FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    FakeLLM.instances.clear()
    cfg = load_config(TINY, [
        f"out_dir={out}", "data.synthetic.n_train=16", "data.synthetic.n_val=4",
        "trainer.rollout_batch_size=4", "trainer.mini_batch_size=4", "trainer.micro_batch_size=4",
        "trainer.log_prob_micro_batch_size=8", "rollout.n=2", "data.max_response_length=6", "eval.every=0",
        "sft.steps=0", "checkpoint.export_hf=false",
        "tensorboard=false", "plot=false", "deterministic=true", "optim.lr=1e-2", "trainer.max_steps=1",
        "rollout.engine=vllm", "rollout.vllm.max_images_per_prompt=2", "eval.min_pixels=1568"])
    tr = Trainer(cfg)
    try:
        (llm,) = FakeLLM.instances
        kw = llm.init_kwargs
        assert kw["model"] == str(out / "tiny_model") and kw["max_model_len"] == 512 + 6
        assert kw["limit_mm_per_prompt"] == {"image": 2} and kw["seed"] == cfg.seed
        assert (kw["gpu_memory_utilization"], kw["dtype"], kw["tensor_parallel_size"]) == (0.5, "bfloat16", 1)
        # in-process engine even in a one-process run: sync_weights reaches its model directly
        assert kw["distributed_executor_backend"] == "external_launcher"
        # vLLM's processor runs with the model directory's defaults, as the trainer's does; the engine
        # read them to check every grid
        assert "mm_processor_kwargs" not in kw
        assert tr.rollout.image_limits == (cfg.model.tiny.min_pixels, cfg.model.tiny.max_pixels)
        assert tr.rollout.eos_ids == eos_ids_of(tr.module.policy, tr.tokenizer)  # HF engine's stop ids
        assert tr.rollout.patch_size == 14
        llm.eos = tr.tokenizer.convert_tokens_to_ids("<|im_end|>")
        before = {n: p.detach().clone() for n, p in tr.module.policy.named_parameters()}
        rec = tr.train_step()
    finally:
        tr.close()

    (loaded,) = llm.model.loaded  # synced once, before the rollout, with the pre-update weights
    from train.vllm_engine import vllm_param_name

    assert [n for n, _ in loaded] == [vllm_param_name(n) for n in before]
    assert all(torch.equal(t, before[n]) for (_, t), n in zip(loaded, before))
    assert llm.prefix_resets == 1
    (reqs, sps), = llm.calls
    assert len(reqs) == 4 and all(len(r["multi_modal_data"]["image"]) == 1 for r in reqs)
    assert all(sp.n == 2 and sp.max_tokens == 6 for sp in sps)
    # the step trained on exactly what the fake engine returned
    comps = [s for out in llm.outputs[0] for s in out.outputs]
    eos = {llm.eos}
    lengths = [len(c.token_ids) for c in comps]
    unfinished = [not (c.token_ids and c.token_ids[-1] in eos) for c in comps]
    assert rec["response/length_mean"] == pytest.approx(sum(lengths) / len(lengths))
    assert rec["response/truncated_frac"] == pytest.approx(sum(unfinished) / len(unfinished))
    assert 0 < rec["response/truncated_frac"] < 1
    assert rec["loss/total"] == rec["loss/total"]  # a finite update ran
    changed = any(not torch.equal(p.detach(), before[n]) for n, p in tr.module.policy.named_parameters())
    assert changed
