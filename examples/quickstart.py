"""Quickstart: PAPO's per-token statistics and a fused two-view loss without [N x V] logits.

Runs on a CPU in seconds:  python examples/quickstart.py [--tokens N] [--vocab V] [--hidden H]

It builds random hidden states for an original and a masked view, computes log-probs, both
entropies and the exact KLs with `two_view_stats`, checks them against materialized logits,
then trains nothing but shows the gradient-in-forward `fused_two_view_loss` with a GRPO-like
clipped objective plus a perception KL and double entropy, and prints the memory a dense
implementation would have needed for the same call.
"""

from __future__ import annotations

import argparse
import time

import torch

import papo_kernels as pk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="completion tokens N")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size H")
    parser.add_argument("--vocab", type=int, default=32_768 + 37, help="vocabulary size V")
    args = parser.parse_args()
    torch.manual_seed(0)
    n, h, v = args.tokens, args.hidden, args.vocab

    hidden = torch.randn(n, h, requires_grad=True)              # original image view (policy)
    masked_hidden = hidden.detach() + 0.3 * torch.randn(n, h)  # masked image view, detached
    weight = (torch.randn(v, h) / h**0.5).requires_grad_()      # lm_head weight
    targets = torch.randint(0, v, (n,))
    targets[-16:] = -100                                        # padding rows are ignored
    old_logp = torch.full((n,), -float(torch.log(torch.tensor(v))))
    advantages = torch.randn(n)

    t0 = time.perf_counter()
    s = pk.two_view_stats(hidden, masked_hidden, weight, targets)
    print(f"two_view_stats on N={n} H={h} V={v}: {time.perf_counter() - t0:.2f} s")
    with torch.no_grad():  # check a few rows against materialized logits
        rows = torch.arange(8)
        la = (hidden[rows] @ weight.T).log_softmax(-1)
        lb = (masked_hidden[rows] @ weight.T).log_softmax(-1)
        kl_dense = (lb.exp() * (lb - la)).sum(-1)
        print(f"  max |kl_ba - dense| over 8 rows: {(s.kl_ba[rows] - kl_dense).abs().max():.2e}")
        print(f"  mean entropy (full view) {s.entropy_a[:-16].mean():.4f}, "
              f"mean KL(masked||full) {s.kl_ba[:-16].mean():.4f}")

    valid = targets != -100
    num_tokens = valid.sum()

    def loss_fn(stats: pk.TwoViewStats, index: torch.Tensor):
        """PAPO-style per-token loss, as a weighted sum over the chunk's tokens."""
        ratio = torch.exp(stats.logp_a - old_logp[index])
        adv = advantages[index]
        policy = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.3))
        per_token = policy - 0.01 * stats.kl_ba + 0.03 * stats.entropy_a + 0.03 * stats.entropy_b
        weights = valid[index].float() / num_tokens
        return (per_token * weights).sum(), {"kl/perception": (stats.kl_ba * weights).sum().detach()}

    t0 = time.perf_counter()
    loss, metrics = pk.fused_two_view_loss(hidden, masked_hidden, weight, targets, loss_fn)
    loss.backward()
    print(f"fused_two_view_loss fwd+bwd: {time.perf_counter() - t0:.2f} s, loss {loss.item():.5f}, "
          f"kl/perception {metrics['kl/perception'].item():.5f}")
    print(f"  |grad hidden| {hidden.grad.norm():.4e}, |grad weight| {weight.grad.norm():.4e}")
    dense_gb = 2 * n * v * 4 * 3 / 1e9  # two views x fp32 logits, softmax and grad copies
    print(f"  a dense implementation would hold ~{dense_gb:.2f} GB of [N x V] fp32 tensors; "
          f"this one never allocates a [N x V] buffer")


if __name__ == "__main__":
    main()
