"""Under a real scheduler, an aifs_ens_inputs asset event starts an aifs_ens_forecast run for the event's date and bucket.

``dag.test()`` never schedules anything: only a real Airflow (api-server, scheduler, dag-processor;
SQLite) turns an event into a run. The deployment says AIFS_ENS_FORECAST_TRIGGER=inputs; the event
is posted through the REST API, as aifs_ens_inputs' verify_inputs (or an operator) makes it. The run's
check_params must resolve the event's date, members, bucket and checkpoint (the run has no logical
date to take a date from), and the run goes on to wait for that date's inputs in that bucket. The bucket
holds none, so the run is stopped there.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from conftest import local_deployment
from test_scheduler import Airflow

pytestmark = pytest.mark.slow

FORECAST_DAG = "aifs_ens_forecast"
DATE = "20250603_0000"  # not the day any schedule or logical date would give


@pytest.fixture(scope="module")
def airflow(emulator, worker_python):
    home = Path(tempfile.mkdtemp(prefix="aifs-inputs-scheduler-"))
    stack = Airflow(home, {"STORAGE_EMULATOR_HOST": emulator.url, "AIFS_WORKER_PYTHON": worker_python,
                           "AIFS_ENS_FORECAST_TRIGGER": "inputs", **local_deployment(home / "scratch")})
    try:
        yield stack.start()
    finally:
        stack.stop()


def test_an_inputs_asset_event_starts_a_forecast_for_its_date_and_bucket(airflow, bucket):
    airflow.request("PATCH", f"/api/v2/dags/{FORECAST_DAG}", {"is_paused": False})
    assets = airflow.request("GET", "/api/v2/assets?name_pattern=aifs_ens_inputs")["assets"]
    (asset,) = [a for a in assets if a["name"] == "aifs_ens_inputs"]
    assert FORECAST_DAG in {ref["dag_id"] for ref in asset["scheduled_dags"]}
    assert airflow.get(f"/api/v2/dags/{FORECAST_DAG}/dagRuns")["dag_runs"] == []  # nothing before the event

    extra = {"bucket": bucket, "date": DATE, "members": "2-3", "checkpoint": "tiny.ckpt",
             "prefix": f"gs://{bucket}/{DATE}/input/"}
    airflow.request("POST", "/api/v2/assets/events", {"asset_id": asset["id"], "extra": extra})

    def waiting_run():
        for run in airflow.request("GET", f"/api/v2/dags/{FORECAST_DAG}/dagRuns")["dag_runs"]:
            states = {ti["task_id"]: ti["state"] for ti in airflow.task_instances(run["dag_run_id"])}
            if states.get("wait_for_inputs") == "deferred" or run["state"] in ("success", "failed"):
                return run, states
        return None

    run, states = airflow.wait_for(waiting_run, "the asset-triggered forecast run to wait for its inputs", timeout=150)
    run_id = run["dag_run_id"]
    try:
        assert run["run_type"] == "asset_triggered", run
        # checked, planned, and waiting (deferred) for the inputs of the event's date in the event's bucket
        assert (states["check_params"], states["plan"], states["wait_for_inputs"]) == ("success", "success", "deferred"), states
        config = airflow.request("GET", f"/api/v2/dags/{FORECAST_DAG}/dagRuns/{run_id}/taskInstances/check_params/"
                                        "xcomEntries/return_value")["value"]
        config = json.loads(config) if isinstance(config, str) else config
        assert (config["date"], config["bucket"], config["members"], config["worker"]["checkpoint"]) == (
            DATE, bucket, [2, 3], "tiny.ckpt")
    finally:  # its bucket has no inputs: the run would wait for them (no triggerer here); it has shown what it had to
        airflow.request("PATCH", f"/api/v2/dags/{FORECAST_DAG}/dagRuns/{run_id}", {"state": "failed"})
