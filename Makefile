# Developer shortcuts (the README's two commands are the supported entry points).
PY ?= python

.PHONY: test test-fast test-gpu lint quickstart

test:
	$(PY) -m pytest -q

test-fast:
	$(PY) -m pytest -q -m "not slow"

test-gpu:
	$(PY) -m pytest -q -m gpu

lint:
	$(PY) -m ruff check .

quickstart:
	$(PY) examples/quickstart.py
