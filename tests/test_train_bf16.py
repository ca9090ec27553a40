"""bf16 runs (DeepSpeed bf16, fp32 master weights) and model.fp32_lm_head."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tests._tiny_runs import fresh_dir, make_cfg


@pytest.mark.parametrize("fp32_head,zero_stage", [(False, 0), (True, 0), (True, 2)])
def test_bf16_run(assets, tmp_path, fp32_head, zero_stage):
    from train.engine import fp32_master_weight
    from train.policy import PolicyWithLoss
    from train.trainer import Trainer

    out = fresh_dir(assets, tmp_path, f"bf16_{fp32_head}_{zero_stage}")
    # two mini-batches per step: the second uses the head after an optimizer step
    cfg = make_cfg(out, "trainer.max_steps=2", "checkpoint.save_every=0", "model.dtype=bfloat16",
                   f"model.fp32_lm_head={str(fp32_head).lower()}", f"trainer.zero_stage={zero_stage}")
    tr = Trainer(cfg)
    uses = []
    original = PolicyWithLoss.head_weight

    def checked(self, mod):  # every use of the head: the current master exactly (never stale)
        w = original(self, mod)
        if fp32_head:
            uses.append(torch.equal(w.detach(), fp32_master_weight(tr.engine.optimizer, mod.weight)))
        return w

    try:
        PolicyWithLoss.head_weight = checked
        recs = tr.train()
        PolicyWithLoss.head_weight = original
        for r in recs:
            assert math.isfinite(r["loss/total"]) and math.isfinite(r["grad_norm"])
            assert r["optimizer_steps"] == 2
        w = tr.module.policy.lm_head.weight
        assert w.dtype == torch.bfloat16
        master = fp32_master_weight(tr.engine.optimizer, w)
        assert master is not None and master.dtype == torch.float32
        # lr 1e-2 updates land in the fp32 master below bf16 resolution
        assert (master - w.float()).abs().max() > 0
        if fp32_head:
            assert len(uses) >= 8 and all(uses)
        else:
            assert tr.module.head_fp32 is None
    finally:
        PolicyWithLoss.head_weight = original
        tr.close()


def test_head_weight_is_the_master_with_gradient_to_the_working_weight():
    from train.policy import PolicyWithLoss

    policy = nn.Module()
    policy.lm_head = nn.Linear(8, 5, bias=False).to(torch.bfloat16)
    mod = PolicyWithLoss(policy, None)
    assert mod.head_weight(policy.lm_head) is policy.lm_head.weight
    master = policy.lm_head.weight.detach().float() + 1e-4 * torch.randn(5, 8)
    mod.head_fp32 = master
    w = mod.head_weight(policy.lm_head)
    assert w.dtype == torch.float32 and torch.equal(w, master)
    upstream = torch.randn(5, 8)
    (w * upstream).sum().backward()
    torch.testing.assert_close(policy.lm_head.weight.grad, upstream.to(torch.bfloat16), rtol=0, atol=0)
    with torch.no_grad():
        assert mod.head_weight(policy.lm_head) is master


def test_fp32_head_of_a_frozen_lora_head_is_the_loaded_weight(assets, tmp_path):
    pytest.importorskip("peft")
    from train.policy import load_policy
    from train.trainer import Trainer

    out = fresh_dir(assets, tmp_path, "bf16_lora")
    cfg = make_cfg(out, "trainer.max_steps=1", "checkpoint.save_every=0", "model.dtype=bfloat16",
                   "model.fp32_lm_head=true", "model.lora.rank=2")
    loaded, _ = load_policy(out / "tiny_model", dtype=torch.float32, attn_implementation="sdpa")
    tr = Trainer(cfg)
    try:
        recs = tr.train()
        assert math.isfinite(recs[0]["loss/total"])
        assert tr.module.policy.lm_head.weight.dtype == torch.bfloat16
        # the head never trains under LoRA: the fp32 copy is the checkpoint's own weight
        assert torch.equal(tr.module.head_fp32, loaded.lm_head.weight.detach())
    finally:
        tr.close()
