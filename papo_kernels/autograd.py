"""Autograd wiring: custom ops for the statistics calls and the gradient-in-forward Function.

Orchestration only; the math lives in the backends (reference.py, kernels/, extension.py).

- `papo_kernels::token_stats` / `papo_kernels::two_view_stats` are torch.library custom ops
  with fake implementations and registered autograd (backward recomputes logit tiles through
  the `*_backward` ops), so functions calling them compile under torch.compile. An op's schema
  takes tensors and scalars only: the caller passes `KernelOptions.op_args()`, and the op
  rebuilds the options for the backend.
- `FusedLossFunction` runs phase 1, the user's loss_fn and phase 2 chunk by chunk in the
  forward and keeps only dh and the fp32 dW accumulator until backward (eager-only: it takes
  a Python callable).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from papo_kernels._backends import resolve_backend
from papo_kernels._options import KernelOptions
from papo_kernels.reference import RowGrads, RowStats, compute_dtype


def _empty_stats(hidden: Tensor, count: int) -> tuple[Tensor, ...]:
    acc = compute_dtype(hidden.dtype)
    return tuple(hidden.new_empty(hidden.shape[0], dtype=acc) for _ in range(count))


def _weight_acc(weight: Tensor, hidden: Tensor, need: bool) -> Tensor | None:
    if not need:
        return None
    return torch.zeros(weight.shape, dtype=compute_dtype(hidden.dtype), device=weight.device)


# ---------------------------------------------------------------- token_stats op


@torch.library.custom_op("papo_kernels::token_stats", mutates_args=())
def token_stats_op(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float,
    ignore_index: int,
    backend: str,
    strategy: str,
    chunk_tokens: int,
    chunk_vocab: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(logp, entropy, lse), each [N]; chunk sizes 0 mean the backend's defaults."""
    options = KernelOptions.from_op_args(temperature, ignore_index, backend, strategy, chunk_tokens,
                                         chunk_vocab)
    s = resolve_backend(backend, hidden.device).forward_stats(hidden, None, weight, targets, options)
    return s.logp_a, s.entropy_a, s.lse_a


@token_stats_op.register_fake
def _(hidden, weight, targets, temperature, ignore_index, backend, strategy, chunk_tokens, chunk_vocab):
    return _empty_stats(hidden, 3)


@torch.library.custom_op("papo_kernels::token_stats_backward", mutates_args=())
def token_stats_backward_op(
    grad_logp: Tensor | None,
    grad_entropy: Tensor | None,
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    logp: Tensor,
    entropy: Tensor,
    lse: Tensor,
    temperature: float,
    ignore_index: int,
    backend: str,
    strategy: str,
    chunk_tokens: int,
    chunk_vocab: int,
    need_hidden: bool,
    need_weight: bool,
) -> tuple[Tensor, Tensor]:
    """(d hidden, d weight); an input that needs no gradient gets an empty tensor."""
    options = KernelOptions.from_op_args(temperature, ignore_index, backend, strategy, chunk_tokens,
                                         chunk_vocab)
    be = resolve_backend(backend, hidden.device)
    dw_acc = _weight_acc(weight, hidden, need_weight)
    dh, _ = be.backward_grads(
        hidden, None, weight, targets,
        RowStats(logp, entropy, lse),
        RowGrads(logp_a=grad_logp, entropy_a=grad_entropy),
        options,
        need_hidden_a=need_hidden,
        weight_grad_acc=dw_acc,
    )
    dh = dh if need_hidden else hidden.new_empty(0)
    dw = dw_acc.to(weight.dtype) if need_weight else weight.new_empty(0)
    return dh, dw


@token_stats_backward_op.register_fake
def _(grad_logp, grad_entropy, hidden, weight, targets, logp, entropy, lse, temperature,
      ignore_index, backend, strategy, chunk_tokens, chunk_vocab, need_hidden, need_weight):
    dh = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
    dw = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    return dh, dw


def _token_setup(ctx, inputs, output):
    hidden, weight, targets, *opts = inputs
    logp, entropy, lse = output
    ctx.save_for_backward(hidden, weight, targets, logp, entropy, lse)
    ctx.opts = opts
    ctx.mark_non_differentiable(lse)
    # Unused outputs then arrive as None, so the backend skips their dZ terms (and view b's
    # logit tiles) instead of multiplying them by zeros.
    ctx.set_materialize_grads(False)


def _token_backward(ctx, grad_logp, grad_entropy, _grad_lse):
    hidden, weight, targets, logp, entropy, lse = ctx.saved_tensors
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dh, dw = token_stats_backward_op(
        grad_logp, grad_entropy, hidden, weight, targets, logp, entropy, lse, *ctx.opts,
        need_h, need_w,
    )
    return (dh if need_h else None, dw if need_w else None) + (None,) * 7


token_stats_op.register_autograd(_token_backward, setup_context=_token_setup)


# ---------------------------------------------------------------- two_view_stats op


