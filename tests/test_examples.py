"""examples/ run as a user would run them (a subprocess), on small sizes, and print right numbers."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in the output:\n{text}"
    return float(match.group(1))


def test_quickstart():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--tokens", "96",
                          "--hidden", "32", "--vocab", "1000"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "two_view_stats on N=96 H=32 V=1000" in text
    # the kernels' KL against materialized logits, and sensible magnitudes
    assert _number(r"max \|kl_ba - dense\| over 8 rows: (\S+)", text) < 1e-5
    assert 0 < _number(r"mean entropy \(full view\) (\S+),", text) <= math.log(1000)
    assert _number(r"mean KL\(masked\|\|full\) (\S+)", text) > 0
    assert _number(r"\|grad hidden\| (\S+),", text) > 0 and _number(r"\|grad weight\| (\S+)", text) > 0
    assert "never allocates a [N x V] buffer" in text
