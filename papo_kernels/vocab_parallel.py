"""Vocabulary-parallel statistics: the head's vocabulary split over the ranks of a process group.

    from papo_kernels import vocab_parallel as vp
    s = vp.token_stats(hidden, weight_shard, targets, process_group=group)
    s = vp.two_view_stats(hidden_a, hidden_b, weight_shard, targets, process_group=group)
    loss, metrics = vp.fused_token_loss(hidden, weight_shard, targets, loss_fn, process_group=group)
    loss, metrics = vp.fused_two_view_loss(hidden_a, hidden_b, weight_shard, targets, loss_fn,
                                           process_group=group)

Layout (as a tensor-parallel, column-parallel lm_head): every rank holds the same hidden states
and targets (global token ids) and a contiguous block of rows of the head, `weight_shard`
[V_r, H] = W[vocab_start_r : vocab_start_r + V_r], ordered by rank; shards may differ in size.
Every rank gets the statistics of the full vocabulary, equal to the unsharded calls within fp32
rounding. Gradients: dh is summed over the shards (all-reduce), dW stays per shard (each rank
gets the gradient of its own rows).

How the shards are combined. Each rank runs the ordinary backend on its shard as if it were the
whole vocabulary, giving per-shard lse_r, entropy H_r, KL_r and (on the owner of the target)
logp_r. With M = max_r lse_r, d_r = lse_r - M <= 0 and A = sum_r e^(d_r):

    lse     = M + log A
    H       = sum_r e^(d_r) (H_r - d_r) / A + log A
    logp    = (logp_r + d_r on the target's owner) - log A
    KL_ab   = sum_r e^(d_a,r) (KL_ab,r + d_a,r - d_b,r) / A_a - log A_a + log A_b

which is the online (max, sum-exp, shifted U', cross term) recurrence of the kernels applied
once more across shards; every summand is bounded, so no large logits cancel. That costs two
all-reduces per chunk of rows: a max of [C, 2] and a sum of [C, 8]. The backward runs the
backend's gradient sweep on the shard with the *global* statistics, which gives exactly the
shard's columns of the global dZ; rows whose target lives on another shard are run with a
placeholder target (local id 0) and the placeholder's one-hot term (g_logp at column 0) is
subtracted again from dh and dW, an O(N H) correction.

These calls are eager (a torch.autograd.Function around collectives), not custom ops, and every
rank must call them with the same hidden states, targets and options.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from papo_kernels._backends import resolve_backend
from papo_kernels._options import KernelOptions
from papo_kernels.api import TokenStats, TwoViewStats, _check_loss_fn, _validate
from papo_kernels.autograd import FusedLossFunction, _check_loss_fn_result
from papo_kernels.reference import DEFAULT_CHUNK_TOKENS, RowGrads, RowStats, compute_dtype


def _dist():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "papo_kernels.vocab_parallel needs an initialized torch.distributed process group "
            "(torch.distributed.init_process_group); without one use the ordinary papo_kernels calls"
        )
    return dist


class _Layout:
    """Where this rank's rows sit in the full vocabulary, and the group to combine over."""

    def __init__(self, weight_shard: Tensor, process_group, vocab_start: int | None):
        dist = _dist()
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.world = dist.get_world_size(process_group)
        sizes = torch.zeros(self.world, dtype=torch.int64, device=weight_shard.device)
        sizes[self.rank] = weight_shard.shape[0]
        dist.all_reduce(sizes, group=process_group)  # every rank learns every shard's size
        self.sizes = [int(s) for s in sizes.tolist()]
        self.vocab_size = sum(self.sizes)
        expected_start = sum(self.sizes[: self.rank])
        if vocab_start is not None and vocab_start != expected_start:
            raise ValueError(
                f"vocab_start={vocab_start} on rank {self.rank}, but the shards are contiguous in rank "
                f"order (sizes {self.sizes}), so rank {self.rank} starts at {expected_start}"
            )
        self.start = expected_start
        self.stop = expected_start + weight_shard.shape[0]


