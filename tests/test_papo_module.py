"""papo.PAPOLoss (hidden states -> loss through the fused kernels) against the same loss on dense
float64 logits, for every estimator / masked-view mode."""

import pytest
import torch

from papo import PAPOConfig, PAPOLoss, papo_loss

F64 = torch.float64
B, T, H, V = 3, 5, 8, 13
LENGTHS = torch.tensor([5, 2, 4])


def _inputs(seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=F64)
    hm = h + 0.7 * torch.randn(B, T, H, generator=g, dtype=F64)  # masked view: correlated
    w = torch.randn(V, H, generator=g, dtype=F64) * 0.8
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.arange(T) < LENGTHS.unsqueeze(-1)
    ids[~mask] = -7  # padding ids outside [0, V) must never reach the kernels
    adv = torch.tensor([1.2, -0.8, -1.5], dtype=F64)
    noise = torch.randn(B, T, generator=g, dtype=F64)
    extra = torch.randn(B, T, generator=g, dtype=F64)
    return dict(h=h.to(dtype), hm=hm.to(dtype), w=w.to(dtype), ids=ids, mask=mask, adv=adv,
                noise=noise, extra=extra)


def _dense_stats(h, w, ids, temperature):
    """log-probs of ids and the full log-softmax from dense float64 logits (the test's oracle)."""
    logits = (h.to(F64) @ w.to(F64).T) / temperature
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, ids.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp, logp_all


def _kl(logp_p, logp_q):
    return (logp_p.exp() * (logp_p - logp_q)).sum(-1)


def _entropy(logp_all):
    return -(logp_all.exp() * logp_all).sum(-1)


MODES = [
    # (estimator, masked_view, direction, extra config)
    ("sampled", "rollout_no_grad", "masked_to_full", dict(beta=0.05, ref_kl_estimator="k3")),
    ("sampled", "current_no_grad", "masked_to_full", dict(temperature=0.7)),
    ("sampled", "live", "masked_to_full", dict()),
    ("exact", "current_no_grad", "masked_to_full", dict(beta=0.05, ref_kl_estimator="k2")),
    ("exact", "live", "masked_to_full", dict(loss_agg="seq-mean-token-mean", loss_scale="global")),
    ("exact", "live", "full_to_masked", dict(temperature=1.3)),
]


