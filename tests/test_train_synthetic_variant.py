"""The synthetic task's misleading variant (`data.synthetic.variant`); the default task unchanged."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

def test_standard_task_is_unchanged():
    from train.data import synthetic_rows

    rows = synthetic_rows(40, seed=5, id_prefix="train")
    digest = hashlib.sha256(json.dumps([[r["id"], r["problem"], r["answer"], r["category"]]
                                        for r in rows]).encode()).hexdigest()
    # recorded from the generator before the misleading variant existed
    assert digest == "2057d9e4836e754be09aeae2a1d5d49531339147a399a91f9d203e9e069280eb"


def test_misleading_variant():
    from train.data import ANSWERS, synthetic_rows

    def hint_of(row):
        return row["problem"].split("Hint: the answer is ", 1)[1].split(". ", 1)[0]

    train = synthetic_rows(800, seed=3, variant="misleading", train=True, skew=0.5, hint_accuracy=0.7)
    val = synthetic_rows(400, seed=4, variant="misleading", train=False, skew=0.5, hint_accuracy=0.7)
    for r in train[:8] + val[:8]:
        assert r["problem"].startswith("<image>Hint: the answer is ") and r["problem"].count("<image>") == 1
        assert hint_of(r) in ANSWERS[r["category"]]
    assert sum(hint_of(r) == r["answer"] for r in train) / len(train) == pytest.approx(0.7, abs=0.05)
    assert all(hint_of(r) != r["answer"] for r in val)
    counts = Counter(r["answer"] for r in train if r["category"] == "count")
    assert counts["1"] / sum(counts.values()) == pytest.approx(0.25 + 0.5 * 0.75, abs=0.07)
    vcounts = Counter(r["answer"] for r in val if r["category"] == "count")
    assert max(vcounts.values()) / sum(vcounts.values()) < 0.4
    with pytest.raises(ValueError, match="variant must be one of"):
        synthetic_rows(4, seed=0, variant="tricky")
    with pytest.raises(ValueError, match="skew must be in"):
        synthetic_rows(4, seed=0, variant="misleading", skew=1.5)


def test_misleading_variant_through_the_trainer_config(tmp_path):
    from train.config import ConfigError, load_config
    from train.trainer import Trainer

    tiny = ROOT / "train" / "configs" / "tiny.yaml"
    with pytest.raises(ConfigError, match="data.synthetic.variant"):
        load_config(tiny, ["data.synthetic.variant=tricky"])
    with pytest.raises(ConfigError, match="data.synthetic.hint_accuracy"):
        load_config(tiny, ["data.synthetic.hint_accuracy=-0.1"])
    # the trainer writes the configured variant (its asset step alone: no model is built)
    trainer = Trainer.__new__(Trainer)
    trainer.cfg = load_config(tiny, [f"out_dir={tmp_path}", "model.path=unused", "data.synthetic.n_train=8",
                                     "data.synthetic.n_val=4", "data.synthetic.variant=misleading",
                                     "data.synthetic.skew=1.0"])
    trainer.rank, trainer.out = 0, tmp_path
    trainer._prepare_assets()
    summary = json.loads((tmp_path / "data" / "summary.json").read_text())
    assert summary["variant"] == "misleading" and summary["skew"] == 1.0
    assert summary["train"]["question_aware_majority_rate"] == 1.0  # skew 1: always the favoured answer
