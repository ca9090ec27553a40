"""Chunked pure-PyTorch backend: the oracle every faster backend is tested against.

Math (docs/design.md "Kernel math"), per row and view, with z = h W^T / T over the vocabulary:

    phase 1 (statistics), streaming vocabulary tiles with a running max m:
        S  = sum e^(z - m)                      U' = sum e^(z - m) (z - m)   (shifted: 1e-6 accurate entropy)
        X_ab = sum e^(z_a - m_a) (z_a - z_b)    X_ba = sum e^(z_b - m_b) (z_b - z_a)
        lse = m + log S     logp = z_y - lse     H = log S - U'/S
        KL_ab = X_ab / S_a - ((m_a - m_b) + log S_a - log S_b)
    phase 2 (gradients w.r.t. z, given upstream per-row gradients g_*), recomputing z per tile:
        dZ_a = g_lpa (onehot - p_a) - g_ha p_a (log p_a + H_a)
               + g_kab p_a (log p_a - log p_b - KL_ab) + g_kba (p_a - p_b)
        dZ_b = mirrored;   dh = dZ W / T,   dW = (dZ_a^T h_a + dZ_b^T h_b) / T

Memory: at most a few [chunk_tokens x chunk_vocab] blocks per view exist at once; never
[N x V]. Everything is computed in float32 (float64 for float64 inputs): bf16/fp16 inputs
are upcast per tile before the GEMM so no logit is ever rounded to low precision. On CUDA,
where torch has fp32-output GEMMs of half operands (papo_kernels/_gemm.py), bf16/fp16 inputs
stay in their dtype for the GEMMs instead (tensor cores, fp32 accumulation and outputs, so
logits are as exact as the upcast ones); dZ is rounded to that dtype once before the dh and
dW GEMMs, as the Triton workspace strategy does.

This module is also the backend interface: a backend provides `forward_stats`,
`backward_grads` and `loss_rows` (the gradient-in-forward loop of the fused calls, which a
backend may specialize, e.g. to reuse its logit workspace between the two phases) with these
signatures (papo_kernels/_backends.py dispatches). The call's options (temperature,
ignore_index, strategy, chunk sizes) arrive as one checked `KernelOptions` (_options.py); the
keyword arguments are what differs between calls of one run (which gradients are needed, where
they go). The torch backend has a single execution strategy and accepts any `strategy` value.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from papo_kernels import _gemm
from papo_kernels._options import DEFAULT_OPTIONS, KernelOptions

DEFAULT_CHUNK_TOKENS = 1024
DEFAULT_CHUNK_VOCAB = 8192


class RowStats(NamedTuple):
    """Per-row statistics saved by the forward (each [N], compute dtype). `*_b` and the KLs
    are None for a single view."""

    logp_a: torch.Tensor
    entropy_a: torch.Tensor
    lse_a: torch.Tensor
    logp_b: torch.Tensor | None = None
    entropy_b: torch.Tensor | None = None
    lse_b: torch.Tensor | None = None
    kl_ab: torch.Tensor | None = None
    kl_ba: torch.Tensor | None = None


class RowGrads(NamedTuple):
    """Upstream gradients of the per-row outputs (each [N] or None meaning zero)."""

    logp_a: torch.Tensor | None = None
    entropy_a: torch.Tensor | None = None
    logp_b: torch.Tensor | None = None
    entropy_b: torch.Tensor | None = None
    kl_ab: torch.Tensor | None = None
    kl_ba: torch.Tensor | None = None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 inputs compute (and return) in float64; everything else in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_masks(targets: torch.Tensor, vocab_size: int, ignore_index: int):
    """(valid, bad): valid rows are not ignore_index; bad rows are valid but out of [0, V).

    Computed on the device, no host sync: bad rows become NaN instead of raising here.
    """
    valid = targets != ignore_index
    bad = valid & ((targets < 0) | (targets >= vocab_size))
    return valid, bad


def _gemm_dtype(hidden: torch.Tensor, acc: torch.dtype) -> torch.dtype:
    """The operand dtype of the GEMMs: the hidden dtype where fp32-output half GEMMs run
    (CUDA), else the compute dtype (operands upcast)."""
    return hidden.dtype if _gemm.half_gemm_supported(hidden) else acc


def _tile_logits(h: torch.Tensor, w_tile: torch.Tensor, temperature: float) -> torch.Tensor:
    """z tile = h W_tile^T / T in fp32 (float64 for float64): h is upcast already, or half
    where the GEMM has fp32 outputs."""
    z = _gemm.mm_f32(h, w_tile.to(h.dtype).T)
    return z if temperature == 1.0 else z.div_(temperature)


class _Online:
    """Running (m, S, U') of one view over vocabulary tiles (online softmax with shifted U')."""

    def __init__(self, rows: int, dtype: torch.dtype, device: torch.device):
        self.m = torch.full((rows,), -math.inf, dtype=dtype, device=device)
        self.s = torch.zeros(rows, dtype=dtype, device=device)
        self.u = torch.zeros(rows, dtype=dtype, device=device)

    def update(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold tile z [C, v] in; z is consumed (overwritten in place). Returns (rescale factor
        of the old sums, e^(z - m_new))."""
        m_new = torch.maximum(self.m, z.amax(dim=1))
        shift = self.m - m_new  # -inf on the first tile
        scale = torch.exp(shift)
        zs = z.sub_(m_new[:, None])
        e = torch.exp(zs)
        # U' <- e^(m-m') (U' + (m-m') S); on the first tile S = 0 and (m-m') = -inf: guard 0 * -inf.
        moved = torch.where(self.s > 0, shift * self.s, torch.zeros_like(self.s))
        # torch.sum's cascaded summation, not a dot product: at V = 152k a BLAS dot loses ~1e-5
        # of entropy accuracy in fp32.
        self.u = scale * (self.u + moved) + zs.mul_(e).sum(dim=1)
        self.s = scale * self.s + e.sum(dim=1)
        self.m = m_new
        return scale, e

    def lse(self) -> torch.Tensor:
        return self.m + torch.log(self.s)

    def entropy(self) -> torch.Tensor:
        return torch.log(self.s) - self.u / self.s


