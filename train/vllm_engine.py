"""An optional vLLM rollout engine (`rollout.engine: vllm`), behind the `RolloutEngine` interface.

vLLM is not a dependency: this module imports it only when a real engine or
vLLM's `SamplingParams` is needed, and says how to install it when it is
missing. `VLLMRolloutEngine` wraps a `vllm.LLM` (or anything with the same
`generate`), so tests drive it with a fake engine on CPU.

What it does, matching `HFRolloutEngine`'s contract:

- one `llm.generate` call per `generate`, one request per prompt with `n`
  samples; results come back in request order (samples ordered by their index);
- sampling: temperature / top_p / top_k (0 -> vLLM's -1) / max tokens, stop at
  the EOS ids (`<|im_end|>`, `<|endoftext|>`) with the EOS kept in the
  response; `finished` is True iff the response ends at an EOS; token ids only
  (detokenize off); the vision special tokens are suppressed (logit bias -100);
- seeding per call: prompt i gets seed `f(params.seed) + i * n` and vLLM seeds
  its n samples `seed + j`, so every sample has its own stream;
- vLLM preprocesses images itself: a request carries the prompt's token ids
  with each image's `<|image_pad|>` run collapsed to one placeholder (or the
  prompt text) and its images as the trainer's processor received them
  (`EncodedPrompt.raw_images`: bounded to the data's pixel limits, RGB). vLLM's
  processor runs with the model directory's preprocessor defaults, as the
  trainer's does, so it picks the same grid and the same pixels; with the
  processor's limits known (`image_limits`, read from the directory by
  `from_pretrained`), a grid that would differ is an error before anything is sent;
- `sync_weights(policy)` pushes the policy's parameters into the engine
  (Qwen2.5-VL names of transformers >= 4.52 mapped to the checkpoint layout
  every vLLM version loads; ZeRO-3 partitions gathered through `gather`), then
  drops vLLM's prefix cache (its KV entries were computed with the old weights).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from train.batching import EncodedPrompt
from train.lora import merged_state_dict
from train.rollout import Completion, SamplingParams, truncate_at_eos
from train.tiny import VISION_SPECIAL_TOKENS

INSTALL_HINT = ('rollout.engine="vllm" needs vLLM, which is not installed: pip install vllm '
                '(or use rollout.engine="hf")')

# transformers >= 4.52 nests the language model under `model.language_model` and the vision
# tower under `model.visual`; the released checkpoints (and every vLLM version's loader) use
# `model.*`, `visual.*` and `lm_head.*`. Longest prefix first.
_CHECKPOINT_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.language_model.", "model."),
    ("model.visual.", "visual."),
)

# Seed stride between calls (prompts of one call add i * n, so calls rarely overlap).
_SEED_STRIDE = 1_000_003


def import_vllm():
    """The vllm module, or an ImportError that says how to install it."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return vllm


def vllm_param_name(name: str) -> str:
    """A transformers Qwen2.5-VL parameter name in the checkpoint layout vLLM loads."""
    for old, new in _CHECKPOINT_PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def collapse_image_pads(input_ids: list[int], image_pad_id: int) -> list[int]:
    """Token ids with every run of `<|image_pad|>` replaced by one (vLLM expands it again)."""
    out: list[int] = []
    for t in input_ids:
        if t == image_pad_id and out and out[-1] == image_pad_id:
            continue
        out.append(t)
    return out


def _load_weights_on_worker(worker, weights) -> None:
    """Runs inside a vLLM worker (`LLM.collective_rpc`): load named tensors into its model."""
    runner = getattr(worker, "model_runner", None) or worker.worker.model_runner
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    model.load_weights(weights)


def default_weight_loader(llm) -> Callable[[Iterable[tuple[str, torch.Tensor]]], Any]:
    """A callable that loads (name, tensor) pairs into `llm`'s model.

    Tries the in-process model of the known vLLM layouts
    (`llm_engine.model_executor.driver_worker[.worker].model_runner.model`), then
    `llm.collective_rpc` (vLLM >= 0.8; tensors are sent to the workers).
    """
    for path in (("llm_engine", "model_executor", "driver_worker", "worker", "model_runner", "model"),
                 ("llm_engine", "model_executor", "driver_worker", "model_runner", "model")):
        obj = llm
        try:
            for attr in path:
                obj = getattr(obj, attr)
        except Exception:  # noqa: BLE001 - engine internals differ between vLLM versions
            continue
        if callable(getattr(obj, "load_weights", None)):
            return obj.load_weights
    rpc = getattr(llm, "collective_rpc", None)
    if callable(rpc):
        return lambda weights: rpc(_load_weights_on_worker, args=(list(weights),))
    raise RuntimeError(
        f"cannot find how to load weights into this vLLM engine ({type(llm).__name__}): neither "
        "llm.llm_engine.model_executor.driver_worker[.worker].model_runner.model.load_weights nor "
        "llm.collective_rpc exists; pass weight_loader= to VLLMRolloutEngine")


