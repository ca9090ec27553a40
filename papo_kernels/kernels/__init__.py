"""Triton backend (`backend="triton"`): `forward_stats` / `backward_grads` with reference.py's signatures.

One execution path, the workspace (docs/design.md "Execution strategies"): per chunk of C rows,
one cuBLAS GEMM of the stacked views into a bounded fp32 logit workspace, epilogues for the
statistics and dZ, and per ring of dZ rows one stacked dh GEMM and one dW GEMM (workspace.py,
stats_workspace.py, stats_combine.py, grad_workspace.py). Two strategies pick the epilogues:
"workspace" the Triton ones, "workspace_cuda" the CUDA C++ ones of the compiled extension
(csrc/cuda/, a PAPO_BUILD_CUDA=1 build); "auto" picks Triton unless a committed GPU run measured
the CUDA ones faster (epilogue_choice.py).

The in-register strategy ("fused": logits recomputed in registers, dh and dW by ownership
sweeps or atomics) was retired from the public choices: its gradient kernels measured 104x the
GEMM floor on an H100 (16 s against 0.154 s at the 7B head, 16k tokens), and an in-register
backward at H = 3584 cannot keep its dh/dW accumulators on chip: it recomputes the logits
(8HV FLOPs against the 6HV floor, >= 1.33x by construction) and moves ~1-2 TB of accumulator
traffic, to save memory that is small next to the 2.18 GB fp32 dW accumulator every strategy
needs. Its forward (stats_inregister.py) stays behind PAPO_INREGISTER_FORWARD=1, a comparison
switch for the no-grad statistics on a GPU, not a public strategy.

Semantics are exactly reference.py's: fp32 math on fp16/bf16/fp32 inputs (outputs float32), rows
whose target is ignore_index give 0 in every output and gradient, targets outside [0, V) give
NaN outputs and gradients without a host sync, the vocabulary tail contributes exactly 0, and a
constant view b (`hidden_b_is_constant`) sends no gradient to the weight. float64 inputs fall
back to the reference implementation (Triton's fp64 dots are neither fast nor needed: fp64 is
for gradchecks on tiny shapes).

`chunk_tokens` is the workspace strategy's chunk size (rows per view per GEMM). `chunk_vocab` is
ignored: tile sizes come from the launch configs (_config.py), fixed per GPU family, overridable
with `_config.override_configs`; the workspace switches (ring size, variants) are documented
there too.

Importing this package needs `triton` but no GPU: every driver query is deferred and guarded.
Kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (set before importing
triton), where half inputs are upcast to fp32 right after loading.
"""

from __future__ import annotations

import torch
import triton  # noqa: F401  (ImportError here tells the dispatcher that Triton is missing)

from papo_kernels import reference
from papo_kernels._options import DEFAULT_OPTIONS, KernelOptions
from papo_kernels.kernels import _config, workspace
from papo_kernels.kernels._config import LaunchConfig, override_configs
from papo_kernels.kernels.epilogue_choice import choose_epilogue
from papo_kernels.kernels.stats_inregister import inregister_stats
from papo_kernels.reference import RowGrads, RowStats

__all__ = ["LaunchConfig", "backward_grads", "forward_stats", "loss_rows", "override_configs"]

_STAT_NAMES = ("logp_a", "entropy_a", "lse_a", "logp_b", "entropy_b", "lse_b", "kl_ab", "kl_ba")




def _unit_cols(t: torch.Tensor | None) -> torch.Tensor | None:
    """Kernels index columns with unit stride (rows may have any stride)."""
    if t is None or t.stride(-1) == 1:
        return t
    return t.contiguous()


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


