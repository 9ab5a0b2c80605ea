"""Backfilling a range of dates under a real scheduler: each date is its own run, with its own host.

The deployment here is what a Composer environment would set: a daily schedule, its backend and
host, and its param defaults in AIFS_ENS_PARAM_DEFAULTS, so backfill runs carry no conf of their
own and take their forecast date from their logical date. Unpausing the DAG also lets the scheduler create the
latest daily run; it finds no inputs for that date and fails at wait_for_inputs, before any host,
which this test checks too.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from conftest import local_deployment, scratch_leftovers
from test_scheduler import DAG_ID, Airflow

from aifs import layout

DATES = ["20250601_0000", "20250602_0000"]


def _create_backfill(airflow: Airflow, body: dict):
    """POST the backfill; None (try again) while SQLite is locked by the scheduler's own writes.

    Unpausing makes the scheduler create the latest daily run at the same moment, and on SQLite
    Airflow then answers 503 "Database is locked" rather than waiting for the lock: a test-stack
    limit (production Composer runs PostgreSQL), so the request is repeated, as an operator would.
    """
    try:
        return airflow.request("POST", "/api/v2/backfills", body)
    except AssertionError as err:
        if "HTTP 503" in str(err) and "Database is locked" in str(err):
            return None
        raise


def test_backfill_runs_each_date_with_its_own_host(emulator, worker_python, gcs, bucket, seed, tiny_checkpoint, tmp_path):
    for date in DATES:
        seed(bucket, date, "1")
    defaults = {
        "members": "1", "bucket": bucket, "checkpoint": tiny_checkpoint, "lead_time": 12, "upload_threads": 2,
        "input_wait_minutes": 0.2, "input_poke_seconds": 1,
    }
    home = Path(tempfile.mkdtemp(prefix="aifs-backfill-test-"))
    stack = Airflow(home, {
        "STORAGE_EMULATOR_HOST": emulator.url,
        "AIFS_WORKER_PYTHON": worker_python,
        "AIFS_ENS_SCHEDULE": "0 0 * * *",
        "AIFS_ENS_START_DATE": "2025-06-01",
        "AIFS_ENS_PARAM_DEFAULTS": json.dumps(defaults),
        **local_deployment(tmp_path),
    })
    try:
        airflow = stack.start()
        airflow.request("PATCH", f"/api/v2/dags/{DAG_ID}", {"is_paused": False})
        backfill = {"dag_id": DAG_ID, "from_date": "2025-06-01T00:00:00Z", "to_date": "2025-06-02T00:00:00Z",
                    "max_active_runs": 1}
        airflow.wait_for(lambda: _create_backfill(airflow, backfill), "the backfill to be created", timeout=60)

        def backfill_runs():
            runs = airflow.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns?run_type=backfill&limit=10")["dag_runs"]
            done = [r for r in runs if r["state"] in ("success", "failed")]
            return runs if len(runs) == len(DATES) and len(done) == len(DATES) else None

        runs = sorted(airflow.wait_for(backfill_runs, "both backfill runs to finish", timeout=420),
                      key=lambda r: r["logical_date"])
        assert [r["state"] for r in runs] == ["success", "success"], [airflow.task_instances(r["dag_run_id"]) for r in runs]
        assert [r["logical_date"][:10] for r in runs] == ["2025-06-01", "2025-06-02"]

        for run, date in zip(runs, DATES):
            states = {(ti["task_id"], ti["map_index"]): ti["state"] for ti in airflow.task_instances(run["dag_run_id"])}
            # its own host: created and deleted within this run
            assert states[("create_host", -1)] == "success" and states[("delete_host", -1)] == "success", states
            assert states[("run_member", 0)] == "success"
            manifest = gcs.bucket(bucket).get_blob(layout.manifest_object(date, 1))
            assert manifest is not None, f"no manifest for {date}: the run did not forecast its own date"
            assert gcs.bucket(bucket).get_blob(layout.forecast_object(date, 1, 0, 12)) is not None

        # the latest scheduled run found no inputs for its date and stopped before making a host
        scheduled = airflow.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns?run_type=scheduled&limit=10")["dag_runs"]
        for run in scheduled:
            airflow.wait_for_run(run["dag_run_id"], timeout=180)
            states = {ti["task_id"]: ti["state"] for ti in airflow.task_instances(run["dag_run_id"])}
            assert states.get("wait_for_inputs") == "failed" and states.get("create_host") != "success", states
        assert scratch_leftovers(tmp_path) == []  # every host's scratch removed
    finally:
        stack.stop()
