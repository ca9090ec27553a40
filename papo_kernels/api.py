"""Public API: the four calls of docs/design.md's contract, input validation and backend dispatch.

    token_stats(hidden, weight, targets)                      -> TokenStats(logp, entropy)
    two_view_stats(hidden_a, hidden_b, weight, targets)       -> TwoViewStats(logp_a, logp_b,
                                                                 entropy_a, entropy_b, kl_ab, kl_ba)
    fused_token_loss(hidden, weight, targets, loss_fn)        -> (loss, metrics)
    fused_two_view_loss(hidden_a, hidden_b, weight, targets, loss_fn) -> (loss, metrics)

None of them materializes [tokens x vocab] logits. View a is the original image, view b the
masked image; kl_ab = KL(pi_a || pi_b), kl_ba = KL(pi_b || pi_a).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from papo_kernels._backends import resolve_backend
from papo_kernels._options import KernelOptions
from papo_kernels.autograd import FusedLossFunction, FusedRun, token_stats_op, two_view_stats_op

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class TokenStats(NamedTuple):
    """Per-token statistics of one view (each shaped like `targets`)."""

    logp: Tensor
    entropy: Tensor


class TwoViewStats(NamedTuple):
    """Per-token statistics of two views sharing the head (each shaped like `targets`)."""

    logp_a: Tensor
    logp_b: Tensor
    entropy_a: Tensor
    entropy_b: Tensor
    kl_ab: Tensor
    kl_ba: Tensor


# ---------------------------------------------------------------- validation


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def _validate(hiddens: dict[str, Tensor], weight: Tensor, targets: Tensor, options: KernelOptions) -> None:
    """Raise TypeError/ValueError naming the offending argument and what was expected (the
    options checked themselves when they were built)."""
    for name, t in (*hiddens.items(), ("weight", weight), ("targets", targets)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise ValueError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, H] (the lm_head weight), got shape {tuple(weight.shape)}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"weight must be a floating tensor ({_FLOAT_DTYPES}), got {weight.dtype}")
    vocab, hid = weight.shape
    if vocab == 0:
        raise ValueError("weight must have at least one vocabulary row, got shape (0, H)")
    if hid == 0:
        raise ValueError(f"weight must have a hidden size H >= 1, got shape ({vocab}, 0)")
    first = next(iter(hiddens))
    for name, h in hiddens.items():
        if h.dim() < 2:
            raise ValueError(f"{name} must be [N, H] or [B, T, H], got shape {tuple(h.shape)}")
        if h.shape[-1] != hid:
            raise ValueError(
                f"{name} has hidden size {h.shape[-1]} but weight is [V={vocab}, H={hid}]: "
                f"{name}.shape[-1] must equal weight.shape[1]"
            )
        if h.dtype != weight.dtype:
            raise TypeError(
                f"{name} has dtype {h.dtype} but weight has dtype {weight.dtype}: they must match"
            )
        if h.device != weight.device:
            raise ValueError(f"{name} is on {h.device} but weight is on {weight.device}: they must match")
        if h.shape != hiddens[first].shape:
            raise ValueError(
                f"{name} has shape {tuple(h.shape)} but {first} has shape "
                f"{tuple(hiddens[first].shape)}: both views must have the same shape"
            )
    h0 = hiddens[first]
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor (token ids), got {targets.dtype}")
    if targets.dtype not in (torch.int32, torch.int64):
        raise TypeError(
            f"targets must be int64 or int32 token ids, got {targets.dtype} (too narrow for a "
            "vocabulary index; convert with targets.long())"
        )
    if tuple(targets.shape) != tuple(h0.shape[:-1]):
        raise ValueError(
            f"targets must have shape {tuple(h0.shape[:-1])} ({first}.shape[:-1]), "
            f"got {tuple(targets.shape)}"
        )
    if targets.device != weight.device:
        raise ValueError(f"targets is on {targets.device} but weight is on {weight.device}: they must match")
    if _is_compiling():
        # Value checks need a host sync, which would break the graph: inside torch.compile
        # check_inputs/check_finite are skipped and the kernels' NaN rule applies instead.
        return
    check_inputs, ignore_index = options.check_inputs, options.ignore_index
    if check_inputs is None:
        check_inputs = targets.device.type == "cpu"
    if check_inputs:
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"targets must be in [0, {vocab}) or equal ignore_index={ignore_index}; "
                f"targets{list(idx)} = {int(targets[idx])}"
            )
    if options.check_finite:
        for name, t in (*hiddens.items(), ("weight", weight)):
            finite = torch.isfinite(t).all(dim=-1)
            if not bool(finite.all()):
                idx = tuple(int(i) for i in (~finite).nonzero()[0])
                raise ValueError(f"{name} has NaN/Inf values in row {list(idx)} (check_finite=True)")


def _flat(t: Tensor, keep_last: bool) -> Tensor:
    return t.reshape(-1, t.shape[-1]) if keep_last else t.reshape(-1)


# ---------------------------------------------------------------- statistics calls

_COMMON_ARGS = """
        temperature: logits are z = hidden @ weight.T / temperature (finite, > 0).
        ignore_index: rows whose target equals it give 0 in every output and 0 gradient.
        backend: "auto" (fastest available for the tensors' device: Triton on CUDA, the
            compiled "cpp" on CPU, else "torch"; PAPO_KERNELS_BACKEND=torch|triton|cpp
            overrides it), "torch" (chunked PyTorch, any device and dtype), "triton", "cpp";
            an explicit backend that is not built or cannot run raises BackendUnavailableError.
        strategy: "auto" | "workspace" | "tiles" | "workspace_cuda" (docs/design.md
            "Execution strategies"): Triton has "workspace" and "workspace_cuda" (the same
            path with the CUDA C++ epilogues of a PAPO_BUILD_CUDA=1 build; the in-register
            "fused" one was retired), cpp has "workspace" and "tiles" ("auto": "tiles" for the
            statistics calls, "workspace" for the fused calls), the torch backend has one and
            ignores it.
        check_inputs: raise ValueError naming `targets` for ids outside [0, V) other than
            ignore_index (default: True for CPU tensors, where it costs nothing). When False
            such rows give NaN outputs and gradients, without a host sync.
        check_finite: raise ValueError on NaN/Inf rows of the hidden states or weight. When
            False a non-finite row gives non-finite outputs, dh rows and dW.
            (Both checks need a host sync and are skipped inside torch.compile'd code.)
        chunk_tokens, chunk_vocab: block sizes, None for each backend's defaults: rows x
            vocabulary columns per block for the torch backend (1024 x 8192); rows per chunk
            for triton and cpp (cpp "tiles": vocabulary columns per tile in chunk_vocab).
"""


def token_stats(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    strategy: str = "auto",
    check_inputs: bool | None = None,
    check_finite: bool = False,
    chunk_tokens: int | None = None,
    chunk_vocab: int | None = None,
) -> TokenStats:
    """Sampled-token log-prob and full-vocabulary entropy of softmax(hidden @ weight.T / T).

    Args:
        hidden: [N, H] or [B, T, H] float16/bfloat16/float32/float64 last hidden states.
        weight: [V, H] lm_head weight, same dtype and device as hidden.
        targets: [N] or [B, T] integer token ids.
    {common}
    Returns:
        TokenStats(logp, entropy), each shaped like targets, float32 (float64 for float64
        inputs). Differentiable w.r.t. hidden and weight; backward recomputes logit tiles.
        A torch custom op: works under torch.compile.
    """
    options = KernelOptions(temperature=temperature, ignore_index=ignore_index, backend=backend,
                            strategy=strategy, check_inputs=check_inputs, check_finite=check_finite,
                            chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab)
    _validate({"hidden": hidden}, weight, targets, options)
    logp, entropy, _ = token_stats_op(_flat(hidden, True), weight, _flat(targets, False), *options.op_args())
    shape = targets.shape
    return TokenStats(logp.reshape(shape), entropy.reshape(shape))


def two_view_stats(
    hidden_a: Tensor,
    hidden_b: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    strategy: str = "auto",
    check_inputs: bool | None = None,
    check_finite: bool = False,
    chunk_tokens: int | None = None,
    chunk_vocab: int | None = None,
) -> TwoViewStats:
    """Log-probs, entropies and exact KLs in both directions of two views sharing one head.

    Args:
        hidden_a: [N, H] or [B, T, H] hidden states of view a (original image).
        hidden_b: same shape, view b (masked image). If it does not require grad, view b is a
            constant distribution: no gradient reaches weight through it (as autograd gives
            for hidden_b @ weight.detach().T). View a is always live: weight gets its
            gradient through view a whether or not hidden_a requires grad.
        weight: [V, H] lm_head weight shared by both views.
        targets: [N] or [B, T] integer token ids (the same completion for both views).
    {common}
    Returns:
        TwoViewStats(logp_a, logp_b, entropy_a, entropy_b, kl_ab, kl_ba), each shaped like
        targets, float32 (float64 for float64 inputs); kl_ab = KL(pi_a || pi_b) over the full
        vocabulary. A torch custom op: works under torch.compile.
    """
    options = KernelOptions(temperature=temperature, ignore_index=ignore_index, backend=backend,
                            strategy=strategy, check_inputs=check_inputs, check_finite=check_finite,
                            chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab)
    _validate({"hidden_a": hidden_a, "hidden_b": hidden_b}, weight, targets, options)
    outs = two_view_stats_op(_flat(hidden_a, True), _flat(hidden_b, True), weight, _flat(targets, False),
                             *options.op_args())
    shape = targets.shape
    return TwoViewStats(*(o.reshape(shape) for o in outs[:6]))


# ---------------------------------------------------------------- fused calls


def _check_loss_fn(loss_fn) -> None:
    """The fused calls (and vocab_parallel's) check loss_fn first, before building their options."""
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable (stats, index) -> (loss, metrics), "
                        f"got {type(loss_fn).__name__}")


def _fused(hiddens, weight, targets, loss_fn, stats_type, options: KernelOptions):
    _validate(hiddens, weight, targets, options)
    views = [_flat(h, True) for h in hiddens.values()]
    hidden_a, hidden_b = views[0], (views[1] if len(views) > 1 else None)
    run = FusedRun(resolve_backend(options.backend, weight.device), loss_fn, stats_type, options)
    targets = _flat(targets, False)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (*views, weight)):
        loss = FusedLossFunction.apply(hidden_a, hidden_b, weight, targets, run)
    else:  # nothing requires grad: statistics and loss_fn only, no gradient sweep
        loss, *_ = run.execute(hidden_a, hidden_b, weight, targets, False, False, False)
    return loss, run.metrics


