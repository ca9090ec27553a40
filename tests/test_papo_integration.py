"""papo.integrations.torch_loop: rollout log-probs and optimizer steps on a toy vision-language model."""

import pytest
import torch
from torch import nn

from papo import PAPOConfig, PAPOLoss
from papo.integrations.torch_loop import rollout_log_probs, train_step

V, H, D_IMG, B, T = 17, 8, 6, 4, 5


class ToyVLM(nn.Module):
    """Token embedding + projected image feature -> hidden states; tied to nothing."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.image = nn.Linear(D_IMG, H)
        self.mix = nn.Linear(H, H)
        self.lm_head = nn.Linear(H, V, bias=False)

    def hidden(self, mb, masked):
        image = mb["masked_image"] if masked else mb["image"]
        return torch.tanh(self.mix(self.embed(mb["inputs"]) + self.image(image).unsqueeze(1)))


def _micro_batches(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    image = torch.randn(B, D_IMG, generator=g)
    mask = (torch.arange(T) < torch.tensor([[5], [3], [4], [2]])).long()
    batch = dict(
        completion_ids=ids, completion_mask=mask,
        inputs=torch.cat([torch.zeros(B, 1, dtype=torch.long), ids[:, :-1]], 1),  # teacher forcing, shifted
        image=image, masked_image=image * (torch.rand(B, D_IMG, generator=g) > 0.6),
        advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]),
    )
    return batch


@pytest.mark.parametrize("config", [
    PAPOConfig.from_preset("papo-g-nref-7b", loss_scale="global"),
    PAPOConfig(estimator="exact", masked_view="live", gamma=0.05),
])
def test_rollout_then_update(config):
    torch.manual_seed(0)
    model = ToyVLM()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    batch = _micro_batches(1)
    stats = rollout_log_probs(model.hidden, model.lm_head.weight, batch, config)
    assert stats["kl/perception_exact"] > 0 and stats["old_logp"].shape == (B, T)
    batch.update(old_logp=stats["old_logp"], masked_logp=stats["masked_logp"])
    micro = [{k: v[rows] for k, v in batch.items()} for rows in (slice(0, 2), slice(2, 4))]
    before = [p.detach().clone() for p in model.parameters()]
    loss_module = PAPOLoss(config, backend="torch")
    metrics = train_step(loss_module, model.hidden, model.lm_head.weight, optimizer, micro)
    # the first update is on-policy: old log-probs were computed with the same weights
    assert metrics["ratio/mean"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["skipped"] == 0.0 and metrics["grad_norm"] > 0
    changed = [not torch.equal(a, p) for a, p in zip(before, model.parameters())]
    assert all(changed)
    # a second step is off-policy and moves the ratio
    metrics = train_step(loss_module, model.hidden, model.lm_head.weight, optimizer, micro)
    assert metrics["ratio/mean"] != pytest.approx(1.0, abs=1e-6)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())


CONFIGS = [
    pytest.param(PAPOConfig.from_preset("papo-g-nref-7b"), id="sampled-rollout_no_grad"),
    pytest.param(PAPOConfig(estimator="exact", masked_view="current_no_grad", gamma=0.5),
                 id="exact-current_no_grad"),
    pytest.param(PAPOConfig(estimator="exact", masked_view="live", gamma=0.5), id="exact-live"),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_rollout_views_and_the_step_direction(config):
    """rollout_log_probs takes each view's log-probs from its own hidden states, and train_step
    moves the weights by -lr x the gradient of the loss computed here by hand, with the masked
    view the config names (plain SGD, no clipping: the update is exactly the gradient)."""
    torch.manual_seed(0)
    model = ToyVLM().double()  # float64: the update compares to lr x gradient without rounding noise
    batch = {k: v.double() if v.is_floating_point() else v for k, v in _micro_batches(2).items()}
    stats = rollout_log_probs(model.hidden, model.lm_head.weight, batch, config)
    mask = batch["completion_mask"].bool()
    with torch.no_grad():
        for name, masked in (("old_logp", False), ("masked_logp", True)):
            logits = model.hidden(batch, masked) @ model.lm_head.weight.T / config.temperature
            logp = torch.log_softmax(logits, -1)
            want = logp.gather(-1, batch["completion_ids"][..., None]).squeeze(-1) * mask
            torch.testing.assert_close(stats[name], want, rtol=1e-9, atol=1e-12, msg=name)
    assert not torch.allclose(stats["old_logp"], stats["masked_logp"])
    batch.update(old_logp=stats["old_logp"], masked_logp=stats["masked_logp"])
    loss_module = PAPOLoss(config, backend="torch")

    # the gradient by hand: the loss on the whole batch, one micro-batch
    params = list(model.parameters())
    with torch.set_grad_enabled(config.masked_view == "live"):
        masked_hidden = model.hidden(batch, True)
    out = loss_module(model.hidden(batch, False), model.lm_head.weight, batch["completion_ids"],
                      batch["completion_mask"], batch["advantages"], old_logp=batch["old_logp"],
                      masked_hidden=None if config.masked_view == "rollout_no_grad" else masked_hidden,
                      masked_logp=batch["masked_logp"] if config.masked_view == "rollout_no_grad" else None,
                      num_valid_tokens=int(mask.sum()), num_valid_sequences=B, num_micro_batches=1)
    grads = torch.autograd.grad(out.loss, params)
    assert sum(float(g.abs().sum()) for g in grads) > 0

    lr = 0.1
    before = [p.detach().clone() for p in params]
    sgd = torch.optim.SGD(params, lr=lr)
    metrics = train_step(loss_module, model.hidden, model.lm_head.weight, sgd, [batch], max_grad_norm=1e9)
    assert metrics["skipped"] == 0.0
    assert metrics["loss/total"] == pytest.approx(float(out.loss.detach()), rel=1e-9, abs=1e-12)
    for p, p0, g in zip(params, before, grads):
        torch.testing.assert_close(p.detach() - p0, -lr * g, rtol=1e-9, atol=1e-12)
