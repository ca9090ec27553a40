"""A tiny random-initialized Qwen2.5-VL with an offline tokenizer and processor.

No package ships Qwen's vocabulary files and this project never downloads
weights, so the default config builds its own model directory:

- a byte-level BPE trained with `tokenizers` on a small corpus (the synthetic
  task's text plus the prompt template), using Qwen2's pre-tokenizer regex and
  ByteLevel mapping, followed by the 14 Qwen special tokens in Qwen's order
  (so `<|endoftext|>` is the first id after the BPE vocabulary, as in Qwen);
- `Qwen2Tokenizer` around it, the Qwen2.5-VL chat template, and a stock
  `Qwen2_5_VLProcessor` (image + video processor; the video processor needs
  torchvision);
- `Qwen2_5_VLForConditionalGeneration` from a small config whose special ids,
  vocabulary size and `mrope_section` match the tokenizer and head dim.

Everything is written with `save_pretrained` and loads back with
`from_pretrained` / `AutoProcessor.from_pretrained`, like a real checkpoint.

    python -m train.tiny --out runs/tiny_model [--hidden-size 64 ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path

import torch

from train.data import PROMPT_INSTRUCTION, synthetic_corpus

# The 14 special tokens of Qwen2.5-VL, in Qwen's id order (151643 ... 151656).
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Tokens a policy must never generate: a sampled <|image_pad|> makes the
# re-forward fail ("Image features and image tokens do not match").
VISION_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2's pre-tokenizer split (identical to transformers' Qwen2Tokenizer).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The Qwen2.5-VL-Instruct chat template (chat_template.json of the released
# checkpoints): default system prompt, <|vision_start|><|image_pad|><|vision_end|>
# per image segment, `<|im_start|>assistant\n` as the generation prompt.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclasses.dataclass(kw_only=True)
class TinyModelSpec:
    """Shape of the tiny model. Defaults give ~0.4M parameters: a forward of a
    prompt with one small image takes tens of milliseconds on one CPU core."""

    vocab_size: int = 512
    """Target BPE vocabulary size before the 14 special tokens (the trainer may
    stop earlier if the corpus has fewer merges)."""
    hidden_size: int = 64
    """Text hidden size; also the vision tower's output size (out_hidden_size)."""
    intermediate_size: int = 128
    """Text MLP size."""
    num_layers: int = 2
    """Text decoder layers."""
    num_heads: int = 4
    """Text attention heads (head_dim = hidden_size / num_heads, must be even)."""
    num_kv_heads: int = 2
    """Text key/value heads (grouped-query attention as in Qwen2.5)."""
    vision_depth: int = 2
    """Vision transformer blocks; the last one uses full attention."""
    vision_hidden_size: int = 64
    """Vision transformer width."""
    vision_heads: int = 4
    """Vision attention heads."""
    tie_word_embeddings: bool = False
    """Tie lm_head to the input embedding (as Qwen2.5-VL-3B does)."""
    model_vocab_size: int = 0
    """Rows of the embedding and lm_head (0: the tokenizer's size). Larger pads them as Qwen
    does (151,936 rows for 151,665 tokens), e.g. to give a random model the real head's shape;
    ids past the tokenizer decode to nothing."""
    min_pixels: int = 56 * 56
    """Processor min_pixels (images are upscaled to at least this)."""
    max_pixels: int = 112 * 112
    """Processor max_pixels (112x112 -> 16 image tokens after the 2x2 merge)."""
    seed: int = 0
    """Seed of the random initialization."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "vision_depth", "vision_hidden_size", "vision_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TinyModelSpec.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"TinyModelSpec.hidden_size ({self.hidden_size}) / num_heads ({self.num_heads}) "
                "must be an even integer head_dim (rotary embeddings rotate pairs)"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"TinyModelSpec.num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.vision_hidden_size % self.vision_heads:
            raise ValueError(
                f"TinyModelSpec.vision_hidden_size ({self.vision_hidden_size}) must be divisible "
                f"by vision_heads ({self.vision_heads})"
            )
        if self.model_vocab_size < 0:
            raise ValueError(f"TinyModelSpec.model_vocab_size must be >= 0, got {self.model_vocab_size}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(
                f"TinyModelSpec needs 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}"
            )


def mrope_section_for(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies into (temporal, height, width) sections.

    Qwen2.5-VL's default [16, 24, 24] is for head_dim 128 (sum 64); any other
    head dim needs a section list summing to head_dim // 2. We keep the same
    1 : 1.5 : 1.5 proportions, giving the remainder to the temporal section.
    """
    half = head_dim // 2
    hw = (half * 3) // 8
    return [half - 2 * hw, hw, hw]


