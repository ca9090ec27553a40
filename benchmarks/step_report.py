"""How the step benchmark's results read: its section of a results document (`python -m
benchmarks.step`) as Markdown and as a plot. Apart from benchmarks/step.py so that the loss
benchmark's renderer of a whole results document (`benchmarks.loss.render_document`, which the step
benchmark uses too) can render step sections without importing the step benchmark.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks import _harness as H


def render_section(section: dict) -> str:
    rows = section.get("rows", [])
    peak = "process peak RSS" if section.get("device") == "cpu" else "max_memory_allocated"
    out = ["## PAPO update step (`python -m benchmarks.step`)", "",
           f"Command: `{section.get('command', '')}`. One micro-batch: trunk with grad (original "
           f"image) + trunk without grad (masked image) + loss + backward + AdamW, estimator "
           f"'exact', masked view 'current_no_grad'. tokens/s = completion tokens (one view) per "
           f"second; peak = {peak}, "
           f"extra = peak - memory at the step's start (weights, AdamW states). Sides alternate "
           f"step by step.", ""]
    if section.get("partial"):
        out += ["**Partial results.**", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        info = section.get("models", {}).get(model, {})
        out += [f"### {model}: {info.get('params', 0) / 1e6:.1f}M parameters, "
                f"{info.get('sequence_tokens')} tokens per sequence ({info.get('completion_tokens')} "
                f"completion), {info.get('dtype')}, {info.get('device')}", ""]
        if info.get("note"):
            out += [info["note"], ""]
        header = ["side", "batch (seqs)", "kind", "step s", "spread", "tokens/s", "peak MB",
                  "extra MB", "first loss", "max batch", "status"]
        tab = []
        for r in rows:
            if r["model"] != model:
                continue
            t = r["time"]
            status = r["status"] if r["status"] != "ok" or not r["reason"] else r["reason"]
            tab.append([f"`{r['side']}`", r["batch"], r["kind"], t.get("median"),
                        f"{100 * t['spread']:.0f}%" if t else None, r["tokens_per_s"], r["peak_mb"],
                        r["extra_mb"], f"{r['first_loss']:.6g}" if r["first_loss"] is not None else None,
                        r["max_batch"], status])
        out += [H.md_table(header, tab), ""]
    return "\n".join(out)


def plot_section(section: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in section.get("rows", []) if r["status"] == "ok"]
    if not rows:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    labels = [f"{r['model']}\n{r['side']} B={r['batch']}" for r in rows]
    axes[0].bar(labels, [r["tokens_per_s"] for r in rows])
    axes[0].set_ylabel("completion tokens / s")
    axes[1].bar(labels, [r["peak_mb"] or 0 for r in rows])
    axes[1].set_ylabel("peak memory (MB)")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
