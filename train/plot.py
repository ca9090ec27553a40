"""Plot a run's metrics: `python -m train.plot RUN_DIR [--out RUN_DIR/plots]`.

Reads `RUN_DIR/metrics.jsonl` and writes PNG curves: rewards and accuracy,
validation avg@k, every loss term, and the paper's collapse signals
(docs/algorithm.md: the perception KL blowing up, the clip-high fraction
rising, both entropies rising).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PANELS: dict[str, list[str]] = {
    "rewards": ["reward/mean", "reward/accuracy", "reward/format"],
    "losses": ["loss/total", "loss/policy", "kl/perception", "kl/ref"],
    "collapse_signals": ["kl/perception", "rollout/kl_perception_exact", "clip/frac_high",
                         "entropy/full", "entropy/masked", "rollout/entropy_masked_exact"],
    "optimization": ["grad_norm", "lr", "ratio/mean", "kl/old"],
    "response": ["response/length_mean", "response/truncated_frac"],
    "throughput": ["perf/rollout_tokens_per_s", "perf/update_tokens_per_s", "time/step_s"],
}


def load_metrics(run_dir: str | Path) -> list[dict]:
    """The records of `run_dir/metrics.jsonl` (training steps and evaluations)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write one PNG per panel (plus eval.png); returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    records = load_metrics(run_dir)
    out = Path(out_dir) if out_dir else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    panels = dict(PANELS)
    eval_keys = sorted({k for r in records for k in r if k.startswith("eval/avg@")})
    if eval_keys:
        panels["eval"] = eval_keys
    for name, keys in panels.items():
        keys = [k for k in keys if any(k in r for r in records)]
        if not keys:
            continue
        fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=True, squeeze=False)
        for ax, key in zip(axes[:, 0], keys):
            pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3)
            ax.set_ylabel(key, fontsize=8)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("rollout step")
        fig.suptitle(f"{Path(run_dir).name}: {name}")
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None, help="output directory (default RUN_DIR/plots)")
    args = parser.parse_args(argv)
    for p in plot_run(args.run_dir, args.out):
        print(p)


if __name__ == "__main__":
    main()
