"""Which members a run must wait for, and which it must run.

A member is finished when its completion manifest is in the bucket (aifs.manifest): the worker
writes it last, after every window verified. Planning skips finished members, so rerunning a
whole date only runs what is missing and a daily run that is retried costs nothing twice.
Each question is answered with one listing of a prefix, not one request per member.
"""

from __future__ import annotations

from aifs import layout
from aifs.orchestration.storage import list_object_names, storage_client


def missing_inputs(client, bucket: str, date: str, members: list[int]) -> list[int]:
    """Members whose input pickle is not in the bucket yet."""
    present = list_object_names(client, bucket, f"{date}/input/")
    return [m for m in members if layout.input_object(date, m) not in present]


def missing_inputs_now(bucket: str, date: str, members: list[int], gcp_conn_id: str) -> list[int]:
    """missing_inputs with a fresh client (the sensor and its trigger run in different processes)."""
    return missing_inputs(storage_client(gcp_conn_id), bucket, date, members)


def finished_members(client, bucket: str, date: str, members: list[int]) -> list[int]:
    """Members of the selection whose completion manifest exists."""
    present = list_object_names(client, bucket, layout.manifest_prefix(date))
    return [m for m in members if layout.manifest_object(date, m) in present]


def members_to_run(selected: list[int], finished: list[int]) -> list[int]:
    done = set(finished)
    return [m for m in selected if m not in done]