@torch.library.custom_op("papo_kernels::two_view_stats", mutates_args=())
def two_view_stats_op(
    hidden_a: Tensor,
    hidden_b: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float,
    ignore_index: int,
    backend: str,
    strategy: str,
    chunk_tokens: int,
    chunk_vocab: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(logp_a, logp_b, entropy_a, entropy_b, kl_ab, kl_ba, lse_a, lse_b), each [N]."""
    options = KernelOptions.from_op_args(temperature, ignore_index, backend, strategy, chunk_tokens,
                                         chunk_vocab)
    s = resolve_backend(backend, hidden_a.device).forward_stats(hidden_a, hidden_b, weight, targets, options)
    return s.logp_a, s.logp_b, s.entropy_a, s.entropy_b, s.kl_ab, s.kl_ba, s.lse_a, s.lse_b


@two_view_stats_op.register_fake
def _(hidden_a, hidden_b, weight, targets, temperature, ignore_index, backend, strategy,
      chunk_tokens, chunk_vocab):
    return _empty_stats(hidden_a, 8)


@torch.library.custom_op("papo_kernels::two_view_stats_backward", mutates_args=())
def two_view_stats_backward_op(
    grad_logp_a: Tensor | None,
    grad_logp_b: Tensor | None,
    grad_entropy_a: Tensor | None,
    grad_entropy_b: Tensor | None,
    grad_kl_ab: Tensor | None,
    grad_kl_ba: Tensor | None,
    hidden_a: Tensor,
    hidden_b: Tensor,
    weight: Tensor,
    targets: Tensor,
    logp_a: Tensor,
    logp_b: Tensor,
    entropy_a: Tensor,
    entropy_b: Tensor,
    kl_ab: Tensor,
    kl_ba: Tensor,
    lse_a: Tensor,
    lse_b: Tensor,
    temperature: float,
    ignore_index: int,
    backend: str,
    strategy: str,
    chunk_tokens: int,
    chunk_vocab: int,
    need_hidden_a: bool,
    need_hidden_b: bool,
    need_weight: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(d hidden_a, d hidden_b, d weight). A hidden_b that needs no gradient is a constant
    view: no gradient reaches weight through it."""
    options = KernelOptions.from_op_args(temperature, ignore_index, backend, strategy, chunk_tokens,
                                         chunk_vocab)
    be = resolve_backend(backend, hidden_a.device)
    dw_acc = _weight_acc(weight, hidden_a, need_weight)
    dh_a, dh_b = be.backward_grads(
        hidden_a, hidden_b, weight, targets,
        RowStats(logp_a, entropy_a, lse_a, logp_b, entropy_b, lse_b, kl_ab, kl_ba),
        RowGrads(grad_logp_a, grad_entropy_a, grad_logp_b, grad_entropy_b, grad_kl_ab, grad_kl_ba),
        options,
        need_hidden_a=need_hidden_a,
        need_hidden_b=need_hidden_b,
        weight_grad_acc=dw_acc,
        hidden_b_is_constant=not need_hidden_b,
    )
    dh_a = dh_a if need_hidden_a else hidden_a.new_empty(0)
    dh_b = dh_b if need_hidden_b else hidden_b.new_empty(0)
    dw = dw_acc.to(weight.dtype) if need_weight else weight.new_empty(0)
    return dh_a, dh_b, dw


@two_view_stats_backward_op.register_fake
def _(ga, gb, gha, ghb, gkab, gkba, hidden_a, hidden_b, weight, targets, *rest):
    need_a, need_b, need_w = rest[-3:]
    return (
        torch.empty_like(hidden_a) if need_a else hidden_a.new_empty(0),
        torch.empty_like(hidden_b) if need_b else hidden_b.new_empty(0),
        torch.empty_like(weight) if need_w else weight.new_empty(0),
    )


def _two_view_setup(ctx, inputs, output):
    hidden_a, hidden_b, weight, targets, *opts = inputs
    ctx.save_for_backward(hidden_a, hidden_b, weight, targets, *output)
    ctx.opts = opts
    ctx.mark_non_differentiable(output[6], output[7])
    ctx.set_materialize_grads(False)


def _two_view_backward(ctx, g_lpa, g_lpb, g_ha, g_hb, g_kab, g_kba, _g_lse_a, _g_lse_b):
    hidden_a, hidden_b, weight, targets, *stats = ctx.saved_tensors
    need_a, need_b, need_w = ctx.needs_input_grad[:3]
    dh_a, dh_b, dw = two_view_stats_backward_op(
        g_lpa, g_lpb, g_ha, g_hb, g_kab, g_kba, hidden_a, hidden_b, weight, targets, *stats,
        *ctx.opts, need_a, need_b, need_w,
    )
    return (dh_a if need_a else None, dh_b if need_b else None, dw if need_w else None) + (None,) * 7


two_view_stats_op.register_autograd(_two_view_backward, setup_context=_two_view_setup)


# ---------------------------------------------------------------- gradient in forward


def _check_loss_fn_result(result, r0: int, r1: int):
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict)):
        raise ValueError(
            "loss_fn must return (loss, metrics) with loss a scalar tensor and metrics a dict of "
            f"per-chunk sums; got {type(result).__name__} for rows [{r0}, {r1})"
        )
    loss, metrics = result
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"loss_fn must return a scalar loss (a sum over the chunk's tokens); got {shape} "
            f"for rows [{r0}, {r1})"
        )
    return loss.reshape(()), metrics


