"""Check that a date's members are really in the bucket, by reading the bucket back.

For each member: its completion manifest exists and parses, names this date and member, and
every object it lists is in the bucket with the recorded size and crc32c. The bucket's own
crc32c (computed by GCS on upload) is compared, not anything the worker says about itself.
One listing of the forecasts prefix covers all members; manifests are small single reads.
"""

from __future__ import annotations

import dataclasses

from aifs import layout
from aifs.manifest import Manifest
from aifs.members import member_label


@dataclasses.dataclass
class MemberCheck:
    member: int
    problems: list[str]
    manifest: Manifest | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclasses.dataclass
class VerifyReport:
    date: str
    bucket: str
    checks: list[MemberCheck]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def bad_members(self) -> list[int]:
        return [c.member for c in self.checks if not c.ok]

    @property
    def objects(self) -> list[str]:
        return [o.name for c in self.checks if c.manifest for o in c.manifest.objects]

    def describe_problems(self) -> str:
        lines = []
        for check in self.checks:
            for problem in check.problems:
                lines.append(f"  {member_label(check.member)}: {problem}")
        return "\n".join(lines)


def verify_members(client, bucket: str, date: str, members: list[int]) -> VerifyReport:
    bucket_obj = client.bucket(bucket)
    in_bucket = {
        blob.name: (blob.size, blob.crc32c) for blob in client.list_blobs(bucket, prefix=layout.forecast_prefix(date))
    }
    manifests = {blob.name: blob for blob in client.list_blobs(bucket, prefix=layout.manifest_prefix(date))}

    checks = []
    for member in members:
        problems: list[str] = []
        name = layout.manifest_object(date, member)
        if name not in manifests:
            checks.append(MemberCheck(member, ["no completion manifest (the member did not finish)"]))
            continue
        try:
            manifest = Manifest.from_json(bucket_obj.blob(name).download_as_bytes())
        except Exception as exc:  # any unreadable manifest is the same finding: not complete
            checks.append(MemberCheck(member, [f"manifest gs://{bucket}/{name} unreadable: {exc}"]))
            continue
        if manifest.date != date or manifest.member != member:
            problems.append(f"manifest is for date {manifest.date} member {manifest.member}")
        if not manifest.objects:
            problems.append("manifest lists no objects")
        for obj in manifest.objects:
            found = in_bucket.get(obj.name)
            if found is None:
                problems.append(f"gs://{bucket}/{obj.name} is missing")
                continue
            size, crc32c = found
            if size != obj.size:
                problems.append(f"gs://{bucket}/{obj.name} has {size} bytes, manifest says {obj.size}")
            if crc32c != obj.crc32c:
                problems.append(f"gs://{bucket}/{obj.name} crc32c {crc32c}, manifest says {obj.crc32c}")
        checks.append(MemberCheck(member, problems, manifest))
    return VerifyReport(date=date, bucket=bucket, checks=checks)
