"""aifs_ens_inputs under a real Airflow (dag.test, SQLite) and the GCS emulator.

The open-data wait against a real HTTP server that has not published the date (it times out with a
clear message), a hostile run conf, the bucket check and the asset event's extra, and how the
forecast DAG takes its date from that event.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import DAGS, FORECAST_DAY, task_states

from aifs import layout
from aifs.orchestration.assets import INPUTS

INPUTS_DAG_FILE = DAGS / "aifs_ens_inputs.py"
DATE = "20250601_0000"


def load_inputs_dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(INPUTS_DAG_FILE))
    assert not bag.import_errors, bag.import_errors
    return bag.get_dag("aifs_ens_inputs")


@pytest.fixture
def unpublished_source(tmp_path, monkeypatch):
    """A real HTTP server with open data's layout but no file for the date: nothing is published."""
    root = tmp_path / "opendata"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(root)))
    server.RequestHandlerClass.log_message = lambda *a: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("AIFS_ENS_OPENDATA_SOURCE", url)
    yield url
    server.shutdown()


def conf(bucket: str, **more) -> dict:
    return {"members": "1-2", "bucket": bucket, "checkpoint": "tiny.ckpt", "publish_wait_minutes": 0.05,
            "publish_poke_seconds": 0.5, **more}


def test_an_unpublished_date_is_waited_for_then_fails_clearly_and_nothing_is_built(
    airflow_db, deployment, emulator, bucket, unpublished_source, alert_sink
):
    dag = load_inputs_dag()
    dr = dag.test(logical_date=FORECAST_DAY, run_conf=conf(bucket))
    states = task_states(dr)
    assert dr.state == "failed"
    assert states[("check_params", -1)] == "success"
    assert states[("wait_for_opendata", -1)] == "failed"
    assert states[("build_inputs", -1)] == "upstream_failed" and states[("verify_inputs", -1)] == "upstream_failed"
    alert = next(m for m in alert_sink.messages if "wait_for_opendata failed" in m["title"])
    assert f"ECMWF open data for {DATE} was not published at {unpublished_source} within 0.05 minutes" in alert["message"]
    assert not list(emulator_client_list(bucket))


def emulator_client_list(bucket: str):
    from aifs.orchestration.storage import storage_client

    return storage_client().list_blobs(bucket)


HOSTILE = {"source": "http://attacker.example/", "opendata_source": "file:///etc", "backend": "ssh",
           "host": {"worker_python": "/bin/sh"}, "image": "evil/image", "docker_args": ["--privileged"],
           "env": {"LD_PRELOAD": "/tmp/x.so"}, "step_machine_type": "a3-megagpu-8g", "gcp_conn_id": "other"}


def test_a_hostile_conf_fails_at_check_params_naming_each_key(airflow_db, deployment, bucket, alert_sink):
    dag = load_inputs_dag()
    dr = dag.test(logical_date=FORECAST_DAY, run_conf={**conf(bucket), **HOSTILE})
    states = task_states(dr)
    assert dr.state == "failed" and states[("check_params", -1)] == "failed"
    assert states[("build_inputs", -1)] == "upstream_failed"
    message = next(m for m in alert_sink.messages if "check_params failed" in m["title"])["message"]
    assert "source: set by the deployment (AIFS_ENS_OPENDATA_SOURCE), not by a trigger" in message
    for key in HOSTILE:
        assert f"{key}: " in message, f"the refusal does not name {key}:\n{message}"


def write_inputs(gcs, bucket: str, members, checkpoint: str = "tiny.ckpt", tamper: int | None = None) -> None:
    """Pickles and input manifests as aifs.inputs writes them (aifs.inputs.manifest's layout)."""
    from aifs.inputs.manifest import VERSION

    b = gcs.bucket(bucket)
    for member in members:
        blob = b.blob(layout.input_object(DATE, member))
        blob.upload_from_string(b"pickle of member %d" % member)
        blob.reload()
        manifest = {"version": VERSION, "date": DATE, "member": member, "object": blob.name, "size": blob.size,
                    "crc32c": "AAAAAA==" if member == tamper else blob.crc32c,
                    "checkpoint": {"reference": checkpoint, "identity": "sha256:" + "1" * 64}}
        b.blob(layout.input_manifest_object(DATE, member)).upload_from_string(json.dumps(manifest))


def asset_events(dag_id: str, run_id: str) -> list[dict]:
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        events = session.scalars(select(AssetEvent).where(AssetEvent.source_dag_id == dag_id, AssetEvent.source_run_id == run_id)).all()
        return [dict(e.extra) for e in events]


