"""The whole DAG under ``dag.test()``: local backend, real worker subprocess, tiny model, GCS emulator.

``dag.test()`` runs tasks one by one in this process (serial execution itself is proved under a
real scheduler in test_scheduler.py). It returns the run even when it failed: check its state.
"""

from __future__ import annotations

import os
import pickle

import pytest
from conftest import FORECAST_DAY, run_conf, scratch_leftovers, task_states

from aifs import layout
from aifs.manifest import Manifest

DATE = "20250601_0000"
LEAD_TIME = 144  # two 72 h windows

pytestmark = pytest.mark.slow


def bucket_objects(gcs, bucket: str) -> dict[str, int]:
    """name -> generation: a rewritten object gets a new generation."""
    return {b.name: b.generation for b in gcs.list_blobs(bucket, prefix=f"{DATE}/")}


def rendered_labels(dag_run) -> dict[int, str]:
    return {ti.map_index: ti.rendered_map_index for ti in dag_run.get_task_instances() if ti.task_id == "run_member"}


def asset_events(bucket: str):
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.scalars(
            select(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id).where(AssetModel.name == "aifs_ens_forecasts")
        ).all()
        return [e.extra for e in rows if e.extra.get("bucket") == bucket]


class Hostile:
    """An 'input state' whose unpickling would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_date_fails_on_a_broken_member_then_completes_and_reruns_nothing(
    dag, gcs, bucket, seed, tiny_checkpoint, tmp_path, scratch, alert_sink
):
    """One date through three runs, as an operator lives it (one scenario keeps the worker runs few).

    1. member 2's input is hostile: that member fails at once (input invalid, no retry), members 1
       and 3 finish, the host is still deleted, the run fails and the alert names member 2;
    2. the input is replaced and the date is run again: only member 2 runs; all three members
       have every window and a manifest; the forecasts asset is emitted;
    3. the date is run a third time: no member runs and no host is made.
    """
    seed(bucket, DATE, "1-3")
    marker = tmp_path / "pwned"
    gcs.bucket(bucket).blob(layout.input_object(DATE, 2)).upload_from_string(pickle.dumps(Hostile(marker)))
    conf = run_conf(bucket, tiny_checkpoint, members="1-3", lead_time=LEAD_TIME)

    # -- 1. a broken member ------------------------------------------------------------------
    dr = dag.test(logical_date=FORECAST_DAY, run_conf=conf)

    states = task_states(dr)
    assert dr.state == "failed", states
    assert states[("run_member", 0)] == "success"
    assert states[("run_member", 1)] == "failed"
    assert states[("run_member", 2)] == "success"  # the member after the broken one still ran
    assert states[("delete_host", -1)] == "success"  # teardown ran although a member failed
    assert states[("verify", -1)] == "failed"
    assert rendered_labels(dr) == {0: "member 001", 1: "member 002", 2: "member 003"}
    assert not marker.exists(), "the hostile pickle ran code"
    tries = {ti.map_index: ti.try_number for ti in dr.get_task_instances() if ti.task_id == "run_member"}
    assert tries[1] == 1, "an invalid input must not be retried"
    names = set(bucket_objects(gcs, bucket))
    assert layout.manifest_object(DATE, 1) in names and layout.manifest_object(DATE, 3) in names
    assert layout.manifest_object(DATE, 2) not in names
    assert scratch_leftovers(scratch) == []
    assert asset_events(bucket) == []

    member_alert = next(m for m in alert_sink.messages if "member 002" in m["title"])
    body = member_alert["message"]
    for expected in (
        "DAG: aifs_ens_forecast",
        f"Date: {DATE}",
        "Member: member 002",
        "try 1 of 3",
        "INPUT_INVALID",
        "Log: http",
        "/tasks/run_member/mapped/1",
        '"task_ids": [["run_member", 1]]',
    ):
        assert expected in body, f"{expected!r} not in alert:\n{body}"
    run_alert = next(m for m in alert_sink.messages if m["title"].endswith(" failed") and "run manual__" in m["title"])
    assert f"Date: {DATE}" in run_alert["message"] and "How to rerun" in run_alert["message"]
    assert "member 002" in run_alert["message"]  # verify's findings reach the run alert
    finished_before = {n: g for n, g in bucket_objects(gcs, bucket).items() if "member002" not in n and "/input/" not in n}

    # -- 2. the input is fixed; the date runs again ------------------------------------------
    seed(bucket, DATE, "2")
    alert_sink.messages.clear()
    dr = dag.test(logical_date=FORECAST_DAY, run_conf=conf)

    states = task_states(dr)
    assert dr.state == "success", states
    assert rendered_labels(dr) == {0: "member 002"}  # members 1 and 3 were planned out
    assert states[("create_host", -1)] == states[("delete_host", -1)] == states[("verify", -1)] == "success"
    objects = bucket_objects(gcs, bucket)
    for member in (1, 2, 3):
        windows = [layout.forecast_object(DATE, member, w.start, w.end) for w in layout.windows(LEAD_TIME)]
        assert set(windows) <= set(objects), f"member {member} windows missing"
        manifest = Manifest.from_json(gcs.bucket(bucket).blob(layout.manifest_object(DATE, member)).download_as_bytes())
        assert [o.name for o in manifest.objects] == windows
    assert {n: objects[n] for n in finished_before} == finished_before  # members 1 and 3 untouched
    assert scratch_leftovers(scratch) == []
    [event] = asset_events(bucket)
    assert event == {"bucket": bucket, "date": DATE, "prefix": f"gs://{bucket}/{DATE}/forecasts/", "members": "1-3", "objects": 6}
    assert alert_sink.messages == []

    # -- 3. and again: nothing to do -----------------------------------------------------------
    dr = dag.test(logical_date=FORECAST_DAY, run_conf=conf)

    states = task_states(dr)
    assert dr.state == "success", states
    assert states[("create_host", -1)] == states[("delete_host", -1)] == "skipped"
    assert not any(task == "run_member" and state == "success" for (task, _), state in states.items())
    assert states[("verify", -1)] == "success"
    assert bucket_objects(gcs, bucket) == objects  # not one object rewritten
    assert scratch_leftovers(scratch) == []
