"""What "complete" means: the one definition used by the DAG's plan, the worker's skip and verify.

A member is complete for a run when its manifest (aifs.manifest) matches what the run asks for
(date, member, lead time, checkpoint, the exact window list of layout.windows), each window's
GRIB message count is its steps x output fields, and every object it lists is in the bucket
with the recorded size and crc32c (the bucket's own checksum, read back, not the worker's word).
Anything else (a smoke run's 72 h manifest under a 792 h run, another checkpoint, a tampered
window, a schema-1 manifest that predates these checks) is not complete: the member is planned,
its old manifest withdrawn and the member redone.

The checkpoint is compared by identity, its content: ``sha256:<hex>`` of the checkpoint file or
``hf:<revision>`` (the resolved commit) for a Hugging Face id, never by name. The Airflow side
does not have the file: it compares the identity when the run config has one and otherwise the
checkpoint reference string. The worker, which has the file, always compares the identity, and
also the reference string when it was not given an identity to expect, so that it never skips a
member that the DAG's verify (comparing the string) would then fail.

Plain Python: no Airflow, no google-cloud-storage import. The bucket helpers take a
google-cloud-storage ``Bucket`` (duck-typed) and pass ``request`` keywords (timeout, retry) on.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping

from aifs import layout
from aifs.manifest import SCHEMA_VERSION, Manifest

_IDENTITY_RE = re.compile(r"^(sha256:[0-9a-f]{64}|hf:[0-9A-Za-z._-]+)$")


def is_checkpoint_identity(text: str | None) -> bool:
    """``sha256:<64 hex>`` or ``hf:<revision>``."""
    return isinstance(text, str) and bool(_IDENTITY_RE.match(text))


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What a run asks of each of its members. A checkpoint field that is None is not compared."""

    date: str
    lead_time: int
    checkpoint: str | None = None  # the reference string (path or Hugging Face id) the run was given
    checkpoint_identity: str | None = None  # "sha256:<hex>" | "hf:<revision>"

    def __post_init__(self):
        if self.checkpoint is None and self.checkpoint_identity is None:
            raise ValueError("a run must name its checkpoint: a reference or an identity")

    @classmethod
    def for_orchestrator(cls, date: str, lead_time: int, checkpoint: str, checkpoint_identity: str | None) -> "RunSpec":
        """The Airflow side (no file): the identity when the deployment knows it, else the reference string."""
        if checkpoint_identity:
            return cls(date, lead_time, checkpoint_identity=checkpoint_identity)
        return cls(date, lead_time, checkpoint=checkpoint)

    @classmethod
    def for_worker(cls, date: str, lead_time: int, checkpoint: str, loaded_identity: str,
                   expected_identity: str | None) -> "RunSpec":
        """The worker: always the identity it computed; the reference too when no identity was expected.

        With an expected identity the DAG compares identities, so the worker does too; without one
        the DAG compares the reference string, so the worker must not call complete a member whose
        manifest names another reference (verify would then fail it, every day).
        """
        return cls(date, lead_time, checkpoint=None if expected_identity else checkpoint,
                   checkpoint_identity=loaded_identity)


def expected_objects(date: str, member: int, lead_time: int) -> list[tuple[str, tuple[int, int]]]:
    """(object name, window) of every window a member of a ``lead_time`` run writes, in order."""
    return [(layout.forecast_object(date, member, w.start, w.end), (w.start, w.end)) for w in layout.windows(lead_time)]


def _windows_text(windows: Iterable[tuple[int, int]]) -> str:
    return ", ".join(f"h{s:03d}-{e:03d}" for s, e in windows) or "none"


def manifest_problems(manifest: Manifest, run: RunSpec, member: int) -> list[str]:
    """What in the manifest itself does not match the run (no bucket access)."""
    if manifest.schema < SCHEMA_VERSION:
        return [f"manifest schema {manifest.schema} predates checkpoint identities and field counts: redo the member"]
    problems = []
    if manifest.date != run.date or manifest.member != member:
        problems.append(f"manifest is for date {manifest.date} member {manifest.member}")
    if manifest.lead_time != run.lead_time:
        problems.append(f"manifest is for lead time {manifest.lead_time} h, the run wants {run.lead_time} h")
    if run.checkpoint_identity is not None and manifest.checkpoint_identity != run.checkpoint_identity:
        problems.append(f"manifest is for checkpoint {manifest.checkpoint_identity or '(no identity)'}, "
                        f"the run wants {run.checkpoint_identity}")
    if run.checkpoint is not None and manifest.checkpoint != run.checkpoint:
        problems.append(f"manifest is for checkpoint {manifest.checkpoint!r}, the run wants {run.checkpoint!r}")

    want = expected_objects(run.date, member, run.lead_time)
    have = [(o.name, tuple(o.window)) for o in manifest.objects]
    if have != want:
        problems.append(f"manifest lists windows {_windows_text(w for _, w in have)}, "
                        f"the run wants {_windows_text(w for _, w in want)}")
    problems += message_count_problems(manifest)
    return problems


