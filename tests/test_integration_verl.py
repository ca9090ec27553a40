"""papo.integrations.verl against verl 0.9.1 itself, through the interfaces it hooks.

- verl's `patch_forward_with_backends` with `fused_kernels_backend="papo"` makes the tiny
  Qwen2.5-VL return log-probs and entropies equal to log_softmax over its materialized logits
  (and the same lm_head gradient);
- verl's `ppo_loss` (as the engine workers call it) becomes the PAPO loss: equal to
  `papo.papo_loss` on the padded per-token tensors, and, with gamma = eta = 0, equal in value and
  gradient to verl's own vanilla PPO loss for each aggregation mode and dp_size 2.

verl installs with `pip install --no-deps verl==0.9.1`; importing it needs the `verl` extra
(ray, tensordict, omegaconf, codetiming). Without them the verl tests are skipped; the masking
helper is tested either way.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from papo import PAPOConfig, papo_loss
from papo.integrations import verl as papo_verl
from train.tiny import TinyModelSpec, build_tiny_model_dir

try:
    import verl.models.transformers.monkey_patch as monkey_patch
    import verl.utils.tensordict_utils as tu
    import verl.workers.utils.losses as verl_losses
    from verl.workers.config import ActorConfig
except ImportError as exc:  # verl, or one of the packages its import needs, is missing
    VERL_MISSING = (f"verl 0.9.1 does not import here ({exc}); pip install --no-deps verl==0.9.1 "
                    "and '.[verl]'")
else:
    VERL_MISSING = ""

needs_verl = pytest.mark.skipif(bool(VERL_MISSING), reason=VERL_MISSING)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_verl"), TinyModelSpec())


@pytest.fixture
def enabled():
    papo_config = PAPOConfig.from_preset("papo-g-nref-7b")
    replaced = papo_verl.enable(papo_config)
    yield papo_config, replaced
    papo_verl.disable()


def _image(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (56, 56, 3), dtype=np.uint8))


# ---------------------------------------------------------------------- masking helper


def test_masked_multi_modal_inputs_match_the_originals_processing(tiny_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_dir)
    images = [_image(0), _image(1)]
    original = processor.image_processor(images=images, return_tensors="pt")
    untouched = papo_verl.masked_multi_modal_inputs(images, processor, generator=0, prob=0.0)
    torch.testing.assert_close(untouched["pixel_values"], original["pixel_values"], rtol=0, atol=0)
    masked = papo_verl.masked_multi_modal_inputs(images, processor, generator=0)
    assert torch.equal(masked["image_grid_thw"], original["image_grid_thw"])
    assert not torch.equal(masked["pixel_values"], original["pixel_values"])


# ---------------------------------------------------------------------- fused forward


@needs_verl
def test_fused_forward_hook_equals_materialized_logits(tiny_dir, enabled):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    _, replaced = enabled
    assert "verl.models.transformers.monkey_patch.patch_forward_with_backends" in replaced
    processor = AutoProcessor.from_pretrained(tiny_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many red?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True) + "two blue 3"
    inputs = processor(images=[_image(2)], text=[text], return_tensors="pt")
    inputs.pop("token_type_ids", None)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir).double()
    temperature = 0.8
    labels = torch.roll(inputs["input_ids"], -1, dims=-1)

    logits = model(**inputs).logits / temperature
    dense = torch.log_softmax(logits, -1)
    dense_logp = dense.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    dense_entropy = -(dense.exp() * dense).sum(-1)
    (dense_logp.sum() + 0.5 * dense_entropy.sum()).backward()
    dense_grad = model.lm_head.weight.grad.clone()
    model.zero_grad()

    cls = type(model)
    original_forward = cls.forward
    try:
        monkey_patch.patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="papo")
        assert cls.forward is papo_verl.papo_fused_forward
        out = model(**inputs, temperature=temperature)
        torch.testing.assert_close(out.log_probs, dense_logp, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(out.entropy, dense_entropy, rtol=1e-9, atol=1e-9)
        (out.log_probs.sum() + 0.5 * out.entropy.sum()).backward()
        torch.testing.assert_close(model.lm_head.weight.grad, dense_grad, rtol=1e-8, atol=1e-10)
        # other model types are refused with their name
        with pytest.raises(ValueError, match="supports model types"):
            llama = type("M", (), {"config": type("C", (), {"model_type": "llama"})})()
            papo_verl.install_fused_forward(llama)
    finally:
        cls.forward = original_forward


# ---------------------------------------------------------------------- loss


def _verl_batch(seed: int, dp_size: int):
    """A verl micro-batch in the no-padding layout, with its padded per-token ground truth."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens, response_lens = [2, 3, 1], [4, 2, 3]
    R = max(response_lens)
    mask = torch.zeros(3, R)
    for i, n in enumerate(response_lens):
        mask[i, :n] = 1
    logp = -torch.rand(3, R, generator=g, dtype=torch.float64) * 2
    values = []
    for i, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        # position t of the model output predicts token t + 1: the response's log-probs sit at
        # positions p - 1 ... p + r - 2 of the sequence
        row = -torch.rand(p + r, generator=g, dtype=torch.float64) * 2
        row[p - 1:p + r - 1] = logp[i, :r]
        values.append(row)
    nested_logp = torch.nested.as_nested_tensor(values, layout=torch.jagged).requires_grad_(True)

    def nested(t):
        rows = [t[i, :n] for i, n in enumerate(response_lens)]
        return torch.nested.as_nested_tensor(rows, layout=torch.jagged)

    old = logp + 0.3 * torch.randn(3, R, generator=g, dtype=torch.float64)
    masked = logp - 0.5 * torch.rand(3, R, generator=g, dtype=torch.float64)
    adv = torch.randn(3, 1, generator=g, dtype=torch.float64).expand(3, R).contiguous()
    tensors = {
        "prompts": torch.nested.as_nested_tensor([torch.arange(p) for p in prompt_lens],
                                                 layout=torch.jagged),
        "responses": torch.nested.as_nested_tensor([torch.arange(r) for r in response_lens],
                                                   layout=torch.jagged),
        "response_mask": nested(mask), "old_log_probs": nested(old), "advantages": nested(adv),
        "masked_log_probs": nested(masked),
    }
    info = {"dp_size": dp_size, "batch_num_tokens": int(mask.sum()) * dp_size,
            "global_batch_size": 3 * dp_size}
    data = tu.get_tensordict(tensors, info)
    return data, nested_logp, dict(logp=logp, old=old, masked=masked, adv=adv[:, 0], mask=mask)