def train_tokenizer(corpus: Iterable[str], vocab_size: int):
    """Train a Qwen2-style byte-level BPE on `corpus` and wrap it as a Qwen2Tokenizer.

    Returns a `transformers.Qwen2Tokenizer` whose last 14 ids are the Qwen special
    tokens in Qwen's order, with eos `<|im_end|>` and pad `<|endoftext|>` as in
    Qwen2.5-VL-Instruct.
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import Qwen2Tokenizer

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # All 256 byte symbols are in the initial alphabet, so any text (including
    # text the corpus never saw) still tokenizes, as with Qwen's real vocabulary.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(list(corpus), trainer)
    # Specials go after the BPE vocabulary, in Qwen's order (ids n .. n+13).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    return Qwen2Tokenizer(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        errors="replace",
    )


def build_processor(tokenizer, *, min_pixels: int, max_pixels: int):
    """A stock Qwen2_5_VLProcessor around `tokenizer` with the Qwen2.5-VL chat template."""
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    try:
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    except ImportError as e:  # the video processor is what needs torchvision
        raise ImportError(
            "Qwen2_5_VLProcessor needs torchvision for its video processor; install torchvision "
            "matching your torch"
        ) from e
    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    )


def build_model(tokenizer, spec: TinyModelSpec):
    """Random-init Qwen2_5_VLForConditionalGeneration sized by `spec`, ids taken from `tokenizer`."""
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    head_dim = spec.hidden_size // spec.num_heads
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=max(len(tokenizer), spec.model_vocab_size),
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_kv_heads,
            max_position_embeddings=8192,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0,
                             "mrope_section": mrope_section_for(head_dim)},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=spec.vision_depth,
            hidden_size=spec.vision_hidden_size,
            intermediate_size=2 * spec.vision_hidden_size,
            num_heads=spec.vision_heads,
            out_hidden_size=spec.hidden_size,
            fullatt_block_indexes=[spec.vision_depth - 1],
            window_size=112,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=spec.tie_word_embeddings,
    )
    torch.manual_seed(spec.seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    # Qwen2.5-VL-Instruct stops on <|im_end|> or <|endoftext|> (docs/algorithm.md).
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
    )
    return model


def default_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: the synthetic task and the prompt template."""
    lines = synthetic_corpus()
    lines += [PROMPT_INSTRUCTION, "You are a helpful assistant.", "system", "user", "assistant"]
    return lines


def build_tiny_model_dir(out_dir: str | Path, spec: TinyModelSpec | None = None, *,
                         corpus: Iterable[str] | None = None) -> Path:
    """Build and save a tiny random-init Qwen2.5-VL + tokenizer + processor under `out_dir`.

    Args:
        out_dir: directory to write (created; existing files are overwritten).
        spec: model shape; `TinyModelSpec()` by default.
        corpus: tokenizer training text; `default_corpus()` by default.

    Returns the directory, loadable with `Qwen2_5_VLForConditionalGeneration.from_pretrained`
    and `AutoProcessor.from_pretrained`.
    """
    spec = spec or TinyModelSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(default_corpus() if corpus is None else corpus, spec.vocab_size)
    processor = build_processor(tokenizer, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
    model = build_model(tokenizer, spec)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "tiny_spec.json").write_text(json.dumps(dataclasses.asdict(spec), indent=2) + "\n")
    return out


def ensure_tiny_model_dir(out_dir: str | Path, spec: TinyModelSpec | None = None) -> Path:
    """Build the tiny model directory unless it already holds one built with the same spec."""
    out = Path(out_dir)
    spec = spec or TinyModelSpec()
    marker = out / "tiny_spec.json"
    if marker.exists() and (out / "config.json").exists():
        if json.loads(marker.read_text()) == dataclasses.asdict(spec):
            return out
    return build_tiny_model_dir(out, spec)


def main(argv: list[str] | None = None) -> None:
    """CLI: build a tiny model directory."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory")
    for f in dataclasses.fields(TinyModelSpec):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parser.add_argument(flag, type=int, default=f.default)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    path = build_tiny_model_dir(out, TinyModelSpec(**args))
    n = sum(1 for _ in path.iterdir())
    print(f"wrote tiny Qwen2.5-VL ({n} files) to {path}")


if __name__ == "__main__":
    main()
