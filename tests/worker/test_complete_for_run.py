"""The worker's skip uses the one definition of complete (aifs.completeness), not "a manifest exists".

A member is skipped only when its manifest matches this run (lead time, checkpoint identity,
windows) and every object verifies; otherwise its old manifest is withdrawn and it is redone.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from worker_helpers import DATE, expected_forecast_objects, read_manifest, seed, tagged, worker_args

from aifs import layout
from aifs.manifest import SCHEMA_VERSION

pytestmark = pytest.mark.timeout(240)


def sha256_identity(path: str) -> str:
    with open(path, "rb") as f:
        return "sha256:" + hashlib.sha256(f.read()).hexdigest()


def run(run_main, bucket, checkpoint, dirs, lead_time, *extra):
    return run_main(worker_args(bucket=bucket.name, checkpoint=checkpoint, dirs=dirs, members="1", lead_time=lead_time,
                                extra=list(extra)))


def summary_status(text: str) -> str:
    (row,) = [line for line in tagged(text, "[SUMMARY]") if " 001 " in line]
    return row.split()[row.split().index("001") + 1]


def test_smoke_run_then_full_run_redoes_the_member(run_main, client, bucket, checkpoint, dirs):
    """The issue's reproduction: a 72 h smoke run, then a 144 h run of the same member -> redone, 2 windows."""
    seed(bucket, checkpoint, [1])
    code, text = run(run_main, bucket, checkpoint, dirs, 72)
    assert code == 0, text[-4000:]
    smoke = read_manifest(bucket, 1)
    assert smoke.lead_time == 72 and len(smoke.objects) == 1

    code, text = run(run_main, bucket, checkpoint, dirs, 144)
    assert code == 0, text[-4000:]
    assert summary_status(text) == "done", tagged(text, "[SUMMARY]")
    assert not tagged(text, "[SKIP]")
    (redo,) = tagged(text, "[REDO]")
    assert "lead time 72 h, the run wants 144 h" in redo
    full = read_manifest(bucket, 1)
    assert full.schema == SCHEMA_VERSION and full.lead_time == 144
    assert [o.name for o in full.objects] == expected_forecast_objects(1, 144)
    assert full.checkpoint_identity == sha256_identity(checkpoint)
    assert full.step_hours == 6
    for obj in full.objects:
        assert obj.fields > 0 and obj.messages == 12 * obj.fields
        blob = bucket.get_blob(obj.name)
        assert (blob.size, blob.crc32c) == (obj.size, obj.crc32c)

    # now it is complete for a 144 h run: skipped, nothing rewritten
    generations = {o.name: bucket.get_blob(o.name).generation for o in full.objects}
    code, text = run(run_main, bucket, checkpoint, dirs, 144)
    assert code == 0 and summary_status(text) == "skipped", text[-4000:]
    assert {o.name: bucket.get_blob(o.name).generation for o in full.objects} == generations


def test_manifest_of_another_checkpoint_is_redone(run_main, client, bucket, checkpoint, dirs):
    seed(bucket, checkpoint, [1])
    code, text = run(run_main, bucket, checkpoint, dirs, 12)
    assert code == 0, text[-4000:]
    name = layout.manifest_object(DATE, 1)
    data = json.loads(bucket.blob(name).download_as_bytes())
    other = "sha256:" + "0" * 64
    data["checkpoint_identity"] = other  # as if another checkpoint had been at this path
    bucket.blob(name).upload_from_string(json.dumps(data))

    code, text = run(run_main, bucket, checkpoint, dirs, 12)
    assert code == 0, text[-4000:]
    assert summary_status(text) == "done", tagged(text, "[SUMMARY]")
    (redo,) = tagged(text, "[REDO]")
    assert f"manifest is for checkpoint {other}, the run wants {sha256_identity(checkpoint)}" in redo
    assert read_manifest(bucket, 1).checkpoint_identity == sha256_identity(checkpoint)


def test_tampered_window_is_redone(run_main, client, bucket, checkpoint, dirs):
    seed(bucket, checkpoint, [1])
    code, text = run(run_main, bucket, checkpoint, dirs, 12)
    assert code == 0, text[-4000:]
    (window,) = read_manifest(bucket, 1).objects
    bucket.blob(window.name).upload_from_string(b"GRIB" + b"\0" * 100 + b"7777")

    code, text = run(run_main, bucket, checkpoint, dirs, 12)
    assert code == 0, text[-4000:]
    assert summary_status(text) == "done", tagged(text, "[SUMMARY]")
    (redo,) = tagged(text, "[REDO]")
    assert f"gs://{bucket.name}/{window.name} has 108 bytes" in redo
    blob = bucket.get_blob(window.name)
    (redone,) = read_manifest(bucket, 1).objects
    assert (blob.size, blob.crc32c) == (redone.size, redone.crc32c) == (window.size, window.crc32c)  # seeded: same bytes


def test_expected_checkpoint_identity(run_main, client, bucket, checkpoint, dirs):
    """--checkpoint-identity: the loaded checkpoint must be that one (exit 15 otherwise, nothing written)."""
    seed(bucket, checkpoint, [1])
    wrong = "sha256:" + "f" * 64
    code, text = run(run_main, bucket, checkpoint, dirs, 12, "--checkpoint-identity", wrong)
    assert code == 15, text[-4000:]
    assert f"this run expects {wrong}" in text
    assert read_manifest(bucket, 1) is None and list(client.list_blobs(bucket.name, prefix=f"{DATE}/forecasts/")) == []
    assert "--checkpoint-identity " + wrong in tagged(text, "[RERUN]")[-1]

    right = sha256_identity(checkpoint)
    code, text = run(run_main, bucket, checkpoint, dirs, 12, "--checkpoint-identity", right)
    assert code == 0, text[-4000:]
    assert read_manifest(bucket, 1).checkpoint_identity == right


def test_bad_identity_flag_is_a_usage_error(run_main, bucket, checkpoint, dirs):
    code, text = run(run_main, bucket, checkpoint, dirs, 12, "--checkpoint-identity", "aifs-ens-1.0")
    assert code == 2, text[-4000:]
    assert "--checkpoint-identity must be sha256:<64 hex digits> or hf:<revision>" in text
