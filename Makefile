# Two environments, as in production: the worker's (torch, anemoi-inference; what runs on the
# GPU host) and Airflow's (what runs in Composer; no torch). Both are built from scratch here.
PYTHON ?= python3
WORKER_VENV := .venv
AIRFLOW_VENV := .venv-airflow
WORKER_PY := $(WORKER_VENV)/bin/python
# AIFS-ENS 2.0's worker environment (aifs.generations "v2": anemoi-models 0.11, torch-geometric)
V2_VENV := .venv-v2
V2_PY := $(V2_VENV)/bin/python
AIRFLOW_PY := $(AIRFLOW_VENV)/bin/python
PIP_FLAGS := --disable-pip-version-check --progress-bar off -q

.PHONY: all env test test-lane-workers test-lane-dags test-worker test-airflow demo bench bench-writers bench-inputs bench-products clean

all: env

env: $(WORKER_VENV)/.built $(V2_VENV)/.built $(AIRFLOW_VENV)/.built

WORKER_REQUIREMENTS := requirements-worker.txt requirements-inputs.txt requirements-products.txt requirements-test.txt

$(WORKER_VENV)/.built: $(WORKER_REQUIREMENTS) pyproject.toml
	$(PYTHON) -m venv $(WORKER_VENV)
	$(WORKER_PY) -m pip install $(PIP_FLAGS) $(addprefix -r ,$(WORKER_REQUIREMENTS))
	$(WORKER_PY) -m pip install $(PIP_FLAGS) --no-deps -e .
	touch $@

# the v2 model stack and the test tools only (inputs/products tools stay in the v1 environment)
$(V2_VENV)/.built: requirements-worker-v2.txt requirements-test.txt pyproject.toml
	$(PYTHON) -m venv $(V2_VENV)
	$(V2_PY) -m pip install $(PIP_FLAGS) -r requirements-worker-v2.txt -r requirements-test.txt
	$(V2_PY) -m pip install $(PIP_FLAGS) --no-deps -e .
	touch $@

$(AIRFLOW_VENV)/.built: requirements.txt requirements-airflow-local.txt requirements-test.txt pyproject.toml
	$(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_PY) -m pip install $(PIP_FLAGS) -r requirements-airflow-local.txt -r requirements-test.txt
	$(AIRFLOW_PY) -m pip install $(PIP_FLAGS) --no-deps -e .
	touch $@

# Worker tests run in the worker environments, DAG tests in Airflow's; together they are the suite.
# Two lanes at once, about even (~9 min each on 2 cores): the worker suites then the real-scheduler
# tests (which mostly wait on schedulers and subprocesses), and the rest of the DAG tests. -O prints
# each lane's output whole when it ends; the suite fails if either lane does.
AIRFLOW_PYTEST := AIFS_WORKER_PYTHON=$(abspath $(WORKER_PY)) AIFS_WORKER_PYTHON_V2=$(abspath $(V2_PY)) $(AIRFLOW_PY) -m pytest
SCHEDULER_TESTS := tests/airflow/test_backfill.py tests/airflow/test_scheduler.py

test: env
	$(MAKE) --no-print-directory -j2 -O test-lane-workers test-lane-dags

test-lane-workers: env
	$(WORKER_PY) -m pytest tests/worker tests/contracts
	$(V2_PY) -m pytest tests/worker_v2
	$(AIRFLOW_PYTEST) $(SCHEDULER_TESTS)

test-lane-dags: env
	$(AIRFLOW_PYTEST) tests/airflow $(addprefix --ignore=,$(SCHEDULER_TESTS))

test-worker: $(WORKER_VENV)/.built
	$(WORKER_PY) -m pytest tests/worker tests/contracts

test-airflow: env
	$(AIRFLOW_PYTEST) tests/airflow

demo: env
	AIFS_WORKER_PYTHON=$(abspath $(WORKER_PY)) AIFS_WORKER_PYTHON_V2=$(abspath $(V2_PY)) AIRFLOW_PYTHON=$(abspath $(AIRFLOW_PY)) bash include/demo.sh

# 216 h at 4 s and 1 s stand-in steps x 102 and 120 fields, GRIB writer processes vs the in-process
# writer, and a true 1 s step (GPU-like replay) at 120 fields (~35 min on 2 cores);
# GRIB messages/s against the number of writer processes (bench-writers);
# then AIFS-ENS 2.0's tiny real architecture (its own CPU step time, ~30 s at N320 on 2 cores: 72 h, ~12 min)
bench: $(WORKER_VENV)/.built $(V2_VENV)/.built
	$(WORKER_PY) bench/member_cycle.py --matrix
	$(MAKE) bench-writers
	$(V2_PY) bench/member_cycle.py --generation v2 --lead-time 72 --modes writers,in-process
	$(MAKE) bench-inputs bench-products

# issue 16: messages/s of the in-process writer and of 1..cores writer processes, the cores left to them (~3 min on 2 cores)
bench-writers: $(WORKER_VENV)/.built
	$(WORKER_PY) bench/grib_writers.py

# issue 14: 2 members' inputs, 0.25 deg open data -> N320, CPU per member and its breakdown (~1 min on 2 cores)
bench-inputs: $(WORKER_VENV)/.built
	$(WORKER_PY) bench/inputs.py --members 2 --workers 1

# issue 15: 50 N320 members -> checked, submitted AI Weather Quest files (target <= 5 min, <= 4 GB on 2 cores)
bench-products: $(WORKER_VENV)/.built
	$(WORKER_PY) bench/products.py

clean:
	rm -rf $(WORKER_VENV) $(V2_VENV) $(AIRFLOW_VENV) .demo
