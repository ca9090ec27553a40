"""The reward path under attack, in CI: a sample of the answers `python -m benchmarks.attack_grader`
grades (every kind), the canary's positive control, and the committed table of the full run."""

from __future__ import annotations

import json

import pytest

from benchmarks.attack_grader import (
    KINDS,
    RESULTS,
    TABLE,
    canary_control,
    canary_payloads,
    generate,
    render_markdown,
)

pytest.importorskip("mathruler.grader")

SAMPLE = 296  # 37 of each of the 8 kinds (the generator takes the kinds in turn)


def test_the_canary_payloads_are_live_python(tmp_path):
    # without this control, "the canary never appeared" could mean the payloads never worked
    canary = tmp_path / "C"
    assert canary_control(canary) == len(canary_payloads(str(canary)))
    assert not canary.exists()


def test_a_sample_of_the_attack(tmp_path):
    from benchmarks.attack_grader import run_attack
    from papo.rewards import DEFAULT_TIMEOUT_S

    canary = tmp_path / "C"
    attacks = generate(SAMPLE, seed=1, canary=str(canary))
    result = run_attack(attacks, canary=canary, timeout=DEFAULT_TIMEOUT_S, throughput_answers=5, rounds=1)
    assert set(result["kinds"]) == set(KINDS)
    assert all(row["answers"] == SAMPLE // len(KINDS) for row in result["kinds"].values())
    assert not result["canary_created"] and not canary.exists()
    assert result["past_deadline"] == 0
    # the guard refuses what would hang sympy before it starts: nothing reaches the deadline
    assert result["timeouts"] == 0 and result["worker_deaths"] == 0, result["kinds"]
    assert result["children_after"] == result["children_before"] and result["zombies_after"] == 0
    assert result["fds_after"] == result["fds_before"]
    refused = {kind: row["refused"] for kind, row in result["kinds"].items()}
    assert refused["unicode look-alikes of digits and operators"] > 0 and refused["deep nesting"] > 0, refused


def test_the_committed_table_is_the_results_rendered():
    results = json.loads(RESULTS.read_text())
    assert TABLE.read_text(encoding="utf-8") == render_markdown(results)
    assert results["answers"] >= 10_000 and set(results["kinds"]) == set(KINDS)
