"""Check a date's input states in the bucket the way the worker will take them, before saying they are there.

For each member: its pickle ``{date}/input/input_state_member_NNN.pkl`` exists; its input manifest
(layout.input_manifest_object, written by aifs.inputs after the pickle) exists, parses, and is for
this date, this member and this run's checkpoint (by identity when the deployment declares one,
else by reference: the same rule the forecast's plan uses); and the pickle in the bucket has the
size and crc32c the manifest records (the bucket's own checksum, read back, not the builder's word).
A member failing any of these is named with its problem; nothing partial looks complete.

One listing of ``{date}/input/`` and one of ``{date}/input_manifests/``, one small read per manifest.
"""

from __future__ import annotations

import json
from typing import Any

from aifs import layout
from aifs.members import format_members
from aifs.orchestration.verify import MemberCheck, MembersReport


def manifest_problems(manifest: dict[str, Any], config: dict[str, Any], member: int) -> list[str]:
    """What in an input manifest (aifs.inputs.manifest) does not match the run (no bucket access)."""
    from aifs.inputs.manifest import VERSION  # json only: light

    if manifest.get("version") != VERSION:
        return [f"input manifest version {manifest.get('version')!r}, expected {VERSION}: rebuild the member"]
    problems = []
    if manifest.get("date") != config["date"] or manifest.get("member") != member:
        problems.append(f"input manifest is for date {manifest.get('date')} member {manifest.get('member')}")
    if manifest.get("object") != layout.input_object(config["date"], member):
        problems.append(f"input manifest describes {manifest.get('object')!r}")
    checkpoint = manifest.get("checkpoint") if isinstance(manifest.get("checkpoint"), dict) else {}
    identity = config.get("checkpoint_identity")
    if identity:  # by content when the deployment declares it, as the forecast's plan compares
        if checkpoint.get("identity") != identity:
            problems.append(f"inputs were built for checkpoint {checkpoint.get('identity') or '(no identity)'}, the run wants {identity}")
    elif checkpoint.get("reference") != config["checkpoint"]:
        problems.append(f"inputs were built for checkpoint {checkpoint.get('reference')!r}, the run wants {config['checkpoint']!r}")
    return problems


def check_inputs(client, config: dict[str, Any]) -> MembersReport:
    from aifs.orchestration.storage import list_blobs, read_bytes

    bucket, date = config["bucket"], config["date"]
    pickles = {b.name: (b.size, b.crc32c) for b in list_blobs(client, bucket, f"{date}/input/")}
    manifest_names = {b.name for b in list_blobs(client, bucket, layout.input_manifest_object(date, 1).rsplit("/", 1)[0] + "/")}
    checks = []
    for member in config["members"]:
        name, manifest_name = layout.input_object(date, member), layout.input_manifest_object(date, member)
        url = f"gs://{bucket}/{name}"
        if name not in pickles:
            checks.append(MemberCheck(member, [f"{url} is missing"]))
            continue
        if manifest_name not in manifest_names:
            checks.append(MemberCheck(member, [f"no input manifest gs://{bucket}/{manifest_name} (the build did not finish)"]))
            continue
        try:
            manifest = json.loads(read_bytes(client, bucket, manifest_name))
            if not isinstance(manifest, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            checks.append(MemberCheck(member, [f"input manifest gs://{bucket}/{manifest_name} unreadable: {exc}"]))
            continue
        problems = manifest_problems(manifest, config, member)
        size, crc32c = manifest.get("size"), manifest.get("crc32c")
        stored_size, stored_crc = pickles[name]
        if size != stored_size:
            problems.append(f"{url} has {stored_size} bytes, its manifest says {size}")
        if crc32c != stored_crc:
            problems.append(f"{url} crc32c {stored_crc}, its manifest says {crc32c}")
        checks.append(MemberCheck(member, problems))
    return MembersReport(date, bucket, checks)


def findings(report: MembersReport, config: dict[str, Any]) -> str:
    bad = report.bad_members
    return (f"{len(bad)} of {len(config['members'])} members' inputs are not complete in "
            f"gs://{config['bucket']}/{config['date']}/input/: {format_members(bad)}\n{report.describe_problems()}\n"
            f"Clear this run's 'inputs' task to build them again (members complete and matching are skipped).")


def asset_extra(config: dict[str, Any]) -> dict[str, Any]:
    """The aifs_ens_inputs event's extra: what a forecast run for these inputs needs to know."""
    return {
        "bucket": config["bucket"],
        "date": config["date"],
        "members": config["members_text"],
        "checkpoint": config["checkpoint"],
        "prefix": f"gs://{config['bucket']}/{config['date']}/input/",
    }
