# The README's two commands are `make demo` and `make test`; both set up .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: system-deps install demo demo-postgres test lint unit integration bench schemas clean quality bench-postgres

system-deps:
	bash scripts/system-deps

$(VENV)/.installed: pyproject.toml
	bash scripts/system-deps --no-postgres
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m stream.cli demo

demo-postgres: system-deps install
	$(PY) -m stream.cli demo --postgres

lint: install
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m stream.cli schemas --check

unit: install
	$(PY) -m pytest -q -m "not integration"

integration: system-deps install
	$(PY) -m pytest -q -m integration

test: system-deps lint
	bash scripts/deploy-tools
	$(PY) -m pytest -q

.PHONY: deploy-check
deploy-check: install
	bash scripts/deploy-tools
	$(PY) -m pytest -q tests/deploy

bench: system-deps install
	$(PY) benchmarks/bench_pipeline.py

bench-postgres: system-deps install
	$(PY) benchmarks/bench_postgres.py

schemas: install
	$(PY) -m stream.cli schemas --write

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info

quality: install
	$(PY) benchmarks/scenarios.py run
