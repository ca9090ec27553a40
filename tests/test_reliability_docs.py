"""docs/reliability.md is the catalog rendered: every case, fault and figure it shows comes from
tests/reliability_catalog.py (the messages themselves are checked case by case in
tests/test_reliability_inputs.py), and every test it names exists."""

from __future__ import annotations

import importlib

from tests.reliability_catalog import (
    CASES,
    DOC,
    FAULTS,
    INPUT_TEST,
    Documented,
    case_test_id,
    documented_cells,
    load_grader_results,
    render,
)


def test_the_document_is_the_catalog_rendered():
    text = DOC.read_text(encoding="utf-8")
    cells = documented_cells(text)
    missing = [c.id for c in CASES if case_test_id(c) not in cells]
    assert not missing, f"no row in docs/reliability.md (run python -m tests.reliability_catalog): {missing}"
    # documented results come from the catalog; error messages from the file (each checked against
    # the code by its case in test_reliability_inputs.py)
    shown = {c.id: c.expect.result if isinstance(c.expect, Documented) else cells[case_test_id(c)]
             for c in CASES}
    assert render(shown, load_grader_results()) == text


def test_every_test_the_document_names_exists():
    named = {INPUT_TEST} | {f.test for f in FAULTS}
    for test_id in named:
        path, _, name = test_id.partition("::")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert callable(getattr(module, name, None)), test_id


def test_the_catalog_covers_what_the_issue_asks():
    assert len(CASES) >= 40
    assert {c.component for c in CASES} == {"kernels", "loss", "config", "data", "trainer"}
    assert len({c.id for c in CASES}) == len(CASES)
