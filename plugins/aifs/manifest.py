"""The per-member completion manifest: written last by the worker, read by plan, the worker's skip and verify.

What makes a member complete for a run (its manifest matches the run and every object it lists
verifies) is defined once, in aifs.completeness. The manifest lives outside the ``*.grib``
names (see layout.manifest_object) so nothing that globs GRIB files ever mistakes it for data.

Schema 2 added what "complete for this run" needs: the checkpoint's identity (its content, not
its name), the model's time step and each window's output field count (so a window's message
count can be checked against steps x fields). Schema 1 manifests still read, with those left
empty, and aifs.completeness finds them not complete: the member is redone once.

A window may carry its GRIB index (``ManifestObject.index``: aifs.worker.grib_index, written
beside it since the index existed). It only speeds the products up: manifests without it read
(``None``) and stay complete, so the schema number did not change for it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterable

SCHEMA_VERSION = 2
#: Schemas this reader accepts; older ones read with the newer fields empty (never complete).
READABLE_SCHEMAS = (1, 2)


@dataclasses.dataclass
class IndexObject:
    """A window's GRIB index object (layout.forecast_index_object), as the bucket stored it."""

    name: str
    size: int  # bytes
    crc32c: str  # base64, as google-cloud-storage reports Blob.crc32c


@dataclasses.dataclass
class ManifestObject:
    name: str  # object name in the bucket
    size: int  # bytes
    crc32c: str  # base64, as google-cloud-storage reports Blob.crc32c
    window: tuple[int, int]  # (start, end] hours
    messages: int  # GRIB messages in the file
    fields: int = 0  # output fields a step written to the window (0: not recorded, schema 1)
    index: IndexObject | None = None  # the window's GRIB index (None: written before indexes existed)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ManifestObject":
        # keys a later version adds to an object are left out, not an error: a reader older than the
        # worker (Composer upgraded after the image) must not take every new member for unreadable
        known = {f.name for f in dataclasses.fields(cls)}
        index = data.get("index")
        index = None if index is None else IndexObject(**{k: v for k, v in index.items() if k in {"name", "size", "crc32c"}})
        return cls(**{**{k: v for k, v in data.items() if k in known}, "window": tuple(data["window"]), "index": index})


@dataclasses.dataclass
class Manifest:
    date: str
    member: int
    seed: int
    lead_time: int
    checkpoint: str
    objects: list[ManifestObject]
    #: what the checkpoint was, by content: "sha256:<hex>" of the file or "hf:<revision>" ("" in schema 1)
    checkpoint_identity: str = ""
    step_hours: int = 0  # the model's time step (0: not recorded, schema 1)
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    host: str = ""
    schema: int = SCHEMA_VERSION

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        for obj in data["objects"]:  # a window without an index is written as before indexes existed
            if obj.get("index") is None:
                obj.pop("index", None)
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Manifest":
        data: dict[str, Any] = json.loads(text)
        schema = data.get("schema")
        if type(schema) is not int or schema not in READABLE_SCHEMAS:
            raise ValueError(f"unsupported manifest schema {schema!r}")
        data["objects"] = [ManifestObject.from_dict(o) for o in data["objects"]]
        return cls(**data)

    @property
    def total_bytes(self) -> int:
        return sum(o.size for o in self.objects)


def installed_versions(dists: Iterable[str]) -> dict[str, str]:
    """``{distribution: version}`` of those of ``dists`` installed here: the software a manifest records
    as having written its objects (this completion manifest's ``versions``, the input manifest's ``software``)."""
    from importlib import metadata

    versions = {}
    for dist in dists:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions
