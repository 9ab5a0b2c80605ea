"""A member is redone by the DAG when it is not complete for the run (aifs.completeness), not skipped
because some manifest exists: a smoke run under a full run, a window tampered with in the bucket.

Under ``dag.test()`` with the local backend, the real worker and the tiny model on the GCS emulator.
"""

from __future__ import annotations

import pytest
from conftest import FORECAST_DAY, run_conf, task_states

from aifs import layout
from aifs.manifest import Manifest

DATE = "20250601_0000"

pytestmark = pytest.mark.slow


def manifest(gcs, bucket: str, member: int = 1) -> Manifest:
    return Manifest.from_json(gcs.bucket(bucket).blob(layout.manifest_object(DATE, member)).download_as_bytes())


def forecasts_events(bucket: str) -> list[dict]:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.scalars(
            select(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id).where(AssetModel.name == "aifs_ens_forecasts")
        ).all()
        return [e.extra for e in rows if e.extra.get("bucket") == bucket]


def ran(dag_run) -> dict[int, str]:
    """map index -> state of run_member in this run."""
    return {i: s for (task, i), s in task_states(dag_run).items() if task == "run_member"}


def test_smoke_run_then_full_run_redoes_the_member(dag, gcs, bucket, seed, tiny_checkpoint, scratch):
    seed(bucket, DATE, "1")
    smoke = dag.test(logical_date=FORECAST_DAY, run_conf=run_conf(bucket, tiny_checkpoint, members="1", lead_time=72))
    assert smoke.state == "success", task_states(smoke)
    assert manifest(gcs, bucket).lead_time == 72

    full = dag.test(logical_date=FORECAST_DAY, run_conf=run_conf(bucket, tiny_checkpoint, members="1", lead_time=144))

    states = task_states(full)
    assert full.state == "success", states
    assert ran(full) == {0: "success"}, "the 144 h run must plan member 1 again, not skip it"
    assert states[("verify", -1)] == "success"
    done = manifest(gcs, bucket)
    assert done.lead_time == 144
    assert [tuple(o.window) for o in done.objects] == [(0, 72), (72, 144)]
    for obj in done.objects:
        blob = gcs.bucket(bucket).get_blob(obj.name)
        assert (blob.size, blob.crc32c) == (obj.size, obj.crc32c)
        assert obj.messages == 12 * obj.fields
    assert [e["objects"] for e in forecasts_events(bucket)] == [1, 2]  # verify counted the 144 h run's two windows


def test_tampered_member_is_replanned_and_redone(dag, gcs, bucket, seed, tiny_checkpoint, scratch):
    seed(bucket, DATE, "1")
    conf = run_conf(bucket, tiny_checkpoint, members="1", lead_time=72)
    first = dag.test(logical_date=FORECAST_DAY, run_conf=conf)
    assert first.state == "success", task_states(first)
    (window,) = manifest(gcs, bucket).objects
    gcs.bucket(bucket).blob(window.name).upload_from_string(b"GRIB" + b"\0" * 64 + b"7777")  # overwritten in the bucket

    again = dag.test(logical_date=FORECAST_DAY, run_conf=conf)  # "trigger the date again", as the alert advises

    states = task_states(again)
    assert again.state == "success", states
    assert ran(again) == {0: "success"}, "plan must plan the tampered member again"
    blob = gcs.bucket(bucket).get_blob(window.name)
    (redone,) = manifest(gcs, bucket).objects
    assert (blob.size, blob.crc32c) == (redone.size, redone.crc32c) == (window.size, window.crc32c)


def test_declared_checkpoint_identity_redoes_another_checkpoints_member_and_refuses_a_wrong_file(
    gcs, bucket, seed, tiny_checkpoint, scratch, deployment, monkeypatch, airflow_db, caplog
):
    """AIFS_ENS_CHECKPOINTS declares the checkpoint's identity: plan and verify compare it, the worker checks it."""
    import hashlib
    import json

    from conftest import TEST_CHECKPOINTS, load_dag

    with open(tiny_checkpoint, "rb") as f:
        real = "sha256:" + hashlib.sha256(f.read()).hexdigest()
    other = "sha256:" + "0" * 64

    def declare(identity):
        monkeypatch.setenv("AIFS_ENS_CHECKPOINTS", json.dumps({**TEST_CHECKPOINTS, tiny_checkpoint: {"identity": identity}}))
        return load_dag()

    seed(bucket, DATE, "1")
    conf = run_conf(bucket, tiny_checkpoint, members="1", lead_time=72)
    first = declare(None).test(logical_date=FORECAST_DAY, run_conf=conf)
    assert first.state == "success", task_states(first)
    # as if another checkpoint (same path, other content) had made this member
    name = layout.manifest_object(DATE, 1)
    data = json.loads(gcs.bucket(bucket).blob(name).download_as_bytes())
    assert data["checkpoint_identity"] == real
    gcs.bucket(bucket).blob(name).upload_from_string(json.dumps({**data, "checkpoint_identity": other}))

    again = declare(real).test(logical_date=FORECAST_DAY, run_conf=conf)
    assert again.state == "success", task_states(again)
    assert ran(again) == {0: "success"}, "a member made with another checkpoint must be planned again"
    assert manifest(gcs, bucket).checkpoint_identity == real

    # the deployment declares an identity the file on the host does not have: exit 15, not retried
    seed(bucket, DATE, "2")
    caplog.clear()
    wrong = declare(other).test(logical_date=FORECAST_DAY, run_conf={**conf, "members": "2"})
    assert wrong.state == "failed"
    assert ran(wrong) == {0: "failed"}
    tries = {ti.map_index: ti.try_number for ti in wrong.get_task_instances() if ti.task_id == "run_member"}
    assert tries == {0: 1}
    assert f"is {real}, but this run expects {other}: refusing to run it" in caplog.text
    assert "CHECKPOINT_FAILED" in caplog.text
    assert gcs.bucket(bucket).get_blob(layout.manifest_object(DATE, 2)) is None
