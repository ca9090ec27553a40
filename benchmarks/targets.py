"""The loss kernels' targets (issue 17) read off a results file: one table, met / missed / not measured.

    python -m benchmarks.targets benchmarks/results/h200-2026-12-01.json
    python -m benchmarks.targets RESULTS.json --json        # the rows as JSON

Every ratio compares cells of one results file, i.e. one run on one card (an H200 has more
bandwidth than the H100: only ratios within a run mean anything). The floor is the `floor`
provider of the same workload and N: six GEMMs per token for two views with gradients, four when
view b is a constant (`--detached-b`). Extra memory is the docs/design.md accounting (peak minus
inputs and one gradient per input) less the fp32 dW accumulator. Cells come from every "loss*"
section of the file (gpu_session.sh writes one section per stage).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT = "triton:fused:workspace"  # the default path: the fused loss, ring workspace
CUDA_EPILOGUES = "triton:fused:workspace_cuda"  # the same path with the CUDA C++ epilogues (csrc/cuda/)
HEADLINE_N = 16384


def _cells(doc: dict) -> list[dict]:
    out = []
    for key, section in doc.items():
        if key.startswith("loss") and isinstance(section, dict):
            out += [dict(c, section=key) for c in section.get("cells", [])]
    return out


def _find(cells, provider, op="two_view", mode="fwd_bwd", tokens=HEADLINE_N, b_grad=True, field="vs_floor"):
    """The value of `field` of the matching ok cell, or None; where several stages measured it,
    the cell with the most repetitions (then the last)."""
    hits = [c for c in cells if c["provider"] == provider and c["op"] == op and c["mode"] == mode
            and c["tokens"] == tokens and c.get("b_requires_grad", True) == b_grad
            and c.get(field) is not None and (field == "max_tokens" or c["status"] == "ok")]
    if not hits:
        return None
    return max(enumerate(hits), key=lambda ic: (len(ic[1].get("samples", [])), ic[0]))[1][field]


def _row(what: str, target: str, value, ok: bool | None, where: str) -> dict:
    verdict = "not measured" if value is None else ("met" if ok else "missed")
    return {"target": what, "goal": target, "measured": value, "verdict": verdict, "source": where}


def _num(x) -> float | None:
    """A max-tokens label as a number: 12345, ">= 524288" (a lower bound) or None."""
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, str) and x.startswith(">="):
        try:
            return float(x[2:].strip())
        except ValueError:
            return None
    return None


def evaluate(doc: dict) -> list[dict]:
    cells = _cells(doc)
    rows = []
    ours = sorted({c["provider"] for c in cells
                   if c.get("kind") == "ours" and c["provider"].startswith("triton")})
    for p in ours:  # every path at the headline N, old and new side by side
        x = _find(cells, p)
        if x is not None:
            goal = "<= 1.15x floor" if p == DEFAULT else "(compare)"
            rows.append(_row(f"two views fwd+bwd, N 16k: `{p}`", goal, round(x, 3),
                             x <= 1.15 if p == DEFAULT else True, "x floor"))
    if not any(r["target"].endswith(f"`{DEFAULT}`") for r in rows):
        rows.append(_row(f"two views fwd+bwd, N 16k: `{DEFAULT}`", "<= 1.15x floor", None, None, "x floor"))
    compile_t = _find(cells, "compile", field="time")
    ours_t = _find(cells, DEFAULT, field="time")
    if compile_t and ours_t:
        rows.append(_row("two views 16k: torch.compile time / ours", "(compare)",
                         round(compile_t["median"] / ours_t["median"], 3), True, "time"))
    cuda_t = _find(cells, CUDA_EPILOGUES, field="time")
    if cuda_t and ours_t:  # papo_kernels/kernels/epilogue_choice.py: `auto` follows this ratio
        ratio = cuda_t["median"] / ours_t["median"]
        rows.append(_row("two views 16k: CUDA epilogues time / Triton epilogues", "< 1: auto may pick CUDA",
                         round(ratio, 3), ratio < 1, "time; an Evidence entry makes auto use it"))
    sweep = {c["tokens"]: c["vs_floor"] for c in cells if c["provider"] == DEFAULT and c["op"] == "two_view"
             and c["mode"] == "fwd_bwd" and c.get("b_requires_grad", True) and c["status"] == "ok"
             and c.get("vs_floor") is not None and 2048 <= c["tokens"] <= 32768}
    worst = max(sweep.values()) if len(sweep) > 1 else None
    rows.append(_row("two views fwd+bwd, N 2k-32k (worst)", "<= 1.25x floor",
                     None if worst is None else round(worst, 3), worst is not None and worst <= 1.25,
                     f"N {sorted(sweep)}" if sweep else "x floor"))
    x = _find(cells, DEFAULT, b_grad=False)
    rows.append(_row("view b constant, N 16k (4-GEMM floor)", "<= 1.15x floor",
                     None if x is None else round(x, 3), x is not None and x <= 1.15, "x floor"))
    x = _find(cells, DEFAULT, op="token_stats")
    rows.append(_row("fused_token_loss, N 16k", "<= 1.2x floor", None if x is None else round(x, 3),
                     x is not None and x <= 1.2, "x floor"))
    for op in ("two_view", "token_stats"):
        x = _find(cells, "triton:stats:workspace", op=op)
        rows.append(_row(f"stats ops ({op}) fwd+bwd, N 16k", "<= 1.45x floor",
                         None if x is None else round(x, 3), x is not None and x <= 1.45, "x floor"))
    for p in ("triton:stats:workspace", "triton:stats:workspace_cuda", "triton:stats:workspace:v1",
              "triton:stats:inregister"):
        x = _find(cells, p, op="token_stats", mode="fwd")
        t = _find(cells, p, op="token_stats", mode="fwd", field="time")
        tc = _find(cells, "compile", op="token_stats", mode="fwd", field="time")
        if x is None and p != "triton:stats:workspace":
            continue
        faster = None if (t is None or tc is None) else t["median"] < tc["median"]
        rows.append(_row(f"forward-only statistics, N 16k: `{p}`", "<= 1.25x floor, < compile",
                         None if x is None else round(x, 3),
                         x is not None and x <= 1.25 and bool(faster), "x floor" + (
                             "" if faster is None else f", {'faster' if faster else 'slower'} than compile")))
    for p in [q for q in ours if q.startswith("triton:fused:workspace")]:
        mb = _find(cells, p, field="extra_beyond_dw_mb")
        plan = _find(cells, p, field="plan")
        if mb is None:
            continue
        ring = f"ring {plan['ring_rows']} rows, buffers {plan['total_bytes'] / 1e6:.0f} MB" if plan else ""
        goal = "<= 1000 MB" if p == DEFAULT else "(compare)"
        rows.append(_row(f"extra memory beyond fp32 dW, N 16k: `{p}`", goal, round(mb),
                         mb <= 1000 if p == DEFAULT else True, ring or "MB"))
    flat = {c["tokens"]: c["extra_beyond_dw_mb"] for c in cells if c["provider"] == DEFAULT
            and c["op"] == "two_view" and c["mode"] == "fwd_bwd" and c["status"] == "ok"
            and c.get("extra_beyond_dw_mb") is not None and c.get("b_requires_grad", True)}
    what, goal = "extra memory flat in N (max - min over N)", "flat (<= 100 MB spread)"
    if len(flat) > 1:
        spread = max(flat.values()) - min(flat.values())
        rows.append(_row(what, goal, round(spread), spread <= 100, f"N {sorted(flat)}"))
    else:
        rows.append(_row(what, goal, None, None, ""))
    mine = _num(_find(cells, DEFAULT, field="max_tokens"))
    for peer in ("eager", "compile"):
        theirs = _num(_find(cells, peer, field="max_tokens"))
        ratio = None if not (mine and theirs) else mine / theirs
        goal = ">= 4x" if peer == "eager" else "(compare)"
        rows.append(_row(f"largest micro-batch (tokens), ours / {peer}", goal,
                         None if ratio is None else round(ratio, 2),
                         ratio is not None and (ratio >= 4 if peer == "eager" else True),
                         f"ours {mine}, {peer} {theirs} (>= means a lower bound)" if ratio else ""))
    return rows


def render(rows: list[dict]) -> str:
    out = ["| target | goal | measured | verdict | note |", "|---|---|---|---|---|"]
    for r in rows:
        m = "–" if r["measured"] is None else r["measured"]
        out.append(f"| {r['target']} | {r['goal']} | {m} | {r['verdict']} | {r['source']} |")
    return "\n".join(out)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="a results JSON (benchmarks/results/<device>-<date>.json)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args(argv)
    try:
        doc = json.loads(args.results.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"cannot read {args.results}: {exc}")
    rows = evaluate(doc)
    print(json.dumps(rows, indent=1) if args.json else render(rows))
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