def image_processor_config(model_dir: str | Path) -> dict[str, Any]:
    """The image processor's saved settings: `preprocessor_config.json` (released checkpoints)
    or the "image_processor" entry of `processor_config.json` (transformers 5); {} if neither."""
    pre = Path(model_dir) / "preprocessor_config.json"
    if pre.is_file():
        return json.loads(pre.read_text())
    proc = Path(model_dir) / "processor_config.json"
    if proc.is_file():
        return json.loads(proc.read_text()).get("image_processor") or {}
    return {}


def image_limits_of(preprocessor_config: dict[str, Any]) -> dict[str, Any]:
    """`image_limits` and `merge_size` of a Qwen2-VL preprocessor_config.json (its
    min_pixels / max_pixels, or size.shortest_edge / size.longest_edge); {} if it has none."""
    size = preprocessor_config.get("size") or {}
    lo = preprocessor_config.get("min_pixels") or size.get("shortest_edge")
    hi = preprocessor_config.get("max_pixels") or size.get("longest_edge")
    if lo is None or hi is None:
        return {}
    return {"image_limits": (int(lo), int(hi)), "merge_size": int(preprocessor_config.get("merge_size", 2))}


class VLLMRolloutEngine:
    """Rollouts with a vLLM engine; see the module docstring.

    Args:
        llm: a `vllm.LLM`, or any object with `generate(prompts, sampling_params=..., use_tqdm=...)`
            returning RequestOutput-like objects (`.outputs[j].token_ids / .finish_reason / .index`).
        tokenizer: the policy's tokenizer (EOS and vision special token ids).
        eos_ids: stop ids (default: the tokenizer's `<|im_end|>` and `<|endoftext|>`, the
            generation config's EOS of Qwen2.5-VL).
        weight_loader: callable taking an iterable of (name, tensor) that loads them into the
            engine (default: `default_weight_loader(llm)`, resolved on first sync).
        gather: optional callable returning a context manager that makes the full weights
            available (ZeRO-3 `GatheredParameters`); entered once per `sync_weights`.
        state_transform: optional callable mapping the {name: tensor} dict of the policy's
            parameters to plain Qwen2.5-VL weights (e.g. merging LoRA adapters).
        prompt_format: "token_ids" (the prompt's ids, image placeholders collapsed) or "text"
            (`EncodedPrompt.prompt_text`).
        patch_size: the vision patch size (pixels per `image_grid_thw` unit; 14 for Qwen2.5-VL).
        image_limits: optional (min_pixels, max_pixels) of vLLM's image processor; when given,
            each image's grid under them is checked against the prompt's `image_grid_thw`.
        merge_size: the vision merger's spatial merge (2 for Qwen2.5-VL), for that check.
        sampling_params_cls: vLLM's SamplingParams class (default: `vllm.SamplingParams`).
    """

    def __init__(self, llm, tokenizer, *, eos_ids: list[int] | None = None,
                 weight_loader: Callable[[Iterable[tuple[str, torch.Tensor]]], Any] | None = None,
                 gather: Callable[[], contextlib.AbstractContextManager] | None = None,
                 state_transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
                 prompt_format: str = "token_ids", patch_size: int = 14,
                 image_limits: tuple[int, int] | None = None, merge_size: int = 2,
                 sampling_params_cls: type | None = None):
        if prompt_format not in ("token_ids", "text"):
            raise ValueError(f'prompt_format must be "token_ids" or "text", got {prompt_format!r}')
        self.llm = llm
        self.tokenizer = tokenizer
        if eos_ids is None:
            eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        self.eos_ids = [int(e) for e in eos_ids]
        self.image_pad_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.suppress_ids = [tokenizer.convert_tokens_to_ids(t) for t in VISION_SPECIAL_TOKENS]
        self.weight_loader = weight_loader
        self.gather = gather or contextlib.nullcontext
        self.state_transform = state_transform
        self.prompt_format = prompt_format
        self.patch_size = patch_size
        self.image_limits = image_limits
        self.merge_size = merge_size
        self._sp_cls = sampling_params_cls

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, tokenizer, *, gpu_memory_utilization: float = 0.5,
                        tensor_parallel_size: int = 1, enforce_eager: bool = False,
                        max_model_len: int | None = None, dtype: str = "bfloat16", limit_images: int = 4,
                        seed: int = 0, llm_kwargs: dict[str, Any] | None = None,
                        **engine_kwargs) -> VLLMRolloutEngine:
        """Start a `vllm.LLM` on a local Qwen2.5-VL directory and wrap it.

        `llm_kwargs` go to `vllm.LLM` as they are, `engine_kwargs` to the constructor. The
        engine always runs inside this process, so `sync_weights` reaches its model directly
        (no copy of the weights to another process): under torch.distributed (the trainer,
        any world size) every rank starts its own engine on its GPU with vLLM's
        "external_launcher" backend, which joins the existing process group; without it, vLLM's
        V1 multiprocessing is switched off (VLLM_ENABLE_V1_MULTIPROCESSING=0).
        """
        vllm = import_vllm()
        kwargs: dict[str, Any] = dict(
            model=str(model_dir), gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size, enforce_eager=enforce_eager, dtype=dtype,
            limit_mm_per_prompt={"image": limit_images}, seed=seed, skip_tokenizer_init=False,
        )
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            kwargs["distributed_executor_backend"] = "external_launcher"
        else:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        kwargs.update(llm_kwargs or {})
        config = Path(model_dir) / "config.json"
        if config.is_file() and "patch_size" not in engine_kwargs:
            vision = json.loads(config.read_text()).get("vision_config") or {}
            engine_kwargs["patch_size"] = int(vision.get("patch_size", 14))
        if "image_limits" not in engine_kwargs:
            engine_kwargs.update(image_limits_of(image_processor_config(model_dir)))
        gen = Path(model_dir) / "generation_config.json"
        if gen.is_file() and "eos_ids" not in engine_kwargs:  # the stop ids HFRolloutEngine uses
            eos = json.loads(gen.read_text()).get("eos_token_id")
            if eos is not None:
                engine_kwargs["eos_ids"] = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        return cls(vllm.LLM(**kwargs), tokenizer, **engine_kwargs)

    @classmethod
    def from_config(cls, cfg, model_dir: str | Path, tokenizer, *, gather=None) -> VLLMRolloutEngine:
        """The engine of a RunConfig (`rollout.vllm.*`, seed, lengths, LoRA merge)."""
        v = cfg.rollout.vllm
        transform = None
        lora = getattr(cfg.model, "lora", None)
        if lora is not None and getattr(lora, "rank", 0):
            def transform(state, _spec=lora):
                return merged_state_dict(state, _spec)
        return cls.from_pretrained(
            model_dir, tokenizer, gpu_memory_utilization=v.gpu_memory_utilization,
            tensor_parallel_size=v.tensor_parallel_size, enforce_eager=v.enforce_eager,
            max_model_len=v.max_model_len or cfg.data.max_prompt_length + cfg.data.max_response_length,
            dtype=v.dtype, limit_images=v.max_images_per_prompt, seed=cfg.seed, gather=gather,
            state_transform=transform)

    # ------------------------------------------------------------------ requests

    def _sampling_params_cls(self):
        if self._sp_cls is None:
            self._sp_cls = import_vllm().SamplingParams
        return self._sp_cls

    def sampling_kwargs(self, params: SamplingParams, seed: int) -> dict[str, Any]:
        """vLLM SamplingParams keyword arguments for one request."""
        kw: dict[str, Any] = dict(
            n=params.n, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1,  # vLLM: -1 disables top-k
            max_tokens=params.max_new_tokens, seed=seed, stop_token_ids=list(self.eos_ids),
            detokenize=False,
        )
        if self.suppress_ids:
            kw["logit_bias"] = {int(t): -100.0 for t in self.suppress_ids}  # vLLM clamps to +-100
        return kw

    def _images(self, prompt: EncodedPrompt, where: str) -> list:
        """The prompt's bounded RGB images, as the trainer's processor received them."""
        grids = prompt.image_grid_thw
        n = 0 if grids is None else int(grids.shape[0])
        if n == 0:
            return []
        if prompt.raw_images is None:
            raise ValueError(f"{where} has {n} image(s) but no raw_images: the vLLM engine preprocesses "
                             "images itself and needs the PIL images (build prompts with "
                             "train.batching.encode_prompt, which keeps them)")
        if len(prompt.raw_images) != n:
            raise ValueError(f"{where} has {len(prompt.raw_images)} raw_images for {n} image grids")
        out = []
        for k, (img, (_, gh, gw)) in enumerate(zip(prompt.raw_images, grids.tolist())):
            if self.image_limits is not None:
                from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

                lo, hi = self.image_limits
                h, w = smart_resize(img.height, img.width, factor=self.patch_size * self.merge_size,
                                    min_pixels=lo, max_pixels=hi)
                if (h // self.patch_size, w // self.patch_size) != (int(gh), int(gw)):
                    raise ValueError(
                        f"{where}, image {k}: vLLM's processor (pixels {lo}..{hi}) would give a "
                        f"{h // self.patch_size} x {w // self.patch_size} patch grid, the trainer's "
                        f"processor gave {int(gh)} x {int(gw)}: both must read the same "
                        "preprocessor config (the model directory's)")
            out.append(img if img.mode == "RGB" else img.convert("RGB"))
        return out

    def request(self, prompt: EncodedPrompt, index: int = 0) -> dict[str, Any]:
        """The vLLM prompt dict of one EncodedPrompt."""
        where = f"prompt {index}"
        images = self._images(prompt, where)
        if self.prompt_format == "text":
            if prompt.prompt_text is None:
                raise ValueError(f'{where} has no prompt_text (needed by prompt_format="text")')
            req: dict[str, Any] = {"prompt": prompt.prompt_text}
        else:
            ids = collapse_image_pads(prompt.input_ids.tolist(), self.image_pad_id)
            pads = sum(1 for t in ids if t == self.image_pad_id)
            if pads != len(images):
                raise ValueError(f"{where} has {pads} image placeholder(s) for {len(images)} image(s)")
            req = {"prompt_token_ids": ids}
        if images:
            req["multi_modal_data"] = {"image": images}
        return req

    def completion(self, out) -> Completion:
        """A Completion from one vLLM CompletionOutput (EOS kept, finished iff it ends at an EOS)."""
        ids = torch.as_tensor(list(out.token_ids), dtype=torch.long)
        stop = getattr(out, "stop_reason", None)
        if (getattr(out, "finish_reason", None) == "stop" and isinstance(stop, int) and stop in self.eos_ids
                and not bool(torch.isin(ids, torch.tensor(self.eos_ids)).any())):
            ids = torch.cat([ids, torch.tensor([stop])])  # a version that dropped the stop token
        return truncate_at_eos(ids, self.eos_ids)

    @torch.no_grad()
    def generate(self, prompts: list[EncodedPrompt], params: SamplingParams) -> list[list[Completion]]:
        """Sample `params.n` responses per prompt in one vLLM call; see the module docstring."""
        if not prompts:
            return []
        sp_cls = self._sampling_params_cls()
        base = params.seed * _SEED_STRIDE
        requests = [self.request(p, i) for i, p in enumerate(prompts)]
        sampling = [sp_cls(**self.sampling_kwargs(params, (base + i * params.n) % 2**63))
                    for i in range(len(prompts))]
        outputs = list(self.llm.generate(requests, sampling_params=sampling, use_tqdm=False))
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} results for {len(prompts)} prompts")
        results = []
        for i, out in enumerate(outputs):
            samples = sorted(out.outputs, key=lambda o: getattr(o, "index", 0))
            if len(samples) != params.n:
                raise RuntimeError(f"vLLM returned {len(samples)} samples for prompt {i}, "
                                   f"expected {params.n}")
            results.append([self.completion(o) for o in samples])
        return results

    # ------------------------------------------------------------------ weights

    def named_weights(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """(vLLM name, tensor) of every parameter of `model` (call inside `gather` under ZeRO-3)."""
        state = {name: p.detach() for name, p in model.named_parameters()}
        if self.state_transform is not None:
            state = self.state_transform(state)
        for name, t in state.items():
            if ".lora_" in name:
                raise ValueError(f"parameter {name} is a LoRA adapter: merge adapters before syncing "
                                 "(pass state_transform=, as from_config does for model.lora)")
            yield vllm_param_name(name), t

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> int:
        """Load the policy's current weights into the engine; returns how many tensors were sent."""
        if self.weight_loader is None:
            self.weight_loader = default_weight_loader(self.llm)
        with self.gather():
            weights = list(self.named_weights(model))
            self.weight_loader(weights)
        reset = getattr(self.llm, "reset_prefix_cache", None)
        if callable(reset):
            reset()  # cached prefixes hold KV computed with the old weights
        return len(weights)
