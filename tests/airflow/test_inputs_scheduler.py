"""Under a real scheduler, an aifs_ens_inputs asset event starts an aifs_ens_forecast run for the event's date and bucket;
events for several dates that reach one run give each date a run of its own.

``dag.test()`` never schedules anything: only a real Airflow (api-server, scheduler, dag-processor;
SQLite) turns an event into a run. The deployment says AIFS_ENS_FORECAST_TRIGGER=inputs; the event
is posted through the REST API, as aifs_ens_inputs' verify_inputs (or an operator) makes it. The run's
check_params must resolve the event's date, members, bucket and checkpoint (the run has no logical
date to take a date from), and the run goes on to wait for that date's inputs in that bucket. The bucket
holds none, so the run is stopped there.

The splitting of several events into runs (aifs.orchestration.inputs_asset) is tested here first as plain
functions; the scheduler tests are the slow ones.
"""

from __future__ import annotations

import datetime as dt
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import local_deployment
from test_scheduler import Airflow

FORECAST_DAG = "aifs_ens_forecast"
DATE = "20250603_0000"  # not the day any schedule or logical date would give


# -- several events, one run a date (plain functions) -------------------------------------------


@dataclass
class Event:
    extra: object
    timestamp: dt.datetime | None = None


def at(minute: int) -> dt.datetime:
    return dt.datetime(2025, 6, 10, 7, minute, tzinfo=dt.timezone.utc)


def inputs(date: str, members: str = "1-3", bucket: str = "aifs-test-000", checkpoint: str = "tiny.ckpt", **more) -> dict:
    return {"date": date, "members": members, "bucket": bucket, "checkpoint": checkpoint, **more}


def test_several_events_give_the_latest_date_to_this_run_and_each_other_date_a_run():
    from aifs.orchestration.inputs_asset import split_inputs_events

    events = [Event(inputs("20250601_0000"), at(1)), Event(inputs("20250602_0000"), at(2)),
              Event(inputs("20250601_0000"), at(3)),  # that date's inputs cleared and made again: one run
              Event(inputs("20250603_0000"), at(4))]
    this_run, others = split_inputs_events(events)
    assert this_run == inputs("20250603_0000")
    assert others == [inputs("20250601_0000"), inputs("20250602_0000")]  # oldest first, each once
    assert split_inputs_events(events[:1]) == (inputs("20250601_0000"), [])  # one event: this run alone
    assert split_inputs_events([]) == ({}, [])
    # this run's own date again (inputs remade while queued) is not a second run
    assert split_inputs_events([Event(inputs(DATE), at(1)), Event(inputs(DATE), at(2))]) == (inputs(DATE), [])


def test_the_same_date_with_other_members_bucket_or_checkpoint_is_another_run_the_same_members_are_not():
    from aifs.orchestration.inputs_asset import split_inputs_events

    latest = inputs(DATE, members="1-3")
    events = [inputs(DATE, members="4-5"), inputs(DATE, members="1,2,3"),  # 1,2,3 is 1-3: this run's
              inputs(DATE, bucket="aifs-test-001"), inputs(DATE, checkpoint="other.ckpt"), inputs(DATE, members="4,5"), latest]
    _, others = split_inputs_events([Event(extra) for extra in events])
    assert others == [inputs(DATE, members="4-5"), inputs(DATE, bucket="aifs-test-001"), inputs(DATE, checkpoint="other.ckpt")]


def test_events_are_taken_in_time_order_whatever_order_airflow_hands_them():
    from aifs.orchestration.assets import INPUTS
    from aifs.orchestration.inputs_asset import inputs_event_params, other_date_runs

    shuffled = [Event(inputs("20250602_0000"), at(2)), Event(inputs("20250603_0000"), at(3)), Event(inputs("20250601_0000"), at(1))]
    context = {"triggering_asset_events": {INPUTS: shuffled}, "dag_run": type("Run", (), {"run_id": "asset_triggered__x"})()}
    assert inputs_event_params(context)["date"] == "20250603_0000"
    assert [run["conf"]["date"] for run in other_date_runs(context)] == ["20250601_0000", "20250602_0000"]


