"""Fused strategy (the low-memory option): no [N, V] or [C, V] buffer at all.

    forward:  stats_fused           logits in registers over vocabulary tiles, W tile shared by
                                    both views; vocabulary splits merged by a combine kernel
    backward: grad_fused_dh         dh by row-tile ownership (recompute sweep 1)
              grad_fused_dw         dW by vocabulary-slice ownership (recompute sweep 2)
              -- or, with PAPO_FUSED_ATOMICS=1 --
              grad_fused_atomic     dh and dW in one recompute sweep with fp32 atomics
                                    (faster, not deterministic)

The ownership sweeps are bitwise reproducible (10HV FLOPs per row and view with the forward);
the atomic sweep costs 8HV. Extra memory: the dh kernel's per-program scratch (G x 2 x BLOCK_N
x H fp32, independent of N) or, with atomics, an [N, H] fp32 dh accumulator.
"""

from __future__ import annotations

import torch

from papo_kernels.kernels import _config
from papo_kernels.kernels.grad_fused_atomic import fused_atomic
from papo_kernels.kernels.grad_fused_dh import fused_dh
from papo_kernels.kernels.grad_fused_dw import fused_dw
from papo_kernels.kernels.stats_fused import fused_stats


def forward_stats(hidden_a, hidden_b, weight, targets, outs, *, temperature, ignore_index):
    """Phase 1 for all rows into `outs` ([N] float32 each)."""
    n, hid = hidden_a.shape
    vocab = weight.shape[0]
    device, dtype = hidden_a.device, hidden_a.dtype
    fused_stats(
        hidden_a, hidden_b, weight, targets, outs,
        temperature=temperature, ignore_index=ignore_index,
        config=_config.get_config("fused_stats", device, dtype, n, vocab, hid),
        combine_config=_config.get_config("stats_combine", device, dtype, n, vocab, hid),
    )


def backward_grads(hidden_a, hidden_b, weight, targets, stats, grads, dh_a, dh_b, weight_grad_acc, *,
                   b_in_dw, temperature, ignore_index):
    """Phase 2 for all rows (arguments as workspace.backward_grads)."""
    n, hid = hidden_a.shape
    vocab = weight.shape[0]
    if n == 0:
        return
    device, dtype = hidden_a.device, hidden_a.dtype
    opts = dict(temperature=temperature, ignore_index=ignore_index)
    if _config.fused_atomics_enabled():
        acc_a = None if dh_a is None else torch.zeros((n, hid), dtype=torch.float32, device=device)
        acc_b = None if dh_b is None else torch.zeros((n, hid), dtype=torch.float32, device=device)
        fused_atomic(
            hidden_a, hidden_b, weight, targets, stats, grads, acc_a, acc_b, weight_grad_acc,
            b_in_dw=b_in_dw, config=_config.get_config("fused_atomic", device, dtype, n, vocab, hid), **opts,
        )
        for dh, acc in ((dh_a, acc_a), (dh_b, acc_b)):
            if dh is not None:
                dh.copy_(acc)  # cast once
        return
    if dh_a is not None or dh_b is not None:
        fused_dh(
            hidden_a, hidden_b, weight, targets, stats, grads, dh_a, dh_b,
            config=_config.get_config("fused_dh", device, dtype, n, vocab, hid), **opts,
        )
    if weight_grad_acc is not None:
        fused_dw(
            hidden_a, hidden_b, weight, targets, stats, grads, weight_grad_acc,
            b_in_dw=b_in_dw, config=_config.get_config("fused_dw", device, dtype, n, vocab, hid), **opts,
        )
