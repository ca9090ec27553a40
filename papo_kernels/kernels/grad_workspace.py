"""Workspace strategy, phase-2 epilogue: dZ of a materialized logit chunk, given upstream grads.

From the chunk's fp32 logits Z = [h_a; h_b] W^T, the saved row statistics (lse, H, KLs) and the
upstream per-row gradients g_*, each [BLOCK_N, BLOCK_V] tile is independent (a 2-D grid, no
reduction):

    p = exp(z - lse),  log p = z - lse,  z = Z / T
    dZ_a = g_lpa (onehot - p_a) - g_ha p_a (log p_a + H_a)
           + g_kab p_a (log p_a - log p_b - KL_ab) + g_kba (p_a - p_b)      (dZ_b mirrored)

in fp32, divided by T, and written in the dtype of the following cuBLAS GEMMs (dh = dZ W,
dW += dZ^T h): the workspace itself for fp32 inputs (in place), a bf16/fp16 copy otherwise.
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
    row_masks,
)


@triton.heuristics({
    "LOAD_B": lambda args: args["ZB"] is not None,
    "NEED_DZ_A": lambda args: args["DZA"] is not None,
    "NEED_DZ_B": lambda args: args["DZB"] is not None,
    **UPSTREAM_GRAD_FLAGS,
})
@triton.jit
def _workspace_dz_kernel(
    ZA, ZB, DZA, DZB, TARGETS,
    LSE_A, ENT_A, LSE_B, ENT_B, KL_AB, KL_BA,
    G_LPA, G_HA, G_LPB, G_HB, G_KAB, G_KBA,
    N, V, ignore_index, stride_za_n, stride_zb_n, stride_dza_n, stride_dzb_n,
    TEMPERATURE: tl.constexpr, LOAD_B: tl.constexpr, NEED_DZ_A: tl.constexpr, NEED_DZ_B: tl.constexpr,
    HAS_G_LPA: tl.constexpr, HAS_G_HA: tl.constexpr, HAS_G_LPB: tl.constexpr, HAS_G_HB: tl.constexpr,
    HAS_G_KAB: tl.constexpr, HAS_G_KBA: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    tgt = tl.load(TARGETS + rows, mask=rows < N, other=0)
    in_range, valid, bad = row_masks(tgt, rows, N, V, ignore_index)
    col_ok = cols < V
    mask = in_range[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    lse_a, ent_a, lse_b, ent_b, kl_ab, kl_ba = load_row_stats(
        rows, in_range, LSE_A, ENT_A, LSE_B, ENT_B, KL_AB, KL_BA, LOAD_B)
    g_lpa, g_ha, g_lpb, g_hb, g_kab, g_kba = load_row_grads(
        rows, in_range, valid, G_LPA, G_HA, G_LPB, G_HB, G_KAB, G_KBA,
        HAS_G_LPA, HAS_G_HA, HAS_G_LPB, HAS_G_HB, HAS_G_KAB, HAS_G_KBA)
    # z tile in fp32 (the workspace never holds rounded logits)
    za = tl.load(ZA + rows64[:, None] * stride_za_n + cols[None, :], mask=mask, other=0.0)
    if TEMPERATURE != 1.0:
        za = za / TEMPERATURE
    zb = za
    if LOAD_B:
        zb = tl.load(ZB + rows64[:, None] * stride_zb_n + cols[None, :], mask=mask, other=0.0)
        if TEMPERATURE != 1.0:
            zb = zb / TEMPERATURE
    onehot = cols[None, :] == tgt[:, None]
    keep = valid[:, None] & col_ok[None, :]
    # dZ = sum of the upstream terms, / T, 0 on ignored rows and the vocabulary tail
    dza, dzb = dz_tiles(za, zb, onehot, keep, bad, lse_a, ent_a, lse_b, ent_b, kl_ab, kl_ba,
                        g_lpa, g_ha, g_lpb, g_hb, g_kab, g_kba, TEMPERATURE,
                        HAS_G_LPA, HAS_G_HA, HAS_G_LPB, HAS_G_HB, HAS_G_KAB, HAS_G_KBA,
                        NEED_DZ_A, NEED_DZ_B, LOAD_B)
    # dZ in the dtype of the following GEMMs (fp32 stays exact; half rounds once, here)
    if NEED_DZ_A:
        tl.store(DZA + rows64[:, None] * stride_dza_n + cols[None, :], dza.to(DZA.dtype.element_ty),
                 mask=mask)
    if NEED_DZ_B:
        tl.store(DZB + rows64[:, None] * stride_dzb_n + cols[None, :], dzb.to(DZB.dtype.element_ty),
                 mask=mask)


def workspace_dz(
    z_a: torch.Tensor,
    z_b: torch.Tensor | None,
    dz_a: torch.Tensor | None,
    dz_b: torch.Tensor | None,
    targets: torch.Tensor,
    stats: dict[str, torch.Tensor | None],
    grads: dict[str, torch.Tensor | None],
    *,
    temperature: float,
    ignore_index: int,
    config: _config.LaunchConfig,
) -> None:
    """dZ of one chunk into `dz_a` / `dz_b` (may alias z_a / z_b: each element is read, then written).

    Args:
        z_a, z_b: [C, V] float32 raw logits (before / T); z_b None when view b is not needed.
        dz_a, dz_b: [C, V] outputs (float32, float16 or bfloat16) or None when not needed.
        targets: [C] integer ids.
        stats: [C] float32 saved statistics lse_a, entropy_a, and for two views lse_b, entropy_b,
            kl_ab, kl_ba (masked as the forward returns them).
        grads: [C] float32 upstream gradients logp_a, entropy_a, logp_b, entropy_b, kl_ab, kl_ba,
            None meaning zero.
        temperature, ignore_index: as in the forward.
        config: BLOCK_N x BLOCK_V tile of the 2-D grid.
    """
    n, vocab = z_a.shape
    if n == 0 or (dz_a is None and dz_b is None):
        return
    two = z_b is not None
    grid = (triton.cdiv(n, config.BLOCK_N), triton.cdiv(vocab, config.BLOCK_V))
    _workspace_dz_kernel[grid](
        z_a, z_b, dz_a, dz_b, targets,
        stats["lse_a"], stats["entropy_a"], stats.get("lse_b"), stats.get("entropy_b"),
        stats.get("kl_ab"), stats.get("kl_ba"),
        grads.get("logp_a"), grads.get("entropy_a"), grads.get("logp_b"), grads.get("entropy_b"),
        grads.get("kl_ab"), grads.get("kl_ba"),
        n, vocab, ignore_index, z_a.stride(0), z_b.stride(0) if two else 0,
        dz_a.stride(0) if dz_a is not None else 0, dz_b.stride(0) if dz_b is not None else 0,
        TEMPERATURE=float(temperature), BLOCK_N=config.BLOCK_N, BLOCK_V=config.BLOCK_V,
        **config.launch_kwargs(),
    )
