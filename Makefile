# The same commands for people and CI (CI runs .ci/run, which runs `make`-free equivalents).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv test lint bench demo
venv:
	python3 -m venv $(VENV) && $(VENV)/bin/pip install -e '.[test]'
test:
	$(VENV)/bin/pytest
lint:
	$(VENV)/bin/ruff check . && $(VENV)/bin/mypy
bench:
	$(PY) loadtests/bench.py --duration 10 && $(PY) loadtests/assign_bench.py && $(PY) loadtests/reload_bench.py
demo:
	$(VENV)/bin/ringproxy demo