def fused_token_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    loss_fn: Callable,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    strategy: str = "auto",
    check_inputs: bool | None = None,
    check_finite: bool = False,
    chunk_tokens: int | None = None,
    chunk_vocab: int | None = None,
) -> tuple[Tensor, dict]:
    """A loss over tokens of one view with its gradient computed in the forward.

    Rows are processed in chunks of `chunk_tokens`: statistics, then
    `loss_fn(TokenStats(logp, entropy), index)` with each stat [C] requiring grad and `index`
    [C] the chunk's row positions into the flattened N rows; loss_fn returns
    (scalar loss that is a sum over the chunk's tokens, dict of per-chunk metric sums). Then
    the gradient sweep accumulates dh and dW (fp32). Eager-only (takes a Python callable).

    Args:
        hidden: [N, H] or [B, T, H]; weight: [V, H]; targets: [N] or [B, T] (flattened to N rows).
        loss_fn: callable (TokenStats, index) -> (loss, metrics). Other tensors it closes over
            receive no gradient.
    {common}
    Returns:
        (loss, metrics): loss is the sum of the chunk losses, differentiable w.r.t. hidden and
        weight (backward only scales the stored gradients); metrics sums each key over chunks
        (detached). If nothing requires grad the gradient sweep is skipped.
    """
    _check_loss_fn(loss_fn)
    options = KernelOptions(temperature=temperature, ignore_index=ignore_index, backend=backend,
                            strategy=strategy, check_inputs=check_inputs, check_finite=check_finite,
                            chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab)
    return _fused({"hidden": hidden}, weight, targets, loss_fn, TokenStats, options)


