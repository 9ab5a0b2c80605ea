"""Planning and verification read the real bucket (GCS emulator): manifests, objects, crc32c."""

from __future__ import annotations

import base64

import google_crc32c
import pytest

from aifs import layout
from aifs.manifest import Manifest, ManifestObject
from aifs.orchestration.plan import finished_members, members_to_run, missing_inputs
from aifs.orchestration.verify import verify_members

DATE = "20250601_0000"


def crc32c_b64(data: bytes) -> str:
    return base64.b64encode(google_crc32c.Checksum(data).digest()).decode()


def finish_member(gcs, bucket: str, member: int, lead_time: int = 144) -> Manifest:
    """What a finished worker leaves: its windows, then the manifest naming them with size and crc32c."""
    objects = []
    for window in layout.windows(lead_time):
        name = layout.forecast_object(DATE, member, window.start, window.end)
        data = f"GRIB member {member} {window}".encode() * 100
        gcs.bucket(bucket).blob(name).upload_from_string(data)
        objects.append(ManifestObject(name, len(data), crc32c_b64(data), (window.start, window.end), 10))
    manifest = Manifest(date=DATE, member=member, seed=1, lead_time=lead_time, checkpoint="tiny", objects=objects)
    gcs.bucket(bucket).blob(layout.manifest_object(DATE, member)).upload_from_string(manifest.to_json())
    return manifest


def test_plan_skips_members_with_a_manifest(gcs, bucket):
    finish_member(gcs, bucket, 2)
    finished = finished_members(gcs, bucket, DATE, [1, 2, 3])
    assert finished == [2]
    assert members_to_run([1, 2, 3], finished) == [1, 3]


def test_missing_inputs(gcs, bucket):
    gcs.bucket(bucket).blob(layout.input_object(DATE, 1)).upload_from_string(b"x")
    gcs.bucket(bucket).blob(layout.input_object("20250602_0000", 2)).upload_from_string(b"x")  # another date
    assert missing_inputs(gcs, bucket, DATE, [1, 2, 3]) == [2, 3]


def test_complete_members_verify(gcs, bucket):
    for member in (1, 2):
        finish_member(gcs, bucket, member)
    report = verify_members(gcs, bucket, DATE, [1, 2])
    assert report.ok, report.describe_problems()
    assert len(report.objects) == 4


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

    report = verify_members(gcs, bucket, DATE, [1, 2])
    assert not report.ok
    assert report.bad_members == [2]
    assert finding in report.describe_problems()
    assert "member 002" in report.describe_problems()
