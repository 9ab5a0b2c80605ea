"""Planning and verification read the real bucket (GCS emulator): manifests, objects, crc32c."""

from __future__ import annotations

import base64
import json

import google_crc32c
import pytest

from aifs import layout
from aifs.completeness import RunSpec
from aifs.manifest import Manifest, ManifestObject
from aifs.orchestration.plan import missing_inputs, plan_members, run_spec
from aifs.orchestration.verify import verify_members, verify_run

DATE = "20250601_0000"
FIELDS = 10
IDENTITY = "sha256:" + "5a" * 32
RUN = RunSpec(DATE, 144, checkpoint="tiny.ckpt")


def crc32c_b64(data: bytes) -> str:
    return base64.b64encode(google_crc32c.Checksum(data).digest()).decode()


def finish_member(gcs, bucket: str, member: int, lead_time: int = 144, identity: str = IDENTITY) -> Manifest:
    """What a finished worker leaves: its windows, then the manifest naming them with size and crc32c."""
    objects = []
    for window in layout.windows(lead_time):
        name = layout.forecast_object(DATE, member, window.start, window.end)
        data = f"GRIB member {member} {window}".encode() * 100
        gcs.bucket(bucket).blob(name).upload_from_string(data)
        steps = (window.end - window.start) // 6
        objects.append(ManifestObject(name, len(data), crc32c_b64(data), (window.start, window.end), steps * FIELDS, FIELDS))
    manifest = Manifest(date=DATE, member=member, seed=1, lead_time=lead_time, checkpoint="tiny.ckpt",
                        checkpoint_identity=identity, step_hours=6, objects=objects)
    gcs.bucket(bucket).blob(layout.manifest_object(DATE, member)).upload_from_string(manifest.to_json())
    return manifest


def config(bucket: str, lead_time: int = 144, identity: str | None = None) -> dict:
    """The parts of a run's config (check_params) that plan and verify read."""
    worker = {"bucket": bucket, "checkpoint": "tiny.ckpt", "lead_time": lead_time, "checkpoint_identity": identity}
    return {"date": DATE, "bucket": bucket, "members": [1, 2, 3], "worker": worker}


def test_plan_skips_complete_members(gcs, bucket):
    finish_member(gcs, bucket, 2)
    found = plan_members(gcs, bucket, RUN, [1, 2, 3])
    assert found.finished == [2]
    assert found.todo == [1, 3]
    assert found.redo == []


def test_plan_redoes_a_smoke_run_under_a_longer_run(gcs, bucket):
    """A 72 h manifest (one window) does not make a member of a 144 h run complete."""
    finish_member(gcs, bucket, 1, lead_time=72)
    finish_member(gcs, bucket, 2, lead_time=144)
    found = plan_members(gcs, bucket, run_spec(config(bucket, lead_time=144)), [1, 2, 3])
    assert found.todo == [1, 3] and found.finished == [2]
    (redo,) = found.redo
    assert redo.member == 1
    assert "manifest is for lead time 72 h, the run wants 144 h" in redo.problems
    # and the other way round: the 144 h member is not a 72 h member either
    assert plan_members(gcs, bucket, run_spec(config(bucket, lead_time=72)), [1, 2]).todo == [2]


def test_plan_compares_the_checkpoint_identity_when_the_run_has_one(gcs, bucket):
    finish_member(gcs, bucket, 1, identity=IDENTITY)
    finish_member(gcs, bucket, 2, identity="sha256:" + "00" * 32)
    assert plan_members(gcs, bucket, run_spec(config(bucket, identity=IDENTITY)), [1, 2]).todo == [2]
    # without a declared identity the reference string is compared (both say tiny.ckpt)
    assert plan_members(gcs, bucket, run_spec(config(bucket)), [1, 2]).todo == []
    assert plan_members(gcs, bucket, RunSpec(DATE, 144, checkpoint="other.ckpt"), [1, 2]).todo == [1, 2]


