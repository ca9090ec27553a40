"""Workspace strategy, phase-1 epilogue: per-row statistics from a materialized logit chunk.

The caller holds the GEMM output Z = [h_a; h_b] W^T of one chunk of C rows in a bounded fp32
workspace ([2C, V], never [N, V]); this kernel streams each row pair over vocabulary tiles:

    online (m, S = sum e^(z-m), U' = sum e^(z-m)(z-m)), X_ab = sum e^(z_a-m_a)(z_a-z_b), X_ba, z_y
    -> logp = z_y - lse, H = log S - U'/S, KL_ab = X_ab/S_a - ((m_a-m_b) + log S_a - log S_b)

with z = Z / T in fp32. It is memory-bound: one read of the workspace, O(C) writes. A chunk has
only a few hundred rows, so the vocabulary is split (grid: row tiles x splits) and the splits'
partial sums are merged by stats_combine.py.

Lane sums (the default, `LANE_SUMS`): per tile only the row max is reduced across threads; S,
U', X_ab and X_ba are accumulated per element lane (rescaled by the row's e^(m - m')) and summed
across lanes once at the end, and z_y is one load per row. The per-tile form (`LANE_SUMS=False`,
the "v1" variant, as measured on 2026-11-25) reduces ~10 sums per tile across the program's
warps: ~40 barriers per tile in its sm_90a SASS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from papo_kernels.kernels import _config
from papo_kernels.kernels._math import online_update, row_masks, store_row_stats
from papo_kernels.kernels.stats_combine import (
    NUM_PARTIALS,
    combine_partials,
    num_splits,
    partial_buffer,
    store_partials,
)


@triton.heuristics({
    "TWO_VIEW": lambda args: args["ZB"] is not None,
    "PARTIAL": lambda args: args["PART"] is not None,
})
@triton.jit
def _workspace_stats_kernel(
    ZA, ZB, TARGETS, PART,
    LOGP_A, ENT_A, LSE_A, LOGP_B, ENT_B, LSE_B, KL_AB, KL_BA,
    N, V, ignore_index, SPLITS, stride_za_n, stride_zb_n,
    TEMPERATURE: tl.constexpr, TWO_VIEW: tl.constexpr, PARTIAL: tl.constexpr, LANE_SUMS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
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
    # per-lane accumulators of S, U', X_ab, X_ba (LANE_SUMS), against the row's running max
    ls_a = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    lu_a = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    ls_b = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    lu_b = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    lx_ab = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    lx_ba = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    # this split's vocabulary tiles (split 0 is never empty)
    n_tiles = tl.cdiv(V, BLOCK_V)
    per_split = tl.cdiv(n_tiles, SPLITS)
    t_begin = split * per_split
    t_end = tl.minimum(t_begin + per_split, n_tiles)
    for t in range(t_begin, t_end):
        cols = t * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = (cols < V)[None, :]
        mask = in_range[:, None] & col_ok
        za = tl.load(ZA + rows64[:, None] * stride_za_n + cols[None, :], mask=mask, other=0.0)
        if TEMPERATURE != 1.0:
            za = za / TEMPERATURE
        zb = za
        if TWO_VIEW:
            zb = tl.load(ZB + rows64[:, None] * stride_zb_n + cols[None, :], mask=mask, other=0.0)
            if TEMPERATURE != 1.0:
                zb = zb / TEMPERATURE
        if LANE_SUMS:
            m_a, scale_a, e_a, ls_a, lu_a = _lane_fold(za, col_ok, m_a, ls_a, lu_a)
            if TWO_VIEW:
                m_b, scale_b, e_b, ls_b, lu_b = _lane_fold(zb, col_ok, m_b, ls_b, lu_b)
                diff = tl.where(col_ok, za - zb, 0.0)
                lx_ab = scale_a[:, None] * lx_ab + e_a * diff
                lx_ba = scale_b[:, None] * lx_ba - e_b * diff
        else:
            onehot = cols[None, :] == tgt[:, None]
            # online LSE and shifted entropy sum over vocabulary tiles
            m_a, s_a, u_a, scale_a, e_a = online_update(za, col_ok, m_a, s_a, u_a)
            zy_a += tl.sum(tl.where(onehot, za, 0.0), axis=1)
            if TWO_VIEW:
                m_b, s_b, u_b, scale_b, e_b = online_update(zb, col_ok, m_b, s_b, u_b)
                zy_b += tl.sum(tl.where(onehot, zb, 0.0), axis=1)
                # KL sums against each view's own running max
                diff = tl.where(col_ok, za - zb, 0.0)
                x_ab = scale_a * x_ab + tl.sum(e_a * diff, axis=1)
                x_ba = scale_b * x_ba - tl.sum(e_b * diff, axis=1)
    if LANE_SUMS:
        s_a = tl.sum(ls_a, axis=1)
        u_a = tl.sum(lu_a, axis=1)
        # the target logit: one load per row, by the split whose columns hold it
        has_y = in_range & valid & (~bad) & (tgt >= t_begin * BLOCK_V) & (tgt < t_end * BLOCK_V)
        zy_a = tl.load(ZA + rows64 * stride_za_n + tgt, mask=has_y, other=0.0)
        if TEMPERATURE != 1.0:
            zy_a = zy_a / TEMPERATURE
        if TWO_VIEW:
            s_b = tl.sum(ls_b, axis=1)
            u_b = tl.sum(lu_b, axis=1)
            x_ab = tl.sum(lx_ab, axis=1)
            x_ba = tl.sum(lx_ba, axis=1)
            zy_b = tl.load(ZB + rows64 * stride_zb_n + tgt, mask=has_y, other=0.0)
            if TEMPERATURE != 1.0:
                zy_b = zy_b / TEMPERATURE
    if PARTIAL:
        store_partials(PART, split, rows, in_range, N, SPLITS,
                       m_a, s_a, u_a, zy_a, m_b, s_b, u_b, zy_b, x_ab, x_ba, TWO_VIEW)
    else:
        store_row_stats(rows, in_range, valid, bad, m_a, s_a, u_a, zy_a, m_b, s_b, u_b, zy_b, x_ab, x_ba,
                        LOGP_A, ENT_A, LSE_A, LOGP_B, ENT_B, LSE_B, KL_AB, KL_BA, TWO_VIEW)


@triton.jit
def _lane_fold(z, col_ok, m, ls, lu):
    """Fold a tile into per-lane sums against the row's running max m (one cross-thread
    reduction, the max): returns (m', e^(m - m') per row, e^(z - m'), S', U') with the shifted
    U' <- e^(m-m') (U' + (m-m') S) + e (z - m'), guarding 0 * -inf on the first tile."""
    m_new = tl.maximum(m, tl.max(tl.where(col_ok, z, float("-inf")), axis=1))
    shift = m - m_new  # -inf on the first tile
    scale = tl.exp(shift)
    zc = z - m_new[:, None]
    e = tl.where(col_ok, tl.exp(zc), 0.0)
    moved = tl.where(ls > 0, shift[:, None] * ls, 0.0)
    lu = scale[:, None] * (lu + moved) + tl.where(col_ok, e * zc, 0.0)
    ls = scale[:, None] * ls + e
    return m_new, scale, e, ls, lu


def stats_splits(n: int, vocab: int, config: _config.LaunchConfig, device: torch.device) -> int:
    """Vocabulary splits of a chunk of `n` rows (~8 programs per multiprocessor, >= 4 tiles each)."""
    return num_splits(triton.cdiv(n, config.BLOCK_N), triton.cdiv(vocab, config.BLOCK_V), config, device,
                      min_tiles_per_split=4, programs_per_sm=8)


def workspace_stats(
    z_a: torch.Tensor,
    z_b: torch.Tensor | None,
    targets: torch.Tensor,
    outs: dict[str, torch.Tensor],
    *,
    temperature: float,
    ignore_index: int,
    config: _config.LaunchConfig,
    combine_config: _config.LaunchConfig,
    part: torch.Tensor | None = None,
    lane_sums: bool = True,
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
        config: BLOCK_N rows x BLOCK_V columns per tile, `splits` (0: `stats_splits`).
        combine_config: BLOCK_N of the split-merging kernel.
        part: a flat fp32 scratch buffer reused across chunks (allocated here when missing or
            smaller than NUM_PARTIALS * splits * C).
        lane_sums: per-lane sums, one cross-thread reduction per tile (False: the "v1" kernel).
    """
    n, vocab = z_a.shape
    if n == 0:
        return
    assert z_a.dtype == torch.float32 and z_a.stride(1) == 1
    two = z_b is not None
    splits = stats_splits(n, vocab, config, z_a.device)
    if splits > 1:
        size = NUM_PARTIALS * splits * n
        if part is None or part.numel() < size:
            part = partial_buffer(splits, n, z_a.device)
        part = part.reshape(-1)[:size].view(NUM_PARTIALS, splits, n)
    else:
        part = None
    final = {k: (None if part is not None else outs.get(k)) for k in
             ("logp_a", "entropy_a", "lse_a", "logp_b", "entropy_b", "lse_b", "kl_ab", "kl_ba")}
    _workspace_stats_kernel[(triton.cdiv(n, config.BLOCK_N), splits)](
        z_a, z_b, targets, part,
        final["logp_a"], final["entropy_a"], final["lse_a"], final["logp_b"], final["entropy_b"],
        final["lse_b"], final["kl_ab"], final["kl_ba"],
        n, vocab, ignore_index, splits, z_a.stride(0), z_b.stride(0) if two else 0,
        TEMPERATURE=float(temperature), LANE_SUMS=bool(lane_sums), BLOCK_N=config.BLOCK_N,
        BLOCK_V=config.BLOCK_V, **config.launch_kwargs(),
    )
    if part is not None:
        combine_partials(part, targets, outs, vocab=vocab, ignore_index=ignore_index, two_view=two,
                         config=combine_config)
