"""Device functions shared by the kernels: logit tiles, online softmax, row statistics and dZ.

Notation (docs/design.md "Kernel math"): z = h W^T / T over the vocabulary, p = softmax(z), y the
target. Phase 1 folds vocabulary tiles into a running max m, S = sum e^(z-m),
U' = sum e^(z-m) (z-m) (shifted), X_ab = sum e^(z_a-m_a) (z_a-z_b), X_ba mirrored, and the target
logit z_y; then

    lse = m + log S,  logp = z_y - lse,  H = log S - U'/S,
    KL_ab = X_ab/S_a - ((m_a - m_b) + log S_a - log S_b),  KL_ba mirrored.

Phase 2 forms, per tile and in fp32 (all / T):

    dZ_a = g_lpa (onehot - p_a) - g_ha p_a (log p_a + H_a)
           + g_kab p_a (log p_a - log p_b - KL_ab) + g_kba (p_a - p_b)
    dZ_b = g_lpb (onehot - p_b) - g_hb p_b (log p_b + H_b)
           + g_kab (p_b - p_a) + g_kba p_b (log p_b - log p_a - KL_ba)

Numerical rules kept here: every value is fp32; the vocabulary tail enters max/exp as -inf and
every multiplied copy through `where(valid, ., 0)` (0 * -inf is NaN); the -1 of (onehot - p) is
folded in fp32; ignored rows (target == ignore_index) give exactly 0, rows with a target outside
[0, V) give NaN (no host sync).
"""

from __future__ import annotations

import triton
import triton.language as tl


def _has(name: str):
    return lambda args: args[name] is not None


# triton.heuristics flags of the gradient kernels: an upstream gradient passed as None is zero,
# and its dZ terms are compiled out.
UPSTREAM_GRAD_FLAGS = {f"HAS_G_{k}": _has(f"G_{k}") for k in ("LPA", "HA", "LPB", "HB", "KAB", "KBA")}

@triton.jit
def row_masks(tgt, rows, N, V, ignore_index):
    """(in_range, valid, bad) per row: valid = not ignored, bad = valid with target outside [0, V)."""
    in_range = rows < N
    valid = in_range & (tgt != ignore_index)
    bad = valid & ((tgt < 0) | (tgt >= V))
    return in_range, valid, bad