@pytest.mark.parametrize("estimator, view, direction, extra", MODES)
def test_matches_dense_float64_logits(estimator, view, direction, extra):
    cfg = PAPOConfig(estimator=estimator, masked_view=view, kl_prcp_direction=direction,
                     gamma=0.2, eta_full=0.1, eta_masked=0.15, **extra)
    x = _inputs()
    temp = cfg.temperature
    counts = dict(num_micro_batches=2, num_valid_tokens=17, num_valid_sequences=5)

    # ---- dense oracle: papo_loss on statistics of materialized float64 logits
    h, hm, w = (x[k].clone().requires_grad_(True) for k in ("h", "hm", "w"))
    logp, logp_all = _dense_stats(h, w, x["ids"], temp)
    old = logp.detach() + 0.3 * x["noise"]
    ref = logp.detach() + 0.2 * x["extra"]
    rollout_masked = logp.detach() - x["extra"].abs()
    kwargs = dict(config=cfg, ref_logp=ref if cfg.beta else None, entropy=_entropy(logp_all), **counts)
    if view == "rollout_no_grad":
        kwargs["masked_logp"] = rollout_masked
    else:
        # no-grad views are constants: no gradient reaches h_masked or W through them
        hm_used, w_used = (hm, w) if view == "live" else (hm.detach(), w.detach())
        mlogp, mlogp_all = _dense_stats(hm_used, w_used, x["ids"], temp)
        kl = _kl(mlogp_all, logp_all) if direction == "masked_to_full" else _kl(logp_all, mlogp_all)
        kwargs.update(masked_logp=mlogp, masked_entropy=_entropy(mlogp_all),
                      kl_prcp=kl if estimator == "exact" else _kl(logp_all, mlogp_all))
    dense = papo_loss(logp, old, x["adv"], x["mask"], **kwargs)
    dense.loss.backward()

    # ---- fused kernels from hidden states, several chunks so `index` gathers matter
    h2, hm2, w2 = (x[k].clone().requires_grad_(True) for k in ("h", "hm", "w"))
    module = PAPOLoss(cfg, backend="torch", chunk_tokens=4)
    call = dict(old_logp=old, ref_logp=ref if cfg.beta else None, **counts)
    if view == "rollout_no_grad":
        call["masked_logp"] = rollout_masked
    else:
        call["masked_hidden"] = hm2
    fused = module(h2, w2, x["ids"], x["mask"], x["adv"], **call)
    fused.loss.backward()

    tol = dict(rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(fused.loss.detach(), dense.loss.detach(), **tol)
    torch.testing.assert_close(h2.grad, h.grad, **tol)
    torch.testing.assert_close(w2.grad, w.grad, **tol)
    if view == "live":
        assert hm.grad is not None and hm.grad.abs().sum() > 0
        torch.testing.assert_close(hm2.grad, hm.grad, **tol)
    else:
        assert hm2.grad is None
    assert set(fused.metrics) == set(dense.metrics)
    for key, value in dense.metrics.items():
        torch.testing.assert_close(fused.metrics[key].to(F64), value, **tol, msg=key)
    # padding rows get no gradient at all
    assert h2.grad[~x["mask"]].eq(0).all()


def test_float32_hidden_close_to_float64():
    cfg = PAPOConfig(estimator="exact", masked_view="live")
    x64, x32 = _inputs(3), _inputs(3, torch.float32)
    outs = []
    for x in (x64, x32):
        h, hm, w = (x[k].clone().requires_grad_(True) for k in ("h", "hm", "w"))
        out = PAPOLoss(cfg, backend="torch")(h, w, x["ids"], x["mask"], x["adv"], masked_hidden=hm,
                                             num_micro_batches=1)
        out.loss.backward()
        outs.append((out.loss.detach(), h.grad, hm.grad, w.grad))
    assert outs[1][0].dtype == torch.float32
    for a, b in zip(*outs):
        torch.testing.assert_close(b.to(F64), a, rtol=1e-4, atol=1e-5)


def test_exact_gradient_is_the_expected_sampled_gradient_through_the_kernels():
    # one position: sum_y pi(y) grad[-gamma k3(y)] (sampled, rollout view = current masked
    # distribution) equals grad[-gamma KL(pi_masked || pi)] from the two-view kernel
    g = torch.Generator().manual_seed(4)
    h = torch.randn(1, 1, H, generator=g, dtype=F64)
    hm = torch.randn(1, 1, H, generator=g, dtype=F64)
    w = torch.randn(V, H, generator=g, dtype=F64) * 0.25
    one, zero_adv = torch.ones(1, 1), torch.zeros(1, dtype=F64)
    logp_pi = torch.log_softmax((h @ w.T).view(V), -1)
    logp_masked = torch.log_softmax((hm @ w.T).view(V), -1)
    # the identity holds for the unclamped k3: keep exp(d) - d - 1 below the official clamp of 10
    assert (logp_masked - logp_pi).max() < 2.5
    sampled = PAPOLoss(PAPOConfig(gamma=1.0, eta_full=0.0, eta_masked=0.0), backend="torch")
    exp_h, exp_w = torch.zeros_like(h), torch.zeros_like(w)
    for y in range(V):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = sampled(hh, ww, torch.tensor([[y]]), one, zero_adv, masked_logp=logp_masked[y].view(1, 1),
                      num_micro_batches=1)
        out.loss.backward()
        exp_h += logp_pi[y].exp() * hh.grad
        exp_w += logp_pi[y].exp() * ww.grad
    exact = PAPOLoss(PAPOConfig(estimator="exact", masked_view="current_no_grad", gamma=1.0, eta_full=0.0,
                                eta_masked=0.0), backend="torch")
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    exact(hh, ww, torch.tensor([[0]]), one, zero_adv, masked_hidden=hm, num_micro_batches=1).loss.backward()
    torch.testing.assert_close(hh.grad, exp_h, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ww.grad, exp_w, rtol=1e-9, atol=1e-12)


def test_global_micro_batches_accumulate_to_the_full_batch():
    cfg = PAPOConfig(estimator="exact", masked_view="live", loss_scale="global")
    x = _inputs(5)
    counts = dict(num_valid_tokens=int(LENGTHS.sum()))
    module = PAPOLoss(cfg, backend="torch")

    def run(rows):
        h, hm, w = (x[k].clone().requires_grad_(True) for k in ("h", "hm", "w"))
        out = module(h[rows], w, x["ids"][rows], x["mask"][rows], x["adv"][rows], masked_hidden=hm[rows],
                     **counts)
        out.loss.backward()
        return out.loss.detach(), h.grad, hm.grad, w.grad

    full = run(slice(0, 3))
    parts = [run(slice(0, 1)), run(slice(1, 3))]
    for i in range(4):
        torch.testing.assert_close(parts[0][i] + parts[1][i], full[i], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("view", ["rollout_no_grad", "live"])
def test_all_masked_gives_zero_loss_and_zero_gradient(view):
    cfg = PAPOConfig(estimator="exact" if view == "live" else "sampled", masked_view=view)
    x = _inputs()
    h, hm, w = (x[k].clone().requires_grad_(True) for k in ("h", "hm", "w"))
    if view == "rollout_no_grad":
        kw = dict(masked_logp=torch.zeros(B, T, dtype=F64))
    else:
        kw = dict(masked_hidden=hm)
    module = PAPOLoss(cfg, backend="torch")
    out = module(h, w, x["ids"], torch.zeros(B, T), x["adv"], num_micro_batches=1, **kw)
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert h.grad.eq(0).all() and w.grad.eq(0).all()
    if view == "live":
        assert hm.grad.eq(0).all()
    assert all(torch.isfinite(v) for v in out.metrics.values())


@pytest.mark.parametrize(
    "cfg, overrides, exc, match",
    [
        (dict(), dict(masked_logp=None), ValueError, "masked_logp"),
        (dict(), dict(masked_hidden="hm"), ValueError, "masked_hidden"),
        (dict(estimator="exact", masked_view="live"), dict(masked_logp=None), ValueError, "masked_hidden"),
        (dict(estimator="exact", masked_view="live"), dict(masked_logp=None, masked_hidden="hm_nograd"),
         ValueError, "masked_hidden"),
        (dict(masked_view="live"), dict(masked_hidden="hm"), ValueError, "masked_logp"),
        (dict(), dict(ids=torch.zeros(B, T + 1, dtype=torch.long)), ValueError, "completion_ids"),
        (dict(), dict(ids=torch.zeros(B, T)), TypeError, "completion_ids"),
        (dict(), dict(mask=torch.full((B, T), 3)), ValueError, "completion_mask"),
        (dict(), dict(adv=torch.zeros(B + 1, dtype=F64)), ValueError, "advantages"),
        (dict(), dict(old_logp=torch.zeros(B, T + 1, dtype=F64)), ValueError, "old_logp"),
        (dict(), dict(w=torch.zeros(V, H + 1, dtype=F64)), ValueError, "lm_head_weight"),
        (dict(), dict(h=torch.zeros(B * T, H, dtype=F64)), ValueError, "hidden"),
        (dict(beta=0.1), dict(), ValueError, "ref_logp"),
        (dict(loss_scale="global"), dict(), ValueError, "num_valid_tokens"),
    ],
)
def test_bad_input(cfg, overrides, exc, match):
    x = _inputs()
    h = x["h"].clone().requires_grad_(True)
    args = dict(h=h, w=x["w"], ids=x["ids"], mask=x["mask"], adv=x["adv"],
                masked_logp=torch.zeros(B, T, dtype=F64), masked_hidden=None, old_logp=None)
    args.update(overrides)
    if args["masked_hidden"] == "hm":
        args["masked_hidden"] = x["hm"].clone().requires_grad_(True)
    elif args["masked_hidden"] == "hm_nograd":
        args["masked_hidden"] = x["hm"]
    module = PAPOLoss(PAPOConfig(**cfg), backend="torch")
    with pytest.raises(exc, match=match):
        module(args["h"], args["w"], args["ids"], args["mask"], args["adv"], masked_logp=args["masked_logp"],
               masked_hidden=args["masked_hidden"], old_logp=args["old_logp"], num_micro_batches=1)
