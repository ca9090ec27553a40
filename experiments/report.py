"""The sweep's report: tables with paired intervals, per-step curves and the raw JSONL.

    python -m experiments.report [--root experiments/runs/standard-full] [--out DIR]
    python -m experiments.report --from-jsonl experiments/results/standard-full/runs.jsonl   # tables only

Reads every finished run under `--root` (`<variant>/seed<S>/experiment.json`, written by
`experiments.sweep`) and writes into `--out`:

- `results.md`: held-out avg@k (mean +- sd over seeds) and the paired difference to GRPO with
  its 95% t-interval and verdict, per variant and per category; the estimator comparison
  (exact - sampled: accuracy and PAPO step time); black-image accuracy and the real-to-black
  drop; wall time; the KL-hacking grid with the collapse rule; one line per run;
- `runs.jsonl`: one summary row per run (what the tables are computed from);
- `raw/<variant>/seed<S>.jsonl`: each run's own metrics.jsonl (every step and evaluation);
- `curves/<group>_<metric>.png`: per-step curves (training accuracy, held-out accuracy,
  perception KL, both entropies, response length), mean over seeds with the min-max band.

The statistics are those of `experiments.stats` (decided before the sweep ran).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

from experiments import stats
from experiments.variants import BASELINE, EXACT, SAMPLED, VARIANTS

CURVES: dict[str, tuple[str, str, bool]] = {
    # file name: (metrics key, axis label, log scale)
    "accuracy": ("reward/accuracy", "training accuracy (rollouts)", False),
    "perception_kl": ("rollout/kl_perception_exact", "perception KL(full || masked), exact", True),
    "entropy_full": ("rollout/entropy_full_exact", "entropy, original image", False),
    "entropy_masked": ("rollout/entropy_masked_exact", "entropy, masked image", False),
    "response_length": ("response/length_mean", "response length (tokens)", False),
}


# --------------------------------------------------------------------------- collecting runs


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file (blank lines skipped)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Training-step records in step order, the last one of each step (a resumed run may repeat)."""
    by_step = {r["step"]: r for r in records if "reward/accuracy" in r}
    return [by_step[s] for s in sorted(by_step)]


def eval_series(records: list[dict[str, Any]], k: int) -> list[tuple[int, float]]:
    """(step, held-out avg@k) of the run's evaluations, the last record of each step."""
    key = f"eval/avg@{k}"
    by_step = {r["step"]: r[key] for r in records if key in r}
    return sorted(by_step.items())


def _papo_fields(run_dir: Path) -> dict[str, Any]:
    """gamma, eta and estimator of the run's resolved config (config.yaml)."""
    from train.config import load_config

    path = run_dir / "config.yaml"
    if not path.exists():
        return {}
    p = load_config(path).papo_config()
    return {"gamma": p.gamma, "eta_full": p.eta_full, "eta_masked": p.eta_masked, "estimator": p.estimator,
            "beta": p.beta}


def summarize_run(run_dir: Path) -> dict[str, Any]:
    """The summary row of one finished run (see `runs.jsonl`)."""
    exp = json.loads((run_dir / "experiment.json").read_text())
    final = json.loads((run_dir / "eval_final.json").read_text())
    records = read_jsonl(run_dir / "metrics.jsonl")
    keys = [k for k in final if k.startswith("eval/avg@")]
    if not keys:
        raise ValueError(f"{run_dir}/eval_final.json has no eval/avg@k")
    k = int(keys[0].split("@")[1])
    steps = step_records(records)
    evals = eval_series(records, k)
    row: dict[str, Any] = {
        "variant": exp["variant"], "seed": exp["seed"], "k": k,
        "questions": final.get("eval/questions"),
        "avg": final[f"eval/avg@{k}"],
        "format": final.get("eval/format"),
        "by_category": final.get("eval/by_category", {}),
        "initial_avg": final.get("initial", {}).get(f"avg@{k}"),
        "initial_by_category": final.get("initial", {}).get("by_category", {}),
        "wall_s": exp["wall_s"], "cpu_s": exp.get("cpu_s"), "attempts": exp.get("attempts", 1),
        "papo_steps": len(steps),
        "eval_steps": [s for s, _ in evals], "eval_avg": [v for _, v in evals],
    }
    black = final.get("black_images")
    if black is not None:
        row["black_avg"] = black[f"avg@{k}"]
        row["black_by_category"] = black.get("by_category", {})
        row["blind_baseline"] = final.get("blind_baseline")
        row["real_to_black_drop"] = row["avg"] - row["black_avg"]
    for name, key in (("step_s", "time/step_s"), ("update_s", "time/update_s"),
                      ("rollout_s", "time/rollout_s"), ("logprob_s", "time/logprob_s")):
        vals = [r[key] for r in steps if key in r]
        row[f"{name}_mean"] = sum(vals) / len(vals) if vals else None
    kl = [r["rollout/kl_perception_exact"] for r in steps if "rollout/kl_perception_exact" in r]
    if kl and evals:
        c = stats.collapse(kl, [v for _, v in evals])
        row.update(kl_initial=c.kl_initial, kl_peak=c.kl_peak, kl_final=c.kl_final, kl_ratio=c.kl_ratio,
                   eval_peak=c.eval_peak, eval_drop_points=c.eval_drop_points, collapsed=c.collapsed)
    row.update(_papo_fields(run_dir))
    return row