def test_verified_inputs_emit_the_asset_and_a_bad_member_is_named(airflow_db, deployment, gcs, bucket, alert_sink):
    write_inputs(gcs, bucket, [1, 2], tamper=2)
    write_inputs(gcs, bucket, [3], checkpoint="other.ckpt")
    dag = load_inputs_dag()
    skip_build = "wait_for_opendata|build_inputs"  # the bucket check alone (the step runs in the end-to-end test)
    dr = dag.test(logical_date=FORECAST_DAY, run_conf=conf(bucket, members="1-3"), mark_success_pattern=skip_build)
    assert task_states(dr)[("verify_inputs", -1)] == "failed"
    message = next(m for m in alert_sink.messages if "verify_inputs failed" in m["title"])["message"]
    assert "2 of 3 members' inputs are not complete" in message
    assert f"member 002: gs://{bucket}/{layout.input_object(DATE, 2)} crc32c" in message
    assert "member 003: inputs were built for checkpoint 'other.ckpt', the run wants 'tiny.ckpt'" in message
    assert asset_events("aifs_ens_inputs", dr.run_id) == []

    write_inputs(gcs, bucket, [2, 3])
    dr = load_inputs_dag().test(logical_date=FORECAST_DAY, run_conf=conf(bucket, members="1-3"), mark_success_pattern=skip_build)
    assert dr.state == "success", task_states(dr)
    assert asset_events("aifs_ens_inputs", dr.run_id) == [
        {"bucket": bucket, "date": DATE, "members": "1-3", "checkpoint": "tiny.ckpt", "prefix": f"gs://{bucket}/{DATE}/input/"}
    ]


def test_a_backfilled_date_is_the_logical_dates_and_the_step_gets_the_deployments_source(monkeypatch):
    from aifs.orchestration.deployment import DeploymentSettings
    from aifs.orchestration.inputs_params import inputs_arguments, resolve_inputs_config

    monkeypatch.setenv("AIFS_ENS_OPENDATA_SOURCE", "google")
    deployment = DeploymentSettings.from_env()
    config = resolve_inputs_config({"members": "1-3", "cycle_hour": 12}, deployment=deployment, dag_id="aifs_ens_inputs",
                                   run_id="backfill__x", logical_date=dt.datetime(2024, 2, 29, 13, tzinfo=dt.timezone.utc))
    assert config["date"] == "20240229_1200" and config["source"] == "google"
    assert inputs_arguments(config)[:10] == ["--date", "20240229_1200", "--members", "1-3", "--bucket", config["bucket"],
                                            "--checkpoint", config["checkpoint"], "--source", "google"]


# -- the forecast DAG on the asset ------------------------------------------------------------------


class Event:
    def __init__(self, extra):
        self.extra = extra


def test_a_forecast_run_started_by_an_inputs_event_takes_only_its_date_members_bucket_checkpoint():
    from aifs.orchestration.inputs_asset import inputs_event_params

    older, latest = Event({"date": "20250531_0000"}), Event({"date": DATE, "members": "1-3", "bucket": "b", "checkpoint": "c",
                                                               "backend": "ssh", "host": {"python": "/bin/sh"}})
    assert inputs_event_params({"triggering_asset_events": {INPUTS: [older, latest]}}) == {
        "date": DATE, "members": "1-3", "bucket": "b", "checkpoint": "c"}
    assert inputs_event_params({"triggering_asset_events": {}}) == {}
    assert inputs_event_params({}) == {}


@pytest.mark.parametrize("trigger, timetable, inputs_timetable", [
    (None, "AssetTriggeredTimetable", "CronTriggerTimetable"),  # the default: the whole day runs itself
    ("inputs", "AssetTriggeredTimetable", "CronTriggerTimetable"),
    ("time", "CronTriggerTimetable", "NullTimetable"),  # inputs made elsewhere: aifs_ens_inputs never overwrites them unasked
    ("inputs_or_time", "AssetOrTimeSchedule", "CronTriggerTimetable"),
])
def test_the_deployment_chooses_what_starts_the_forecast(trigger, timetable, inputs_timetable, monkeypatch, airflow_db):
    from conftest import load_dag

    monkeypatch.setenv("AIFS_ENS_SCHEDULE", "0 6 * * *")
    if trigger is None:
        monkeypatch.delenv("AIFS_ENS_FORECAST_TRIGGER", raising=False)
    else:
        monkeypatch.setenv("AIFS_ENS_FORECAST_TRIGGER", trigger)
    dag = load_dag()
    assert type(dag.timetable).__name__ == timetable
    if trigger != "time":
        assert "aifs_ens_inputs" in repr(dag.timetable.asset_condition)
    assert type(load_inputs_dag().timetable).__name__ == inputs_timetable
