"""The training process and its group: rank setup, collectives over ranks, seeds.

Every helper here works with and without a process group (one rank: identity), so the trainer's
code paths are the same on one process and on many.
"""

from __future__ import annotations

import os
import random
import socket
import sys
from typing import Any

import numpy as np
import torch


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a local rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Initialize torch.distributed through DeepSpeed; returns (rank, world_size).

    Works under the `deepspeed` launcher and as a plain `python` process (then
    a one-process group on a free local port is created).
    """
    import deepspeed  # a heavy import, needed only by a process that trains

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if not torch.cuda.is_available():
        # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op on first use
        # (45-51 s measured on a 2-core machine); gloo gives identical results without it.
        comm_torch = sys.modules.get("deepspeed.comm.torch")
        if comm_torch is not None:
            comm_torch.build_shm_op = lambda: None
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def barrier() -> None:
    """Barrier across ranks (no-op without a process group)."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum or max) across ranks; identity on one rank."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        red = torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX
        if t.device.type == "cpu" and torch.distributed.get_backend() == "nccl":
            # NCCL reduces device tensors only; the trainer's counters live on the CPU
            buf = t.to(torch.device("cuda", torch.cuda.current_device()))
            torch.distributed.all_reduce(buf, op=red)
            t.copy_(buf)
        else:
            torch.distributed.all_reduce(t, op=red)
    return t


def combine_across_ranks(sums: dict[str, float], weight: float,
                         tokens: int) -> tuple[dict[str, float], float, int]:
    """Token-weighted metric sums, their weight and the token count summed over all ranks
    (a rank without real micro-batches contributes nothing, so the key sets may differ)."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return sums, weight, tokens
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, (sums, weight, tokens))
    total: dict[str, float] = {}
    for part_sums, _, _ in parts:
        for k, v in part_sums.items():
            total[k] = total.get(k, 0.0) + v
    return total, sum(w for _, w, _ in parts), sum(t for _, _, t in parts)


def set_deterministic(enabled: bool, seed: int, num_threads: int = 0) -> None:
    """Seed every generator; set the thread count; in deterministic mode also fix algorithms."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if num_threads:
        torch.set_num_threads(num_threads)
    if enabled:
        # A fixed thread count fixes the order of CPU reductions; with deterministic
        # algorithms a resumed run reproduces an uninterrupted one bit for bit.
        if not num_threads:
            torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def equalize_plan(plan: list[list[int]]) -> list[list[int] | None]:
    """Pad this rank's micro-batch plan to the max count over ranks (None = dummy pass).

    ZeRO-3 gathers parameters collectively in every forward, so every rank must run
    the same number of forwards; a dummy pass reruns a real micro-batch with zero loss.
    """
    n = all_reduce_(torch.tensor([len(plan)], dtype=torch.long), "max").item()
    return plan + [None] * (int(n) - len(plan))
