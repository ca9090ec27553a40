"""benchmarks/gpu_session.sh --dry-run: every stage of the staged GPU session runs on the CPU with
tiny shapes, and the bookkeeping a short GPU window relies on works: the four files in $OUT,
one results section per stage, the stage record, and stages left pending when the budget ends.

The full dry run takes ~1-2 minutes on 2 cores (each stage starts its own Python), hence `slow`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
RECORD = ROOT / "benchmarks" / "gpu_stages.json"


def _run(out: Path, *args: str, **env_extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, DRY_SKIP="compile,cce", DRY_QUICK="1",
               **env_extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)


def _stages() -> list[str]:
    return [s["name"] for s in json.loads(RECORD.read_text())["stages"]]


@pytest.mark.slow
def test_dry_run_runs_every_stage(tmp_path):
    before = RECORD.read_text()
    proc = _run(tmp_path, SESSION_BUDGET_S="5000")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["gpu_stages.json", "results.tar.gz", "session.log", "summary.md"]
    record = json.loads((tmp_path / "gpu_stages.json").read_text())
    assert [s["name"] for s in record["stages"]] == _stages()
    for s in record["stages"]:
        assert s["status"] == "done" and s["rc"] == 0, s
        assert s["results"].startswith("benchmarks/results/cpu-")
    assert RECORD.read_text() == before  # a dry run never writes the committed record
    with tarfile.open(tmp_path / "results.tar.gz") as tar:
        names = tar.getnames()
        doc_name = next(n for n in names if n.endswith(".json"))
        doc = json.load(tar.extractfile(doc_name))
    sections = {"loss-16k", "loss-maxbatch", "loss-bconst-16k", "loss-token-16k", "loss-sweep",
                "loss-memory-rings", "loss-memory-n", "step-7b"}
    assert sections <= set(doc), sorted(doc)
    bconst = doc["loss-bconst-16k"]["cells"]
    assert bconst and all(c["b_requires_grad"] is False for c in bconst)
    assert {c["tokens"] for c in doc["loss-sweep"]["cells"]} == {64, 128}
    cells = {c["provider"]: c for c in doc["loss-16k"]["cells"]}
    assert cells["floor"]["status"] == "ok" and cells["torch:fused"]["check"] == "reference"
    assert cells["triton:fused:workspace:v1"]["status"] == "unavailable"  # gpu-only
    assert cells["triton:fused:workspace_cuda"]["status"] == "unavailable"  # the CUDA epilogues, gpu-only
    assert "compile" not in cells  # DRY_SKIP
    search = {c["provider"]: c for c in doc["loss-maxbatch"]["cells"]}
    assert search["eager"]["max_tokens"] not in (None, "gpu-only")
    assert search["triton:fused:workspace"]["status"] == "unavailable"
    summary = (tmp_path / "summary.md").read_text()
    assert "| target | goal | measured | verdict | note |" in summary
    assert all(f"| {name} | done |" in summary for name in _stages())


def test_budget_leaves_stages_pending_and_unknown_stages_are_refused(tmp_path):
    proc = _run(tmp_path, "loss16k", "maxbatch", SESSION_BUDGET_S="5")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "stage loss16k: " in proc.stdout and "s left (< 45 s): stays pending" in proc.stdout
    record = json.loads((tmp_path / "gpu_stages.json").read_text())
    assert all(s["status"] == "pending" for s in record["stages"])
    bad = _run(tmp_path, "losses")
    assert bad.returncode == 2 and "unknown stage 'losses'" in bad.stderr


def test_targets_table_reads_ratios_memory_and_batch_limits():
    from benchmarks import targets

    def cell(provider, op="two_view", mode="fwd_bwd", tokens=16384, b=True, **kw):
        base = dict(provider=provider, op=op, mode=mode, tokens=tokens, b_requires_grad=b, status="ok",
                    kind="peer" if provider in ("compile", "eager") else "ours", samples=[1.0] * 5)
        return dict(base, **kw)

    doc = {"env": {}, "loss-16k": {"cells": [
        cell("triton:fused:workspace", vs_floor=1.12, time={"median": 0.16}),
        cell("triton:fused:workspace:v1", vs_floor=1.38, time={"median": 0.2}),
        cell("compile", vs_floor=1.6, time={"median": 0.24})]},
        "loss-memory-rings": {"cells": [  # 2 repetitions: the 5-repetition time wins
            cell("triton:fused:workspace", vs_floor=1.5, samples=[1.0, 1.0], extra_beyond_dw_mb=700.0,
                 plan={"ring_rows": 3840, "total_bytes": 1.7e9}),
            cell("triton:fused:workspace:ring8k", vs_floor=1.1, samples=[1.0], extra_beyond_dw_mb=1900.0)]},
        "loss-bconst-16k": {"cells": [cell("triton:fused:workspace", b=False, vs_floor=1.2)]},
        "loss-maxbatch": {"cells": [cell("triton:fused:workspace", status="search", max_tokens=">= 524288"),
                                    cell("eager", status="search", max_tokens=20480)]}}
    rows = {r["target"]: r for r in targets.evaluate(doc)}
    assert rows["two views fwd+bwd, N 16k: `triton:fused:workspace`"]["measured"] == 1.12
    assert rows["two views fwd+bwd, N 16k: `triton:fused:workspace`"]["verdict"] == "met"
    assert rows["two views fwd+bwd, N 16k: `triton:fused:workspace:v1`"]["measured"] == 1.38
    assert rows["two views 16k: torch.compile time / ours"]["measured"] == 1.5
    assert rows["view b constant, N 16k (4-GEMM floor)"]["verdict"] == "missed"
    assert rows["fused_token_loss, N 16k"]["verdict"] == "not measured"
    assert rows["extra memory beyond fp32 dW, N 16k: `triton:fused:workspace`"]["verdict"] == "met"
    assert rows["extra memory beyond fp32 dW, N 16k: `triton:fused:workspace:ring8k`"]["measured"] == 1900
    batch = rows["largest micro-batch (tokens), ours / eager"]
    assert batch["measured"] == 25.6 and batch["verdict"] == "met"
    assert "| target | goal |" in targets.render(list(rows.values()))
