"""In-register forward statistics: per-row statistics with the logits computed in registers.

Kept (not public) as the candidate no-grad statistics path against the workspace forward, to be
measured on a GPU (benchmarks/GPU_NOTES.md): `PAPO_INREGISTER_FORWARD=1` makes the Triton
backend's `forward_stats` use it. The in-register gradient kernels were retired (measured 104x
the GEMM floor on an H100; an in-register backward recomputes the logits, 8HV against the 6HV
floor, so it is >= 1.33x by construction).

Each program owns BLOCK_N rows and a contiguous range of vocabulary tiles (a "split"); per tile
it accumulates z_a = h_a W^T and z_b = h_b W^T over H with tl.dot, loading each W tile once for
both views, and folds z / T into the online sums

    m, S = sum e^(z-m), U' = sum e^(z-m)(z-m), z_y, X_ab = sum e^(z_a-m_a)(z_a-z_b), X_ba.

With one split the program finishes the statistics itself (lse = m + log S, logp = z_y - lse,
H = log S - U'/S, KL_ab = X_ab/S_a - ((m_a-m_b) + log S_a - log S_b)); with several, partial sums
go to a [10, splits, N] buffer and stats_combine.py merges them (rescaling each split by
e^(m_split - m)). Memory: O(splits * N) floats, no [N, V] or [C, V] buffer. FLOPs: 2HV per row
and view, the GEMM floor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from papo_kernels.kernels import _config
from papo_kernels.kernels._math import logit_tiles, online_update, row_masks, store_row_stats
from papo_kernels.kernels.stats_combine import combine_partials, num_splits, partial_buffer, store_partials


@triton.heuristics({
    "TWO_VIEW": lambda args: args["HB"] is not None,
    "PARTIAL": lambda args: args["PART"] is not None,
})
@triton.jit
def _inregister_stats_kernel(
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
        store_partials(PART, split, rows, in_range, N, SPLITS,
                       m_a, s_a, u_a, zy_a, m_b, s_b, u_b, zy_b, x_ab, x_ba, TWO_VIEW)
    else:
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
            _inregister_stats_kernel)
    return _AUTOTUNED


def inregister_stats(
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
    # two waves, >= 8 tiles of W per split (each split re-reads its rows of h once per tile)
    splits = num_splits(triton.cdiv(n, config.BLOCK_N), triton.cdiv(vocab, config.BLOCK_V), config,
                        hidden_a.device, min_tiles_per_split=8, programs_per_sm=2)
    part = partial_buffer(splits, n, hidden_a.device) if splits > 1 else None
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
        _inregister_stats_kernel[(triton.cdiv(n, config.BLOCK_N), splits)](
            *args, **consts, BLOCK_N=config.BLOCK_N, BLOCK_V=config.BLOCK_V, BLOCK_D=config.BLOCK_D,
            **config.launch_kwargs(),
        )
    if part is not None:
        combine_partials(part, targets, outs, vocab=vocab, ignore_index=ignore_index, two_view=two,
                         config=combine_config)
