"""Wait for the selected members' input pickles without holding a worker slot.

``WaitForInputsSensor`` looks once when it starts (inputs that are already there cost no
deferral, and no triggerer is needed then); otherwise it defers to
``aifs.orchestration.triggers.InputsTrigger``, which polls the bucket from the triggerer.
The trigger keeps its own deadline, so the wait ends on time even under ``dag.test()``,
whose inline triggers ignore the operator's timeout.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from aifs.members import format_members
from aifs.orchestration.plan import missing_inputs_now


class WaitForInputsSensor(BaseOperator):
    """Succeeds once the input pickle of every selected member is in the bucket."""

    template_fields = ("config",)

    def __init__(self, *, config: Any, **kwargs):
        super().__init__(**kwargs)
        self.config = config

    def execute(self, context) -> None:
        cfg = self.config
        missing = missing_inputs_now(cfg["bucket"], cfg["date"], cfg["members"], cfg["gcp_conn_id"])
        if not missing:
            self.log.info("all %d input pickles are in gs://%s/%s/input/", len(cfg["members"]), cfg["bucket"], cfg["date"])
            return
        self.log.info("inputs of members %s not there yet; deferring", format_members(missing))
        deadline = time.time() + cfg["input_wait_minutes"] * 60
        from aifs.orchestration.triggers import InputsTrigger  # the triggerer imports it by path; parse stays light

        self.defer(
            trigger=InputsTrigger(
                bucket=cfg["bucket"],
                date=cfg["date"],
                members=cfg["members"],
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
        missing = (event or {}).get("missing") or cfg["members"]
        raise AirflowFailException(
            f"input pickles of members {format_members(missing)} did not arrive in gs://{cfg['bucket']}/{cfg['date']}/input/ "
            f"within {cfg['input_wait_minutes']:g} minutes (param input_wait_minutes); no host was created. "
            f"Rerun the date once they are there."
        )
