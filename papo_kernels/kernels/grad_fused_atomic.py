"""Fused strategy, phase 2, single sweep with fp32 atomics (opt-in, NOT deterministic).

One program per (row tile, vocabulary tile): recompute z = h W^T / T once, form dZ_a, dZ_b in
fp32, and scatter both products with fp32 atomic adds:

    dh[rows]   += dZ W[slice]        dW[slice] += dZ^T h[rows]

The order in which programs add is up to the hardware, so results differ in the last bits from
run to run (enable with PAPO_FUSED_ATOMICS=1; the default fused backward is the two ownership
sweeps, bitwise reproducible). FLOPs: 6HV per row and view instead of 8HV. Memory: an [N, H]
fp32 dh accumulator (dh must be complete before its single cast), no [N, V] buffer.
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
    "NEED_DH_A": lambda args: args["DH_A"] is not None,
    "NEED_DH_B": lambda args: args["DH_B"] is not None,
    "NEED_DW": lambda args: args["DW"] is not None,
    "LOAD_B": lambda args: args["HB"] is not None and (
        args["G_KAB"] is not None or args["G_KBA"] is not None or args["DH_B"] is not None
        or (args["DW"] is not None and args["B_IN_DW"])),
    **UPSTREAM_GRAD_FLAGS,
}


@triton.heuristics(_HEURISTICS)
@triton.jit
def _fused_atomic_kernel(
    HA, HB, W, TARGETS,
    LSE_A, ENT_A, LSE_B, ENT_B, KL_AB, KL_BA,
    G_LPA, G_HA, G_LPB, G_HB, G_KAB, G_KBA,
    DH_A, DH_B, DW,
    N, V, H, ignore_index, stride_ha_n, stride_hb_n, stride_w_v, stride_dw_v,
    TEMPERATURE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, B_IN_DW: tl.constexpr,
    TWO_VIEW: tl.constexpr, LOAD_B: tl.constexpr,
    NEED_DH_A: tl.constexpr, NEED_DH_B: tl.constexpr, NEED_DW: tl.constexpr,
    HAS_G_LPA: tl.constexpr, HAS_G_HA: tl.constexpr, HAS_G_LPB: tl.constexpr, HAS_G_HB: tl.constexpr,
    HAS_G_KAB: tl.constexpr, HAS_G_KBA: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    col_mask = cols < V
    tgt = tl.load(TARGETS + rows, mask=rows < N, other=0)
    in_range, valid, bad = row_masks(tgt, rows, N, V, ignore_index)
    lse_a, ent_a, lse_b, ent_b, kl_ab, kl_ba = load_row_stats(
        rows, in_range, LSE_A, ENT_A, LSE_B, ENT_B, KL_AB, KL_BA, TWO_VIEW)
    g_lpa, g_ha, g_lpb, g_hb, g_kab, g_kba = load_row_grads(
        rows, in_range, valid, G_LPA, G_HA, G_LPB, G_HB, G_KAB, G_KBA,
        HAS_G_LPA, HAS_G_HA, HAS_G_LPB, HAS_G_HB, HAS_G_KAB, HAS_G_KBA)
    # recompute the logit tiles once (ignored rows load h = 0)
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
                        NEED_DH_A or NEED_DW, NEED_DH_B or (NEED_DW and B_IN_DW), LOAD_B)
    # scatter dZ W and dZ^T h with fp32 atomics, one H block at a time
    for d0 in range(0, H, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = (d < H)[None, :]
        if NEED_DH_A or NEED_DH_B:
            w = tl.load(W + cols64[:, None] * stride_w_v + d[None, :], mask=col_mask[:, None] & d_ok,
                        other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            dh_mask = in_range[:, None] & d_ok
            if NEED_DH_A:
                tl.atomic_add(DH_A + rows64[:, None] * H + d[None, :],
                              tl.dot(dza.to(w.dtype), w, input_precision=DOT_PRECISION), mask=dh_mask)
            if NEED_DH_B:
                tl.atomic_add(DH_B + rows64[:, None] * H + d[None, :],
                              tl.dot(dzb.to(w.dtype), w, input_precision=DOT_PRECISION), mask=dh_mask)
        if NEED_DW:
            h_mask = valid[:, None] & d_ok
            ha = tl.load(HA + rows64[:, None] * stride_ha_n + d[None, :], mask=h_mask, other=0.0)
            if UPCAST:
                ha = ha.to(tl.float32)
            part = tl.dot(tl.trans(dza.to(ha.dtype)), ha, input_precision=DOT_PRECISION)
            if B_IN_DW:
                hb = tl.load(HB + rows64[:, None] * stride_hb_n + d[None, :], mask=h_mask, other=0.0)
                if UPCAST:
                    hb = hb.to(tl.float32)
                part = tl.dot(tl.trans(dzb.to(hb.dtype)), hb, part, input_precision=DOT_PRECISION)
            tl.atomic_add(DW + cols64[:, None] * stride_dw_v + d[None, :], part,
                          mask=col_mask[:, None] & d_ok)


_AUTOTUNED = None


def _autotuned_kernel():
    """`triton.autotune` over a few tiles (PAPO_AUTOTUNE=1); accumulators reset/restored per trial."""
    global _AUTOTUNED
    if _AUTOTUNED is None:
        configs = [triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd}, num_warps=w, num_stages=s)
                   for bn, bv, bd, w, s in [(64, 64, 64, 8, 2), (128, 64, 64, 8, 2), (64, 128, 64, 8, 2),
                                            (128, 128, 32, 8, 2)]]
        _AUTOTUNED = triton.autotune(configs=configs, key=["N", "V", "H", "TEMPERATURE", "B_IN_DW"],
                                     reset_to_zero=["DH_A", "DH_B"], restore_value=["DW"])(
            _fused_atomic_kernel)
    return _AUTOTUNED


def fused_atomic(
    hidden_a: torch.Tensor,
    hidden_b: torch.Tensor | None,
    weight: torch.Tensor,
    targets: torch.Tensor,
    stats: dict[str, torch.Tensor | None],
    grads: dict[str, torch.Tensor | None],
    dh_acc_a: torch.Tensor | None,
    dh_acc_b: torch.Tensor | None,
    weight_grad_acc: torch.Tensor | None,
    *,
    b_in_dw: bool,
    temperature: float,
    ignore_index: int,
    config: _config.LaunchConfig,
) -> None:
    """Add dh (into zeroed contiguous [N, H] fp32 accumulators) and dW (into the [V, H] fp32
    accumulator) in one recompute sweep with atomics. Arguments as in `fused_dh` / `fused_dw`."""
    n, hid = hidden_a.shape
    vocab = weight.shape[0]
    if n == 0 or (dh_acc_a is None and dh_acc_b is None and weight_grad_acc is None):
        return
    for acc in (dh_acc_a, dh_acc_b):
        assert acc is None or (acc.dtype == torch.float32 and acc.is_contiguous())
    two = hidden_b is not None
    args = (
        hidden_a, hidden_b, weight, targets,
        stats["lse_a"], stats["entropy_a"], stats.get("lse_b"), stats.get("entropy_b"),
        stats.get("kl_ab"), stats.get("kl_ba"),
        grads.get("logp_a"), grads.get("entropy_a"), grads.get("logp_b"), grads.get("entropy_b"),
        grads.get("kl_ab"), grads.get("kl_ba"),
        dh_acc_a, dh_acc_b, weight_grad_acc,
        n, vocab, hid, ignore_index, hidden_a.stride(0), hidden_b.stride(0) if two else 0,
        weight.stride(0), weight_grad_acc.stride(0) if weight_grad_acc is not None else 0,
    )
    consts = dict(
        TEMPERATURE=float(temperature),
        UPCAST=_config.upcast_after_load(hidden_a.dtype),
        DOT_PRECISION=_config.dot_precision(hidden_a.dtype),
        B_IN_DW=bool(b_in_dw and two),
    )
    if _config.autotune_enabled():
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(vocab, meta["BLOCK_V"]))  # noqa: E731
        _autotuned_kernel()[grid](*args, **consts)
    else:
        grid = (triton.cdiv(n, config.BLOCK_N), triton.cdiv(vocab, config.BLOCK_V))
        _fused_atomic_kernel[grid](
            *args, **consts, BLOCK_N=config.BLOCK_N, BLOCK_V=config.BLOCK_V, BLOCK_D=config.BLOCK_D,
            **config.launch_kwargs(),
        )
