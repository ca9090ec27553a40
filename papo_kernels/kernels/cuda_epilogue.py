"""The CUDA C++ epilogues (csrc/cuda/) with the signatures of the Triton ones the chunk loop calls.

`stats` mirrors stats_workspace.workspace_stats and `dz` grad_workspace.workspace_dz: same
arguments (minus the launch configs: the CUDA kernels fix their geometry, csrc/cuda/
epilogue_math.h), same outputs. They call papo_kernels_C::epilogue_stats / epilogue_dz, which
check their arguments and name the offending one. epilogue_choice.py decides when these run and
has checked that the extension can run them on the tensors' device.
"""

from __future__ import annotations

import torch


def _ops():
    from papo_kernels import extension  # noqa: F401  (loads the library, which registers the ops)

    return torch.ops.papo_kernels_C


def stats(z_a: torch.Tensor, z_b: torch.Tensor | None, targets: torch.Tensor,
          outs: dict[str, torch.Tensor], *, temperature: float, ignore_index: int) -> None:
    """Phase-1 statistics of one chunk from its logits into `outs` (see workspace_stats)."""
    if z_a.shape[0] == 0:
        return
    _ops().epilogue_stats(
        z_a, z_b, targets, outs["logp_a"], outs["entropy_a"], outs["lse_a"], outs.get("logp_b"),
        outs.get("entropy_b"), outs.get("lse_b"), outs.get("kl_ab"), outs.get("kl_ba"), float(temperature),
        int(ignore_index),
    )


def dz(z_a: torch.Tensor, z_b: torch.Tensor | None, dz_a: torch.Tensor | None, dz_b: torch.Tensor | None,
       targets: torch.Tensor, stats: dict[str, torch.Tensor | None], grads: dict[str, torch.Tensor | None], *,
       temperature: float, ignore_index: int) -> None:
    """dZ of one chunk into dz_a / dz_b (see workspace_dz; dz_a may be z_a itself).

    View b's saved statistics go to the op only with z_b (it reads them only then), and view b's
    upstream gradients only with z_b (the caller passes z_b whenever they are present).
    """
    if z_a.shape[0] == 0 or (dz_a is None and dz_b is None):
        return
    two = z_b is not None

    def b(t):
        return t if two else None

    _ops().epilogue_dz(
        z_a, z_b, dz_a, dz_b, targets, stats["lse_a"], stats["entropy_a"], b(stats.get("lse_b")),
        b(stats.get("entropy_b")), b(stats.get("kl_ab")), b(stats.get("kl_ba")), grads.get("logp_a"),
        grads.get("entropy_a"), b(grads.get("logp_b")), b(grads.get("entropy_b")), b(grads.get("kl_ab")),
        b(grads.get("kl_ba")), float(temperature), int(ignore_index),
    )
