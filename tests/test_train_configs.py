"""The trainer in every configuration the shipped configs (train/configs/*.yaml) use, briefly on CPU.

Each test runs the tiny model for one or two rollout steps and asserts something a wrong
implementation would break:
  - a reference model (beta > 0, papo_g_3b.yaml, also with its bf16 + ZeRO-3 + gradient
    checkpointing, and random_3b.yaml's bf16 + ZeRO-0 + frozen vision tower): the rollout-time
    reference log-probs equal the policy's before the first update and the KL grows after;
  - the DAPO online filter (papo_d_7b.yaml): only groups with mixed accuracy reach the update,
    and the batch is refilled to full size;
  - the exact estimator with each masked view (current_no_grad, live): the trainer's parameter
    gradient equals the expectation of the sampled k3 gradient over the tiny vocabulary
    (current_no_grad), or the gradient of the exact KL with the masked pass live;
  - the supervised warm start (tiny.yaml): it lowers the NLL and PAPO starts from its weights,
    with the reference model equal to the warm-started policy.
LoRA and bf16 runs are covered by test_train_lora.py and test_train_bf16.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests._tiny_runs import fresh_dir, make_cfg

ONE_UPDATE_PER_STEP = ["trainer.mini_batch_size=8", "checkpoint.save_every=0"]


def _train(cfg, before_train=None):
    from train.trainer import Trainer

    tr = Trainer(cfg)
    try:
        if before_train is not None:
            before_train(tr)
        return tr, tr.train()
    finally:
        tr.close()


# --------------------------------------------------------------------------- reference model


@pytest.mark.parametrize("extra", [
    pytest.param([], id="fp32-zero0"),
    # papo_g_3b.yaml's engine settings
    pytest.param(["model.dtype=bfloat16", "trainer.zero_stage=3", "model.gradient_checkpointing=true"],
                 id="bf16-zero3-checkpointing", marks=pytest.mark.slow),
    # random_3b.yaml's: the reference is a plain module there, not a DeepSpeed engine
    pytest.param(["model.dtype=bfloat16", "model.gradient_checkpointing=true",
                  "model.freeze_vision_tower=true"], id="bf16-zero0-frozen-vision"),
])
def test_reference_kl_is_zero_before_the_first_update_and_positive_after(assets, tmp_path, extra,
                                                                          monkeypatch):
    from train.trainer import Trainer

    out = fresh_dir(assets, tmp_path, "ref")
    cfg = make_cfg(out, "trainer.max_steps=2", *ONE_UPDATE_PER_STEP, "papo.preset=papo-g-3b", *extra)
    assert cfg.papo_config().beta > 0
    bf16 = cfg.model.dtype == "bfloat16"
    initial, gaps = {}, []
    real_pass = Trainer._logprob_pass

    def logprob_pass(self, samples):
        real_pass(self, samples)
        gaps.append(max(float((s.old_logp - s.ref_logp).abs().max()) for s in samples))

    def keep_reference(tr):
        initial.update({k: v.clone() for k, v in tr.ref_model.state_dict().items()})

    monkeypatch.setattr(Trainer, "_logprob_pass", logprob_pass)
    tr, recs = _train(cfg, keep_reference)
    # before the first update the reference is the policy, computed at the policy's precision:
    # identical rollout-time log-probs
    assert gaps[0] == 0.0 and gaps[1] > 1e-3, gaps
    if bf16:
        assert tr.module.policy.is_gradient_checkpointing
        # the bf16 policy's training pass differs from its no-grad pass in the last bits (ratio
        # ~1 + 4e-6): the KL of step 1 is that noise, far below the KL after one update
        assert 0.0 <= recs[0]["kl/ref"] < 1e-6
    else:
        assert recs[0]["kl/ref"] == 0.0
    assert recs[1]["kl/ref"] > 1e-4
    assert all(math.isfinite(r["loss/total"]) for r in recs)
    for k, v in tr.ref_model.state_dict().items():  # the reference never trains
        assert torch.equal(v, initial[k]), k


# --------------------------------------------------------------------------- DAPO online filter


def test_online_filter_keeps_mixed_groups_and_refills_the_batch(assets, tmp_path, monkeypatch):
    from train.trainer import Trainer

    out = fresh_dir(assets, tmp_path, "filter")
    cfg = make_cfg(out, "trainer.max_steps=1", *ONE_UPDATE_PER_STEP, "papo.preset=papo-d-7b")
    assert cfg.papo_config().online_filter == (0.01, 0.99)

    def score(self, samples):
        # prompts whose uid is 0 mod 3 are always right, 1 mod 3 always wrong, 2 mod 3 mixed:
        # a third of the groups survive, so filling the batch takes several rounds
        seen = {}
        for s in samples:
            j = seen[s.uid] = seen.get(s.uid, -1) + 1
            right = {0: True, 1: False, 2: j % 2 == 0}[s.uid % 3]
            s.accuracy, s.format = float(right), 1.0
            s.reward = 0.9 * s.accuracy + 0.1

    updated = []
    real_update = Trainer._update

    def spy_update(self, samples, coefficients):
        updated.extend(samples)
        return real_update(self, samples, coefficients)

    monkeypatch.setattr(Trainer, "_score", score)
    monkeypatch.setattr(Trainer, "_update", spy_update)
    _, (rec,) = _train(cfg)
    groups = {}
    for s in updated:
        groups.setdefault(s.uid, []).append(s)
    assert len(groups) == cfg.trainer.rollout_batch_size  # refilled to a full batch
    assert all(len(g) == cfg.rollout.n for g in groups.values())
    for uid, g in groups.items():
        assert uid % 3 == 2, uid  # only groups with 0 < mean accuracy < 1
        assert all(s.advantage != 0 for s in g)
    assert rec["filter/kept_groups"] >= cfg.trainer.rollout_batch_size  # over all tries
    assert rec["filter/tries"] >= 2
    assert rec["filter/prompts_seen"] == rec["filter/tries"] * cfg.trainer.rollout_batch_size
    assert rec["reward/accuracy"] == pytest.approx(0.5)


# --------------------------------------------------------------------------- exact estimator


def _dense_perception_loss(tr, batch, masked_view: str, gamma: float) -> torch.Tensor:
    """-gamma x (token mean of the perception term) from materialized float64 logits, with
    autograd through the policy: the expected sampled-k3 gradient (masked view detached), or
    KL(pi_masked || pi) with the masked pass live."""
    from papo.estimators import kl_k3

    module = tr.module
    w = module.policy.lm_head.weight.double()
    temperature = tr.papo.temperature
    mask = batch.response_mask.bool()

    def logp_of(hidden):
        return torch.log_softmax(hidden.double() @ w.T / temperature, -1)[mask]

    logp = logp_of(module.trunk(batch))
    with torch.set_grad_enabled(masked_view == "live"):
        logp_masked = logp_of(module.trunk(batch, masked=True))
    if masked_view == "live":
        per_token = (logp_masked.exp() * (logp_masked - logp)).sum(-1)
    else:
        # the official sampled estimator, k3 of the sampled token against the masked view,
        # averaged over every token y of the vocabulary with the policy's probability
        # (the sample itself is not differentiated)
        assert float((logp_masked - logp).max()) < 2.0  # below k3's clamps: the identity is exact
        per_token = (logp.exp().detach() * kl_k3(logp, logp_masked)).sum(-1)
    return -gamma * per_token.sum() / mask.sum()


@pytest.mark.parametrize("masked_view", ["current_no_grad", "live"])
def test_exact_estimator_gradient_through_the_trainer(assets, tmp_path, masked_view):
    from train.batching import pack

    out = fresh_dir(assets, tmp_path, f"exact_{masked_view}")
    gamma = 1.0
    cfg = make_cfg(out, "trainer.max_steps=1", *ONE_UPDATE_PER_STEP, "papo.estimator=exact",
                   f"papo.masked_view={masked_view}", f"papo.gamma={gamma}", "papo.eta_full=0.0",
                   "papo.eta_masked=0.0")
    from train.trainer import Trainer

    tr = Trainer(cfg)
    try:
        samples, _ = tr._collect(0)
        tr._advantages(samples)
        tr._logprob_pass(samples)
        members = samples[:4]
        for s in members:
            s.advantage = 0.0  # the perception term alone: the clipped objective has no gradient
        params = [p for p in tr.module.parameters() if p.requires_grad]
        batch = pack(tr.module.policy.model, [s.seq() for s in members]).to(tr.device)
        want = torch.autograd.grad(_dense_perception_loss(tr, batch, masked_view, gamma), params,
                                   allow_unused=True)
        n_tokens = float(sum(s.response_ids.numel() for s in members))
        metrics = tr.updater.forward_backward_step(members, num_micro_batches=1, num_valid_tokens=n_tokens,
                                                   num_valid_sequences=float(len(members)),
                                                   coefficients=tr.papo.coefficients(0, 1))
        assert metrics["kl/perception"] > 0
        for (name, p), w in zip([(n, p) for n, p in tr.module.named_parameters() if p.requires_grad], want):
            g = torch.zeros_like(p) if p.grad is None else p.grad
            w = torch.zeros_like(p, dtype=torch.float64) if w is None else w.double()
            torch.testing.assert_close(g.double(), w, rtol=2e-4, atol=2e-4 * float(w.abs().max()) + 1e-10,
                                       msg=lambda m, name=name: f"{name}: {m}")
        assert sum(float(w.abs().sum()) for w in want if w is not None) > 0
    finally:
        tr.close()


# --------------------------------------------------------------------------- SFT warm start


def test_warm_start_lowers_the_nll_and_papo_starts_from_it(assets, tmp_path):
    from train.policy import load_policy

    out = fresh_dir(assets, tmp_path, "sft")
    cfg = make_cfg(out, "trainer.max_steps=1", *ONE_UPDATE_PER_STEP, "sft.steps=4", "sft.batch_size=8",
                   "sft.lr=5e-3", "papo.beta=0.01")
    initial, _ = load_policy(out / "tiny_model", dtype=torch.float32, attn_implementation="sdpa")
    start = {}
    tr, (rec,) = _train(cfg, lambda tr: start.update(tr.full_state_dict()))
    losses = [float(x) for x in (out / "sft_model" / "sft_losses.txt").read_text().split()]
    # the NLL of the response tokens: ~ln(vocabulary) for the random initial policy, then lower
    assert len(losses) == 4, losses
    assert losses[0] == pytest.approx(math.log(cfg.model.tiny.vocab_size), rel=0.1), losses
    assert losses[-1] < losses[0] - 0.05, losses
    warm, _ = load_policy(out / "sft_model", dtype=torch.float32, attn_implementation="sdpa")
    warm_state, initial_state = warm.state_dict(), initial.state_dict()
    for k, v in start.items():
        torch.testing.assert_close(v, warm_state[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")
    assert any(not torch.equal(warm_state[k], initial_state[k]) for k in initial_state)
    # the reference model is the warm-started policy, not the random initial one
    assert rec["kl/ref"] == 0.0