@triton.jit
def logit_tiles(HA, HB, W, rows, cols, h_mask, col_mask, H, stride_ha_n, stride_hb_n, stride_w_v,
                TWO_VIEW: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """h_a W^T and h_b W^T for one [BLOCK_N, BLOCK_V] tile, fp32 accumulation over H.

    Each W tile is loaded once and used for both views. Masked rows/columns load as 0.
    """
    acc_a = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    for d0 in range(0, H, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = d < H
        w = tl.load(W + cols64[:, None] * stride_w_v + d[None, :],
                    mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        ha = tl.load(HA + rows64[:, None] * stride_ha_n + d[None, :],
                     mask=h_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:  # interpreter only: no bf16 arithmetic there
            w = w.to(tl.float32)
            ha = ha.to(tl.float32)
        acc_a = tl.dot(ha, tl.trans(w), acc_a, input_precision=DOT_PRECISION)
        if TWO_VIEW:
            hb = tl.load(HB + rows64[:, None] * stride_hb_n + d[None, :],
                         mask=h_mask[:, None] & d_mask[None, :], other=0.0)
            if UPCAST:
                hb = hb.to(tl.float32)
            acc_b = tl.dot(hb, tl.trans(w), acc_b, input_precision=DOT_PRECISION)
    return acc_a, acc_b


@triton.jit
def online_update(z, col_ok, m, s, u):
    """Fold a logit tile into (m, S, U'); returns (m', S', U', rescale of old sums, e^(z-m'))."""
    m_new = tl.maximum(m, tl.max(tl.where(col_ok, z, float("-inf")), axis=1))
    shift = m - m_new  # -inf on the first tile
    scale = tl.exp(shift)
    zc = z - m_new[:, None]
    e = tl.where(col_ok, tl.exp(zc), 0.0)
    # U' <- e^(m-m') (U' + (m-m') S): on the first tile S = 0 and m-m' = -inf, guard 0 * -inf.
    moved = tl.where(s > 0, shift * s, 0.0)
    u = scale * (u + moved) + tl.sum(tl.where(col_ok, e * zc, 0.0), axis=1)
    s = scale * s + tl.sum(e, axis=1)
    return m_new, s, u, scale, e


@triton.jit
def merge_partial(m, s, u, m_p, s_p, u_p):
    """Merge one partial (m_p, S_p, U'_p) of other vocabulary columns into (m, S, U').

    Returns (m', S', U', rescale of the running sums, rescale of the partial's sums). `m` must be
    finite (the first partial is never empty); an empty partial has m_p = -inf, S_p = 0.
    """
    m_new = tl.maximum(m, m_p)
    sc = tl.exp(m - m_new)
    sc_p = tl.exp(m_p - m_new)
    u = (sc * (u + tl.where(s > 0, (m - m_new) * s, 0.0))
         + sc_p * (u_p + tl.where(s_p > 0, (m_p - m_new) * s_p, 0.0)))
    s = sc * s + sc_p * s_p
    return m_new, s, u, sc, sc_p


@triton.jit
def _masked(x, valid, bad):
    """Ignored rows give exactly 0, out-of-range targets NaN."""
    return tl.where(bad, float("nan"), tl.where(valid, x, 0.0))


@triton.jit
def store_row_stats(rows, in_range, valid, bad, m_a, s_a, u_a, zy_a, m_b, s_b, u_b, zy_b, x_ab, x_ba,
                    LOGP_A, ENT_A, LSE_A, LOGP_B, ENT_B, LSE_B, KL_AB, KL_BA, TWO_VIEW: tl.constexpr):
    """Finish phase 1 (lse, logp, entropy, KLs) from the folded sums and store the masked rows."""
    log_s_a = tl.log(s_a)
    lse_a = m_a + log_s_a
    tl.store(LOGP_A + rows, _masked(zy_a - lse_a, valid, bad), mask=in_range)
    tl.store(ENT_A + rows, _masked(log_s_a - u_a / s_a, valid, bad), mask=in_range)
    tl.store(LSE_A + rows, _masked(lse_a, valid, bad), mask=in_range)
    if TWO_VIEW:
        log_s_b = tl.log(s_b)
        lse_b = m_b + log_s_b
        # Shared-reference lse difference keeps the KL's absolute error near 1e-6.
        dlse = (m_a - m_b) + (log_s_a - log_s_b)
        tl.store(LOGP_B + rows, _masked(zy_b - lse_b, valid, bad), mask=in_range)
        tl.store(ENT_B + rows, _masked(log_s_b - u_b / s_b, valid, bad), mask=in_range)
        tl.store(LSE_B + rows, _masked(lse_b, valid, bad), mask=in_range)
        tl.store(KL_AB + rows, _masked(x_ab / s_a - dlse, valid, bad), mask=in_range)
        tl.store(KL_BA + rows, _masked(x_ba / s_b + dlse, valid, bad), mask=in_range)


@triton.jit
def _load_row(PTR, rows, in_range, HAS: tl.constexpr):
    if HAS:
        x = tl.load(PTR + rows, mask=in_range, other=0.0).to(tl.float32)
    else:
        x = tl.zeros(rows.shape, dtype=tl.float32)
    return x


@triton.jit
def load_row_grads(rows, in_range, valid, G_LPA, G_HA, G_LPB, G_HB, G_KAB, G_KBA,
                   HAS_G_LPA: tl.constexpr, HAS_G_HA: tl.constexpr, HAS_G_LPB: tl.constexpr,
                   HAS_G_HB: tl.constexpr, HAS_G_KAB: tl.constexpr, HAS_G_KBA: tl.constexpr):
    """Upstream per-row gradients; 0 on ignored rows even when the caller's value is NaN there."""
    g_lpa = tl.where(valid, _load_row(G_LPA, rows, in_range, HAS_G_LPA), 0.0)
    g_ha = tl.where(valid, _load_row(G_HA, rows, in_range, HAS_G_HA), 0.0)
    g_lpb = tl.where(valid, _load_row(G_LPB, rows, in_range, HAS_G_LPB), 0.0)
    g_hb = tl.where(valid, _load_row(G_HB, rows, in_range, HAS_G_HB), 0.0)
    g_kab = tl.where(valid, _load_row(G_KAB, rows, in_range, HAS_G_KAB), 0.0)
    g_kba = tl.where(valid, _load_row(G_KBA, rows, in_range, HAS_G_KBA), 0.0)
    return g_lpa, g_ha, g_lpb, g_hb, g_kab, g_kba


@triton.jit
def load_row_stats(rows, in_range, LSE_A, ENT_A, LSE_B, ENT_B, KL_AB, KL_BA, TWO_VIEW: tl.constexpr):
    """Saved phase-1 statistics of a row tile (masked rows: 0, out-of-range targets: NaN)."""
    lse_a = _load_row(LSE_A, rows, in_range, True)
    ent_a = _load_row(ENT_A, rows, in_range, True)
    lse_b = _load_row(LSE_B, rows, in_range, TWO_VIEW)
    ent_b = _load_row(ENT_B, rows, in_range, TWO_VIEW)
    kl_ab = _load_row(KL_AB, rows, in_range, TWO_VIEW)
    kl_ba = _load_row(KL_BA, rows, in_range, TWO_VIEW)
    return lse_a, ent_a, lse_b, ent_b, kl_ab, kl_ba


@triton.jit
def dz_tiles(za, zb, onehot, keep, bad,
             lse_a, ent_a, lse_b, ent_b, kl_ab, kl_ba,
             g_lpa, g_ha, g_lpb, g_hb, g_kab, g_kba,
             TEMPERATURE: tl.constexpr,
             HAS_G_LPA: tl.constexpr, HAS_G_HA: tl.constexpr, HAS_G_LPB: tl.constexpr,
             HAS_G_HB: tl.constexpr, HAS_G_KAB: tl.constexpr, HAS_G_KBA: tl.constexpr,
             NEED_DZ_A: tl.constexpr, NEED_DZ_B: tl.constexpr, LOAD_B: tl.constexpr):
    """dZ_a, dZ_b (fp32, already / T) of one tile; `keep` = valid row & column inside V."""
    # log p and p from the saved lse: no second reduction over the vocabulary.
    lp_a = za - lse_a[:, None]
    p_a = tl.exp(lp_a)
    lp_b = lp_a
    p_b = p_a
    if LOAD_B:
        lp_b = zb - lse_b[:, None]
        p_b = tl.exp(lp_b)
    dza = tl.zeros(za.shape, dtype=tl.float32)
    dzb = tl.zeros(za.shape, dtype=tl.float32)
    if NEED_DZ_A:
        if HAS_G_LPA:  # g (onehot - p) with the -1 folded in fp32 at the target column
            dza += tl.where(onehot, g_lpa[:, None], 0.0) - g_lpa[:, None] * p_a
        if HAS_G_HA:
            dza -= g_ha[:, None] * p_a * (lp_a + ent_a[:, None])
        if HAS_G_KAB:
            dza += g_kab[:, None] * p_a * (lp_a - lp_b - kl_ab[:, None])
        if HAS_G_KBA:
            dza += g_kba[:, None] * (p_a - p_b)
        dza = tl.where(keep, dza * (1.0 / TEMPERATURE), 0.0)
        dza = tl.where(bad[:, None], float("nan"), dza)
    if NEED_DZ_B:
        if HAS_G_LPB:
            dzb += tl.where(onehot, g_lpb[:, None], 0.0) - g_lpb[:, None] * p_b
        if HAS_G_HB:
            dzb -= g_hb[:, None] * p_b * (lp_b + ent_b[:, None])
        if HAS_G_KAB:
            dzb += g_kab[:, None] * (p_b - p_a)
        if HAS_G_KBA:
            dzb += g_kba[:, None] * p_b * (lp_b - lp_a - kl_ba[:, None])
        dzb = tl.where(keep, dzb * (1.0 / TEMPERATURE), 0.0)
        dzb = tl.where(bad[:, None], float("nan"), dzb)
    return dza, dzb
