"""The trigger behind WaitForInputsSensor: polls the bucket from the triggerer until the inputs are there.

Imported by path (``aifs.orchestration.triggers.InputsTrigger``) in the triggerer, so plugins/
(or the installed ``aifs`` package) must be importable there, as on Composer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from aifs.members import format_members
from aifs.orchestration.plan import missing_inputs_now


class InputsTrigger(BaseTrigger):
    """Fires ``{"status": "present"}`` once every input is in the bucket, or ``timeout`` at the deadline."""

    def __init__(self, bucket: str, date: str, members: list[int], gcp_conn_id: str, poke_seconds: float, deadline: float):
        super().__init__()
        self.bucket = bucket
        self.date = date
        self.members = list(members)
        self.gcp_conn_id = gcp_conn_id
        self.poke_seconds = poke_seconds
        self.deadline = deadline  # unix time

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "bucket": self.bucket,
                "date": self.date,
                "members": self.members,
                "gcp_conn_id": self.gcp_conn_id,
                "poke_seconds": self.poke_seconds,
                "deadline": self.deadline,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        missing = self.members
        while True:
            try:
                # the storage client is synchronous: keep it off the triggerer's event loop
                missing = await asyncio.to_thread(missing_inputs_now, self.bucket, self.date, self.members, self.gcp_conn_id)
            except Exception as exc:  # a bucket hiccup is not the end of the wait
                self.log.warning("could not list gs://%s/%s/input/: %s", self.bucket, self.date, exc)
            if not missing:
                yield TriggerEvent({"status": "present"})
                return
            if time.time() >= self.deadline:
                yield TriggerEvent({"status": "timeout", "missing": missing})
                return
            self.log.info("waiting for inputs of members %s", format_members(missing))
            await asyncio.sleep(min(self.poke_seconds, max(0.0, self.deadline - time.time())))


class OpenDataTrigger(BaseTrigger):
    """Fires ``{"status": "published"}`` once the date's open-data index files exist at ``source``,
    or ``{"status": "timeout"}`` at the deadline (unix time). Polls aifs.inputs.published (urllib,
    one HEAD per index file) off the triggerer's event loop."""

    def __init__(self, source: str, date: str, poke_seconds: float, deadline: float):
        super().__init__()
        self.source = source
        self.date = date
        self.poke_seconds = poke_seconds
        self.deadline = deadline

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {"source": self.source, "date": self.date, "poke_seconds": self.poke_seconds, "deadline": self.deadline},
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from aifs.inputs.published import opendata_published  # urllib only: light in the triggerer

        while True:
            try:
                published = await asyncio.to_thread(opendata_published, self.source, self.date)
            except Exception as exc:  # noqa: BLE001 - a bad answer is not the end of the wait
                self.log.warning("could not check open data for %s at %s: %s", self.date, self.source, exc)
                published = False
            if published:
                yield TriggerEvent({"status": "published"})
                return
            if time.time() >= self.deadline:
                yield TriggerEvent({"status": "timeout"})
                return
            self.log.info("open data for %s not published yet at %s; next look in %.0f s", self.date, self.source, self.poke_seconds)
            await asyncio.sleep(min(self.poke_seconds, max(0.0, self.deadline - time.time())))
