"""LoRA (peft) in the trainer: only adapters train, the head gets no dW, the export merges."""

from __future__ import annotations

import sys

import pytest
import torch

from tests._tiny_runs import fresh_dir, make_cfg

pytest.importorskip("peft")


def test_lora_trains_adapters_only_and_export_merges(assets, tmp_path):
    from train.policy import load_policy
    from train.trainer import Trainer

    out = fresh_dir(assets, tmp_path, "lora")
    # one mini-batch per step: on-policy, ratio == 1
    cfg = make_cfg(out, "trainer.max_steps=2", "trainer.mini_batch_size=8", "checkpoint.save_every=0",
                   "checkpoint.export_hf=true", "model.lora.rank=4", "model.lora.alpha=8")
    initial, _ = load_policy(out / "tiny_model", dtype=torch.float32, attn_implementation="sdpa")
    before = {k: v.clone() for k, v in initial.state_dict().items()}
    tr = Trainer(cfg)
    try:
        recs = tr.train()
        policy = tr.module.policy
        assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in recs)
        for r in recs:
            assert abs(r["ratio/mean"] - 1.0) <= 1e-5
        trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
        assert trainable and all(".lora_" in n for n in trainable)
        assert policy.lm_head.weight.grad is None  # frozen head: the fused loss skips dW
        state = policy.state_dict()
        lora_b = [k for k in state if ".lora_B." in k]
        assert any(state[k].abs().max() > 0 for k in lora_b), "adapters did not move"
        for key, value in state.items():
            if ".lora_" in key:
                continue
            torch.testing.assert_close(value, before[key.replace(".base_layer.", ".")], rtol=0, atol=0,
                                       msg=lambda m, key=key: f"frozen {key} changed: {m}")

        exported, _ = load_policy(out / "hf_model", dtype=torch.float32, attn_implementation="sdpa")
        assert not any(".lora_" in k or "base_layer" in k for k in exported.state_dict())
        ids = torch.randint(0, 300, (2, 11))
        with torch.no_grad():
            want = policy(input_ids=ids).logits
            got = exported(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert (want - initial(input_ids=ids).logits).abs().max() > 1e-6  # the merge is not a no-op
    finally:
        tr.close()


def test_lora_errors(assets, monkeypatch):
    from train.config import ConfigError, LoRAConfig
    from train.lora import apply_lora
    from train.policy import load_policy

    policy, _ = load_policy(assets / "tiny_model", dtype=torch.float32, attn_implementation="sdpa")
    with pytest.raises(ConfigError, match="model.lora.target_modules"):
        LoRAConfig(rank=4, target_modules=["qkv"])
    with pytest.raises(ConfigError, match="model.lora.rank"):
        LoRAConfig(rank=-1)
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match="pip install peft"):
        apply_lora(policy, LoRAConfig(rank=4))
    monkeypatch.undo()
    names = apply_lora(policy, LoRAConfig(rank=2, target_modules=["gate_proj"]))
    # the vision tower's MLP has gate_proj layers too: only the language model's are adapted
    assert names and all("language_model" in n for n in names)