def test_plan_redoes_a_tampered_member(gcs, bucket):
    manifest = finish_member(gcs, bucket, 1)
    finish_member(gcs, bucket, 2)
    gcs.bucket(bucket).blob(manifest.objects[1].name).upload_from_string(b"X" * manifest.objects[1].size)
    found = plan_members(gcs, bucket, RUN, [1, 2])
    assert found.todo == [1]
    assert any("crc32c" in p for p in found.redo[0].problems), found.redo


def test_plan_redoes_a_schema_1_manifest(gcs, bucket):
    manifest = finish_member(gcs, bucket, 1)
    data = json.loads(manifest.to_json())
    data["schema"] = 1
    del data["checkpoint_identity"], data["step_hours"]
    for obj in data["objects"]:
        del obj["fields"]
    gcs.bucket(bucket).blob(layout.manifest_object(DATE, 1)).upload_from_string(json.dumps(data))
    found = plan_members(gcs, bucket, RUN, [1])
    assert found.todo == [1] and "schema 1" in found.redo[0].problems[0]


def test_missing_inputs(gcs, bucket):
    gcs.bucket(bucket).blob(layout.input_object(DATE, 1)).upload_from_string(b"x")
    gcs.bucket(bucket).blob(layout.input_object("20250602_0000", 2)).upload_from_string(b"x")  # another date
    assert missing_inputs(gcs, bucket, DATE, [1, 2, 3]) == [2, 3]


def test_complete_members_verify(gcs, bucket):
    for member in (1, 2):
        finish_member(gcs, bucket, member)
    report = verify_members(gcs, bucket, RUN, [1, 2])
    assert report.ok, report.describe_problems()
    assert len(report.objects) == 4
    assert verify_run(gcs, {**config(bucket), "members": [1, 2]}).ok


def test_verify_fails_a_window_with_too_few_messages(gcs, bucket):
    finish_member(gcs, bucket, 1)
    manifest = finish_member(gcs, bucket, 2)
    manifest.objects[1].messages -= FIELDS  # one 6 h step short (the object itself verifies)
    gcs.bucket(bucket).blob(layout.manifest_object(DATE, 2)).upload_from_string(manifest.to_json())
    report = verify_members(gcs, bucket, RUN, [1, 2])
    assert report.bad_members == [2]
    assert (f"member 002: window h072-144 has {11 * FIELDS} GRIB messages, expected 12 steps x {FIELDS} fields = "
            f"{12 * FIELDS}") in report.describe_problems()


def test_verify_fails_a_smoke_run_under_a_longer_run(gcs, bucket):
    finish_member(gcs, bucket, 1, lead_time=72)
    report = verify_run(gcs, {**config(bucket, lead_time=144), "members": [1]})
    assert report.bad_members == [1]
    assert "lead time 72 h, the run wants 144 h" in report.describe_problems()
    assert "manifest lists windows h000-072, the run wants h000-072, h072-144" in report.describe_problems()
@pytest.mark.parametrize(
    "damage, finding",
    [
        ("no_manifest", "no completion manifest"),
        ("object_deleted", "is missing"),
        ("object_replaced", "crc32c"),
        ("manifest_garbage", "unreadable"),
        ("manifest_other_member", "manifest is for date 20250601_0000 member 1"),
    ],
)
def test_incomplete_members_are_found(gcs, bucket, damage, finding):
    finish_member(gcs, bucket, 1)
    manifest = finish_member(gcs, bucket, 2)
    b = gcs.bucket(bucket)
    first = manifest.objects[0].name
    if damage == "no_manifest":
        b.blob(layout.manifest_object(DATE, 2)).delete()
    elif damage == "object_deleted":
        b.blob(first).delete()
    elif damage == "object_replaced":
        b.blob(first).upload_from_string(b"X" * manifest.objects[0].size)  # same size, other bytes
    elif damage == "manifest_garbage":
        b.blob(layout.manifest_object(DATE, 2)).upload_from_string(b"{not json")
    elif damage == "manifest_other_member":
        other = b.blob(layout.manifest_object(DATE, 1)).download_as_bytes()
        b.blob(layout.manifest_object(DATE, 2)).upload_from_string(other)

    report = verify_members(gcs, bucket, RUN, [1, 2])
    assert not report.ok
    assert report.bad_members == [2]
    assert finding in report.describe_problems()
    assert "member 002" in report.describe_problems()
