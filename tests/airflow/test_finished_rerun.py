"""A finished date reruns to success at once, even without its inputs and through a flaky bucket.

The run plans first and waits only for the planned members' inputs; with nothing planned it goes
straight to verify. Here a lifecycle rule has deleted the inputs of a finished date and the bucket
answers 503 to the first try of every manifest listing and read that plan and verify make (a real
HTTP proxy in front of the GCS emulator; the real client retries). Before, the rerun waited for
inputs that would never come back (6 h by default) and failed.
"""

from __future__ import annotations

import time

import pytest
from conftest import FORECAST_DAY, run_conf, task_states
from faulty_gcs import FaultyGCS

from aifs import layout
from aifs.orchestration import storage

DATE = "20250601_0000"

pytestmark = pytest.mark.slow


def test_a_finished_date_without_inputs_reruns_to_success_at_once(
    dag, gcs, bucket, seed, tiny_checkpoint, emulator, monkeypatch
):
    from aifs.orchestration.sensors import WaitForInputsSensor

    seed(bucket, DATE, "1")
    conf = run_conf(bucket, tiny_checkpoint, members="1", lead_time=72, input_wait_minutes=1, input_poke_seconds=1)
    first = dag.test(logical_date=FORECAST_DAY, run_conf=conf)
    assert first.state == "success", task_states(first)

    # a lifecycle rule deletes the inputs; the bucket gets flaky
    gcs.bucket(bucket).blob(layout.input_object(DATE, 1)).delete()
    proxy = FaultyGCS(emulator.url)
    monkeypatch.setenv(storage.EMULATOR_ENV, proxy.url)
    listing = proxy.fail("GET", rf"/b/{bucket}/o\?.*prefix={DATE}%2Fmanifests", times=100, every=2)
    reads = proxy.fail("GET", r"/download/.*manifests.*alt=media", times=100, every=2)
    deferred = []
    monkeypatch.setattr(WaitForInputsSensor, "defer", lambda self, **kw: deferred.append(kw) or pytest.fail("the sensor waited"))

    started = time.monotonic()
    try:
        rerun = dag.test(logical_date=FORECAST_DAY, run_conf=conf)
    finally:
        proxy.close()
    seconds = time.monotonic() - started

    states = task_states(rerun)
    assert rerun.state == "success", states
    assert seconds < 60, f"the rerun took {seconds:.0f} s"
    assert deferred == []
    assert states[("plan", -1)] == states[("wait_for_inputs", -1)] == states[("verify", -1)] == "success"
    assert states[("create_host", -1)] == states[("delete_host", -1)] == "skipped"
    # plan and verify each listed the manifests and read member 1's: every first try met a 503
    assert len(listing.hits) >= 2 and len(reads.hits) >= 2, "\n".join(map(str, proxy.requests))
    assert proxy.answered(503) and not [r for r in proxy.requests if r[2] >= 500 and r[2] != 503]
