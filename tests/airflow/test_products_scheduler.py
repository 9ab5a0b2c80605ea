"""Under a real scheduler, a forecasts asset event starts a products run for the event's bucket and date.

``dag.test()`` never schedules anything: only a real Airflow (api-server, scheduler, dag-processor;
SQLite) turns an ``aifs_ens_forecasts`` event into an ``aifs_ens_products`` run. The event is posted
through the REST API, as the forecast DAG's verify (or an operator) would make it; its bucket holds
no forecasts, so the run goes as far as the real products command refusing the date, which is all
this test needs: the run was made for that bucket and date, and the step was given them.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from conftest import local_deployment
from test_scheduler import Airflow

pytestmark = pytest.mark.slow

PRODUCTS_DAG = "aifs_ens_products"
DATE = "20250605_0000"


@pytest.fixture(scope="module")
def airflow(emulator, worker_python):
    home = Path(tempfile.mkdtemp(prefix="aifs-products-scheduler-"))
    stack = Airflow(home, {"STORAGE_EMULATOR_HOST": emulator.url, "AIFS_WORKER_PYTHON": worker_python,
                           **local_deployment(home / "scratch")})
    try:
        yield stack.start()
    finally:
        stack.stop()


def test_a_forecasts_asset_event_starts_a_products_run_for_its_bucket_and_date(airflow, bucket):
    airflow.wait_for(lambda: airflow.get(f"/api/v2/dags/{PRODUCTS_DAG}"), "the products DAG to be parsed", timeout=120)
    airflow.request("PATCH", f"/api/v2/dags/{PRODUCTS_DAG}", {"is_paused": False})
    assets = airflow.request("GET", "/api/v2/assets?name_pattern=aifs_ens_forecasts")["assets"]
    (asset,) = [a for a in assets if a["name"] == "aifs_ens_forecasts"]
    assert PRODUCTS_DAG in {ref["dag_id"] for ref in asset["scheduled_dags"]}

    extra = {"bucket": bucket, "date": DATE, "members": "1-3", "prefix": f"gs://{bucket}/{DATE}/forecasts/"}
    airflow.request("POST", "/api/v2/assets/events", {"asset_id": asset["id"], "extra": extra})

    def finished_run():
        runs = airflow.request("GET", f"/api/v2/dags/{PRODUCTS_DAG}/dagRuns")["dag_runs"]
        done = [r for r in runs if r["state"] in ("success", "failed")]
        return done[0] if done else None

    run = airflow.wait_for(finished_run, "the asset-triggered products run to finish", timeout=150)
    run_id = run["dag_run_id"]
    assert run["run_type"] == "asset_triggered", run
    base = f"/api/v2/dags/{PRODUCTS_DAG}/dagRuns/{run_id}/taskInstances"
    config = airflow.request("GET", f"{base}/check_params/xcomEntries/return_value")["value"]
    config = json.loads(config) if isinstance(config, str) else config
    assert [(t["bucket"], t["date"], t["members"]) for t in config["targets"]] == [(bucket, DATE, [1, 2, 3])]
    assert "asset event 1" in config["targets"][0]["source"]

    states = {ti["task_id"]: ti["state"] for ti in airflow.request("GET", f"{base}?limit=100")["task_instances"]}
    # no forecasts in the bucket: the real command refuses the date, check_products says the products are missing
    assert states["check_params"] == "success" and states["make_products"] == "failed" and states["check_products"] == "failed", states
    assert run["state"] == "failed"
    logs = "\n".join(p.read_text(errors="replace") for p in (airflow.home / "logs").rglob("*.log")
                     if f"run_id={run_id}" in str(p))
    assert f"-m aifs.products --date {DATE} --bucket {bucket} --members 1-3" in logs, "the step was not given the event's target"
    assert f"no products manifest gs://{bucket}/{DATE}/products/" in logs
