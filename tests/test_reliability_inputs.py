"""Every bad-input case of tests/reliability_catalog.py: the error it must raise (its type, what its
message names, raised by our own validation) or the documented result, and the message that
docs/reliability.md shows for it."""

from __future__ import annotations

import pytest

from tests.reliability_catalog import (
    CASES,
    DOC,
    Context,
    build_processor,
    case_test_id,
    documented_cells,
    execute,
)


@pytest.fixture(scope="module")
def processor_factory(tmp_path_factory):
    built = []

    def factory():
        if not built:  # only the data-loader cases need it
            built.append(build_processor(tmp_path_factory.mktemp("tiny")))
        return built[0]

    return factory


@pytest.fixture(scope="module")
def documented():
    return documented_cells(DOC.read_text(encoding="utf-8"))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, processor_factory, documented):
    shown = execute(case, Context(tmp_path, processor_factory))
    assert documented.get(case_test_id(case)) == shown, (
        "docs/reliability.md does not show what this case gives now: regenerate it with "
        "`python -m tests.reliability_catalog`")
