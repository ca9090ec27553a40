"""What a run reports: the rollout step's record (rewards, responses, monitors, timings, memory)
and the logger that appends records to <out_dir>/metrics.jsonl (and TensorBoard) on rank 0."""

from __future__ import annotations

import json
import logging
import math
import os
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from train.distributed import all_reduce_
from train.samples import Sample

log = logging.getLogger("train")


class MetricsLogger:
    """JSONL (+ optional TensorBoard) metrics of rank 0."""

    def __init__(self, out_dir: Path, *, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"))
            except ImportError:
                log.warning("tensorboard not installed: metrics go to JSONL only")

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (they belong to steps lost by a kill)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", -1) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(k, v, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: GPU allocator peak on CUDA, max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass(frozen=True)
class StepTimes:
    """perf_counter() readings of one rollout step: its start and the end of each phase."""

    start: float
    rollout: float  # samples collected and scored
    logprobs: float  # advantages and the no-grad passes done
    update: float  # every mini-batch's optimizer step done


def rollout_step_record(step: int, epoch: int, samples: list[Sample], coefs, times: StepTimes,
                        update: dict[str, float], device: torch.device, data_stats) -> dict[str, Any]:
    """The metrics of rollout step `step` (0-based; recorded as step + 1): this rank's `samples`
    summed over all ranks (a collective), the schedule's coefficients `coefs`, the phases' times,
    peak memory, the data set's skip counters (`data_stats`) and the `update` phase's metrics
    (whose "update_tokens", over all ranks, becomes the update throughput)."""
    vals = torch.tensor([
        sum(s.reward for s in samples), sum(s.accuracy for s in samples), sum(s.format for s in samples),
        sum(int(s.response_ids.numel()) for s in samples), float(len(samples)),
        sum(1.0 for s in samples if not s.finished),
        sum(s.monitors.get("kl_full_to_masked", 0.0) for s in samples),
        sum(s.monitors.get("kl_masked_to_full", 0.0) for s in samples),
        sum(s.monitors.get("entropy_full", 0.0) for s in samples),
        sum(s.monitors.get("entropy_masked", 0.0) for s in samples),
    ], dtype=torch.float64)
    all_reduce_(vals)
    n = max(vals[4].item(), 1.0)
    gen_tokens = vals[3].item()
    update = dict(update)
    rec: dict[str, Any] = {
        "step": step + 1,
        "epoch": epoch,
        "reward/mean": vals[0].item() / n,
        "reward/accuracy": vals[1].item() / n,
        "reward/format": vals[2].item() / n,
        "response/length_mean": gen_tokens / n,
        "response/max": max((int(s.response_ids.numel()) for s in samples), default=0),
        "response/truncated_frac": vals[5].item() / n,
        "rollout/kl_perception_exact": vals[6].item() / n,
        "rollout/kl_masked_to_full_exact": vals[7].item() / n,
        "rollout/entropy_full_exact": vals[8].item() / n,
        "rollout/entropy_masked_exact": vals[9].item() / n,
        "coef/gamma": coefs.gamma, "coef/eta_full": coefs.eta_full, "coef/eta_masked": coefs.eta_masked,
        "time/rollout_s": times.rollout - times.start,
        "time/logprob_s": times.logprobs - times.rollout,
        "time/update_s": times.update - times.logprobs,
        "time/step_s": times.update - times.start,
        "perf/rollout_tokens_per_s": gen_tokens / max(times.rollout - times.start, 1e-9),
        "perf/update_tokens_per_s": update.pop("update_tokens") / max(times.update - times.logprobs, 1e-9),
        "memory/peak_mb": peak_memory_mb(device),
        "data/overlong_skipped": data_stats.overlong,
        "data/undecodable_skipped": data_stats.undecodable + data_stats.skipped_at_access,
    }
    rec.update(update)
    return rec
