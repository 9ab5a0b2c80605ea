"""aifs.completeness: the one definition of "complete" that plan, the worker's skip and verify share."""

from __future__ import annotations

import base64
import dataclasses
import json

import pytest

from aifs import layout
from aifs.completeness import RunSpec, is_checkpoint_identity, manifest_problems, problems
from aifs.manifest import Manifest, ManifestObject

DATE = "20251127_0000"
CKPT = "/opt/aifs/checkpoints/aifs-ens-crps-1.0.ckpt"
IDENTITY = "sha256:" + "1f" * 32
OTHER_IDENTITY = "sha256:" + "2e" * 32
FIELDS = 7


def manifest(member=3, lead=792, identity=IDENTITY, checkpoint=CKPT) -> Manifest:
    objects = [
        ManifestObject(layout.forecast_object(DATE, member, w.start, w.end), 1000 + i,
                       base64.b64encode(i.to_bytes(4, "big")).decode(), (w.start, w.end),
                       FIELDS * (w.end - w.start) // 6, FIELDS)
        for i, w in enumerate(layout.windows(lead))
    ]
    return Manifest(date=DATE, member=member, seed=1, lead_time=lead, checkpoint=checkpoint,
                    checkpoint_identity=identity, step_hours=6, objects=objects)


def stored(m: Manifest) -> dict[str, tuple[int, str]]:
    return {o.name: (o.size, o.crc32c) for o in m.objects}


RUN = RunSpec(DATE, 792, checkpoint=CKPT, checkpoint_identity=IDENTITY)


def test_complete_member_has_no_problems():
    m = manifest()
    assert len(m.objects) == 11
    assert problems(m, RUN, 3, stored(m), "b") == []


def test_a_smoke_run_is_not_a_full_member():
    """The issue's case: a 72 h manifest under a 792 h run (one window of eleven)."""
    smoke = manifest(lead=72)
    found = problems(smoke, RUN, 3, stored(smoke), "b")
    assert "manifest is for lead time 72 h, the run wants 792 h" in found
    assert any(p.startswith("manifest lists windows h000-072, the run wants h000-072, h072-144") for p in found), found


def test_other_member_or_date():
    m = manifest(member=4)
    assert "manifest is for date 20251127_0000 member 4" in problems(m, RUN, 3, stored(m), "b")


def test_checkpoint_compared_by_identity_not_name():
    renamed = manifest(checkpoint="/elsewhere/same-file.ckpt")  # same content under another path
    assert manifest_problems(renamed, RunSpec(DATE, 792, checkpoint_identity=IDENTITY), 3) == []
    other = manifest(identity=OTHER_IDENTITY)  # same path, other content
    assert manifest_problems(other, RunSpec(DATE, 792, checkpoint_identity=IDENTITY), 3) == [
        f"manifest is for checkpoint {OTHER_IDENTITY}, the run wants {IDENTITY}"
    ]


def test_orchestrator_compares_identity_when_known_else_reference():
    with_identity = RunSpec.for_orchestrator(DATE, 792, "ecmwf/aifs-ens-1.0", IDENTITY)
    assert (with_identity.checkpoint, with_identity.checkpoint_identity) == (None, IDENTITY)
    by_name = RunSpec.for_orchestrator(DATE, 792, CKPT, None)
    assert (by_name.checkpoint, by_name.checkpoint_identity) == (CKPT, None)
    assert manifest_problems(manifest(identity=OTHER_IDENTITY), by_name, 3) == []  # the file is not here to tell
    assert manifest_problems(manifest(checkpoint="x.ckpt"), by_name, 3) == [
        f"manifest is for checkpoint 'x.ckpt', the run wants {CKPT!r}"
    ]


def test_worker_compares_identity_and_the_reference_when_no_identity_was_expected():
    """Without an expected identity the DAG's verify compares the reference: the worker must not skip what verify fails."""
    loose = RunSpec.for_worker(DATE, 792, CKPT, IDENTITY, expected_identity=None)
    assert (loose.checkpoint, loose.checkpoint_identity) == (CKPT, IDENTITY)
    assert manifest_problems(manifest(checkpoint="x.ckpt"), loose, 3) != []
    assert manifest_problems(manifest(identity=OTHER_IDENTITY), loose, 3) != []
    strict = RunSpec.for_worker(DATE, 792, CKPT, IDENTITY, expected_identity=IDENTITY)
    assert (strict.checkpoint, strict.checkpoint_identity) == (None, IDENTITY)
    assert manifest_problems(manifest(checkpoint="x.ckpt"), strict, 3) == []


def test_a_run_must_name_its_checkpoint():
    with pytest.raises(ValueError):
        RunSpec(DATE, 792)


def test_short_window_message_count():
    m = manifest(lead=144)
    m.objects[1] = dataclasses.replace(m.objects[1], messages=FIELDS * 12 - 3)
    assert problems(m, RunSpec(DATE, 144, checkpoint=CKPT), 3, stored(m), "b") == [
        f"window h072-144 has {FIELDS * 12 - 3} GRIB messages, expected 12 steps x {FIELDS} fields = {FIELDS * 12}"
    ]


def test_window_list_must_be_exact():
    m = manifest(lead=144)
    m.objects.append(dataclasses.replace(m.objects[1], name=layout.forecast_object(DATE, 3, 144, 216), window=(144, 216)))
    found = manifest_problems(m, RunSpec(DATE, 144, checkpoint=CKPT), 3)
    assert found == ["manifest lists windows h000-072, h072-144, h144-216, the run wants h000-072, h072-144"]
    renamed = manifest(lead=144)
    renamed.objects[0] = dataclasses.replace(renamed.objects[0], name="20251127_0000/forecasts/other.grib")
    assert manifest_problems(renamed, RunSpec(DATE, 144, checkpoint=CKPT), 3) != []


def test_objects_must_verify():
    m = manifest(lead=144)
    bucket = stored(m)
    first, second = (o.name for o in m.objects)
    bucket[first] = (bucket[first][0], "ZZZZZZ==")
    del bucket[second]
    assert problems(m, RunSpec(DATE, 144, checkpoint=CKPT), 3, bucket, "b") == [
        f"gs://b/{first} crc32c ZZZZZZ==, manifest says {m.objects[0].crc32c}",
        f"gs://b/{second} is missing",
    ]


def test_schema_1_manifest_is_never_complete():
    data = json.loads(manifest().to_json())
    data["schema"] = 1
    del data["checkpoint_identity"], data["step_hours"]
    for obj in data["objects"]:
        del obj["fields"]
    old = Manifest.from_json(json.dumps(data))
    found = problems(old, RUN, 3, stored(old), "b")
    assert found and "schema 1" in found[0] and "redo" in found[0]


@pytest.mark.parametrize("text, ok", [
    (IDENTITY, True), ("hf:" + "0123abcd" * 5, True), ("hf:main", True),
    ("sha256:" + "1F" * 32, False), ("sha256:abc", False), ("aifs-ens-1.0", False), ("", False), (None, False),
    ("hf:", False), ("hf:a b", False),
])
def test_identity_format(text, ok):
    assert is_checkpoint_identity(text) is ok
