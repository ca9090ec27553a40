"""Workspace strategy (the speed default): cuBLAS GEMMs into a bounded logit chunk + Triton epilogues.

Per chunk of C rows (C from `chunk_tokens`, else the largest multiple of 64 whose workspace fits
PAPO_WORKSPACE_MB, default 1 GiB):

    forward:  Z = [h_a; h_b] W^T            one GEMM, W read once for both views, fp32 output
              stats_workspace epilogue      lse, logp, entropy, KLs from Z / T
    backward: Z = [h_a; h_b] W^T            recomputed by backward_grads (the stats ops'
                                            autograd keeps only [N] statistics); the fused
                                            calls' loss_rows reuses the forward's Z instead
              grad_workspace epilogue       dZ (fp32 math, / T) in the GEMM dtype
              dh = dZ W                     cuBLAS, fp32 accumulation, cast once
              dW += dZ^T h                  cuBLAS with beta = 1 into the fp32 accumulator

The workspace is [views * C, V] fp32 plus, for half inputs, the [views * C, V] dZ copy in the
half dtype: never [N, V]. Half inputs use cuBLAS with fp32 output (`out_dtype`) so no logit is
rounded before the softmax; on CPU (the interpreter) the GEMMs run in fp32 on upcast operands.
"""

from __future__ import annotations

import torch

from papo_kernels.kernels import _config
from papo_kernels.kernels.grad_workspace import workspace_dz
from papo_kernels.kernels.stats_workspace import workspace_stats
from papo_kernels.reference import RowStats

_HALF = (torch.float16, torch.bfloat16)


def _gemm_dtype(hidden: torch.Tensor) -> torch.dtype:
    """Half GEMMs only on a real GPU; CPU and the interpreter (no bf16) compute in fp32."""
    if hidden.dtype in _HALF and hidden.is_cuda and not _config.is_interpreting():
        return hidden.dtype
    return torch.float32


def _mm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out (fp32) = a @ b without rounding the product to the operands' half dtype."""
    if a.dtype in _HALF:
        torch.mm(a, b, out_dtype=torch.float32, out=out)  # cuBLAS, fp32 output
    else:
        torch.mm(a, b, out=out)