def message_count_problems(manifest: Manifest) -> list[str]:
    """Each window's GRIB message count against its steps x output fields."""
    step = manifest.step_hours
    if not isinstance(step, int) or step <= 0:
        return [f"manifest has no valid model time step ({step!r}): window message counts cannot be checked"]
    problems = []
    for obj in manifest.objects:
        start, end = obj.window
        steps, rest = divmod(end - start, step)
        if rest or steps <= 0:
            problems.append(f"window h{start:03d}-{end:03d} is not a whole number of {step} h steps")
        elif obj.fields <= 0:
            problems.append(f"window h{start:03d}-{end:03d} has no output field count")
        elif obj.messages != steps * obj.fields:
            problems.append(f"window h{start:03d}-{end:03d} has {obj.messages} GRIB messages, expected "
                            f"{steps} steps x {obj.fields} fields = {steps * obj.fields}")
    return problems


def object_problems(manifest: Manifest, stored: Mapping[str, tuple[int, str]], bucket_name: str) -> list[str]:
    """Objects the manifest lists that are missing from ``stored`` (name -> (size, crc32c)) or differ."""
    problems = []
    for obj in manifest.objects:
        url = f"gs://{bucket_name}/{obj.name}"
        found = stored.get(obj.name)
        if found is None:
            problems.append(f"{url} is missing")
            continue
        size, crc32c = found
        if size != obj.size:
            problems.append(f"{url} has {size} bytes, manifest says {obj.size}")
        if crc32c != obj.crc32c:
            problems.append(f"{url} crc32c {crc32c}, manifest says {obj.crc32c}")
    return problems


def problems(manifest: Manifest, run: RunSpec, member: int, stored: Mapping[str, tuple[int, str]],
             bucket_name: str) -> list[str]:
    """Why ``manifest`` does not make ``member`` complete for ``run``; empty: complete."""
    found = manifest_problems(manifest, run, member)
    if not manifest.objects:
        found.append("manifest lists no objects")
    return found + object_problems(manifest, stored, bucket_name)


# -- reading the bucket ---------------------------------------------------------------------------


@dataclasses.dataclass
class MemberState:
    member: int
    has_manifest: bool  # a manifest object exists, complete or not (a redo withdraws it first)
    problems: list[str]
    manifest: Manifest | None = None

    @property
    def complete(self) -> bool:
        return not self.problems


NO_MANIFEST = "no completion manifest (the member did not finish)"


def stored_objects(bucket, prefix: str, **request: Any) -> dict[str, tuple[int, str]]:
    """name -> (size, crc32c) of every object under ``prefix``, as the bucket reports them."""
    return {blob.name: (blob.size, blob.crc32c) for blob in bucket.list_blobs(prefix=prefix, **request)}


def _state(bucket, run: RunSpec, member: int, blob, stored: Mapping[str, tuple[int, str]], **request: Any) -> MemberState:
    if blob is None:
        return MemberState(member, False, [NO_MANIFEST])
    name = layout.manifest_object(run.date, member)
    try:
        # a fresh Blob, not the listed one: a listed blob downloads from its mediaLink, which skips the
        # client's endpoint (an emulator's or proxy's) and so the request options it was configured with
        manifest = Manifest.from_json(bucket.blob(name).download_as_bytes(**request))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # bad JSON, unknown schema or keys: not complete
        return MemberState(member, True, [f"manifest gs://{bucket.name}/{name} unreadable: {exc}"])
    return MemberState(member, True, problems(manifest, run, member, stored, bucket.name), manifest)


def check_member(bucket, run: RunSpec, member: int, **request: Any) -> MemberState:
    """One member, with one manifest read and one listing of that member's objects (the worker's skip)."""
    blob = bucket.get_blob(layout.manifest_object(run.date, member), **request)
    if blob is None:
        return MemberState(member, False, [NO_MANIFEST])
    stored = stored_objects(bucket, layout.member_forecast_prefix(run.date, member), **request)
    return _state(bucket, run, member, blob, stored, **request)


def check_members(bucket, run: RunSpec, members: list[int], **request: Any) -> list[MemberState]:
    """Every member of a selection with two listings and one read per manifest (plan and verify)."""
    manifests = {blob.name: blob for blob in bucket.list_blobs(prefix=layout.manifest_prefix(run.date), **request)}
    if not any(layout.manifest_object(run.date, m) in manifests for m in members):
        return [MemberState(m, False, [NO_MANIFEST]) for m in members]
    stored = stored_objects(bucket, layout.forecast_prefix(run.date), **request)
    return [_state(bucket, run, m, manifests.get(layout.manifest_object(run.date, m)), stored, **request) for m in members]