def _local_targets(targets: Tensor, layout: _Layout, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(local ids, owned): targets owned by this shard shifted to local ids; other valid rows get
    the placeholder id 0 (its one-hot term is removed in the backward); ignored rows stay ignored;
    ids outside the full vocabulary get a local id outside the shard, so that the backend makes
    their outputs and gradients NaN on every rank, as the unsharded calls do."""
    owned = (targets >= layout.start) & (targets < layout.stop) & (targets != ignore_index)
    ignored = targets == ignore_index
    bad = ~ignored & ((targets < 0) | (targets >= layout.vocab_size))
    local = torch.where(owned, targets - layout.start, torch.zeros_like(targets))
    local = torch.where(bad, torch.full_like(targets, layout.stop - layout.start), local)
    local = torch.where(ignored, targets, local)
    return local, owned


def _combine(local: RowStats, owned: Tensor, valid: Tensor, layout: _Layout) -> RowStats:
    """Global statistics from this shard's: one max and one sum all-reduce."""
    dist = _dist()
    two_view = local.logp_b is not None
    lse = torch.stack([local.lse_a, local.lse_b], dim=1) if two_view else local.lse_a[:, None]
    # Ignored rows are 0 in every local output: keep them finite and neutral until the final mask.
    lse = torch.where(valid[:, None], lse, torch.zeros_like(lse))
    m = lse.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=layout.group)
    d = lse - m  # <= 0, exactly 0 on the shard holding the max
    e = torch.exp(d)
    zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
    cols = [e[:, 0], e[:, 0] * (local.entropy_a - d[:, 0]), torch.where(owned, local.logp_a + d[:, 0], zero)]
    if two_view:
        cols += [
            e[:, 1],
            e[:, 1] * (local.entropy_b - d[:, 1]),
            torch.where(owned, local.logp_b + d[:, 1], zero),
            e[:, 0] * (local.kl_ab + d[:, 0] - d[:, 1]),
            e[:, 1] * (local.kl_ba + d[:, 1] - d[:, 0]),
        ]
    sums = torch.stack(cols, dim=1)
    dist.all_reduce(sums, group=layout.group)

    def masked(x: Tensor) -> Tensor:
        return torch.where(valid, x, zero)

    log_a = torch.log(sums[:, 0])
    out = dict(
        logp_a=masked(sums[:, 2] - log_a),
        entropy_a=masked(sums[:, 1] / sums[:, 0] + log_a),
        lse_a=masked(m[:, 0] + log_a),
    )
    if two_view:
        log_b = torch.log(sums[:, 3])
        out.update(
            logp_b=masked(sums[:, 5] - log_b),
            entropy_b=masked(sums[:, 4] / sums[:, 3] + log_b),
            lse_b=masked(m[:, 1] + log_b),
            kl_ab=masked(sums[:, 6] / sums[:, 0] - log_a + log_b),
            kl_ba=masked(sums[:, 7] / sums[:, 3] - log_b + log_a),
        )
    return RowStats(**out)


