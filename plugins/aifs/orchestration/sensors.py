"""Wait for the input pickles of the members a run will run, without holding a worker slot.

The DAG plans first and waits only for the planned members: a finished member needs no input,
so rerunning a finished date whose inputs a lifecycle rule deleted verifies at once instead of
waiting for inputs that will never come back. With nothing planned there is nothing to wait for.

``WaitForInputsSensor`` looks once when it starts (inputs that are already there cost no
deferral, and no triggerer is needed then); otherwise it defers to
``aifs.orchestration.triggers.InputsTrigger``, which polls the bucket from the triggerer.
The trigger keeps its own deadline, so the wait ends on time even under ``dag.test()``,
whose inline triggers ignore the operator's timeout. A storage error on that first look (after
the storage layer's own retries) is not a verdict either: the trigger keeps polling.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from aifs.members import format_members
from aifs.orchestration.plan import missing_inputs_now
from aifs.orchestration.storage import is_transient


class WaitForInputsSensor(BaseOperator):
    """Succeeds once the input pickle of every member in ``members`` is in the bucket.

    ``members``: the planned members (plan's XCom); None waits for the whole selection
    (``config["members"]``). An empty list succeeds at once.
    """

    template_fields = ("config", "members")

    def __init__(self, *, config: Any, members: Any = None, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.members = members

    def _members(self) -> list[int]:
        return list(self.config["members"] if self.members is None else self.members)

    def execute(self, context) -> None:
        cfg, members = self.config, self._members()
        if not members:
            self.log.info("no member is planned (all are complete): no input to wait for")
            return
        try:
            missing = missing_inputs_now(cfg["bucket"], cfg["date"], members, cfg["gcp_conn_id"])
        except Exception as exc:
            if not is_transient(exc):  # no permission, no such bucket: say so now, not at the deadline
                raise
            # the storage layer retried already; the trigger polls on
            self.log.warning("could not list gs://%s/%s/input/ (%s); deferring to keep polling", cfg["bucket"], cfg["date"], exc)
            missing = members
        if not missing:
            self.log.info("all %d input pickles are in gs://%s/%s/input/", len(members), cfg["bucket"], cfg["date"])
            return
        self.log.info("inputs of members %s not there yet; deferring", format_members(missing))
        deadline = time.time() + cfg["input_wait_minutes"] * 60
        from aifs.orchestration.triggers import InputsTrigger  # the triggerer imports it by path; parse stays light

        self.defer(
            trigger=InputsTrigger(
                bucket=cfg["bucket"],
                date=cfg["date"],
                members=members,
                gcp_conn_id=cfg["gcp_conn_id"],
                poke_seconds=cfg["input_poke_seconds"],
                deadline=deadline,
            ),
            method_name="execute_complete",
            # a safety net for a triggerer that dies: the trigger's own deadline normally ends the wait
            timeout=dt.timedelta(minutes=cfg["input_wait_minutes"], seconds=max(60.0, cfg["input_poke_seconds"] * 2)),
        )

    def execute_complete(self, context, event: dict[str, Any] | None = None) -> None:
        cfg = self.config
        if event and event.get("status") == "present":
            self.log.info("all input pickles are in gs://%s/%s/input/", cfg["bucket"], cfg["date"])
            return
        missing = (event or {}).get("missing") or self._members()
        raise AirflowFailException(
            f"input pickles of members {format_members(missing)} did not arrive in gs://{cfg['bucket']}/{cfg['date']}/input/ "
            f"within {cfg['input_wait_minutes']:g} minutes (param input_wait_minutes); no host was created. "
            f"Rerun the date once they are there."
        )