def _addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b with fp32 accumulation (cuBLAS beta = 1 into the accumulator)."""
    if a.dtype not in _HALF:
        acc.addmm_(a, b)
        return
    try:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError):
        # torch builds whose out_dtype addmm wants `self` in the input dtype: add vocabulary
        # slices of an fp32 product, bounding the temporary at 64 Mi elements.
        step = max(1, (64 << 20) // max(1, acc.shape[1]))
        for v0 in range(0, acc.shape[0], step):
            acc[v0:v0 + step] += torch.mm(a[v0:v0 + step], b, out_dtype=torch.float32)


def _stacked_rows(hidden_a, hidden_b, valid, r0, r1, zero) -> torch.Tensor:
    """Rows r0:r1 of view a (and of view b when given) stacked for one GEMM, in `zero`'s dtype.
    Ignored rows may hold anything (even NaN): they are zeroed so 0 * NaN never reaches dW."""
    rv = valid[r0:r1, None]
    parts = [torch.where(rv, h[r0:r1].to(zero.dtype), zero) for h in (hidden_a, hidden_b) if h is not None]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _grad_gemms(dz, x, w_g, r0, r1, dh_a, dh_b, weight_grad_acc, b_in_dw) -> None:
    """The chunk's gradient GEMMs from its dZ workspace ([views * C, V], rows r0:r1 of N):
    dh = dZ W per view (fp32 accumulation inside cuBLAS, one rounding into dh's dtype), and
    dW += dZ^T h for view a and the live view b, stacked into one GEMM."""
    c = r1 - r0
    for dh, dz_view in ((dh_a, dz[:c]), (dh_b, dz[c:2 * c])):
        if dh is None:
            continue
        if dh.dtype == w_g.dtype:
            torch.mm(dz_view, w_g, out=dh[r0:r1])
        else:
            dh[r0:r1] = torch.mm(dz_view, w_g)
    if weight_grad_acc is not None:
        rows = 2 * c if b_in_dw else c
        _addmm_f32_(weight_grad_acc, dz[:rows].T, x[:rows])


def chunk_rows(n: int, vocab: int, views: int, gemm_dtype: torch.dtype, chunk_tokens: int | None) -> int:
    """Rows per chunk: `chunk_tokens`, else the largest multiple of 64 within the workspace bound."""
    if chunk_tokens:
        return max(1, min(n, chunk_tokens))
    per_row = views * vocab * (4 + (torch.finfo(gemm_dtype).bits // 8 if gemm_dtype in _HALF else 0))
    rows = max(64, (_config.workspace_bytes() // per_row) // 64 * 64)
    return max(1, min(n, rows))


def forward_stats(hidden_a, hidden_b, weight, targets, outs, *, temperature, ignore_index, chunk_tokens):
    """Phase 1 for all rows into `outs` ([N] float32 each, see stats_workspace.workspace_stats)."""
    n, vocab = hidden_a.shape[0], weight.shape[0]
    if n == 0:
        return
    two = hidden_b is not None
    views = 2 if two else 1
    gemm_dtype = _gemm_dtype(hidden_a)
    w_t = weight.to(gemm_dtype).T  # [H, V] view (a copy only for CPU half inputs)
    c_max = chunk_rows(n, vocab, views, gemm_dtype, chunk_tokens)
    ws = torch.empty((views * c_max, vocab), dtype=torch.float32, device=hidden_a.device)
    config = _config.get_config("workspace_stats", hidden_a.device, hidden_a.dtype, c_max, vocab,
                                hidden_a.shape[1])
    for r0 in range(0, n, c_max):
        r1 = min(r0 + c_max, n)
        c = r1 - r0
        x = hidden_a[r0:r1] if not two else torch.cat([hidden_a[r0:r1], hidden_b[r0:r1]])
        z = ws[: views * c]
        # one GEMM for both views: W is read once per chunk
        _mm_f32(x.to(gemm_dtype), w_t, out=z)
        workspace_stats(
            z[:c], z[c:] if two else None, targets[r0:r1], {k: v[r0:r1] for k, v in outs.items()},
            temperature=temperature, ignore_index=ignore_index, config=config,
        )


def backward_grads(hidden_a, hidden_b, weight, targets, stats, grads, dh_a, dh_b, weight_grad_acc, *,
                   b_in_dw, temperature, ignore_index, chunk_tokens):
    """Phase 2 for all rows: writes dh_a / dh_b ([N, H], hidden dtype, or None) and adds dW into
    `weight_grad_acc` ([V, H] float32 or None). `stats` / `grads`: dicts of [N] float32 (None = 0).
    `b_in_dw`: view b is live, so dZ_b^T h_b enters dW."""
    n, hid = hidden_a.shape
    vocab = weight.shape[0]
    if n == 0:
        return
    two = hidden_b is not None
    need_dw = weight_grad_acc is not None
    need_dz_a = dh_a is not None or need_dw
    need_dz_b = two and (dh_b is not None or (need_dw and b_in_dw))
    load_b = two and (grads.get("kl_ab") is not None or grads.get("kl_ba") is not None or need_dz_b)
    if not (need_dz_a or need_dz_b):
        return
    views = 2 if load_b else 1
    gemm_dtype = _gemm_dtype(hidden_a)
    w_g = weight.to(gemm_dtype)
    c_max = chunk_rows(n, vocab, views, gemm_dtype, chunk_tokens)
    ws = torch.empty((views * c_max, vocab), dtype=torch.float32, device=hidden_a.device)
    # fp32: dZ overwrites the logits in place; half: a dZ copy in the GEMM dtype
    dz_ws = ws if gemm_dtype == torch.float32 else torch.empty_like(ws, dtype=gemm_dtype)
    config = _config.get_config("workspace_dz", hidden_a.device, hidden_a.dtype, c_max, vocab, hid)
    valid = targets != ignore_index
    zero = torch.zeros((), dtype=gemm_dtype, device=hidden_a.device)
    for r0 in range(0, n, c_max):
        r1 = min(r0 + c_max, n)
        c = r1 - r0
        x = _stacked_rows(hidden_a, hidden_b if load_b else None, valid, r0, r1, zero)
        z = ws[: views * c]
        dz = dz_ws[: views * c]
        _mm_f32(x, w_g.T, out=z)
        workspace_dz(
            z[:c], z[c:] if load_b else None, dz[:c] if need_dz_a else None, dz[c:] if need_dz_b else None,
            targets[r0:r1],
            {k: (None if v is None else v[r0:r1]) for k, v in stats.items()},
            {k: (None if v is None else v[r0:r1]) for k, v in grads.items()},
            temperature=temperature, ignore_index=ignore_index, config=config,
        )
        _grad_gemms(dz, x, w_g, r0, r1, dh_a, dh_b, weight_grad_acc, b_in_dw)


def loss_rows(hidden_a, hidden_b, weight, targets, on_chunk, dh_a, dh_b, weight_grad_acc, *,
              b_in_dw, temperature, ignore_index, chunk_tokens):
    """Gradient in forward with one logit GEMM per chunk: Z is computed once, the statistics
    epilogue reads it, `on_chunk(r0, r1, RowStats)` turns them into upstream gradients, and the
    dZ epilogue reuses the same Z (6HV FLOPs per token and view instead of 8HV).

    Writes dh_a / dh_b ([N, H] or None) and adds dW into `weight_grad_acc` (fp32 or None).
    """
    n, hid = hidden_a.shape
    vocab = weight.shape[0]
    two = hidden_b is not None
    views = 2 if two else 1
    device = hidden_a.device
    need_dw = weight_grad_acc is not None
    gemm_dtype = _gemm_dtype(hidden_a)
    w_g = weight.to(gemm_dtype)
    c_max = chunk_rows(n, vocab, views, gemm_dtype, chunk_tokens)
    ws = torch.empty((views * c_max, vocab), dtype=torch.float32, device=device)
    dz_ws = ws if gemm_dtype == torch.float32 else torch.empty_like(ws, dtype=gemm_dtype)
    stats_config = _config.get_config("workspace_stats", device, hidden_a.dtype, c_max, vocab, hid)
    dz_config = _config.get_config("workspace_dz", device, hidden_a.dtype, c_max, vocab, hid)
    names = RowStats._fields if two else RowStats._fields[:3]
    valid = targets != ignore_index
    zero = torch.zeros((), dtype=gemm_dtype, device=device)
    opts = dict(temperature=temperature, ignore_index=ignore_index)
    for r0 in range(0, n, c_max):
        r1 = min(r0 + c_max, n)
        c = r1 - r0
        # the statistics of ignored rows are 0 whatever their (zeroed) logits
        x = _stacked_rows(hidden_a, hidden_b if two else None, valid, r0, r1, zero)
        z = ws[: views * c]
        _mm_f32(x, w_g.T, out=z)  # the only logit GEMM of this chunk
        t = targets[r0:r1]
        outs = {k: torch.empty(c, dtype=torch.float32, device=device) for k in names}
        workspace_stats(z[:c], z[c:] if two else None, t, outs, config=stats_config, **opts)
        grads = on_chunk(r0, r1, RowStats(**outs))
        need_dz_a = dh_a is not None or need_dw
        need_dz_b = two and (dh_b is not None or (need_dw and b_in_dw))
        if grads is None or not (need_dz_a or need_dz_b):
            continue
        grads_d = {k: (None if g is None else g.to(torch.float32).contiguous())
                   for k, g in grads._asdict().items()}
        if not two:
            for k in ("logp_b", "entropy_b", "kl_ab", "kl_ba"):
                grads_d[k] = None
        load_b = two and (grads_d["kl_ab"] is not None or grads_d["kl_ba"] is not None or need_dz_b)
        stats_d = {k: outs[k] for k in ("lse_a", "entropy_a")}
        if two:
            stats_d.update({k: outs[k] for k in ("lse_b", "entropy_b", "kl_ab", "kl_ba")})
        dz = dz_ws[: views * c]
        workspace_dz(
            z[:c], z[c:] if load_b else None, dz[:c] if need_dz_a else None,
            dz[c:] if need_dz_b else None, t, stats_d, grads_d, config=dz_config, **opts,
        )
        _grad_gemms(dz, x, w_g, r0, r1, dh_a, dh_b, weight_grad_acc, b_in_dw)