def _chunk_forward(h_a, h_b, weight, targets, temperature, chunk_vocab, acc):
    """Phase 1 for one chunk of rows: returns raw (unmasked) statistics."""
    rows, vocab = h_a.shape[0], weight.shape[0]
    gemm_dtype = _gemm_dtype(h_a, acc)
    ha = h_a.to(gemm_dtype)
    hb = None if h_b is None else h_b.to(gemm_dtype)
    on_a = _Online(rows, acc, ha.device)
    on_b = None if hb is None else _Online(rows, acc, ha.device)
    z_target = torch.zeros(rows, dtype=acc, device=ha.device)
    z_target_b = None if hb is None else torch.zeros_like(z_target)
    x_ab = None if hb is None else torch.zeros_like(z_target)
    x_ba = None if hb is None else torch.zeros_like(z_target)
    for v0 in range(0, vocab, chunk_vocab):
        v1 = min(v0 + chunk_vocab, vocab)
        w_tile = weight[v0:v1]
        in_tile = (targets >= v0) & (targets < v1)
        local = (targets - v0).clamp(0, v1 - v0 - 1)[:, None]
        z_a = _tile_logits(ha, w_tile, temperature)
        # Read what needs the unshifted logits before update() shifts them in place.
        z_target = torch.where(in_tile, z_a.gather(1, local).squeeze(1), z_target)
        if hb is None:
            on_a.update(z_a)
            continue
        z_b = _tile_logits(hb, w_tile, temperature)
        z_target_b = torch.where(in_tile, z_b.gather(1, local).squeeze(1), z_target_b)
        # z_a - z_b from the unshifted logits: exact cancellation for identical views.
        diff = z_a - z_b
        scale_a, e_a = on_a.update(z_a)
        scale_b, e_b = on_b.update(z_b)
        x_ba = scale_b * x_ba - (e_b * diff).sum(dim=1)
        x_ab = scale_a * x_ab + diff.mul_(e_a).sum(dim=1)
    lse_a = on_a.lse()
    out = dict(logp_a=z_target - lse_a, entropy_a=on_a.entropy(), lse_a=lse_a)
    if hb is not None:
        lse_b = on_b.lse()
        # Shared-reference lse difference: (m_a - m_b) + log(S_a / S_b) keeps ~1e-6 absolute KL error.
        dlse = (on_a.m - on_b.m) + (torch.log(on_a.s) - torch.log(on_b.s))
        out.update(
            logp_b=z_target_b - lse_b,
            entropy_b=on_b.entropy(),
            lse_b=lse_b,
            kl_ab=x_ab / on_a.s - dlse,
            kl_ba=x_ba / on_b.s + dlse,
        )
    return out


