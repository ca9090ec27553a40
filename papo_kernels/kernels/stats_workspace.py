"""Workspace strategy, phase-1 epilogue: per-row statistics from a materialized logit chunk.

The caller holds the GEMM output Z = [h_a; h_b] W^T of one chunk of C rows in a bounded fp32
workspace ([2C, V], never [N, V]); this kernel streams each row pair over vocabulary tiles:

    online (m, S = sum e^(z-m), U' = sum e^(z-m)(z-m)), X_ab = sum e^(z_a-m_a)(z_a-z_b), X_ba, z_y
    -> logp = z_y - lse, H = log S - U'/S, KL_ab = X_ab/S_a - ((m_a-m_b) + log S_a - log S_b)

with z = Z / T in fp32. It is memory-bound: one read of the workspace, O(C) writes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from papo_kernels.kernels import _config
from papo_kernels.kernels._math import online_update, row_masks, store_row_stats


@triton.heuristics({"TWO_VIEW": lambda args: args["ZB"] is not None})
@triton.jit
def _workspace_stats_kernel(
    ZA, ZB, TARGETS,
    LOGP_A, ENT_A, LSE_A, LOGP_B, ENT_B, LSE_B, KL_AB, KL_BA,
    N, V, ignore_index, stride_za_n, stride_zb_n,
    TEMPERATURE: tl.constexpr, TWO_VIEW: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tgt = tl.load(TARGETS + rows, mask=rows < N, other=0)
    in_range, valid, bad = row_masks(tgt, rows, N, V, ignore_index)
    rows64 = rows.to(tl.int64)  # 64-bit offsets: C * V exceeds 2^31 at real shapes
    m_a = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s_a = tl.zeros((BLOCK_N,), tl.float32)
    u_a = tl.zeros((BLOCK_N,), tl.float32)
    zy_a = tl.zeros((BLOCK_N,), tl.float32)
    m_b = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s_b = tl.zeros((BLOCK_N,), tl.float32)
    u_b = tl.zeros((BLOCK_N,), tl.float32)
    zy_b = tl.zeros((BLOCK_N,), tl.float32)
    x_ab = tl.zeros((BLOCK_N,), tl.float32)
    x_ba = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = (cols < V)[None, :]
        mask = in_range[:, None] & col_ok
        onehot = cols[None, :] == tgt[:, None]
        za = tl.load(ZA + rows64[:, None] * stride_za_n + cols[None, :], mask=mask, other=0.0)
        if TEMPERATURE != 1.0:
            za = za / TEMPERATURE
        # online LSE and shifted entropy sum over vocabulary tiles
        m_a, s_a, u_a, scale_a, e_a = online_update(za, col_ok, m_a, s_a, u_a)
        zy_a += tl.sum(tl.where(onehot, za, 0.0), axis=1)
        if TWO_VIEW:
            zb = tl.load(ZB + rows64[:, None] * stride_zb_n + cols[None, :], mask=mask, other=0.0)
            if TEMPERATURE != 1.0:
                zb = zb / TEMPERATURE
            m_b, s_b, u_b, scale_b, e_b = online_update(zb, col_ok, m_b, s_b, u_b)
            zy_b += tl.sum(tl.where(onehot, zb, 0.0), axis=1)
            # KL sums against each view's own running max
            diff = tl.where(col_ok, za - zb, 0.0)
            x_ab = scale_a * x_ab + tl.sum(e_a * diff, axis=1)
            x_ba = scale_b * x_ba - tl.sum(e_b * diff, axis=1)
    store_row_stats(rows, in_range, valid, bad, m_a, s_a, u_a, zy_a, m_b, s_b, u_b, zy_b, x_ab, x_ba,
                    LOGP_A, ENT_A, LSE_A, LOGP_B, ENT_B, LSE_B, KL_AB, KL_BA, TWO_VIEW)


def workspace_stats(
    z_a: torch.Tensor,
    z_b: torch.Tensor | None,
    targets: torch.Tensor,
    outs: dict[str, torch.Tensor],
    *,
    temperature: float,
    ignore_index: int,
    config: _config.LaunchConfig,
) -> None:
    """Phase-1 statistics of one chunk from its fp32 logits.

    Args:
        z_a, z_b: [C, V] float32 raw logits h W^T (before / T), unit column stride; z_b None for
            one view.
        targets: [C] integer token ids.
        outs: [C] float32 outputs, written in place: logp_a, entropy_a, lse_a and, with z_b,
            logp_b, entropy_b, lse_b, kl_ab, kl_ba.
        temperature: T (a compile-time constant of the kernel).
        ignore_index: rows with this target get exactly 0.
        config: BLOCK_N rows x BLOCK_V columns per tile.
    """
    n, vocab = z_a.shape
    if n == 0:
        return
    assert z_a.dtype == torch.float32 and z_a.stride(1) == 1
    two = z_b is not None
    _workspace_stats_kernel[(triton.cdiv(n, config.BLOCK_N),)](
        z_a, z_b, targets,
        outs["logp_a"], outs["entropy_a"], outs["lse_a"],
        outs.get("logp_b"), outs.get("entropy_b"), outs.get("lse_b"), outs.get("kl_ab"), outs.get("kl_ba"),
        n, vocab, ignore_index, z_a.stride(0), z_b.stride(0) if two else 0,
        TEMPERATURE=float(temperature), BLOCK_N=config.BLOCK_N, BLOCK_V=config.BLOCK_V,
        **config.launch_kwargs(),
    )