class FusedRun:
    """One fused-loss call: backend, options and the user's loss_fn, executed chunk by chunk."""

    def __init__(self, backend, loss_fn: Callable, stats_type, options: KernelOptions):
        self.backend = backend
        self.loss_fn = loss_fn
        self.stats_type = stats_type  # TokenStats or TwoViewStats (public named tuples)
        self.options = options
        self.metrics: dict = {}

    def _public_stats(self, s: RowStats, leaves: bool):
        if s.logp_b is None:
            values = (s.logp_a, s.entropy_a)
        else:
            values = (s.logp_a, s.logp_b, s.entropy_a, s.entropy_b, s.kl_ab, s.kl_ba)
        if leaves:
            values = tuple(v.detach().requires_grad_(True) for v in values)
        return self.stats_type(*values)

    @staticmethod
    def _row_grads(public, grads) -> RowGrads:
        g = dict(zip(public._fields, grads))
        if "logp" in g:
            return RowGrads(logp_a=g["logp"], entropy_a=g["entropy"])
        return RowGrads(g["logp_a"], g["entropy_a"], g["logp_b"], g["entropy_b"], g["kl_ab"], g["kl_ba"])

    def _add_metrics(self, metrics: dict):
        for k, v in metrics.items():
            v = v.detach() if isinstance(v, Tensor) else v
            self.metrics[k] = self.metrics[k] + v if k in self.metrics else v

    def execute(self, hidden_a, hidden_b, weight, targets, need_a: bool, need_b: bool, need_w: bool):
        """Returns (loss, dh_a, dh_b, dW fp32 accumulator) of the summed loss (None if not needed).

        The backend's `loss_rows` drives the chunks (it may split them further, e.g. to reuse
        its logit workspace between the phases); `on_chunk` runs loss_fn on each chunk's
        statistics and returns the upstream per-row gradients for the gradient sweep.
        """
        need_any = need_a or need_b or need_w
        dh_a = torch.zeros_like(hidden_a) if need_a else None
        dh_b = torch.zeros_like(hidden_b) if need_b else None
        dw_acc = _weight_acc(weight, hidden_a, need_w)
        total = []

        def on_chunk(r0: int, r1: int, stats: RowStats) -> RowGrads | None:
            public = self._public_stats(stats, leaves=need_any)
            index = torch.arange(r0, r1, device=targets.device)
            with torch.enable_grad() if need_any else torch.no_grad():
                loss, metrics = _check_loss_fn_result(self.loss_fn(public, index), r0, r1)
            self._add_metrics(metrics)
            total.append(loss.detach())
            if not (need_any and loss.requires_grad):
                return None
            return self._row_grads(public, torch.autograd.grad(loss, list(public), allow_unused=True))

        self.backend.loss_rows(
            hidden_a, hidden_b, weight, targets, on_chunk, self.options,
            dh_a=dh_a, dh_b=dh_b, weight_grad_acc=dw_acc, hidden_b_is_constant=not need_b,
        )
        loss = total[0] if len(total) == 1 else torch.stack(total).sum()
        # dW stays in the fp32 accumulator until backward scales it (docs/design.md,
        # "Numerical rules"); casting first would round grad_loss into a low-precision product.
        return loss, dh_a, dh_b, dw_acc


class FusedLossFunction(torch.autograd.Function):
    """loss = sum over chunks of loss_fn(stats(chunk)); the gradient is computed in forward."""

    @staticmethod
    def forward(ctx, hidden_a, hidden_b, weight, targets, run: FusedRun):
        need_a, need_b, need_w = ctx.needs_input_grad[:3]
        loss, dh_a, dh_b, dw_acc = run.execute(hidden_a, hidden_b, weight, targets, need_a, need_b, need_w)
        ctx.save_for_backward(dh_a, dh_b, dw_acc)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if getattr(ctx, "consumed", False):
            raise RuntimeError(
                "the fused loss supports a single backward: its gradients are computed in the "
                "forward and scaled in place (call the fused loss again for another backward)"
            )
        ctx.consumed = True
        dh_a, dh_b, dw_acc = ctx.saved_tensors

        def scaled(g, dtype=None):
            # Scale in place in the stored precision (fp32 for dW) and round once: no second
            # dW-sized buffer, and bf16(grad_loss) never biases the result.
            if g is None:
                return None
            dtype = dtype or g.dtype
            if g.dtype in (torch.float32, torch.float64):
                return g.mul_(grad_loss.to(g.dtype)).to(dtype)
            return (g.float() * grad_loss.float()).to(dtype)

        return scaled(dh_a), scaled(dh_b), scaled(dw_acc, ctx.weight_dtype), None, None
