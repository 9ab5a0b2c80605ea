"""aifs.manifest: the per-member completion marker, written by the worker, read by verify."""

from __future__ import annotations

import base64
import json

import pytest

from aifs import layout
from aifs.manifest import READABLE_SCHEMAS, SCHEMA_VERSION, Manifest, ManifestObject

DATE = "20251127_0000"


def _manifest(member=3, lead=150) -> Manifest:
    objects = [
        ManifestObject(
            name=layout.forecast_object(DATE, member, w.start, w.end),
            size=1000 + i,
            crc32c=base64.b64encode((i + 1).to_bytes(4, "big")).decode(),
            window=(w.start, w.end),
            messages=7 * ((w.end - w.start) // 6),
            fields=7,
        )
        for i, w in enumerate(layout.windows(lead))
    ]
    return Manifest(
        date=DATE,
        member=member,
        seed=123456789,
        lead_time=lead,
        checkpoint="tiny.ckpt",
        checkpoint_identity="sha256:" + "ab" * 32,
        step_hours=6,
        objects=objects,
        versions={"anemoi-inference": "0.13.0", "torch": "2.13.0"},
        timings={"download": 1.5, "inference": 20.25, "upload": 3.0},
        host="gpu-1",
    )


def test_round_trip_exact():
    m = _manifest()
    text = m.to_json()
    back = Manifest.from_json(text)
    assert back == m
    assert all(isinstance(o.window, tuple) for o in back.objects)
    assert back.to_json() == text


def test_from_bytes():
    m = _manifest()
    assert Manifest.from_json(m.to_json().encode()) == m


def test_json_shape():
    data = json.loads(_manifest().to_json())
    assert data["schema"] == SCHEMA_VERSION == 2
    assert set(data) >= {"date", "member", "seed", "lead_time", "checkpoint", "checkpoint_identity", "step_hours",
                         "objects", "versions", "timings", "host"}
    assert data["checkpoint_identity"] == "sha256:" + "ab" * 32 and data["step_hours"] == 6
    first = data["objects"][0]
    assert set(first) == {"name", "size", "crc32c", "window", "messages", "fields"}
    assert first["fields"] == 7
    assert first["window"] == [0, 72]  # JSON has no tuples


def test_json_deterministic():
    """Same content -> same bytes (sorted keys), so a rerun's manifest is comparable."""
    a, b = _manifest(), _manifest()
    assert a.to_json() == b.to_json()
    assert list(json.loads(a.to_json())) == sorted(json.loads(a.to_json()))


def test_total_bytes():
    m = _manifest(lead=150)
    assert m.total_bytes == 1000 + 1001 + 1002
    m.objects = []
    assert m.total_bytes == 0


def test_reads_schema_1_with_the_new_fields_empty():
    """A manifest written before schema 2 still reads (aifs.completeness then calls it not complete)."""
    data = json.loads(_manifest().to_json())
    data["schema"] = 1
    del data["checkpoint_identity"], data["step_hours"]
    for obj in data["objects"]:
        del obj["fields"]
    old = Manifest.from_json(json.dumps(data))
    assert old.schema == 1 and 1 in READABLE_SCHEMAS
    assert old.checkpoint_identity == "" and old.step_hours == 0
    assert [o.fields for o in old.objects] == [0, 0, 0]
    assert [o.name for o in old.objects] == [o.name for o in _manifest().objects]


@pytest.mark.parametrize("schema", [0, 3, None, "1", "2", True])
def test_rejects_other_schema(schema):
    data = json.loads(_manifest().to_json())
    data["schema"] = schema
    with pytest.raises(ValueError, match="schema"):
        Manifest.from_json(json.dumps(data))


def test_rejects_missing_schema():
    data = json.loads(_manifest().to_json())
    del data["schema"]
    with pytest.raises(ValueError, match="schema"):
        Manifest.from_json(json.dumps(data))


def test_rejects_garbage():
    with pytest.raises(ValueError):  # json.JSONDecodeError is a ValueError
        Manifest.from_json("{not json")


def test_defaults_not_shared():
    a = Manifest(date=DATE, member=1, seed=1, lead_time=6, checkpoint="c", objects=[])
    b = Manifest(date=DATE, member=2, seed=2, lead_time=6, checkpoint="c", objects=[])
    a.versions["x"] = "1"
    a.timings["t"] = 1.0
    assert b.versions == {} and b.timings == {}
    assert a.schema == SCHEMA_VERSION and a.host == ""


def test_crc32c_form_matches_google_client():
    """Blob.crc32c is base64 of the big-endian 4-byte checksum; the manifest keeps that form."""
    crc = pytest.importorskip("google_crc32c")
    payload = b"GRIB" + bytes(range(256)) * 10 + b"7777"
    value = base64.b64encode(crc.value(payload).to_bytes(4, "big")).decode()
    obj = ManifestObject(name="x", size=len(payload), crc32c=value, window=(0, 72), messages=1)
    m = Manifest(date=DATE, member=1, seed=1, lead_time=72, checkpoint="c", objects=[obj])
    back = Manifest.from_json(m.to_json())
    assert back.objects[0].crc32c == value
    assert len(base64.b64decode(back.objects[0].crc32c)) == 4


def test_keys_a_later_version_adds_to_an_object_are_ignored():
    """A reader older than the worker that wrote the manifest (Composer upgraded after the image)
    still reads it: an object's unknown keys, its index's too, are left out, not an error."""
    data = json.loads(_manifest().to_json())
    data["objects"][0]["compression"] = "ccsds"
    data["objects"][0]["index"] = {"name": "x.index", "size": 5, "crc32c": "AAAAAA==", "lines": 12}
    m = Manifest.from_json(json.dumps(data))
    assert m.objects[0].index.name == "x.index" and m.objects[0].index.size == 5
    assert m.objects[1:] == _manifest().objects[1:]
