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
    assert "stage loss16k needs 150 s, " in proc.stdout and "stays pending" in proc.stdout
    record = json.loads((tmp_path / "gpu_stages.json").read_text())
    assert all(s["status"] == "pending" for s in record["stages"])
    bad = _run(tmp_path, "losses")
    assert bad.returncode == 2 and "unknown stage 'losses'" in bad.stderr