def _actor_config(**kw):
    return ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=2, ppo_mini_batch_size=4,
                       use_dynamic_bsz=False, rollout_n=2, **kw)


@needs_verl
def test_ppo_loss_hook_equals_papo_loss(enabled):
    papo_config, replaced = enabled
    assert "verl.workers.utils.losses.ppo_loss" in replaced
    config = _actor_config(clip_ratio_low=0.2, clip_ratio_high=0.3)
    data, nested_logp, t = _verl_batch(0, dp_size=2)
    loss_fn = functools.partial(verl_losses.ppo_loss, config=config)  # as ActorRolloutRefWorker binds it
    loss, metrics = loss_fn(model_output={"log_probs": nested_logp}, data=data, dp_group=None)

    logp = t["logp"].clone().requires_grad_(True)
    expected_config = PAPOConfig.from_preset("papo-g-nref-7b", clip_high=0.3, loss_scale="global")
    expected = papo_loss(logp, t["old"], t["adv"], t["mask"], masked_logp=t["masked"], config=expected_config,
                         num_valid_tokens=t["mask"].sum())  # batch_num_tokens / dp_size
    torch.testing.assert_close(loss, expected.loss)
    em = expected.metrics
    assert metrics["actor/kl_prcp_loss"].aggregate() == pytest.approx(-float(em["kl/perception"]))
    assert metrics["actor/aug_entropy_loss"].aggregate() == pytest.approx(float(em["entropy/masked"]))
    loss.backward()
    expected.loss.backward()
    got = torch.stack([row[p - 1:p - 1 + n].sum() for row, p, n in
                       zip(nested_logp.grad.unbind(), [2, 3, 1], [4, 2, 3])])
    torch.testing.assert_close(got, (logp.grad * t["mask"]).sum(-1))


@needs_verl
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_ppo_loss_hook_without_papo_terms_equals_verl_vanilla(agg):
    vanilla = verl_losses.ppo_loss
    papo_verl.enable(PAPOConfig.from_preset("papo-g-nref-7b", gamma=0.0, eta_full=0.0, eta_masked=0.0))
    try:
        config = _actor_config(clip_ratio_low=0.2, clip_ratio_high=0.28, loss_agg_mode=agg)
        losses = []
        grads = []
        for fn in (verl_losses.ppo_loss, vanilla):
            data, nested_logp, _ = _verl_batch(1, dp_size=2)
            loss, _ = fn(config, {"log_probs": nested_logp}, data)
            loss.backward()
            losses.append(loss.detach())
            grads.append(nested_logp.grad.values())
        torch.testing.assert_close(losses[0], losses[1])
        torch.testing.assert_close(grads[0], grads[1])
    finally:
        papo_verl.disable()
    assert verl_losses.ppo_loss is vanilla