def test_other_runs_take_only_the_four_params_and_pass_or_fail_a_triggers_checks():
    from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator

    from aifs.orchestration.assets import INPUTS
    from aifs.orchestration.deployment import DeploymentSettings
    from aifs.orchestration.inputs_asset import other_date_runs
    from aifs.orchestration.params import BadParams, resolve_run_config

    events = [Event(inputs("20250601_0000", backend="ssh", host={"python": "/bin/sh"}, prefix="gs://x/"), at(1)),
              Event(inputs("2025-06-02"), at(2)),  # malformed: refused by its own run, as a trigger's would be
              Event(inputs("20250602_0000", bucket="not-allowed"), at(3)),
              Event(inputs(DATE), at(4))]
    context = {"triggering_asset_events": {INPUTS: events}, "dag_run": type("Run", (), {"run_id": "asset_triggered__2025-06-10T07:04:00+00:00_ab12"})()}
    runs = other_date_runs(context)
    assert [run["conf"] for run in runs] == [inputs("20250601_0000"), inputs("2025-06-02"), inputs("20250602_0000", bucket="not-allowed")]
    # run ids from this run's: a retry or clear finds them; characters Airflow allows in a run id
    assert [run["trigger_run_id"] for run in runs] == [
        "asset_triggered__2025-06-10T07:04:00+00:00_ab12__1_20250601_0000",
        "asset_triggered__2025-06-10T07:04:00+00:00_ab12__2_2025-06-02",
        "asset_triggered__2025-06-10T07:04:00+00:00_ab12__3_20250602_0000"]
    assert other_date_runs(context) == runs  # deterministic
    for run in runs:
        TriggerDagRunOperator(task_id="t", trigger_dag_id=FORECAST_DAG, logical_date=None, **run)  # takes the kwargs

    # what each new run's check_params does with its conf (a manual run: no logical date)
    deployment = DeploymentSettings.from_env()

    def check(conf):
        return resolve_run_config(conf, deployment=deployment, dag_id=FORECAST_DAG, run_id="manual__x",
                                  logical_date=None, run_after=dt.datetime(2025, 6, 10, 8, tzinfo=dt.timezone.utc))

    config = check(runs[0]["conf"])
    assert (config["date"], config["members"], config["bucket"]) == ("20250601_0000", [1, 2, 3], "aifs-test-000")
    with pytest.raises(BadParams, match="date"):
        check(runs[1]["conf"])
    with pytest.raises(BadParams, match="bucket"):
        check(runs[2]["conf"])


def test_an_event_whose_extra_is_not_an_object_is_refused_naming_it():
    from aifs.orchestration.inputs_asset import BadInputsEvent, split_inputs_events

    with pytest.raises(BadInputsEvent, match=r"extra \['20250601_0000'\].*expected an object with date, members, bucket, checkpoint"):
        split_inputs_events([Event(["20250601_0000"], at(1)), Event(inputs(DATE), at(2))])


def test_runs_not_started_by_inputs_events_trigger_no_others():
    from aifs.orchestration.inputs_asset import other_date_runs

    run = type("Run", (), {"run_id": "manual__x"})()
    assert other_date_runs({"dag_run": run}) == []
    assert other_date_runs({"dag_run": run, "triggering_asset_events": {}}) == []


# -- under a real scheduler ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def airflow(emulator, worker_python):
    home = Path(tempfile.mkdtemp(prefix="aifs-inputs-scheduler-"))
    stack = Airflow(home, {"STORAGE_EMULATOR_HOST": emulator.url, "AIFS_WORKER_PYTHON": worker_python,
                           "AIFS_ENS_FORECAST_TRIGGER": "inputs", **local_deployment(home / "scratch")})
    try:
        yield stack.start()
    finally:
        stack.stop()


@pytest.mark.slow
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


def check_params_config(airflow, run_id: str) -> dict:
    value = airflow.request("GET", f"/api/v2/dags/{FORECAST_DAG}/dagRuns/{run_id}/taskInstances/check_params/"
                                   "xcomEntries/return_value")["value"]
    return json.loads(value) if isinstance(value, str) else value