def fused_two_view_loss(
    hidden_a: Tensor,
    hidden_b: Tensor,
    weight: Tensor,
    targets: Tensor,
    loss_fn: Callable,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    strategy: str = "auto",
    check_inputs: bool | None = None,
    check_finite: bool = False,
    chunk_tokens: int | None = None,
    chunk_vocab: int | None = None,
) -> tuple[Tensor, dict]:
    """A loss over tokens of two views sharing the head, gradient computed in the forward.

    As `fused_token_loss`, with loss_fn receiving
    TwoViewStats(logp_a, logp_b, entropy_a, entropy_b, kl_ab, kl_ba) per chunk. A hidden_b
    that does not require grad is a constant distribution (no dh_b, no dW through view b).

    Args:
        hidden_a, hidden_b: [N, H] or [B, T, H] (original and masked image); weight: [V, H];
        targets: [N] or [B, T]; loss_fn: (TwoViewStats, index) -> (loss, metrics).
    {common}
    Returns:
        (loss, metrics) as in `fused_token_loss`.
    """
    _check_loss_fn(loss_fn)
    options = KernelOptions(temperature=temperature, ignore_index=ignore_index, backend=backend,
                            strategy=strategy, check_inputs=check_inputs, check_finite=check_finite,
                            chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab)
    return _fused({"hidden_a": hidden_a, "hidden_b": hidden_b}, weight, targets, loss_fn, TwoViewStats,
                  options)


for _fn in (token_stats, two_view_stats, fused_token_loss, fused_two_view_loss):
    _fn.__doc__ = _fn.__doc__.replace("{common}", _COMMON_ARGS.rstrip())
