# Two environments, as in production: the worker's (torch, anemoi-inference; what runs on the
# GPU host) and Airflow's (what runs in Composer; no torch). Both are built from scratch here.
PYTHON ?= python3
WORKER_VENV := .venv
AIRFLOW_VENV := .venv-airflow
WORKER_PY := $(WORKER_VENV)/bin/python
AIRFLOW_PY := $(AIRFLOW_VENV)/bin/python
PIP_FLAGS := --disable-pip-version-check --progress-bar off -q

.PHONY: all env test test-worker test-airflow demo bench clean

all: env

env: $(WORKER_VENV)/.built $(AIRFLOW_VENV)/.built

WORKER_REQUIREMENTS := requirements-worker.txt requirements-inputs.txt requirements-products.txt requirements-test.txt

$(WORKER_VENV)/.built: $(WORKER_REQUIREMENTS) pyproject.toml
	$(PYTHON) -m venv $(WORKER_VENV)
	$(WORKER_PY) -m pip install $(PIP_FLAGS) $(addprefix -r ,$(WORKER_REQUIREMENTS))
	$(WORKER_PY) -m pip install $(PIP_FLAGS) --no-deps -e .
	touch $@

$(AIRFLOW_VENV)/.built: requirements.txt requirements-airflow-local.txt requirements-test.txt pyproject.toml
	$(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_PY) -m pip install $(PIP_FLAGS) -r requirements-airflow-local.txt -r requirements-test.txt
	$(AIRFLOW_PY) -m pip install $(PIP_FLAGS) --no-deps -e .
	touch $@

# Worker tests run in the worker environment, DAG tests in Airflow's; together they are the suite.
test: env
	$(WORKER_PY) -m pytest tests/worker tests/contracts
	AIFS_WORKER_PYTHON=$(abspath $(WORKER_PY)) $(AIRFLOW_PY) -m pytest tests/airflow

test-worker: $(WORKER_VENV)/.built
	$(WORKER_PY) -m pytest tests/worker tests/contracts

test-airflow: env
	AIFS_WORKER_PYTHON=$(abspath $(WORKER_PY)) $(AIRFLOW_PY) -m pytest tests/airflow

demo: env
	AIFS_WORKER_PYTHON=$(abspath $(WORKER_PY)) AIRFLOW_PYTHON=$(abspath $(AIRFLOW_PY)) bash include/demo.sh

# 216 h at 4 s and 1 s stand-in steps x 102 and 120 fields, GRIB writer processes vs the in-process
# writer, then GRIB messages/s against the number of writers (~20 min on 2 cores)
bench: $(WORKER_VENV)/.built
	$(WORKER_PY) bench/member_cycle.py --matrix

clean:
	rm -rf $(WORKER_VENV) $(AIRFLOW_VENV) .demo