class _Shard:
    """One vocabulary-parallel call: backend, options, layout; forward and gradient sweeps."""

    def __init__(self, weight_shard, targets, process_group, vocab_start, options: KernelOptions):
        self.layout = _Layout(weight_shard, process_group, vocab_start)
        self.backend = resolve_backend(options.backend, weight_shard.device)
        self.options = options
        self.local_targets, self.owned = _local_targets(targets, self.layout, options.ignore_index)
        self.valid = targets != options.ignore_index

    def forward(self, h_a, h_b, weight, rows: slice) -> RowStats:
        local = self.backend.forward_stats(h_a[rows], None if h_b is None else h_b[rows], weight,
                                           self.local_targets[rows], self.options)
        return _combine(local, self.owned[rows], self.valid[rows], self.layout)

    def backward(self, h_a, h_b, weight, rows: slice, stats: RowStats, grads: RowGrads,
                 need_a: bool, need_b: bool, dw_acc: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """This shard's share of (dh_a, dh_b) for the rows (to be summed over ranks); adds into dw_acc."""
        ha = h_a[rows]
        hb = None if h_b is None else h_b[rows]
        dh_a, dh_b = self.backend.backward_grads(
            ha, hb, weight, self.local_targets[rows], stats, grads, self.options,
            need_hidden_a=need_a, need_hidden_b=need_b, weight_grad_acc=dw_acc,
            hidden_b_is_constant=not need_b,
        )
        # Remove the placeholder one-hot: the backend added g_logp at local column 0 of rows whose
        # target is on another shard; the true one-hot lives on the owner's shard.
        placeholder = self.valid[rows] & ~self.owned[rows]
        for view, g, h, dh in ((0, grads.logp_a, ha, dh_a), (1, grads.logp_b, hb, dh_b)):
            if g is None or h is None:
                continue
            coef = torch.where(placeholder, g.to(compute_dtype(h.dtype)), torch.zeros((), dtype=compute_dtype(
                h.dtype), device=h.device)) / self.options.temperature
            if dh is not None:
                dh.sub_((coef[:, None] * weight[0].to(coef.dtype)).to(dh.dtype))
            if dw_acc is not None and (view == 0 or need_b):
                dw_acc[0].sub_(coef @ h.to(coef.dtype))
        return dh_a, dh_b


def _all_reduce_(t: Tensor | None, layout: _Layout) -> Tensor | None:
    if t is not None:
        _dist().all_reduce(t, group=layout.group)
    return t


class _StatsFunction(torch.autograd.Function):
    """Vocabulary-parallel statistics with autograd: backward recomputes the shard's logit tiles."""

    @staticmethod
    def forward(ctx, hidden_a, hidden_b, weight, shard: _Shard):
        stats = shard.forward(hidden_a, hidden_b, weight, slice(None))
        ctx.shard = shard
        ctx.save_for_backward(hidden_a, hidden_b, weight, *(s for s in stats))
        ctx.two_view = hidden_b is not None
        ctx.set_materialize_grads(False)
        values = (stats.logp_a, stats.entropy_a) if hidden_b is None else \
            (stats.logp_a, stats.logp_b, stats.entropy_a, stats.entropy_b, stats.kl_ab, stats.kl_ba)
        return values

    @staticmethod
    def backward(ctx, *grads):
        hidden_a, hidden_b, weight, *saved = ctx.saved_tensors
        shard: _Shard = ctx.shard
        need_a, need_b, need_w = ctx.needs_input_grad[:3]
        if ctx.two_view:
            stats = RowStats(*saved)
            g = RowGrads(grads[0], grads[2], grads[1], grads[3], grads[4], grads[5])
        else:
            stats = RowStats(*saved[:3])
            g = RowGrads(logp_a=grads[0], entropy_a=grads[1])
        dw_acc = torch.zeros(weight.shape, dtype=compute_dtype(hidden_a.dtype), device=weight.device) \
            if need_w else None
        dh_a, dh_b = shard.backward(hidden_a, hidden_b, weight, slice(None), stats, g,
                                    need_a, bool(need_b), dw_acc)
        # dh: the sum of every shard's dZ_r W_r; dW: this shard's rows only
        _all_reduce_(dh_a if need_a else None, shard.layout)
        _all_reduce_(dh_b if need_b else None, shard.layout)
        return (dh_a if need_a else None, dh_b if need_b else None,
                dw_acc.to(weight.dtype) if need_w else None, None)


def _check(hiddens, weight_shard, targets, options: KernelOptions, process_group, vocab_start) -> _Shard:
    # Shape/dtype/device rules of the ordinary calls; the target range is checked against the
    # full vocabulary below, so the local check is off.
    _validate(hiddens, weight_shard, targets, options.replace(check_inputs=False))
    if vocab_start is not None and (isinstance(vocab_start, bool) or not isinstance(vocab_start, int)):
        raise TypeError(f"vocab_start must be an int or None, got {type(vocab_start).__name__}")
    flat_targets = targets.reshape(-1)
    shard = _Shard(weight_shard, flat_targets, process_group, vocab_start, options)
    check_inputs, ignore_index = options.check_inputs, options.ignore_index
    if check_inputs is None:
        check_inputs = targets.device.type == "cpu"
    if check_inputs:
        vocab = shard.layout.vocab_size
        bad = (flat_targets != ignore_index) & ((flat_targets < 0) | (flat_targets >= vocab))
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(
                f"targets must be in [0, {vocab}) (the full vocabulary: shard sizes {shard.layout.sizes}) "
                f"or equal ignore_index={ignore_index}; flattened targets[{i}] = {int(flat_targets[i])}"
            )
    return shard


_ARGS = """
    Args (beyond those of the unsharded call, which keep their meaning):
        weight_shard: [V_r, H] this rank's contiguous rows of the lm_head weight; shards are in
            rank order and may differ in size (each at least one row).
        targets: global token ids in [0, sum_r V_r) or ignore_index, the same on every rank.
        process_group: the group the vocabulary is split over (None: the default group).
        vocab_start: optional check that this rank's shard starts at this row of the full head.
"""


def token_stats(hidden: Tensor, weight_shard: Tensor, targets: Tensor, *, process_group=None,
                vocab_start: int | None = None, temperature: float = 1.0, ignore_index: int = -100,
                backend: str = "auto", strategy: str = "auto", check_inputs: bool | None = None,
                check_finite: bool = False, chunk_tokens: int | None = None,
                chunk_vocab: int | None = None) -> TokenStats:
    """`papo_kernels.token_stats` over the full vocabulary from a vocabulary shard of the head.

    Returns TokenStats(logp, entropy) of the full vocabulary on every rank, shaped like
    targets; backward gives the summed dh (identical on every rank) and this shard's dW.
    {args}
    """
    options = KernelOptions(temperature=temperature, ignore_index=ignore_index, backend=backend,
                            strategy=strategy, check_inputs=check_inputs, check_finite=check_finite,
                            chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab)
    shard = _check({"hidden": hidden}, weight_shard, targets, options, process_group, vocab_start)
    h = hidden.reshape(-1, hidden.shape[-1])
    logp, entropy = _StatsFunction.apply(h, None, weight_shard, shard)
    return TokenStats(logp.reshape(targets.shape), entropy.reshape(targets.shape))


def two_view_stats(hidden_a: Tensor, hidden_b: Tensor, weight_shard: Tensor, targets: Tensor, *,
                   process_group=None, vocab_start: int | None = None, temperature: float = 1.0,
                   ignore_index: int = -100, backend: str = "auto", strategy: str = "auto",
                   check_inputs: bool | None = None, check_finite: bool = False,
                   chunk_tokens: int | None = None, chunk_vocab: int | None = None) -> TwoViewStats:
    """`papo_kernels.two_view_stats` over the full vocabulary from a vocabulary shard of the head.

    Returns TwoViewStats(logp_a, logp_b, entropy_a, entropy_b, kl_ab, kl_ba) of the full
    vocabulary on every rank. A hidden_b that does not require grad is a constant view (no dW
    through it), as in the unsharded call.
    {args}
    """
    options = KernelOptions(temperature=temperature, ignore_index=ignore_index, backend=backend,
                            strategy=strategy, check_inputs=check_inputs, check_finite=check_finite,
                            chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab)
    shard = _check({"hidden_a": hidden_a, "hidden_b": hidden_b}, weight_shard, targets, options,
                   process_group, vocab_start)
    outs = _StatsFunction.apply(hidden_a.reshape(-1, hidden_a.shape[-1]),
                                hidden_b.reshape(-1, hidden_b.shape[-1]), weight_shard, shard)
    return TwoViewStats(*(o.reshape(targets.shape) for o in outs))


class _FusedRun:
    """The fused calls' chunk loop (FusedLossFunction's `run`) over a vocabulary shard."""

    def __init__(self, shard: _Shard, loss_fn: Callable, stats_type):
        self.shard = shard
        self.loss_fn = loss_fn
        self.stats_type = stats_type
        self.chunk_tokens = shard.options.chunk_tokens or DEFAULT_CHUNK_TOKENS
        self.metrics: dict = {}

    def execute(self, hidden_a, hidden_b, weight, targets, need_a: bool, need_b: bool, need_w: bool):
        need_any = need_a or need_b or need_w
        n = hidden_a.shape[0]
        dh_a = torch.zeros_like(hidden_a) if need_a else None
        dh_b = torch.zeros_like(hidden_b) if need_b else None
        dw_acc = torch.zeros(weight.shape, dtype=compute_dtype(hidden_a.dtype), device=weight.device) \
            if need_w else None
        total = []
        # N = 0 still calls loss_fn once on empty statistics, as the unsharded calls do.
        bounds = [(r0, min(r0 + self.chunk_tokens, n)) for r0 in range(0, n, self.chunk_tokens)] or [(0, 0)]
        for r0, r1 in bounds:
            rows = slice(r0, r1)
            stats = self.shard.forward(hidden_a, hidden_b, weight, rows)
            values = (stats.logp_a, stats.entropy_a) if hidden_b is None else \
                (stats.logp_a, stats.logp_b, stats.entropy_a, stats.entropy_b, stats.kl_ab, stats.kl_ba)
            public = self.stats_type(*(v.detach().requires_grad_(need_any) for v in values))
            index = torch.arange(r0, r1, device=targets.device)
            with torch.enable_grad() if need_any else torch.no_grad():
                loss, metrics = _check_loss_fn_result(self.loss_fn(public, index), r0, r1)
            for k, v in metrics.items():
                v = v.detach() if isinstance(v, Tensor) else v
                self.metrics[k] = self.metrics[k] + v if k in self.metrics else v
            total.append(loss.detach())
            if not (need_any and loss.requires_grad):
                continue
            g = dict(zip(public._fields, torch.autograd.grad(loss, list(public), allow_unused=True)))
            if hidden_b is None:
                grads = RowGrads(logp_a=g["logp"], entropy_a=g["entropy"])
            else:
                grads = RowGrads(g["logp_a"], g["entropy_a"], g["logp_b"], g["entropy_b"],
                                 g["kl_ab"], g["kl_ba"])
            ca, cb = self.shard.backward(hidden_a, hidden_b, weight, rows, stats, grads, need_a, need_b,
                                         dw_acc)
            if need_a:
                dh_a[rows] = ca
            if need_b:
                dh_b[rows] = cb
        _all_reduce_(dh_a, self.shard.layout)
        _all_reduce_(dh_b, self.shard.layout)
        loss = total[0] if len(total) == 1 else torch.stack(total).sum()
        return loss, dh_a, dh_b, dw_acc


def _fused(hiddens, weight_shard, targets, loss_fn, stats_type, process_group, vocab_start,
           options: KernelOptions):
    shard = _check(hiddens, weight_shard, targets, options, process_group, vocab_start)
    views = [h.reshape(-1, h.shape[-1]) for h in hiddens.values()]
    hidden_a, hidden_b = views[0], (views[1] if len(views) > 1 else None)
    run = _FusedRun(shard, loss_fn, stats_type)
    flat_targets = targets.reshape(-1)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (*views, weight_shard)):
        loss = FusedLossFunction.apply(hidden_a, hidden_b, weight_shard, flat_targets, run)
    else:
        loss, *_ = run.execute(hidden_a, hidden_b, weight_shard, flat_targets, False, False, False)
    return loss, run.metrics


