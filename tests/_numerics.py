"""Tolerance helper: a kernel may be off by at most k times the error of
the same computation done naively in the test dtype, plus a per-dtype floor."""

from __future__ import annotations

import torch

ATOL = {torch.float64: 1e-10, torch.float32: 5e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_close_to_ref(
    kernel, ref, gt, *, dtype, name: str, k: float = 2.0, atol: float | None = None, rtol: float = 0.0
):
    """Assert |kernel - gt| <= k * |ref - gt| + atol(dtype) + rtol * |gt| elementwise.

    gt: float64 ground truth; ref: the naive computation in the test dtype; kernel: ours.
    rtol allows one final rounding of a result to the test dtype (gradients are accumulated in
    fp32 and cast once), which an elementwise bound would otherwise not cover where `ref`
    happens to be exact.
    Reports the count of violations, the worst index and the three values there.
    """
    atol = ATOL[dtype] if atol is None else atol
    gt = gt.detach().double()
    err = (kernel.detach().double() - gt).abs()
    bound = k * (ref.detach().double() - gt).abs() + atol + rtol * gt.abs()
    bad = ~(err <= bound)  # NaN counts as a violation
    if bool(bad.any()):
        excess = torch.where(bad, (err - bound).nan_to_num(nan=float("inf")), torch.zeros_like(err))
        worst = int(excess.reshape(-1).argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), gt.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements exceed k*|ref-gt|+atol "
            f"(k={k}, atol={atol:g}); worst at {idx}: kernel={kernel.reshape(-1)[worst].item():.8g} "
            f"ref={ref.reshape(-1)[worst].item():.8g} gt={gt.reshape(-1)[worst].item():.8g}"
        )
