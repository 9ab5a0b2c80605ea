"""The per-member input manifest: what a pickle holds, where it came from, and how to recognise it.

Written after the pickle (``aifs.layout.input_manifest_object``). A member whose pickle and
manifest exist and agree (same checkpoint identity and variables, the pickle's crc32c and size
as recorded) is complete: reruns skip it unless ``--force``.
"""

from __future__ import annotations

import json

VERSION = 1


def build_manifest(*, date: str, member: int, obj: str, size: int, crc32c: str, checkpoint: str, identity: str,
                   spec, cycles: list[str], sources: list[dict], constant_sources: list[dict], timings: dict,
                   software: dict, source: str) -> dict:
    return {
        "version": VERSION,
        "date": date,
        "member": member,
        "object": obj,
        "size": size,
        "crc32c": crc32c,
        "checkpoint": {"reference": checkpoint, "identity": identity},
        "variables": list(spec.variables),
        "grid": spec.grid,
        "grid_points": spec.grid_points,
        "time_levels": cycles,
        "dtype": "float32",
        "source": source,
        "sources": sources,
        "constant_sources": constant_sources,
        "bytes_fetched": sum(s["bytes"] for s in sources),
        "timings": timings,
        "software": software,
    }


def manifest_problems(manifest: dict, *, identity: str, variables, size: int | None, crc32c: str | None) -> list[str]:
    """Why an existing pickle + manifest is not this run's complete input (empty: it is)."""
    problems = []
    if manifest.get("version") != VERSION:
        problems.append(f"manifest version {manifest.get('version')!r}, expected {VERSION}")
    if manifest.get("checkpoint", {}).get("identity") != identity:
        problems.append(f"made for checkpoint {manifest.get('checkpoint', {}).get('identity')}, this run's is {identity}")
    if manifest.get("variables") != list(variables):
        problems.append("made for other variables than this checkpoint's")
    if size is None:
        problems.append("the pickle is missing")
    elif (manifest.get("size"), manifest.get("crc32c")) != (size, crc32c):
        problems.append(f"the pickle is {size} bytes crc32c {crc32c}, the manifest says "
                        f"{manifest.get('size')} bytes crc32c {manifest.get('crc32c')}")
    return problems


def dumps(manifest: dict) -> str:
    return json.dumps(manifest, indent=1, sort_keys=True)
