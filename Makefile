# Each target creates or refreshes the local virtual environment first (idempotent: it reinstalls
# only when pyproject.toml changed). torch is pinned in pyproject.toml.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.reca-installed
LAUNCH := $(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no

.PHONY: demo demo-compare lint test test-slow env clean

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m demo --out runs/demo

demo-compare: $(STAMP)
	$(PY) -m demo --compare --out runs/demo-compare

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean:
	rm -rf runs
