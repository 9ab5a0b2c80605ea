"""The per-member completion manifest: written last by the worker, read by the DAG's verify task.

A member is complete when, and only when, its manifest exists in the bucket and every object
it lists is there with the recorded size and crc32c. The manifest lives outside the ``*.grib``
names (see layout.manifest_object) so nothing that globs GRIB files ever mistakes it for data.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

SCHEMA_VERSION = 1


@dataclasses.dataclass
class ManifestObject:
    name: str  # object name in the bucket
    size: int  # bytes
    crc32c: str  # base64, as google-cloud-storage reports Blob.crc32c
    window: tuple[int, int]  # (start, end] hours
    messages: int  # GRIB messages in the file


@dataclasses.dataclass
class Manifest:
    date: str
    member: int
    seed: int
    lead_time: int
    checkpoint: str
    objects: list[ManifestObject]
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    host: str = ""
    schema: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Manifest":
        data: dict[str, Any] = json.loads(text)
        if data.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"unsupported manifest schema {data.get('schema')!r}")
        data["objects"] = [ManifestObject(**{**o, "window": tuple(o["window"])}) for o in data["objects"]]
        return cls(**data)

    @property
    def total_bytes(self) -> int:
        return sum(o.size for o in self.objects)