def _mask_rows(x: torch.Tensor, valid: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """Ignored rows give exactly 0; out-of-range targets give NaN (no host sync)."""
    x = torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return torch.where(bad, torch.full((), math.nan, dtype=x.dtype, device=x.device), x)


def forward_stats(
    hidden_a: torch.Tensor,
    hidden_b: torch.Tensor | None,
    weight: torch.Tensor,
    targets: torch.Tensor,
    options: KernelOptions = DEFAULT_OPTIONS,
) -> RowStats:
    """Phase 1 over all rows: hidden_* [N, H], weight [V, H], targets [N] -> RowStats ([N] each)."""
    chunk_tokens = options.chunk_tokens or DEFAULT_CHUNK_TOKENS
    chunk_vocab = options.chunk_vocab or DEFAULT_CHUNK_VOCAB
    temperature, ignore_index = options.temperature, options.ignore_index
    acc = compute_dtype(hidden_a.dtype)
    n, vocab = hidden_a.shape[0], weight.shape[0]
    valid, bad = row_masks(targets, vocab, ignore_index)
    names = ["logp_a", "entropy_a", "lse_a"]
    if hidden_b is not None:
        names += ["logp_b", "entropy_b", "lse_b", "kl_ab", "kl_ba"]
    outs = {k: torch.empty(n, dtype=acc, device=hidden_a.device) for k in names}
    for r0 in range(0, n, chunk_tokens):
        r1 = min(r0 + chunk_tokens, n)
        chunk = _chunk_forward(
            hidden_a[r0:r1],
            None if hidden_b is None else hidden_b[r0:r1],
            weight,
            targets[r0:r1],
            temperature,
            chunk_vocab,
            acc,
        )
        for k in names:
            outs[k][r0:r1] = chunk[k]
    for k in names:
        outs[k] = _mask_rows(outs[k], valid, bad)
    return RowStats(**outs)


def _chunk_grad(g, r0, r1, valid, bad, acc):
    """Slice an upstream gradient to the chunk: 0 on ignored rows (even if g is NaN there),
    NaN on out-of-range rows so that their dh rows and dW become NaN."""
    if g is None:
        return None
    return _mask_rows(g[r0:r1].to(acc), valid[r0:r1], bad[r0:r1])


def backward_grads(
    hidden_a: torch.Tensor,
    hidden_b: torch.Tensor | None,
    weight: torch.Tensor,
    targets: torch.Tensor,
    stats: RowStats,
    grads: RowGrads,
    options: KernelOptions = DEFAULT_OPTIONS,
    *,
    need_hidden_a: bool = True,
    need_hidden_b: bool = False,
    weight_grad_acc: torch.Tensor | None = None,
    hidden_b_is_constant: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Phase 2: returns (dh_a, dh_b) in the hidden dtype (None where not needed) and adds dW
    into `weight_grad_acc` ([V, H], compute dtype) when given.

    `hidden_b_is_constant`: view b is a detached distribution, so no dW flows through it.
    """
    chunk_tokens = options.chunk_tokens or DEFAULT_CHUNK_TOKENS
    chunk_vocab = options.chunk_vocab or DEFAULT_CHUNK_VOCAB
    temperature, ignore_index = options.temperature, options.ignore_index
    acc = compute_dtype(hidden_a.dtype)
    n, vocab = hidden_a.shape[0], weight.shape[0]
    two_view = hidden_b is not None
    need_dw = weight_grad_acc is not None
    need_dz_b = two_view and (need_hidden_b or (need_dw and not hidden_b_is_constant))
    dh_a = torch.empty_like(hidden_a) if need_hidden_a else None
    dh_b = torch.empty_like(hidden_b) if (two_view and need_hidden_b) else None
    if not (need_hidden_a or need_dz_b or need_dw):
        return dh_a, dh_b
    valid, bad = row_masks(targets, vocab, ignore_index)
    zero = torch.zeros((), dtype=acc, device=hidden_a.device)
    gemm_dtype = _gemm_dtype(hidden_a, acc)
    zero_g = torch.zeros((), dtype=gemm_dtype, device=hidden_a.device)
    inv_t = 1.0 / temperature
    for r0 in range(0, n, chunk_tokens):
        r1 = min(r0 + chunk_tokens, n)
        # Ignored rows may hold anything (even NaN): zero them so 0 * NaN never reaches dW.
        rv = valid[r0:r1, None]
        ha = torch.where(rv, hidden_a[r0:r1].to(gemm_dtype), zero_g)
        hb = torch.where(rv, hidden_b[r0:r1].to(gemm_dtype), zero_g) if two_view else None
        t = targets[r0:r1]
        g = RowGrads(*(_chunk_grad(x, r0, r1, valid, bad, acc) for x in grads))
        need_b_tile = two_view and (g.kl_ab is not None or g.kl_ba is not None or need_dz_b)
        lse_a = stats.lse_a[r0:r1, None]
        ent_a = stats.entropy_a[r0:r1, None]
        if two_view:
            lse_b = stats.lse_b[r0:r1, None]
            ent_b = stats.entropy_b[r0:r1, None]
            kl_ab = stats.kl_ab[r0:r1, None]
            kl_ba = stats.kl_ba[r0:r1, None]
        dha = torch.zeros(ha.shape, dtype=acc, device=ha.device) if need_hidden_a else None
        dhb = torch.zeros(hb.shape, dtype=acc, device=hb.device) if (dh_b is not None) else None
        for v0 in range(0, vocab, chunk_vocab):
            v1 = min(v0 + chunk_vocab, vocab)
            w_tile = weight[v0:v1].to(gemm_dtype)
            in_tile = (t >= v0) & (t < v1)
            local = (t - v0).clamp(0, v1 - v0 - 1)[:, None]
            lp_a = _tile_logits(ha, w_tile, temperature).sub_(lse_a)
            p_a = torch.exp(lp_a)
            dz_a = torch.zeros_like(p_a)
            dz_b = None
            if g.logp_a is not None:
                # (onehot - p) with the -1 folded in fp32 at the target column.
                dz_a -= g.logp_a[:, None] * p_a
                dz_a.scatter_add_(1, local, torch.where(in_tile, g.logp_a, zero)[:, None])
            if g.entropy_a is not None:
                dz_a -= g.entropy_a[:, None] * p_a * (lp_a + ent_a)
            if need_b_tile:
                lp_b = _tile_logits(hb, w_tile, temperature).sub_(lse_b)
                p_b = torch.exp(lp_b)
                if g.kl_ab is not None:
                    dz_a += g.kl_ab[:, None] * p_a * (lp_a - lp_b - kl_ab)
                if g.kl_ba is not None:
                    dz_a += g.kl_ba[:, None] * (p_a - p_b)
                if need_dz_b:
                    dz_b = torch.zeros_like(p_b)
                    if g.logp_b is not None:
                        dz_b -= g.logp_b[:, None] * p_b
                        dz_b.scatter_add_(1, local, torch.where(in_tile, g.logp_b, zero)[:, None])
                    if g.entropy_b is not None:
                        dz_b -= g.entropy_b[:, None] * p_b * (lp_b + ent_b)
                    if g.kl_ab is not None:
                        dz_b += g.kl_ab[:, None] * (p_b - p_a)
                    if g.kl_ba is not None:
                        dz_b += g.kl_ba[:, None] * p_b * (lp_b - lp_a - kl_ba)
            # In-place GEMM accumulation: no [C, H] or [v, H] temporaries. Half GEMM operands
            # (CUDA): dZ is rounded once to the hidden dtype, products stay fp32.
            dz_a = dz_a.to(gemm_dtype)
            dz_b = None if dz_b is None else dz_b.to(gemm_dtype)
            if dha is not None:
                _gemm.addmm_f32_(dha, dz_a, w_tile)
            if dhb is not None:
                _gemm.addmm_f32_(dhb, dz_b, w_tile)
            if need_dw:
                acc_tile = weight_grad_acc[v0:v1]
                _gemm.addmm_f32_(acc_tile, dz_a.T, ha, alpha=inv_t)
                if dz_b is not None and not hidden_b_is_constant:
                    _gemm.addmm_f32_(acc_tile, dz_b.T, hb, alpha=inv_t)
        if dh_a is not None:
            dh_a[r0:r1] = dha * inv_t
        if dh_b is not None:
            dh_b[r0:r1] = dhb * inv_t
    return dh_a, dh_b


def run_loss_rows(
    forward_stats_fn,
    backward_grads_fn,
    hidden_a: torch.Tensor,
    hidden_b: torch.Tensor | None,
    weight: torch.Tensor,
    targets: torch.Tensor,
    on_chunk,
    options: KernelOptions = DEFAULT_OPTIONS,
    *,
    dh_a: torch.Tensor | None,
    dh_b: torch.Tensor | None,
    weight_grad_acc: torch.Tensor | None,
    hidden_b_is_constant: bool = True,
) -> None:
    """Gradient in forward, chunk by chunk, from any backend's phase-1 and phase-2 functions.

    For each chunk of rows [r0, r1) (`options.chunk_tokens` rows): stats = phase 1, then
    `on_chunk(r0, r1, stats)` returns the upstream RowGrads (or None: no gradient for this
    chunk), then phase 2 writes dh_a[r0:r1] / dh_b[r0:r1] (preallocated [N, H] or None) and adds
    into weight_grad_acc. N = 0 still calls on_chunk once, on empty statistics.
    """
    n = hidden_a.shape[0]
    chunk = options.chunk_tokens or DEFAULT_CHUNK_TOKENS
    # chunk_tokens sizes this loop's chunks (what loss_fn sees); within a chunk each phase splits
    # its rows as the backend does by default.
    opts = options.replace(chunk_tokens=None)
    bounds = [(r0, min(r0 + chunk, n)) for r0 in range(0, n, chunk)] or [(0, 0)]
    need_a, need_b = dh_a is not None, dh_b is not None
    for r0, r1 in bounds:
        h_a = hidden_a[r0:r1]
        h_b = None if hidden_b is None else hidden_b[r0:r1]
        t = targets[r0:r1]
        stats = forward_stats_fn(h_a, h_b, weight, t, opts)
        grads = on_chunk(r0, r1, stats)
        if grads is None or not (need_a or need_b or weight_grad_acc is not None):
            continue
        ca, cb = backward_grads_fn(
            h_a, h_b, weight, t, stats, grads, opts, need_hidden_a=need_a, need_hidden_b=need_b,
            weight_grad_acc=weight_grad_acc, hidden_b_is_constant=hidden_b_is_constant,
        )
        if need_a:
            dh_a[r0:r1] = ca
        if need_b:
            dh_b[r0:r1] = cb


def loss_rows(hidden_a, hidden_b, weight, targets, on_chunk, options: KernelOptions = DEFAULT_OPTIONS,
              **kwargs) -> None:
    """The torch backend's gradient-in-forward loop (see `run_loss_rows`)."""
    run_loss_rows(forward_stats, backward_grads, hidden_a, hidden_b, weight, targets, on_chunk, options,
                  **kwargs)
