"""Which members a run must wait for, and which it must run.

A member is finished when it is complete for this run in the sense of aifs.completeness: its
manifest matches the run's date, lead time, checkpoint and windows, and every object verifies.
Planning skips those, so rerunning a whole date only runs what is missing and a daily run that
is retried costs nothing twice; a member whose manifest is from another run (a smoke test's
shorter lead time, another checkpoint) or whose objects do not verify is planned again, and the
worker withdraws its old manifest before redoing it. Each question is answered with one listing
of a prefix (plus one read per existing manifest), not one request per member.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aifs import layout
from aifs.completeness import MemberState, RunSpec, check_members
from aifs.orchestration.storage import list_object_names, storage_client, storage_request


def missing_inputs(client, bucket: str, date: str, members: list[int]) -> list[int]:
    """Members whose input pickle is not in the bucket yet."""
    present = list_object_names(client, bucket, f"{date}/input/")
    return [m for m in members if layout.input_object(date, m) not in present]


def missing_inputs_now(bucket: str, date: str, members: list[int], gcp_conn_id: str) -> list[int]:
    """missing_inputs with a fresh client (the sensor and its trigger run in different processes)."""
    return missing_inputs(storage_client(gcp_conn_id), bucket, date, members)


def run_spec(config: dict[str, Any]) -> RunSpec:
    """What a run asks of its members, from its config (check_params): the Airflow side's view.

    The checkpoint is compared by identity when the deployment declares one for it
    (``config["worker"]["checkpoint_identity"]``), else by its reference string.
    """
    worker = config["worker"]
    return RunSpec.for_orchestrator(config["date"], int(worker["lead_time"]), worker["checkpoint"],
                                    worker.get("checkpoint_identity"))


@dataclasses.dataclass
class Plan:
    states: list[MemberState]

    @property
    def todo(self) -> list[int]:
        """Members to run: not complete for this run, in selection order."""
        return [s.member for s in self.states if not s.complete]

    @property
    def finished(self) -> list[int]:
        return [s.member for s in self.states if s.complete]

    @property
    def redo(self) -> list[MemberState]:
        """Members that have a manifest which does not make them complete: they are done again."""
        return [s for s in self.states if s.has_manifest and not s.complete]


def plan_members(client, bucket: str, run: RunSpec, members: list[int]) -> Plan:
    """Every selected member's state for ``run``; ``Plan.todo`` is what the run must do."""
    # every read with the storage layer's transient-error retries (a 503 must not fail the day)
    return Plan(check_members(client.bucket(bucket), run, members, **storage_request()))
