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
	$(PY) -m pip install -q -e '.[deploy,tracking]'
	touch $@

# A real MLflow server for tests/test_tracking.py, in a venv of its own: the full `mlflow` package
# (its server, SQLAlchemy, Flask...) is not installed beside Airflow. Built on first use by the tests.
# Under a lock: `make test` starts the build in the background and the test's own call waits for it.
MLFLOW_VENV ?= .venv-mlflow
$(MLFLOW_VENV)/.installed:
	flock $(MLFLOW_VENV).lock sh -ec 'test -f $@ && exit 0; \
	  test -x $(MLFLOW_VENV)/bin/python || $(PYTHON) -m venv $(MLFLOW_VENV); \
	  $(MLFLOW_VENV)/bin/python -m pip install -q mlflow==3.17.2; touch $@'

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

# Two workers, each taking whole test files (module fixtures are set up once): the files that drive a
# live deployment mostly wait on it (a fault, a time-out), so the other worker uses the CPU meanwhile.
# The MLflow server's venv (tests/test_tracking.py) builds meanwhile, in the background.
test: lint
	$(MAKE) -s $(MLFLOW_VENV)/.installed >$(MLFLOW_VENV).log 2>&1 &
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

bench: $(VENV)/.installed-test
	for b in bench/[a-z]*.py; do n=$$(basename $$b .py); [ $$n = report ] || $(PY) -m bench.$$n || exit 1; done

clean:
	rm -rf $(VENV) $(MLFLOW_VENV) demo_output .pytest_cache
