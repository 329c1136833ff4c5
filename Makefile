# Two commands on a fresh machine:  make run  (install + main job),  make test  (install + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup data run test test-all bench reproduce clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test,flower,peer,report]"
	touch $@

data:
	sh scripts/ensure-data.sh

run: setup data
	$(PY) -m fedmutual run

# Packages type-checked by `make test` (settings: [tool.mypy] in pyproject.toml).
MYPY_PATHS ?= fedmutual/engine fedmutual/protocol fedmutual/algorithms fedmutual/runtimes fedmutual/deploy

test: setup data
	$(PY) -m mypy $(MYPY_PATHS)
	$(PY) -m pytest -q
	$(PY) -m pytest -q -m "deploy or pipeline"

test-all: setup data
	$(PY) -m pytest -q -m ""

# The papers' claims, regenerated into docs/results.md (about 3 hours on 2 cores; resumable).
reproduce: setup data
	$(PY) -m fedmutual reproduce --docs docs/results.md

bench: setup data
	$(PY) benchmarks/engine.py

clean:
	rm -rf $(VENV) runs .pytest_cache
