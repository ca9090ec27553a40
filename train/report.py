"""The end-of-run report: <out_dir>/eval_final.json and eval.md compare the warm-started (step 0)
and final avg@k on the same validation questions, with the black-image check (the final policy on
black images against the question-aware blind baseline) when it ran."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from train.config import RunConfig
from train.eval import to_markdown
from train.metrics import MetricsLogger

log = logging.getLogger("train")


def blind_baseline(val_ds, cfg: RunConfig) -> float:
    """Question-aware majority-answer rate of the evaluated validation questions (the first
    `eval.limit` of `val_ds`, or all): what answering without looking at the image scores."""
    n = min(cfg.eval.limit, len(val_ds)) if cfg.eval.limit else len(val_ds)
    by_q: dict[str, list[str]] = {}
    for i in range(n):
        row = val_ds.records[val_ds.indices[i]]
        key = str(row.get("category") or row[cfg.data.prompt_key])
        by_q.setdefault(key, []).append(str(row[cfg.data.answer_key]))
    return sum(Counter(a).most_common(1)[0][1] for a in by_q.values()) / max(n, 1)


def write_final_report(out: Path, metrics: MetricsLogger, final: dict[str, Any], *, k: int, step: int,
                       black: dict[str, Any] | None = None, baseline: float | None = None) -> dict[str, Any]:
    """Write eval_final.json and eval.md into `out` (rank 0) from the final evaluation's record
    `final` ({"step", "eval/...": ...}), the step-0 evaluation found in `metrics`' JSONL (if any) and
    the black-image evaluation `black` with its blind `baseline`; logs the black-image metrics to
    `metrics`. Returns the report."""
    key = f"eval/avg@{k}"
    report: dict[str, Any] = dict(final)
    start = None
    if metrics.path.exists():
        for line in metrics.path.read_text().splitlines():
            r = json.loads(line) if line.strip() else {}
            if r.get("step") == 0 and key in r:
                start = r
    rows = {}
    if start is not None:
        report["initial"] = {k2[5:]: v for k2, v in start.items() if k2.startswith("eval/")}
        report[f"delta_avg@{k}"] = final[key] - start[key]
        rows["initial policy (step 0)"] = report["initial"]
    rows[f"final policy (step {step})"] = {k2[5:]: v for k2, v in final.items() if k2.startswith("eval/")}
    if black is not None:
        report["black_images"] = black
        report["blind_baseline"] = baseline
        report["black_images_margin"] = black[f"avg@{k}"] - baseline
        rows[f"final policy, black images (blind baseline {100 * baseline:.2f}%)"] = black
        metrics.log({"step": step, **{f"eval_black/{k2}": v for k2, v in black.items()}})
    (out / "eval_final.json").write_text(json.dumps(report, indent=2) + "\n")
    md = to_markdown(rows, k).rsplit("| **overall**", 1)[0]
    if start is not None:
        delta = 100 * report[f"delta_avg@{k}"]
        md += f"\navg@{k} change: {delta:+.2f} points on {final['eval/questions']} questions\n"
    (out / "eval.md").write_text(md)
    log.info("evaluation (avg@%d, %d questions):\n%s", k, final["eval/questions"], md)
    return report