def fused_token_loss(hidden: Tensor, weight_shard: Tensor, targets: Tensor, loss_fn: Callable, *,
                     process_group=None, vocab_start: int | None = None, temperature: float = 1.0,
                     ignore_index: int = -100, backend: str = "auto", strategy: str = "auto",
                     check_inputs: bool | None = None, check_finite: bool = False,
                     chunk_tokens: int | None = None, chunk_vocab: int | None = None) -> tuple[Tensor, dict]:
    """`papo_kernels.fused_token_loss` from a vocabulary shard of the head.

    loss_fn sees the full-vocabulary statistics of each chunk (the same on every rank) and must
    be deterministic across ranks; the returned loss and metrics are the same on every rank.
    {args}
    """
    _check_loss_fn(loss_fn)
    options = KernelOptions(temperature=temperature, ignore_index=ignore_index, backend=backend,
                            strategy=strategy, check_inputs=check_inputs, check_finite=check_finite,
                            chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab)
    return _fused({"hidden": hidden}, weight_shard, targets, loss_fn, TokenStats, process_group, vocab_start,
                  options)


def fused_two_view_loss(hidden_a: Tensor, hidden_b: Tensor, weight_shard: Tensor, targets: Tensor,
                        loss_fn: Callable, *, process_group=None, vocab_start: int | None = None,
                        temperature: float = 1.0, ignore_index: int = -100, backend: str = "auto",
                        strategy: str = "auto", check_inputs: bool | None = None, check_finite: bool = False,
                        chunk_tokens: int | None = None, chunk_vocab: int | None = None,
                        ) -> tuple[Tensor, dict]:
    """`papo_kernels.fused_two_view_loss` from a vocabulary shard of the head (as fused_token_loss).
    {args}
    """
    _check_loss_fn(loss_fn)
    options = KernelOptions(temperature=temperature, ignore_index=ignore_index, backend=backend,
                            strategy=strategy, check_inputs=check_inputs, check_finite=check_finite,
                            chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab)
    return _fused({"hidden_a": hidden_a, "hidden_b": hidden_b}, weight_shard, targets, loss_fn, TwoViewStats,
                  process_group, vocab_start, options)


for _fn in (token_stats, two_view_stats, fused_token_loss, fused_two_view_loss):
    _fn.__doc__ = _fn.__doc__.replace("{args}", _ARGS.strip("\n"))