def forward_stats(
    hidden_a: torch.Tensor,
    hidden_b: torch.Tensor | None,
    weight: torch.Tensor,
    targets: torch.Tensor,
    options: KernelOptions = DEFAULT_OPTIONS,
) -> RowStats:
    """Phase 1 over all rows: hidden_* [N, H], weight [V, H], targets [N] -> RowStats ([N] each).

    Outputs are float32 (float64 inputs: reference.forward_stats, float64 outputs).
    """
    epilogue = choose_epilogue(options.strategy, hidden_a.device)
    if hidden_a.dtype == torch.float64:
        return reference.forward_stats(hidden_a, hidden_b, weight, targets, options)
    temperature, ignore_index, chunk_tokens = options.temperature, options.ignore_index, options.chunk_tokens
    n = hidden_a.shape[0]
    two = hidden_b is not None
    names = _STAT_NAMES if two else _STAT_NAMES[:3]
    outs = {k: torch.empty(n, dtype=torch.float32, device=hidden_a.device) for k in names}
    hidden_a, hidden_b, weight = _unit_cols(hidden_a), _unit_cols(hidden_b), _unit_cols(weight)
    targets = targets.contiguous()
    opts = dict(temperature=float(temperature), ignore_index=int(ignore_index))
    if _config.inregister_forward_enabled():
        device, hid, vocab = hidden_a.device, hidden_a.shape[1], weight.shape[0]
        inregister_stats(
            hidden_a, hidden_b, weight, targets, outs,
            config=_config.get_config("inregister_stats", device, hidden_a.dtype, n, vocab, hid),
            combine_config=_config.get_config("stats_combine", device, hidden_a.dtype, n, vocab, hid),
            **opts,
        )
    else:
        workspace.forward_stats(hidden_a, hidden_b, weight, targets, outs, chunk_tokens=chunk_tokens,
                                epilogue=epilogue, **opts)
    return RowStats(**outs)


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
    """Phase 2: returns (dh_a, dh_b) in the hidden dtype (None where not needed) and adds dW into
    `weight_grad_acc` ([V, H], float32; float64 for float64 inputs) when given.

    `hidden_b_is_constant`: view b is a detached distribution, so no dW flows through it.
    float64 inputs: reference.backward_grads.
    """
    epilogue = choose_epilogue(options.strategy, hidden_a.device)
    if hidden_a.dtype == torch.float64:
        return reference.backward_grads(
            hidden_a, hidden_b, weight, targets, stats, grads, options,
            need_hidden_a=need_hidden_a, need_hidden_b=need_hidden_b, weight_grad_acc=weight_grad_acc,
            hidden_b_is_constant=hidden_b_is_constant,
        )
    temperature, ignore_index, chunk_tokens = options.temperature, options.ignore_index, options.chunk_tokens
    n, hid = hidden_a.shape
    two = hidden_b is not None
    device = hidden_a.device
    dh_a = torch.empty((n, hid), dtype=hidden_a.dtype, device=device) if need_hidden_a else None
    dh_b = torch.empty((n, hid), dtype=hidden_b.dtype, device=device) if (two and need_hidden_b) else None
    b_in_dw = two and not hidden_b_is_constant
    if dh_a is None and dh_b is None and weight_grad_acc is None:
        return dh_a, dh_b
    # The kernels add into a unit-column-stride fp32 accumulator; anything else goes via a copy.
    acc = weight_grad_acc
    if acc is not None and (acc.dtype != torch.float32 or acc.stride(1) != 1):
        acc = torch.zeros(weight.shape, dtype=torch.float32, device=device)
    hidden_a, hidden_b, weight = _unit_cols(hidden_a), _unit_cols(hidden_b), _unit_cols(weight)
    targets = targets.contiguous()
    stats_d = {k: _f32(getattr(stats, k)) for k in ("lse_a", "entropy_a")}
    if two:
        stats_d.update({k: _f32(getattr(stats, k)) for k in ("lse_b", "entropy_b", "kl_ab", "kl_ba")})
    grads_d = {k: _f32(getattr(grads, k)) for k in RowGrads._fields}
    if not two:  # view-b gradients of a single view are meaningless: treat as zero
        for k in ("logp_b", "entropy_b", "kl_ab", "kl_ba"):
            grads_d[k] = None
    workspace.backward_grads(hidden_a, hidden_b, weight, targets, stats_d, grads_d, dh_a, dh_b, acc,
                             chunk_tokens=chunk_tokens, b_in_dw=b_in_dw, temperature=float(temperature),
                             ignore_index=int(ignore_index), epilogue=epilogue)
    if acc is not None and acc is not weight_grad_acc:
        weight_grad_acc += acc.to(weight_grad_acc.dtype)
    return dh_a, dh_b


def loss_rows(
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
    """The fused calls' gradient-in-forward loop (reference.run_loss_rows' contract).

    The workspace strategy computes each chunk's logits once and reuses them for dZ (one GEMM
    fewer per chunk than phase 1 + phase 2); float64 inputs, N = 0 and an accumulator the
    kernels cannot add into use the generic loop over `forward_stats` / `backward_grads`.
    """
    epilogue = choose_epilogue(options.strategy, hidden_a.device)
    temperature, ignore_index, chunk_tokens = options.temperature, options.ignore_index, options.chunk_tokens
    generic = (hidden_a.dtype == torch.float64 or hidden_a.shape[0] == 0
               or (weight_grad_acc is not None and (weight_grad_acc.dtype != torch.float32
                                                    or weight_grad_acc.stride(1) != 1)))
    if generic:
        reference.run_loss_rows(
            forward_stats, backward_grads, hidden_a, hidden_b, weight, targets, on_chunk,
            options, dh_a=dh_a, dh_b=dh_b, weight_grad_acc=weight_grad_acc,
            hidden_b_is_constant=hidden_b_is_constant,
        )
        return
    two = hidden_b is not None
    workspace.loss_rows(
        _unit_cols(hidden_a), _unit_cols(hidden_b), _unit_cols(weight), targets.contiguous(), on_chunk,
        dh_a, dh_b, weight_grad_acc, b_in_dw=two and not hidden_b_is_constant,
        temperature=float(temperature), ignore_index=int(ignore_index), chunk_tokens=chunk_tokens,
        epilogue=epilogue,
    )
