"""papo_kernels.vocab_parallel on 2 and 3 gloo ranks (CPU) equals the unsharded calls.

Each rank holds a contiguous, unequal block of the head's rows; the 3-rank split has a shard that
holds none of the targets, and some rows are ignored. Every rank checks its full-vocabulary
statistics, the loss and metrics of the fused calls, dh (summed over shards) and its own rows of
dW against the unsharded papo_kernels calls on the full head, in float64.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import papo_kernels as pk
from train.distributed import free_port

pytestmark = pytest.mark.distributed

VOCAB, HID, B, T = 37, 16, 4, 6
SHARDS = {2: [25, 12], 3: [20, 12, 5]}
TOL = dict(rtol=1e-9, atol=1e-10)


def _inputs():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(VOCAB, HID, generator=g, dtype=torch.float64)
    h_a = torch.randn(B, T, HID, generator=g, dtype=torch.float64) * 2
    h_b = h_a + 0.7 * torch.randn(B, T, HID, generator=g, dtype=torch.float64)
    # targets in [0, 32): rows of the last 3-rank shard (32..36) are never a target
    targets = torch.randint(0, 32, (B, T), generator=g)
    targets[0, :2] = 21  # the middle shard owns a few
    targets[1, 3] = -100
    targets[3, 5] = -100
    coefs = torch.randn(6, B, T, generator=g, dtype=torch.float64)
    return weight, h_a, h_b, targets, coefs


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _weighted(stats, coefs):
    return sum((c * s).sum() for c, s in zip(coefs, stats))


def _loss_fn(stats, index):
    # a PAPO-like per-token loss using every statistic, summed over tokens
    per_token = -stats.logp_a * 0.5 + 0.01 * stats.entropy_a - 0.02 * stats.kl_ba + 0.03 * stats.entropy_b \
        + 0.1 * stats.kl_ab * stats.logp_b.exp()
    return per_token.sum(), {"kl": stats.kl_ab.detach().sum(), "n": float(index.numel())}


def _token_loss_fn(stats, index):
    return (stats.logp.exp() * 0.3 - 0.05 * stats.entropy).sum(), {"h": stats.entropy.detach().sum()}


def _check_all(rank: int, world: int) -> None:
    from papo_kernels import vocab_parallel as vp

    weight, h_a, h_b, targets, coefs = _inputs()
    sizes = SHARDS[world]
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    opts = dict(backend="torch")

    def close(a, b, what):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"rank {rank}/{world} {what}: {m}")

    # token_stats: values and gradients
    w_full, h_full = _leaves(weight, h_a)
    ref = pk.token_stats(h_full, w_full, targets, **opts)
    _weighted(ref, coefs).backward()
    w_shard, h_sh = _leaves(weight[rows], h_a)
    got = vp.token_stats(h_sh, w_shard, targets, vocab_start=start, **opts)
    _weighted(got, coefs).backward()
    for name, x, y in zip(ref._fields, got, ref):
        close(x, y, f"token_stats.{name}")
    close(h_sh.grad, h_full.grad, "token_stats dh")
    close(w_shard.grad, w_full.grad[rows], "token_stats dW shard")

    # two_view_stats with a live and with a constant masked view
    for live_b in (True, False):
        w_full, ha_full, hb_full = _leaves(weight, h_a, h_b)
        hb_full.requires_grad_(live_b)
        ref = pk.two_view_stats(ha_full, hb_full, w_full, targets, **opts)
        _weighted(ref, coefs).backward()
        w_shard, ha_sh, hb_sh = _leaves(weight[rows], h_a, h_b)
        hb_sh.requires_grad_(live_b)
        got = vp.two_view_stats(ha_sh, hb_sh, w_shard, targets, **opts)
        _weighted(got, coefs).backward()
        for name, x, y in zip(ref._fields, got, ref):
            close(x, y, f"two_view_stats(live_b={live_b}).{name}")
        close(ha_sh.grad, ha_full.grad, f"two_view dh_a (live_b={live_b})")
        if live_b:
            close(hb_sh.grad, hb_full.grad, "two_view dh_b")
        close(w_shard.grad, w_full.grad[rows], f"two_view dW shard (live_b={live_b})")

    # fused losses, several chunks of rows
    w_full, ha_full, hb_full = _leaves(weight, h_a, h_b)
    ref_loss, ref_metrics = pk.fused_two_view_loss(ha_full, hb_full, w_full, targets, _loss_fn,
                                                   chunk_tokens=7, **opts)
    ref_loss.backward()
    w_shard, ha_sh, hb_sh = _leaves(weight[rows], h_a, h_b)
    loss, metrics = vp.fused_two_view_loss(ha_sh, hb_sh, w_shard, targets, _loss_fn, chunk_tokens=7, **opts)
    loss.backward()
    close(loss, ref_loss, "fused_two_view_loss loss")
    close(metrics["kl"], ref_metrics["kl"], "fused_two_view_loss metrics")
    assert metrics["n"] == ref_metrics["n"]
    close(ha_sh.grad, ha_full.grad, "fused dh_a")
    close(hb_sh.grad, hb_full.grad, "fused dh_b")
    close(w_shard.grad, w_full.grad[rows], "fused dW shard")

    w_full, h_full = _leaves(weight, h_a)
    ref_loss, _ = pk.fused_token_loss(h_full, w_full, targets, _token_loss_fn, chunk_tokens=10, **opts)
    ref_loss.backward()
    w_shard, h_sh = _leaves(weight[rows], h_a)
    loss, _ = vp.fused_token_loss(h_sh, w_shard, targets, _token_loss_fn, chunk_tokens=10, **opts)
    loss.backward()
    close(loss, ref_loss, "fused_token_loss loss")
    close(h_sh.grad, h_full.grad, "fused_token_loss dh")
    close(w_shard.grad, w_full.grad[rows], "fused_token_loss dW shard")

    # out-of-vocabulary targets are reported against the full vocabulary
    bad = targets.clone()
    bad[2, 2] = VOCAB
    with pytest.raises(ValueError, match=rf"targets must be in \[0, {VOCAB}\)"):
        vp.token_stats(h_a, weight[rows], bad, **opts)


def _worker(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _check_all(rank, world)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_equals_one_rank(world):
    mp.spawn(_worker, args=(world, free_port()), nprocs=world, join=True)


def test_vocab_parallel_needs_a_process_group(monkeypatch):
    from papo_kernels import vocab_parallel as vp

    # another test in this process may have left a default group behind
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    weight, h_a, _, targets, _ = _inputs()
    with pytest.raises(RuntimeError, match="initialized torch.distributed process group"):
        vp.token_stats(h_a, weight, targets)
