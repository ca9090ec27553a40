"""Fused strategy, phase 1: per-row statistics with the logits computed in registers.

Each program owns BLOCK_N rows and a contiguous range of vocabulary tiles (a "split"); per tile
it accumulates z_a = h_a W^T and z_b = h_b W^T over H with tl.dot, loading each W tile once for
both views, and folds z / T into the online sums

    m, S = sum e^(z-m), U' = sum e^(z-m)(z-m), z_y, X_ab = sum e^(z_a-m_a)(z_a-z_b), X_ba.

With one split the program finishes the statistics itself (lse = m + log S, logp = z_y - lse,
H = log S - U'/S, KL_ab = X_ab/S_a - ((m_a-m_b) + log S_a - log S_b)); with several, partial sums
go to a [10, splits, N] buffer and `_stats_combine_kernel` merges them (rescaling each split by
e^(m_split - m)). Memory: O(splits * N) floats, no [N, V] or [C, V] buffer. FLOPs: 2HV per row
and view, the GEMM floor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from papo_kernels.kernels import _config
from papo_kernels.kernels._math import (
    logit_tiles,
    merge_partial,
    online_update,
    row_masks,
    store_row_stats,
)

# Partial sums per split, rows of the [NUM_PARTIALS, splits, N] buffer in this order:
# m_a, S_a, U'_a, z_y_a, m_b, S_b, U'_b, z_y_b, X_ab, X_ba.
NUM_PARTIALS = 10


@triton.heuristics({
    "TWO_VIEW": lambda args: args["HB"] is not None,
    "PARTIAL": lambda args: args["PART"] is not None,
})
@triton.jit
def _fused_stats_kernel(
    HA, HB, W, TARGETS, PART,
    LOGP_A, ENT_A, LSE_A, LOGP_B, ENT_B, LSE_B, KL_AB, KL_BA,
    N, V, H, ignore_index, SPLITS, stride_ha_n, stride_hb_n, stride_w_v,
    TEMPERATURE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TWO_VIEW: tl.constexpr, PARTIAL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    tgt = tl.load(TARGETS + rows, mask=rows < N, other=0)
    in_range, valid, bad = row_masks(tgt, rows, N, V, ignore_index)
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
    # this split's vocabulary tiles (split 0 is never empty)
    n_tiles = tl.cdiv(V, BLOCK_V)
    per_split = tl.cdiv(n_tiles, SPLITS)
    t_end = tl.minimum(split * per_split + per_split, n_tiles)
    for t in range(split * per_split, t_end):
        cols = t * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        # logits of both views from one W tile, fp32 accumulation over H
        za, zb = logit_tiles(HA, HB, W, rows, cols, in_range, col_mask, H, stride_ha_n, stride_hb_n,
                             stride_w_v, TWO_VIEW, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
        if TEMPERATURE != 1.0:
            za = za / TEMPERATURE
            zb = zb / TEMPERATURE
        col_ok = col_mask[None, :]
        onehot = cols[None, :] == tgt[:, None]
        # online LSE and shifted entropy sum over vocabulary tiles
        m_a, s_a, u_a, scale_a, e_a = online_update(za, col_ok, m_a, s_a, u_a)
        zy_a += tl.sum(tl.where(onehot, za, 0.0), axis=1)
        if TWO_VIEW:
            m_b, s_b, u_b, scale_b, e_b = online_update(zb, col_ok, m_b, s_b, u_b)
            zy_b += tl.sum(tl.where(onehot, zb, 0.0), axis=1)
            diff = tl.where(col_ok, za - zb, 0.0)
            x_ab = scale_a * x_ab + tl.sum(e_a * diff, axis=1)
            x_ba = scale_b * x_ba - tl.sum(e_b * diff, axis=1)
    if PARTIAL:
        # partial sums of this split: [stat, split, row]
        base = PART + split * N + rows
        stride = SPLITS * N
        tl.store(base + 0 * stride, m_a, mask=in_range)
        tl.store(base + 1 * stride, s_a, mask=in_range)
        tl.store(base + 2 * stride, u_a, mask=in_range)
        tl.store(base + 3 * stride, zy_a, mask=in_range)
        if TWO_VIEW:
            tl.store(base + 4 * stride, m_b, mask=in_range)
            tl.store(base + 5 * stride, s_b, mask=in_range)
            tl.store(base + 6 * stride, u_b, mask=in_range)
            tl.store(base + 7 * stride, zy_b, mask=in_range)
            tl.store(base + 8 * stride, x_ab, mask=in_range)
            tl.store(base + 9 * stride, x_ba, mask=in_range)
    else:
        store_row_stats(rows, in_range, valid, bad, m_a, s_a, u_a, zy_a, m_b, s_b, u_b, zy_b, x_ab, x_ba,
                        LOGP_A, ENT_A, LSE_A, LOGP_B, ENT_B, LSE_B, KL_AB, KL_BA, TWO_VIEW)


@triton.jit
def _load_partial(PART, stat, split, rows, in_range, N, SPLITS):
    return tl.load(PART + stat * SPLITS * N + split * N + rows, mask=in_range, other=0.0)


@triton.jit
def _stats_combine_kernel(
    PART, TARGETS,
    LOGP_A, ENT_A, LSE_A, LOGP_B, ENT_B, LSE_B, KL_AB, KL_BA,
    N, V, ignore_index, SPLITS,
    TWO_VIEW: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tgt = tl.load(TARGETS + rows, mask=rows < N, other=0)
    in_range, valid, bad = row_masks(tgt, rows, N, V, ignore_index)
    # start from split 0 (never empty), then merge the others with their max rescaled
    m_a = _load_partial(PART, 0, 0, rows, in_range, N, SPLITS)
    s_a = _load_partial(PART, 1, 0, rows, in_range, N, SPLITS)
    u_a = _load_partial(PART, 2, 0, rows, in_range, N, SPLITS)
    zy_a = _load_partial(PART, 3, 0, rows, in_range, N, SPLITS)
    m_b = _load_partial(PART, 4, 0, rows, in_range, N, SPLITS)
    s_b = _load_partial(PART, 5, 0, rows, in_range, N, SPLITS)
    u_b = _load_partial(PART, 6, 0, rows, in_range, N, SPLITS)
    zy_b = _load_partial(PART, 7, 0, rows, in_range, N, SPLITS)
    x_ab = _load_partial(PART, 8, 0, rows, in_range, N, SPLITS)
    x_ba = _load_partial(PART, 9, 0, rows, in_range, N, SPLITS)
    for sp in range(1, SPLITS):
        m_a, s_a, u_a, sc_a, scp_a = merge_partial(
            m_a, s_a, u_a, _load_partial(PART, 0, sp, rows, in_range, N, SPLITS),
            _load_partial(PART, 1, sp, rows, in_range, N, SPLITS),
            _load_partial(PART, 2, sp, rows, in_range, N, SPLITS))
        zy_a += _load_partial(PART, 3, sp, rows, in_range, N, SPLITS)
        if TWO_VIEW:
            m_b, s_b, u_b, sc_b, scp_b = merge_partial(
                m_b, s_b, u_b, _load_partial(PART, 4, sp, rows, in_range, N, SPLITS),
                _load_partial(PART, 5, sp, rows, in_range, N, SPLITS),
                _load_partial(PART, 6, sp, rows, in_range, N, SPLITS))
            zy_b += _load_partial(PART, 7, sp, rows, in_range, N, SPLITS)
            x_ab = sc_a * x_ab + scp_a * _load_partial(PART, 8, sp, rows, in_range, N, SPLITS)
            x_ba = sc_b * x_ba + scp_b * _load_partial(PART, 9, sp, rows, in_range, N, SPLITS)
    store_row_stats(rows, in_range, valid, bad, m_a, s_a, u_a, zy_a, m_b, s_b, u_b, zy_b, x_ab, x_ba,
                    LOGP_A, ENT_A, LSE_A, LOGP_B, ENT_B, LSE_B, KL_AB, KL_BA, TWO_VIEW)


_AUTOTUNED = None


def _autotuned_kernel():
    """`triton.autotune` over a few GEMM-like tiles (PAPO_AUTOTUNE=1; built on first use)."""
    global _AUTOTUNED
    if _AUTOTUNED is None:
        configs = [
            triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd}, num_warps=w, num_stages=s)
            for bn, bv, bd, w, s in [(64, 128, 64, 8, 3), (128, 128, 64, 8, 3), (64, 256, 32, 8, 3),
                                     (128, 64, 64, 4, 4), (64, 64, 64, 4, 4)]
        ]
        _AUTOTUNED = triton.autotune(configs=configs, key=["V", "H", "SPLITS", "TEMPERATURE"])(
            _fused_stats_kernel)
    return _AUTOTUNED


def _num_splits(n: int, vocab: int, config: _config.LaunchConfig, device: torch.device) -> int:
    """Vocabulary splits per row tile: enough programs for two waves, >= 8 tiles per split.

    An explicit `config.splits` is only capped at the tile count, so trailing splits may be
    empty (the kernels handle that; autotuned BLOCK_V can cause it too).
    """
    n_tiles = triton.cdiv(vocab, config.BLOCK_V)
    if config.splits:
        return max(1, min(config.splits, n_tiles))
    if _config.is_interpreting():
        return 1
    row_tiles = triton.cdiv(n, config.BLOCK_N)
    sms = _config.sm_count(device)
    if row_tiles >= sms:
        return 1
    splits = max(1, min(max(1, n_tiles // 8), triton.cdiv(2 * sms, row_tiles)))
    return triton.cdiv(n_tiles, triton.cdiv(n_tiles, splits))  # no empty split


def fused_stats(
    hidden_a: torch.Tensor,
    hidden_b: torch.Tensor | None,
    weight: torch.Tensor,
    targets: torch.Tensor,
    outs: dict[str, torch.Tensor],
    *,
    temperature: float,
    ignore_index: int,
    config: _config.LaunchConfig,
    combine_config: _config.LaunchConfig,
) -> None:
    """Phase-1 statistics of all rows without any logit buffer.

    Args:
        hidden_a, hidden_b: [N, H] float16/bfloat16/float32 with unit column stride (hidden_b None
            for one view).
        weight: [V, H] same dtype, unit column stride.
        targets: [N] integer ids.
        outs: [N] float32 outputs written in place (see `workspace_stats`).
        temperature, ignore_index: as in the API.
        config: BLOCK_N x BLOCK_V logit tile, BLOCK_D per dot step, `splits` (0: heuristic).
        combine_config: BLOCK_N of the split-merging kernel.
    """
    n, hid = hidden_a.shape
    vocab = weight.shape[0]
    if n == 0:
        return
    two = hidden_b is not None
    splits = _num_splits(n, vocab, config, hidden_a.device)
    part = None
    if splits > 1:
        part = torch.empty((NUM_PARTIALS, splits, n), dtype=torch.float32, device=hidden_a.device)
    final = {k: (None if part is not None else outs.get(k)) for k in
             ("logp_a", "entropy_a", "lse_a", "logp_b", "entropy_b", "lse_b", "kl_ab", "kl_ba")}
    args = (
        hidden_a, hidden_b, weight, targets, part,
        final["logp_a"], final["entropy_a"], final["lse_a"], final["logp_b"], final["entropy_b"],
        final["lse_b"], final["kl_ab"], final["kl_ba"],
        n, vocab, hid, ignore_index, splits, hidden_a.stride(0), hidden_b.stride(0) if two else 0,
        weight.stride(0),
    )
    consts = dict(
        TEMPERATURE=float(temperature),
        UPCAST=_config.upcast_after_load(hidden_a.dtype),
        DOT_PRECISION=_config.dot_precision(hidden_a.dtype),
    )
    if _config.autotune_enabled():
        _autotuned_kernel()[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)](*args, **consts)
    else:
        _fused_stats_kernel[(triton.cdiv(n, config.BLOCK_N), splits)](
            *args, **consts, BLOCK_N=config.BLOCK_N, BLOCK_V=config.BLOCK_V, BLOCK_D=config.BLOCK_D,
            **config.launch_kwargs(),
        )
    if part is not None:
        _stats_combine_kernel[(triton.cdiv(n, combine_config.BLOCK_N),)](
            part, targets,
            outs["logp_a"], outs["entropy_a"], outs["lse_a"],
            outs.get("logp_b"), outs.get("entropy_b"), outs.get("lse_b"), outs.get("kl_ab"),
            outs.get("kl_ba"), n, vocab, ignore_index, splits,
            TWO_VIEW=two, BLOCK_N=combine_config.BLOCK_N, **combine_config.launch_kwargs(),
        )
