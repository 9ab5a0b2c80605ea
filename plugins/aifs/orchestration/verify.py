"""Check that a date's members are really in the bucket, by reading the bucket back.

For each member, aifs.completeness decides: its completion manifest exists, parses and matches
the run (date, member, lead time, checkpoint, the exact window list), each window's GRIB message
count is its steps x output fields, and every object it lists is in the bucket with the recorded
size and crc32c. The bucket's own crc32c (computed by GCS on upload) is compared, not anything
the worker says about itself. This is the same definition plan uses, so a member verify fails
is one the next plan runs again. One listing of the forecasts prefix covers all members;
manifests are small single reads.
"""

from __future__ import annotations

import dataclasses

from typing import Any

from aifs.completeness import RunSpec, check_members
from aifs.manifest import Manifest
from aifs.members import member_label
from aifs.orchestration.storage import storage_request


@dataclasses.dataclass
class MemberCheck:
    member: int
    problems: list[str]
    manifest: Manifest | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclasses.dataclass
class MembersReport:
    """A date's members checked in a bucket (their forecasts here; their inputs in aifs.orchestration.inputs_verify)."""

    date: str
    bucket: str
    checks: list[MemberCheck]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def bad_members(self) -> list[int]:
        return [c.member for c in self.checks if not c.ok]

    def describe_problems(self) -> str:
        return "\n".join(f"  {member_label(c.member)}: {p}" for c in self.checks for p in c.problems)


@dataclasses.dataclass
class VerifyReport(MembersReport):
    @property
    def objects(self) -> list[str]:
        return [o.name for c in self.checks if c.manifest for o in c.manifest.objects]


def verify_members(client, bucket: str, run: RunSpec, members: list[int]) -> VerifyReport:
    states = check_members(client.bucket(bucket), run, members, **storage_request())
    checks = [MemberCheck(s.member, s.problems, s.manifest) for s in states]
    return VerifyReport(date=run.date, bucket=bucket, checks=checks)


def verify_run(client, config: dict[str, Any]) -> VerifyReport:
    """verify_members for a DAG run's config (check_params), with the run's own expectations."""
    from aifs.orchestration.plan import run_spec

    return verify_members(client, config["bucket"], run_spec(config), config["members"])
