"""Fused strategy, phase 2, sweep 2: dW by vocabulary-slice ownership (deterministic).

A program owns BLOCK_V rows of W (a vocabulary slice) and walks all row tiles in order: it
recomputes z = h W^T / T for the tile (tl.dot over H), forms dZ_a (and dZ_b when view b is live)
in fp32, and adds dZ^T h into its own rows of the caller's fp32 accumulator:

    dW[slice] += dZ_a[:, slice]^T h_a  (+ dZ_b[:, slice]^T h_b unless view b is constant)

Only this program writes these rows and the row order is fixed: bitwise reproducible. Ignored
rows load h = 0, so a NaN in an ignored row's hidden state never reaches dW (0 * NaN).

Memory: none beyond the [V, H] fp32 accumulator the caller owns. FLOPs: 4HV per row and view
(recompute + dW); the accumulator round trip costs 8 * BLOCK_V * H bytes per
4 * BLOCK_N * BLOCK_V * H FLOPs per row tile: large BLOCK_N helps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from papo_kernels.kernels import _config
from papo_kernels.kernels._math import (
    UPSTREAM_GRAD_FLAGS,
    dz_tiles,
    load_row_grads,
    load_row_stats,
    logit_tiles,
    row_masks,
)

_HEURISTICS = {
    "TWO_VIEW": lambda args: args["HB"] is not None,
    "LOAD_B": lambda args: args["HB"] is not None and (
        args["G_KAB"] is not None or args["G_KBA"] is not None or args["B_IN_DW"]),
    **UPSTREAM_GRAD_FLAGS,
}


@triton.heuristics(_HEURISTICS)
@triton.jit
def _fused_dw_kernel(
    HA, HB, W, TARGETS,
    LSE_A, ENT_A, LSE_B, ENT_B, KL_AB, KL_BA,
    G_LPA, G_HA, G_LPB, G_HB, G_KAB, G_KBA,
    DW,
    N, V, H, ignore_index, stride_ha_n, stride_hb_n, stride_w_v, stride_dw_v,
    TEMPERATURE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, B_IN_DW: tl.constexpr,
    TWO_VIEW: tl.constexpr, LOAD_B: tl.constexpr,
    HAS_G_LPA: tl.constexpr, HAS_G_HA: tl.constexpr, HAS_G_LPB: tl.constexpr, HAS_G_HB: tl.constexpr,
    HAS_G_KAB: tl.constexpr, HAS_G_KBA: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    cols64 = cols.to(tl.int64)
    for r0 in range(0, N, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        rows64 = rows.to(tl.int64)
        tgt = tl.load(TARGETS + rows, mask=rows < N, other=0)
        in_range, valid, bad = row_masks(tgt, rows, N, V, ignore_index)
        lse_a, ent_a, lse_b, ent_b, kl_ab, kl_ba = load_row_stats(
            rows, in_range, LSE_A, ENT_A, LSE_B, ENT_B, KL_AB, KL_BA, TWO_VIEW)
        g_lpa, g_ha, g_lpb, g_hb, g_kab, g_kba = load_row_grads(
            rows, in_range, valid, G_LPA, G_HA, G_LPB, G_HB, G_KAB, G_KBA,
            HAS_G_LPA, HAS_G_HA, HAS_G_LPB, HAS_G_HB, HAS_G_KAB, HAS_G_KBA)
        # recompute the logit tiles (ignored rows load h = 0)
        za, zb = logit_tiles(HA, HB, W, rows, cols, valid, col_mask, H, stride_ha_n, stride_hb_n,
                             stride_w_v, LOAD_B, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
        if TEMPERATURE != 1.0:
            za = za / TEMPERATURE
            zb = zb / TEMPERATURE
        onehot = cols[None, :] == tgt[:, None]
        keep = valid[:, None] & col_mask[None, :]
        dza, dzb = dz_tiles(za, zb, onehot, keep, bad, lse_a, ent_a, lse_b, ent_b, kl_ab, kl_ba,
                            g_lpa, g_ha, g_lpb, g_hb, g_kab, g_kba, TEMPERATURE,
                            HAS_G_LPA, HAS_G_HA, HAS_G_LPB, HAS_G_HB, HAS_G_KAB, HAS_G_KBA,
                            True, B_IN_DW, LOAD_B)
        # dW[slice] += dZ^T h over H blocks, fp32 accumulation in the program-owned rows
        for d0 in range(0, H, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = (d < H)[None, :]
            h_mask = valid[:, None] & d_ok
            ha = tl.load(HA + rows64[:, None] * stride_ha_n + d[None, :], mask=h_mask, other=0.0)
            if UPCAST:
                ha = ha.to(tl.float32)
            dw_ptr = DW + cols64[:, None] * stride_dw_v + d[None, :]
            dw_mask = col_mask[:, None] & d_ok
            acc = tl.load(dw_ptr, mask=dw_mask, other=0.0)
            acc = tl.dot(tl.trans(dza.to(ha.dtype)), ha, acc, input_precision=DOT_PRECISION)
            if B_IN_DW:
                hb = tl.load(HB + rows64[:, None] * stride_hb_n + d[None, :], mask=h_mask, other=0.0)
                if UPCAST:
                    hb = hb.to(tl.float32)
                acc = tl.dot(tl.trans(dzb.to(hb.dtype)), hb, acc, input_precision=DOT_PRECISION)
            tl.store(dw_ptr, acc, mask=dw_mask)
        tl.debug_barrier()  # the next row tile reads these accumulator rows back


_AUTOTUNED = None


def _autotuned_kernel():
    """`triton.autotune` over a few tiles (PAPO_AUTOTUNE=1); restores the accumulator per trial."""
    global _AUTOTUNED
    if _AUTOTUNED is None:
        configs = [triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd}, num_warps=w, num_stages=s)
                   for bn, bv, bd, w, s in [(64, 64, 64, 8, 2), (128, 64, 64, 8, 2), (128, 32, 64, 4, 2),
                                            (64, 64, 32, 4, 3)]]
        _AUTOTUNED = triton.autotune(configs=configs, key=["N", "V", "H", "TEMPERATURE", "B_IN_DW"],
                                     restore_value=["DW"])(_fused_dw_kernel)
    return _AUTOTUNED


def fused_dw(
    hidden_a: torch.Tensor,
    hidden_b: torch.Tensor | None,
    weight: torch.Tensor,
    targets: torch.Tensor,
    stats: dict[str, torch.Tensor | None],
    grads: dict[str, torch.Tensor | None],
    weight_grad_acc: torch.Tensor,
    *,
    b_in_dw: bool,
    temperature: float,
    ignore_index: int,
    config: _config.LaunchConfig,
) -> None:
    """Add dW into `weight_grad_acc` by vocabulary-slice ownership.

    Args:
        hidden_a, hidden_b, weight, targets, stats, grads: as in `fused_dh`.
        weight_grad_acc: [V, H] float32 accumulator (unit column stride), added into.
        b_in_dw: include dZ_b^T h_b (view b live); False for a constant view b.
        temperature, ignore_index: as in the API.
        config: BLOCK_N rows per step, BLOCK_V vocabulary rows per program, BLOCK_D.
    """
    n, hid = hidden_a.shape
    vocab = weight.shape[0]
    if n == 0:
        return
    assert weight_grad_acc.dtype == torch.float32 and weight_grad_acc.stride(1) == 1
    two = hidden_b is not None
    args = (
        hidden_a, hidden_b, weight, targets,
        stats["lse_a"], stats["entropy_a"], stats.get("lse_b"), stats.get("entropy_b"),
        stats.get("kl_ab"), stats.get("kl_ba"),
        grads.get("logp_a"), grads.get("entropy_a"), grads.get("logp_b"), grads.get("entropy_b"),
        grads.get("kl_ab"), grads.get("kl_ba"),
        weight_grad_acc,
        n, vocab, hid, ignore_index, hidden_a.stride(0), hidden_b.stride(0) if two else 0,
        weight.stride(0), weight_grad_acc.stride(0),
    )
    consts = dict(
        TEMPERATURE=float(temperature),
        UPCAST=_config.upcast_after_load(hidden_a.dtype),
        DOT_PRECISION=_config.dot_precision(hidden_a.dtype),
        B_IN_DW=bool(b_in_dw and two),
    )
    if _config.autotune_enabled():
        _autotuned_kernel()[lambda meta: (triton.cdiv(vocab, meta["BLOCK_V"]),)](*args, **consts)
    else:
        _fused_dw_kernel[(triton.cdiv(vocab, config.BLOCK_V),)](
            *args, **consts, BLOCK_N=config.BLOCK_N, BLOCK_V=config.BLOCK_V, BLOCK_D=config.BLOCK_D,
            **config.launch_kwargs(),
        )
