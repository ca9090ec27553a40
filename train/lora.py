"""LoRA adapters (peft) on a Qwen2.5-VL policy's language model, and their merge for export.

The adapters are injected into the HF model in place (`peft.inject_adapter_in_model`), so the
policy keeps its own class and attributes (`policy.model`, `policy.lm_head`, `generate`) and the
trainer, DeepSpeed and the fused loss see an ordinary module whose only trainable parameters
are the adapters. The vision tower has layers with the same leaf names (`mlp.gate_proj`, ...);
only `model.language_model.layers.*` are adapted.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from train.config import ConfigError, LoRAConfig

ADAPTER_NAME = "default"
_LANGUAGE_LAYER = r"(?:.*\.)?language_model\.layers\.\d+\.(?:self_attn|mlp)\.({names})"


def lora_target_names(policy: nn.Module, spec: LoRAConfig) -> list[str]:
    """Full names of the language model's linear layers that `spec.target_modules` selects."""
    pattern = re.compile(_LANGUAGE_LAYER.format(names="|".join(map(re.escape, spec.target_modules))))
    return [n for n, m in policy.named_modules() if isinstance(m, nn.Linear) and pattern.fullmatch(n)]


def apply_lora(policy: nn.Module, spec: LoRAConfig) -> list[str]:
    """Inject rank-`spec.rank` adapters and freeze everything else; returns the adapted layers."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise ImportError("model.lora.rank > 0 needs peft: pip install peft (in the [train] extra)") from e
    names = lora_target_names(policy, spec)
    if not names:
        raise ConfigError(f"model.lora.target_modules {spec.target_modules} matched no linear layer under "
                          "language_model.layers.* of this model")
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=names, bias="none")
    inject_adapter_in_model(config, policy, adapter_name=ADAPTER_NAME)
    for name, p in policy.named_parameters():
        p.requires_grad_(".lora_" in name)
    return names


def merged_state_dict(state: dict[str, torch.Tensor], spec: LoRAConfig) -> dict[str, torch.Tensor]:
    """A plain Qwen2.5-VL state dict from one with adapters: W + (alpha / r) * B @ A per layer
    (merged in fp32, stored in W's dtype), adapter tensors dropped, `base_layer.` removed."""
    scaling = spec.alpha / spec.rank
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if ".base_layer." not in key:
            out[key] = value
            continue
        prefix, leaf = key.split(".base_layer.")
        if leaf == "weight":
            a = state[f"{prefix}.lora_A.{ADAPTER_NAME}.weight"].float()
            b = state[f"{prefix}.lora_B.{ADAPTER_NAME}.weight"].float()
            value = (value.float() + scaling * (b @ a)).to(value.dtype)
        out[f"{prefix}.{leaf}"] = value
    return out