@pytest.mark.slow
def test_inputs_events_for_two_dates_that_reach_one_run_give_each_date_a_forecast_run(airflow, bucket):
    """Inputs made for a date while the forecast DAG is paused, then for the next date: Airflow starts ONE run
    from both events; that run forecasts the later date and triggers a run of its own for the other.

    (Airflow 3.3 queues no run for a paused DAG but the next run consumes every event since the last one; the
    other way events collapse, events that arrive while a run holds max_active_runs, is the same for this DAG
    but in 3.3 leaves all but the first for the run after: apache/airflow#56050.)"""
    older, later = "20250604_0000", "20250605_0000"
    (asset,) = [a for a in airflow.request("GET", "/api/v2/assets?name_pattern=aifs_ens_inputs")["assets"]
                if a["name"] == "aifs_ens_inputs"]
    before = {run["dag_run_id"] for run in airflow.request("GET", f"/api/v2/dags/{FORECAST_DAG}/dagRuns")["dag_runs"]}

    def post(date):
        airflow.request("POST", "/api/v2/assets/events", {"asset_id": asset["id"], "extra": {
            "bucket": bucket, "date": date, "members": "2-3", "checkpoint": "tiny.ckpt", "prefix": f"gs://{bucket}/{date}/input/"}})

    airflow.request("PATCH", f"/api/v2/dags/{FORECAST_DAG}", {"is_paused": True})
    post(older)
    airflow.request("PATCH", f"/api/v2/dags/{FORECAST_DAG}", {"is_paused": False})
    post(later)

    def new_run_done_with(*task_ids):
        def probe():
            for run in airflow.request("GET", f"/api/v2/dags/{FORECAST_DAG}/dagRuns")["dag_runs"]:
                if run["dag_run_id"] in before:
                    continue
                states = {ti["task_id"]: ti["state"] for ti in airflow.task_instances(run["dag_run_id"])}
                if all(states.get(task_id) in ("success", "skipped", "failed") for task_id in task_ids):
                    return run, states
            return None
        return probe

    run, states = airflow.wait_for(new_run_done_with("check_params", "forecast_other_dates"),
                                   "one asset-triggered run from both events to check its params and trigger the other date", timeout=90)
    try:
        assert run["run_type"] == "asset_triggered", run
        events = airflow.request("GET", f"/api/v2/dags/{FORECAST_DAG}/dagRuns/{run['dag_run_id']}/upstreamAssetEvents")
        assert sorted(e["extra"]["date"] for e in events["asset_events"]) == [older, later], events  # both reached this run
        assert (states["check_params"], states["forecast_other_dates"]) == ("success", "success"), states
        assert check_params_config(airflow, run["dag_run_id"])["date"] == later  # the latest event's date
    finally:
        airflow.request("PATCH", f"/api/v2/dags/{FORECAST_DAG}/dagRuns/{run['dag_run_id']}", {"state": "failed"})
    before.add(run["dag_run_id"])

    other, states = airflow.wait_for(new_run_done_with("check_params"), "the other date's own run to check its params", timeout=60)
    try:
        assert other["run_type"] == "operator_triggered" and other["logical_date"] is None, other
        assert other["dag_run_id"].startswith(run["dag_run_id"] + "__"), other
        assert states["check_params"] == "success", states
        config = check_params_config(airflow, other["dag_run_id"])
        assert (config["date"], config["bucket"], config["members"], config["worker"]["checkpoint"]) == (older, bucket, [2, 3], "tiny.ckpt")
    finally:
        airflow.request("PATCH", f"/api/v2/dags/{FORECAST_DAG}/dagRuns/{other['dag_run_id']}", {"state": "failed"})
    runs = airflow.request("GET", f"/api/v2/dags/{FORECAST_DAG}/dagRuns")["dag_runs"]
    assert {r["dag_run_id"] for r in runs} - before == {other["dag_run_id"]}  # one run a date, no more
