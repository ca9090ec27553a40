"""Fused strategy, phase 2, sweep 1: dh by row-tile ownership (deterministic, no logit buffer).

A program owns BLOCK_N rows at a time (persistent: it walks row tiles pid, pid + G, ...). For
every vocabulary tile it recomputes z = h W^T / T (tl.dot over H, one W tile for both views),
forms dZ_a, dZ_b in fp32 from the saved statistics and upstream gradients (see _math.dz_tiles),
and adds dZ W into an fp32 accumulator of its rows in a per-program scratch slot [2, BLOCK_N, H];
after the last vocabulary tile it casts the rows once into dh. Only this program touches these
rows, so the sum order is fixed: bitwise reproducible.

    dh_a = dZ_a W,  dh_b = dZ_b W        (dZ already / T)

Memory: G * 2 * BLOCK_N * H fp32 of scratch (G = 2 x SMs), independent of N; no [N, V] buffer.
FLOPs: 4HV per row and view (recompute + dh). The fp32 accumulator round trip per vocabulary
tile costs 8 * BLOCK_N * H bytes per 4 * BLOCK_N * BLOCK_V * H FLOPs: large BLOCK_V helps.
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
        args["G_KAB"] is not None or args["G_KBA"] is not None or args["DH_B"] is not None),
    "NEED_DZ_A": lambda args: args["DH_A"] is not None,
    "NEED_DZ_B": lambda args: args["DH_B"] is not None,
    **UPSTREAM_GRAD_FLAGS,
}


@triton.heuristics(_HEURISTICS)
@triton.jit
def _fused_dh_kernel(
    HA, HB, W, TARGETS,
    LSE_A, ENT_A, LSE_B, ENT_B, KL_AB, KL_BA,
    G_LPA, G_HA, G_LPB, G_HB, G_KAB, G_KBA,
    DH_A, DH_B, SCRATCH,
    N, V, H, ignore_index, stride_ha_n, stride_hb_n, stride_w_v, stride_dha_n, stride_dhb_n,
    TEMPERATURE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TWO_VIEW: tl.constexpr, LOAD_B: tl.constexpr, NEED_DZ_A: tl.constexpr, NEED_DZ_B: tl.constexpr,
    HAS_G_LPA: tl.constexpr, HAS_G_HA: tl.constexpr, HAS_G_LPB: tl.constexpr, HAS_G_HB: tl.constexpr,
    HAS_G_KAB: tl.constexpr, HAS_G_KBA: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    r = tl.arange(0, BLOCK_N)
    # this program's fp32 accumulators: view a rows, then view b rows
    acc_a_ptr = SCRATCH + pid.to(tl.int64) * (2 * BLOCK_N * H) + r[:, None].to(tl.int64) * H
    acc_b_ptr = acc_a_ptr + BLOCK_N * H
    for tile in range(pid, tl.cdiv(N, BLOCK_N), tl.num_programs(0)):
        rows = tile * BLOCK_N + r
        rows64 = rows.to(tl.int64)
        tgt = tl.load(TARGETS + rows, mask=rows < N, other=0)
        in_range, valid, bad = row_masks(tgt, rows, N, V, ignore_index)
        lse_a, ent_a, lse_b, ent_b, kl_ab, kl_ba = load_row_stats(
            rows, in_range, LSE_A, ENT_A, LSE_B, ENT_B, KL_AB, KL_BA, TWO_VIEW)
        g_lpa, g_ha, g_lpb, g_hb, g_kab, g_kba = load_row_grads(
            rows, in_range, valid, G_LPA, G_HA, G_LPB, G_HB, G_KAB, G_KBA,
            HAS_G_LPA, HAS_G_HA, HAS_G_LPB, HAS_G_HB, HAS_G_KAB, HAS_G_KBA)
        for d0 in range(0, H, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            zeros = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
            tl.store(acc_a_ptr + d[None, :], zeros, mask=(d < H)[None, :])
            tl.store(acc_b_ptr + d[None, :], zeros, mask=(d < H)[None, :])
        tl.debug_barrier()  # accumulator rows are read back by other threads of this program
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_mask = cols < V
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
                                NEED_DZ_A, NEED_DZ_B, LOAD_B)
            # dh += dZ W over H blocks, fp32 accumulation in the program-owned rows
            for d0 in range(0, H, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                d_ok = (d < H)[None, :]
                w = tl.load(W + cols.to(tl.int64)[:, None] * stride_w_v + d[None, :],
                            mask=col_mask[:, None] & d_ok, other=0.0)
                if UPCAST:
                    w = w.to(tl.float32)
                if NEED_DZ_A:
                    acc = tl.load(acc_a_ptr + d[None, :], mask=d_ok, other=0.0)
                    acc = tl.dot(dza.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
                    tl.store(acc_a_ptr + d[None, :], acc, mask=d_ok)
                if NEED_DZ_B:
                    acc = tl.load(acc_b_ptr + d[None, :], mask=d_ok, other=0.0)
                    acc = tl.dot(dzb.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
                    tl.store(acc_b_ptr + d[None, :], acc, mask=d_ok)
            tl.debug_barrier()
        # cast once into dh
        for d0 in range(0, H, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = (d < H)[None, :]
            out_mask = in_range[:, None] & d_ok
            if NEED_DZ_A:
                acc = tl.load(acc_a_ptr + d[None, :], mask=d_ok, other=0.0)
                tl.store(DH_A + rows64[:, None] * stride_dha_n + d[None, :], acc.to(DH_A.dtype.element_ty),
                         mask=out_mask)
            if NEED_DZ_B:
                acc = tl.load(acc_b_ptr + d[None, :], mask=d_ok, other=0.0)
                tl.store(DH_B + rows64[:, None] * stride_dhb_n + d[None, :], acc.to(DH_B.dtype.element_ty),
                         mask=out_mask)
        tl.debug_barrier()


_AUTOTUNE_TILES = [(64, 64, 64, 8, 2), (64, 128, 64, 8, 2), (32, 128, 64, 4, 2), (64, 64, 32, 4, 3)]
_AUTOTUNED = None


def _autotuned_kernel():
    """`triton.autotune` over a few tiles (PAPO_AUTOTUNE=1; the kernel zeroes its own scratch)."""
    global _AUTOTUNED
    if _AUTOTUNED is None:
        configs = [triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd}, num_warps=w, num_stages=s)
                   for bn, bv, bd, w, s in _AUTOTUNE_TILES]
        _AUTOTUNED = triton.autotune(configs=configs, key=["V", "H", "TEMPERATURE"])(_fused_dh_kernel)
    return _AUTOTUNED


def fused_dh(
    hidden_a: torch.Tensor,
    hidden_b: torch.Tensor | None,
    weight: torch.Tensor,
    targets: torch.Tensor,
    stats: dict[str, torch.Tensor | None],
    grads: dict[str, torch.Tensor | None],
    dh_a: torch.Tensor | None,
    dh_b: torch.Tensor | None,
    *,
    temperature: float,
    ignore_index: int,
    config: _config.LaunchConfig,
) -> None:
    """dh_a and/or dh_b (written in place, hidden dtype) by row-tile ownership.

    Args:
        hidden_a, hidden_b: [N, H] unit column stride; hidden_b None for one view.
        weight: [V, H] unit column stride.
        targets: [N] integer ids.
        stats: [N] float32 lse_a, entropy_a (+ lse_b, entropy_b, kl_ab, kl_ba for two views).
        grads: [N] float32 upstream gradients (None meaning zero), keys as RowGrads.
        dh_a, dh_b: [N, H] outputs in the hidden dtype, unit column stride, or None.
        temperature, ignore_index: as in the API.
        config: tiles, and `max_programs` persistent programs (0: 2 x SMs, all row tiles when
            interpreting).
    """
    n, hid = hidden_a.shape
    vocab = weight.shape[0]
    if n == 0 or (dh_a is None and dh_b is None):
        return
    device = hidden_a.device
    autotune = _config.autotune_enabled()
    max_bn = max(t[0] for t in _AUTOTUNE_TILES) if autotune else config.BLOCK_N
    if config.max_programs:
        programs = config.max_programs
    elif _config.is_interpreting():
        programs = triton.cdiv(n, config.BLOCK_N)
    else:
        programs = 2 * _config.sm_count(device)
    min_bn = min(t[0] for t in _AUTOTUNE_TILES) if autotune else config.BLOCK_N
    programs = max(1, min(programs, triton.cdiv(n, min_bn)))  # no program without a row tile
    scratch = torch.empty((programs, 2, max_bn, hid), dtype=torch.float32, device=device)
    two = hidden_b is not None
    args = (
        hidden_a, hidden_b, weight, targets,
        stats["lse_a"], stats["entropy_a"], stats.get("lse_b"), stats.get("entropy_b"),
        stats.get("kl_ab"), stats.get("kl_ba"),
        grads.get("logp_a"), grads.get("entropy_a"), grads.get("logp_b"), grads.get("entropy_b"),
        grads.get("kl_ab"), grads.get("kl_ba"),
        dh_a, dh_b, scratch,
        n, vocab, hid, ignore_index, hidden_a.stride(0), hidden_b.stride(0) if two else 0,
        weight.stride(0), dh_a.stride(0) if dh_a is not None else 0,
        dh_b.stride(0) if dh_b is not None else 0,
    )
    consts = dict(
        TEMPERATURE=float(temperature),
        UPCAST=_config.upcast_after_load(hidden_a.dtype),
        DOT_PRECISION=_config.dot_precision(hidden_a.dtype),
    )
    if autotune:
        # The scratch slot stride is 2 * BLOCK_N * H with the config's BLOCK_N <= max_bn: fits.
        _autotuned_kernel()[(programs,)](*args, **consts)
    else:
        _fused_dh_kernel[(programs,)](
            *args, **consts, BLOCK_N=config.BLOCK_N, BLOCK_V=config.BLOCK_V, BLOCK_D=config.BLOCK_D,
            **config.launch_kwargs(),
        )