def finished_runs(root: Path) -> list[Path]:
    """Run directories under `root` with an experiment.json, sorted by variant then seed."""
    found = [p.parent for p in root.glob("*/seed*/experiment.json") if p.parent.parent.name != "warm"]
    return sorted(found, key=lambda p: (p.parent.name, int(p.name[4:]) if p.name[4:].isdigit() else 0))


def unfinished_runs(root: Path) -> list[Path]:
    """Run directories that exist but are not finished (no experiment.json)."""
    return sorted(p for p in root.glob("*/seed*") if p.is_dir() and p.parent.name != "warm"
                  and not (p / "experiment.json").exists())


def warm_starts(root: Path) -> list[dict[str, Any]]:
    """Wall and CPU time of every finished warm start."""
    out = []
    for p in sorted(root.glob("warm/seed*/WARM.json")):
        w = json.loads(p.read_text())
        out.append({"seed": w["seed"], "wall_s": w["wall_s"], "cpu_s": w.get("cpu_s")})
    return out


# --------------------------------------------------------------------------- tables


def _pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _median(values: list[float]) -> float:
    v = sorted(values)
    if not v:
        return float("nan")
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else 0.5 * (v[mid - 1] + v[mid])


def _mean_sd_pct(values: list[float]) -> str:
    if not values:
        return "-"
    mean, sd = stats.mean_sd(values)
    return f"{100 * mean:.1f} ± {100 * sd:.1f}" if len(values) > 1 else f"{100 * mean:.1f}"


def _interval_pts(iv: stats.Interval | None, scale: float = 100.0, digits: int = 1) -> str:
    if iv is None:
        return "-"
    if iv.n < 2:
        return f"{scale * iv.mean:+.{digits}f} (n = 1, no interval)"
    return f"{scale * iv.mean:+.{digits}f} [{scale * iv.lo:+.{digits}f}, {scale * iv.hi:+.{digits}f}]"


def _by_seed(rows: list[dict[str, Any]], variant: str, key: str,
             category: str | None = None) -> dict[int, float]:
    out = {}
    for r in rows:
        if r["variant"] != variant:
            continue
        v = r.get(key) if category is None else r.get(key, {}).get(category)
        if v is not None:
            out[r["seed"]] = v
    return out


def _order(rows: list[dict[str, Any]]) -> list[str]:
    present = {r["variant"] for r in rows}
    known = [v for v in VARIANTS if v in present]
    return known + sorted(present - set(known))


