# The README's two commands are `make demo` and `make test`; both set up .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Debian's own interpreter, the one most users' hosts have: unit tests and a worker smoke test run on it too,
# because a Python's build decides which optional stdlib modules (dbm.gnu, dbm.ndbm, ...) exist.
SYSTEM_PYTHON ?= /usr/bin/python3
SYSVENV ?= .venv-system

.PHONY: system-deps install demo demo-postgres test lint unit integration bench schemas clean quality bench-postgres \
	test-system-python bench-undo bench-failover bench-checkpoints bench-restore

system-deps:
	bash scripts/system-deps

$(VENV)/.installed: pyproject.toml
	bash scripts/system-deps --no-postgres
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

$(SYSVENV)/.installed: pyproject.toml
	bash scripts/system-deps --no-postgres
	$(SYSTEM_PYTHON) -m venv $(SYSVENV)
	$(SYSVENV)/bin/python -m pip install -q --upgrade pip
	$(SYSVENV)/bin/python -m pip install -q -e . 'pytest>=8'
	touch $@

# The demos are the testbed's (testbed/: local Kafka, Kafka Connect, PostgreSQL), not the product's CLI.
demo: install
	$(PY) -m testbed demo

demo-postgres: system-deps install
	$(PY) -m testbed demo --postgres

lint: install
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m stream.cli schemas --check

unit: install
	$(PY) -m pytest -q -m "not integration"

integration: system-deps install
	$(PY) -m pytest -q -m integration

test: system-deps lint test-system-python
	bash scripts/deploy-tools
	$(PY) -m pytest -q

test-system-python: system-deps $(SYSVENV)/.installed
	$(SYSVENV)/bin/python -c 'import sys; print("tests on", sys.version.split()[0], "(" + sys.base_prefix + ")")'
	$(SYSVENV)/bin/python -m pytest -q -p no:cacheprovider tests/unit tests/integration/test_worker_smoke.py

.PHONY: deploy-check
deploy-check: system-deps install
	bash scripts/deploy-tools
	$(PY) -m pytest -q tests/deploy

bench: system-deps install
	$(PY) benchmarks/bench_pipeline.py

bench-postgres: system-deps install
	$(PY) benchmarks/bench_postgres.py

# Durable state: restore of 100,000 checkpointed agents, checkpoint cost, `writeguard learn` events/s.
bench-checkpoints: system-deps install
	$(PY) benchmarks/bench_checkpoints.py

# Failover: SIGKILL of one of two workers to the first event the survivor scores from its partitions.
bench-failover: system-deps install
	$(PY) benchmarks/bench_failover.py

# Undo: scope of one agent's last hour on a 1,000,000-event CDC topic, then apply of a 10,000-row plan.
bench-undo: system-deps install
	$(PY) benchmarks/bench_undo.py
	$(PY) benchmarks/bench_undo_apply.py

# Restore: fold rate of a 1,000,000-row table from its topic, then 100,000 rows end to end into PostgreSQL.
bench-restore: system-deps install
	$(PY) benchmarks/bench_restore.py

schemas: install
	$(PY) -m stream.cli schemas --write

clean:
	rm -rf $(VENV) $(SYSVENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info

quality: install
	$(PY) benchmarks/scenarios.py run --more-seeds 8,9 --mid-stream-seeds 8,9
