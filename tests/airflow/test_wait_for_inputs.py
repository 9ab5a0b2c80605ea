"""wait_for_inputs: defers until the inputs are in the bucket, and gives up on time saying which are missing."""

from __future__ import annotations

import threading
import time

from conftest import FORECAST_DAY, run_conf, task_states

from aifs import layout
from aifs.orchestration.summary import format_summary, member_states

DATE = "20250601_0000"


def test_missing_inputs_fail_the_run_on_time_before_any_host(dag, gcs, bucket, tmp_path, alert_sink):
    gcs.bucket(bucket).blob(layout.input_object(DATE, 1)).upload_from_string(b"present")
    conf = run_conf(bucket, "tiny.ckpt", members="1-3", input_wait_minutes=0.05, input_poke_seconds=1)

    started = time.monotonic()
    dr = dag.test(logical_date=FORECAST_DAY, run_conf=conf)

    assert time.monotonic() - started < 60, "the wait did not end at its deadline"
    states = task_states(dr)
    assert dr.state == "failed"
    assert states[("wait_for_inputs", -1)] == "failed"
    assert states[("plan", -1)] == "success"  # plan runs first: the wait is for planned members only
    assert states[("create_host", -1)] == "upstream_failed"
    assert list(tmp_path.iterdir()) == []
    alert = next(m for m in alert_sink.messages if "wait_for_inputs failed" in m["title"])
    assert "input pickles of members 2-3 did not arrive" in alert["message"]


def test_inputs_arriving_during_the_wait_let_the_run_go_on(dag, gcs, bucket, monkeypatch):
    """The sensor defers (the trigger polls the bucket) and resumes when the last input lands."""
    from aifs.orchestration.sensors import WaitForInputsSensor

    deferred = []
    original_defer = WaitForInputsSensor.defer

    def defer_then_deliver(self, **kwargs):
        deferred.append(kwargs["trigger"])
        upload = lambda: gcs.bucket(bucket).blob(layout.input_object(DATE, 1)).upload_from_string(b"x")  # noqa: E731
        threading.Timer(3, upload).start()  # the input lands while the trigger polls
        original_defer(self, **kwargs)

    monkeypatch.setattr(WaitForInputsSensor, "defer", defer_then_deliver)
    conf = run_conf(bucket, "tiny.ckpt", members="1", input_wait_minutes=1, input_poke_seconds=1)

    # the tasks after planning are not what this test is about
    dr = dag.test(logical_date=FORECAST_DAY, run_conf=conf,
                  mark_success_pattern="choose_environment|create_host|run_member|delete_host|verify")

    states = task_states(dr)
    assert len(deferred) == 1 and type(deferred[0]).__name__ == "InputsTrigger"
    assert states[("wait_for_inputs", -1)] == "success"
    assert states[("plan", -1)] == "success"
    assert dr.state == "success"


def test_run_summary_lists_each_member_with_minutes():
    outcomes = {
        1: {"member": 1, "exit_code": 0, "name": "OK", "minutes": 7.5, "try": 1},
        2: {"member": 2, "exit_code": 11, "name": "INPUT_INVALID", "minutes": 0.2, "try": 1},
    }
    rows = member_states([1, 2, 3, 4], planned=[1, 2, 4], outcomes=outcomes, bad={2, 4})
    text = format_summary(DATE, "b", rows)
    assert "member 001       7.5  done" in text
    assert "member 002       0.2  failed: INPUT_INVALID (exit 11, try 1)" in text
    assert "member 003         -  skipped (finished before this run)" in text
    assert "member 004         -  not run" in text
    assert text.splitlines()[-1] == "members: 1 done, 1 failed, 1 skipped, 1 not run; 7.7 member-minutes"


def test_a_bucket_hiccup_on_the_first_look_defers_instead_of_failing(dag, gcs, bucket, emulator, monkeypatch):
    """The first look meets errors past the storage layer's deadline: the sensor defers, the trigger finds the inputs."""
    from faulty_gcs import FaultyGCS

    from aifs.orchestration import storage
    from aifs.orchestration.sensors import WaitForInputsSensor

    gcs.bucket(bucket).blob(layout.input_object(DATE, 1)).upload_from_string(b"x")
    proxy = FaultyGCS(emulator.url)
    monkeypatch.setenv(storage.EMULATOR_ENV, proxy.url)
    monkeypatch.setattr(storage, "STORAGE_RETRY_DEADLINE_S", 1.0)  # minutes in production
    outage = proxy.fail("GET", rf"/b/{bucket}/o\?.*prefix={DATE}%2Finput", times=4)
    deferred = []
    original_defer = WaitForInputsSensor.defer
    monkeypatch.setattr(WaitForInputsSensor, "defer", lambda self, **kw: deferred.append(kw) or original_defer(self, **kw))
    conf = run_conf(bucket, "tiny.ckpt", members="1", input_wait_minutes=1, input_poke_seconds=1)

    try:
        dr = dag.test(logical_date=FORECAST_DAY, run_conf=conf,
                      mark_success_pattern="choose_environment|create_host|run_member|delete_host|verify")
    finally:
        proxy.close()

    states = task_states(dr)
    assert states[("wait_for_inputs", -1)] == "success", states
    assert len(deferred) == 1 and len(outage.hits) == 4
    assert dr.state == "success"
