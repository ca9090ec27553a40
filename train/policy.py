"""The policy model: loading a local Qwen2.5-VL checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from train.config import ConfigError


def load_policy(path: str | Path, *, dtype: torch.dtype, attn_implementation: str):
    """Load a Qwen2.5-VL model and processor from a local directory (never the network)."""
    from transformers import AutoConfig, AutoProcessor, Qwen2_5_VLForConditionalGeneration

    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"model.path {p} has no config.json (expected a local Qwen2.5-VL checkpoint)")
    config = AutoConfig.from_pretrained(p, local_files_only=True)
    if config.model_type != "qwen2_5_vl":
        raise ConfigError(f"model.path {p} holds a {config.model_type!r} model; this trainer needs "
                          "Qwen2.5-VL (model_type 'qwen2_5_vl')")
    processor = AutoProcessor.from_pretrained(p, local_files_only=True)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        p, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True)
    return model, processor