def render_markdown(rows: list[dict[str, Any]], *, title: str = "Sweep results",
                    warm: list[dict[str, Any]] | None = None, unfinished: list[str] | None = None) -> str:
    """The report's markdown from summary rows (the `runs.jsonl` rows)."""
    if not rows:
        return f"# {title}\n\nNo finished runs.\n"
    k = rows[0]["k"]
    order = _order(rows)
    baseline_present = any(r["variant"] == BASELINE for r in rows)
    lines = [f"# {title}", ""]
    n_q = sorted({r.get("questions") for r in rows if r.get("questions") is not None})
    lines += [
        f"Held-out avg@{k} on {', '.join(map(str, n_q)) or '?'} validation questions after the last "
        f"PAPO step, in %. Δ: per-seed paired difference to `{BASELINE}` in points, mean [95% "
        "t-interval over seeds]; a variant *helps* only if the interval lies above 0 "
        "(experiments/README.md, \"Statistics\"). Black images: the final policy with every image "
        "replaced by a black one; real − black: how much the policy's accuracy depends on the image. "
        "Wall and CPU: per run (trainer and its grader workers), without the shared warm start.",
        "",
        f"| variant | seeds | avg@{k} (%) | Δ vs {BASELINE} (points) | verdict | black images (%) | "
        "real − black (points) | wall per run (min) | CPU per run (min) | PAPO step (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = _by_seed(rows, BASELINE, "avg")
    for v in order:
        mine = [r for r in rows if r["variant"] == v]
        accs = [r["avg"] for r in mine]
        iv = None
        if v != BASELINE and baseline_present:
            iv = stats.paired_interval(_by_seed(rows, v, "avg"), base)
        black = [r["black_avg"] for r in mine if r.get("black_avg") is not None]
        drop = [r["real_to_black_drop"] for r in mine if r.get("real_to_black_drop") is not None]
        walls = [r["wall_s"] / 60 for r in mine]
        cpus = [r["cpu_s"] / 60 for r in mine if r.get("cpu_s")]
        step_s = [r["step_s_mean"] for r in mine if r.get("step_s_mean") is not None]
        lines.append(
            f"| {v} | {len(mine)} | {_mean_sd_pct(accs)} | {_interval_pts(iv) if iv else '-'} | "
            f"{iv.verdict if iv else '-'} | {_mean_sd_pct(black)} | "
            f"{_mean_sd_pct(drop)} | {sum(walls) / len(walls):.1f} | "
            f"{(sum(cpus) / len(cpus)) if cpus else float('nan'):.1f} | "
            f"{(sum(step_s) / len(step_s)) if step_s else float('nan'):.2f} |")
    blind = sorted({round(r["blind_baseline"], 4) for r in rows if r.get("blind_baseline") is not None})
    if blind:
        lines += ["", f"Blind baseline (question-aware majority answer of the evaluated questions): "
                      f"{', '.join(_pct(b) for b in blind)}%."]

    if any(r["variant"] == EXACT for r in rows) and any(r["variant"] == SAMPLED for r in rows):
        lines += ["", f"## Estimator: `{EXACT}` − `{SAMPLED}` (paired by seed)", "",
                  "| quantity | Δ mean [95% interval] | verdict |", "|---|---|---|"]
        iv = stats.paired_interval(_by_seed(rows, EXACT, "avg"), _by_seed(rows, SAMPLED, "avg"))
        lines.append(f"| held-out avg@{k} (points) | {_interval_pts(iv)} | {iv.verdict if iv else '-'} |")
        for key, label in (("step_s_mean", "PAPO step time (s)"),
                           ("update_s_mean", "update phase per step (s)")):
            iv = stats.paired_interval(_by_seed(rows, EXACT, key), _by_seed(rows, SAMPLED, key))
            if iv is not None:
                word = {"helps": "exact is slower", "hurts": "exact is faster"}.get(iv.verdict, iv.verdict)
                lines.append(f"| {label} | {_interval_pts(iv, scale=1.0, digits=3)} | {word} |")

    cats = sorted({c for r in rows for c in (r.get("by_category") or {})})
    if cats:
        lines += ["", "## Per category", "",
                  f"| variant | category | avg@{k} (%) | Δ vs {BASELINE} (points) | verdict | "
                  "black images (%) |",
                  "|---|---|---|---|---|---|"]
        for v in order:
            for c in cats:
                accs = [r["by_category"][c] for r in rows
                        if r["variant"] == v and c in r.get("by_category", {})]
                black = [r["black_by_category"][c] for r in rows
                         if r["variant"] == v and c in (r.get("black_by_category") or {})]
                iv = None
                if v != BASELINE and baseline_present:
                    iv = stats.paired_interval(_by_seed(rows, v, "by_category", c),
                                               _by_seed(rows, BASELINE, "by_category", c))
                lines.append(f"| {v} | {c} | {_mean_sd_pct(accs)} | {_interval_pts(iv) if iv else '-'} | "
                             f"{iv.verdict if iv else '-'} | {_mean_sd_pct(black)} |")

    grid = [v for v in order if VARIANTS.get(v) is not None and VARIANTS[v].group == "grid"]
    if grid:
        from experiments.variants import grid_cells

        lines += ["", "## KL-hacking grid (sampled estimator)", "",
                  f"Collapse: the perception KL's highest {stats.WINDOW}-step mean >= "
                  f"{stats.KL_FACTOR:g}x its first {stats.WINDOW}-step mean, and the final held-out "
                  f"accuracy >= {stats.DROP_POINTS:g} points below the run's best. Final format: the "
                  "share of held-out answers in the `<think>...</think> \\boxed{}` format at the end (a "
                  "run can also fail by losing its format, with the KL falling instead of rising).", "",
                  f"| gamma | eta | variant | seeds | avg@{k} (%) | Δ vs {BASELINE} (points) | perception KL "
                  "peak/first (median) | drop from peak (points, mean) | final format (%) | collapsed |",
                  "|---" * 10 + "|"]
        for gamma, eta, v in grid_cells():
            mine = [r for r in rows if r["variant"] == v]
            if not mine:
                continue
            iv = stats.paired_interval(_by_seed(rows, v, "avg"), base) if baseline_present else None
            ratios = [r["kl_ratio"] for r in mine if r.get("kl_ratio") is not None]
            drops = [r["eval_drop_points"] for r in mine if r.get("eval_drop_points") is not None]
            formats = [r["format"] for r in mine if r.get("format") is not None]
            n_col = sum(1 for r in mine if r.get("collapsed"))
            lines.append(f"| {gamma:g} | {eta:g} | {v} | {len(mine)} | "
                         f"{_mean_sd_pct([r['avg'] for r in mine])} | {_interval_pts(iv) if iv else '-'} | "
                         f"{_median(ratios):.2f} | {_mean(drops):.1f} | {_mean_sd_pct(formats)} | "
                         f"{n_col}/{len(mine)} |")

    lines += ["", "## Runs", "",
              f"| variant | seed | step-0 avg@{k} (%) | final avg@{k} (%) | format (%) | black (%) | "
              "KL peak/first | collapsed | wall (min) | CPU (min) | attempts |", "|---" * 11 + "|"]
    for v in order:
        for r in sorted((r for r in rows if r["variant"] == v), key=lambda r: r["seed"]):
            ratio = r.get("kl_ratio")
            cpu_min = r["cpu_s"] / 60 if r.get("cpu_s") else float("nan")
            lines.append(f"| {v} | {r['seed']} | {_pct(r.get('initial_avg'))} | {_pct(r['avg'])} | "
                         f"{_pct(r.get('format'))} | {_pct(r.get('black_avg'))} | "
                         f"{'-' if ratio is None else f'{ratio:.2f}'} | "
                         f"{'yes' if r.get('collapsed') else 'no'} | "
                         f"{r['wall_s'] / 60:.1f} | {cpu_min:.1f} | {r.get('attempts', 1)} |")
    # the warm start is shared: every variant of a seed must start from the same step-0 score
    by_seed: dict[int, set[float]] = defaultdict(set)
    for r in rows:
        if r.get("initial_avg") is not None:
            by_seed[r["seed"]].add(round(r["initial_avg"], 6))
    if by_seed:
        parts = [f"seed {s}: {_pct(min(v))}" + ("" if len(v) == 1 else f" to {_pct(max(v))} (differs!)")
                 for s, v in sorted(by_seed.items())]
        lines += ["", f"Step-0 avg@{k} (the shared warm start, equal across variants of a seed): "
                  + "; ".join(parts) + "."]
    if warm:
        total = sum(w["wall_s"] for w in warm)
        cpu = sum(w.get("cpu_s") or 0.0 for w in warm)
        lines += [f"Warm starts: {len(warm)}, {total / 60:.1f} min wall, {cpu / 60:.1f} min CPU in all."]
    total_runs = sum(r["wall_s"] for r in rows)
    cpu_runs = sum(r.get("cpu_s") or 0.0 for r in rows)
    lines += [f"Runs: {len(rows)}, {total_runs / 3600:.2f} h wall, {cpu_runs / 3600:.2f} h CPU in all."]
    if unfinished:
        lines += ["", f"Not finished (not in the tables): {', '.join(unfinished)}."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- curves


def _mean_band(series: list[dict[int, float]]) -> tuple[list[int], list[float], list[float], list[float]]:
    steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
    mean = [sum(s[t] for s in series) / len(series) for t in steps]
    lo = [min(s[t] for s in series) for t in steps]
    hi = [max(s[t] for s in series) for t in steps]
    return steps, mean, lo, hi


def plot_curves(raw: dict[str, dict[int, list[dict[str, Any]]]], k: int, out: Path) -> list[Path]:
    """One PNG per (group, metric): mean over seeds per variant with the min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[str]] = defaultdict(list)
    for v in raw:
        spec = VARIANTS.get(v)
        groups[spec.group if spec else "main"].append(v)
    if "grid" in groups and SAMPLED in raw and SAMPLED not in groups["grid"]:
        groups["grid"].append(SAMPLED)  # the grid's (0.01, 0.03) cell
    metrics = dict(CURVES)
    metrics["heldout"] = (f"eval/avg@{k}", f"held-out avg@{k}", False)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for group, names in sorted(groups.items()):
        names = [v for v in VARIANTS if v in names] + sorted(set(names) - set(VARIANTS))
        for fname, (key, label, log) in metrics.items():
            fig, ax = plt.subplots(figsize=(7, 4))
            drawn = False
            for v in names:
                series = []
                for recs in raw[v].values():
                    pts = {}
                    for r in recs:
                        if key in r and isinstance(r[key], (int, float)):
                            pts[r["step"]] = float(r[key])
                    if pts:
                        series.append(pts)
                if not series:
                    continue
                steps, mean, lo, hi = _mean_band(series)
                if not steps:
                    continue
                line, = ax.plot(steps, mean, label=f"{v} (n={len(series)})",
                                marker="o" if len(steps) < 12 else None, markersize=3)
                if len(series) > 1:
                    ax.fill_between(steps, lo, hi, alpha=0.15, color=line.get_color())
                drawn = True
            if not drawn:
                plt.close(fig)
                continue
            if log:
                ax.set_yscale("log")
            ax.set_xlabel("PAPO step")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            ax.set_title(f"{group} variants: {label} (mean over seeds, band min-max)", fontsize=9)
            fig.tight_layout()
            path = out / f"{group}_{fname}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            written.append(path)
    return written


# --------------------------------------------------------------------------- entry points


def write_report(root: Path, out: Path) -> dict[str, Any]:
    """Collect the finished runs under `root` and write the report into `out`."""
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise FileNotFoundError(f"no sweep at {root}")
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    rows, raw = [], defaultdict(dict)
    raw_dir = out / "raw"
    shutil.rmtree(raw_dir, ignore_errors=True)
    for run in finished_runs(root):
        row = summarize_run(run)
        rows.append(row)
        dst = raw_dir / row["variant"] / f"seed{row['seed']}.jsonl"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run / "metrics.jsonl", dst)
        files.append(dst)
        raw[row["variant"]][row["seed"]] = read_jsonl(run / "metrics.jsonl")
    runs_path = out / "runs.jsonl"
    runs_path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    files.append(runs_path)
    warm = warm_starts(root)
    sweep = json.loads((root / "sweep.json").read_text()) if (root / "sweep.json").exists() else {}
    title = "Sweep results" + (f": task {sweep['task']}, budget {sweep['budget']}" if sweep else "")
    unfinished = [f"{p.parent.name} {p.name}" for p in unfinished_runs(root)]
    md = render_markdown(rows, title=title, warm=warm, unfinished=unfinished)
    md_path = out / "results.md"
    md_path.write_text(md)
    files.append(md_path)
    if rows:
        shutil.rmtree(out / "curves", ignore_errors=True)
        files += plot_curves(raw, rows[0]["k"], out / "curves")
    return {"markdown": md_path, "files": files, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    """CLI: write the report of a sweep, or re-render the tables of a runs.jsonl."""
    from experiments.variants import ROOT

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(ROOT / "experiments" / "runs" / "standard-full"),
                        help="sweep root")
    parser.add_argument("--out", default=None, help="report folder (default experiments/results/<root name>)")
    parser.add_argument("--from-jsonl", default=None, help="print the tables of this runs.jsonl and exit")
    args = parser.parse_args(argv)
    if args.from_jsonl:
        print(render_markdown(read_jsonl(Path(args.from_jsonl))), end="")
        return 0
    out = Path(args.out) if args.out else ROOT / "experiments" / "results" / Path(args.root).name
    written = write_report(Path(args.root), out)
    print(f"{len(written['rows'])} runs -> {written['markdown']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
