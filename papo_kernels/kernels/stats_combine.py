"""Vocabulary splits of the statistics: partial online sums per split, merged by one small kernel.

A statistics kernel split over the vocabulary (the workspace epilogue over a logit chunk, the
in-register forward over W tiles) folds its columns into the running sums of docs/design.md's phase 1

    m, S = sum e^(z-m), U' = sum e^(z-m)(z-m), z_y, X_ab = sum e^(z_a-m_a)(z_a-z_b), X_ba

and stores them into a [NUM_PARTIALS, splits, N] fp32 buffer (`store_partials`). The combine
kernel merges the splits per row, rescaling each one by e^(m_split - m), and finishes the
statistics exactly as a single-split kernel does. Splitting keeps the GPU full when a chunk has
few rows (one program per row tile would leave most multiprocessors idle or run a second,
nearly empty wave); the partials cost 40 B per row and split.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from papo_kernels.kernels import _config
from papo_kernels.kernels._math import merge_partial, row_masks, store_row_stats

# Rows of the partial buffer, in this order: m_a, S_a, U'_a, z_y_a, m_b, S_b, U'_b, z_y_b, X_ab, X_ba.
NUM_PARTIALS = 10


def partial_buffer(splits: int, n: int, device: torch.device) -> torch.Tensor:
    return torch.empty((NUM_PARTIALS, splits, n), dtype=torch.float32, device=device)


def num_splits(row_tiles: int, vocab_tiles: int, config: _config.LaunchConfig, device: torch.device, *,
               min_tiles_per_split: int, programs_per_sm: int) -> int:
    """Vocabulary splits per row tile: `config.splits` when set (capped at the tile count, so
    trailing splits may be empty: the kernels handle that), else 1 under the interpreter, else
    enough programs for `programs_per_sm` per multiprocessor with >= `min_tiles_per_split` tiles
    per split."""
    if config.splits:
        return max(1, min(config.splits, vocab_tiles))
    if _config.is_interpreting():
        return 1
    target = programs_per_sm * _config.sm_count(device)
    if row_tiles >= target:
        return 1
    splits = max(1, min(max(1, vocab_tiles // min_tiles_per_split), triton.cdiv(target, row_tiles)))
    return triton.cdiv(vocab_tiles, triton.cdiv(vocab_tiles, splits))  # no empty split


@triton.jit
def store_partials(PART, split, rows, in_range, N, SPLITS,
                   m_a, s_a, u_a, zy_a, m_b, s_b, u_b, zy_b, x_ab, x_ba, TWO_VIEW: tl.constexpr):
    """This split's running sums of a row tile into PART[stat, split, row]."""
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


def combine_partials(part: torch.Tensor, targets: torch.Tensor, outs: dict[str, torch.Tensor], *,
                     vocab: int, ignore_index: int, two_view: bool, config: _config.LaunchConfig) -> None:
    """Merge `part` ([NUM_PARTIALS, splits, N], split 0 never empty) into the [N] outputs."""
    n, splits = part.shape[2], part.shape[1]
    _stats_combine_kernel[(triton.cdiv(n, config.BLOCK_N),)](
        part, targets,
        outs["logp_a"], outs["entropy_a"], outs["lse_a"],
        outs.get("logp_b"), outs.get("entropy_b"), outs.get("lse_b"), outs.get("kl_ab"),
        outs.get("kl_ba"), n, vocab, ignore_index, splits,
        TWO_VIEW=two_view, BLOCK_N=config.BLOCK_N, **config.launch_kwargs(),
    )
