# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint format bench clean airflow airflow-stop airflow-demo

$(VENV)/.installed-runtime: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed-runtime
	$(PY) -m pip install -q -e '.[test]'
	touch $@

$(VENV)/.installed-deploy: pyproject.toml $(VENV)/.installed-runtime
	$(PY) -m pip install -q -e '.[deploy]'
	touch $@

# A real local deployment (PostgreSQL, Redis, CeleryExecutor, Ascend-queue workers) in .airflow/:
# `make airflow ARGS="--netns-hosts 2"` adds namespace hosts (root). See README, "Run it on Airflow".
airflow: $(VENV)/.installed-deploy
	$(PY) -m deploy.stack start $(ARGS)

airflow-stop: $(VENV)/.installed-deploy
	$(PY) -m deploy.stack stop

# the demo's fine-tune on that deployment, through its REST API (ARGS="--nodes 2" with netns hosts)
airflow-demo: $(VENV)/.installed-deploy
	$(PY) -m deploy.stack demo $(ARGS)
demo: $(VENV)/.installed-runtime
	scripts/demo.sh demo_output

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache --no-logo

format: $(VENV)/.installed-test
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest -q

bench: $(VENV)/.installed-test
	for b in bench/[a-z]*.py; do n=$$(basename $$b .py); [ $$n = report ] || $(PY) -m bench.$$n || exit 1; done

clean:
	rm -rf $(VENV) demo_output .pytest_cache
