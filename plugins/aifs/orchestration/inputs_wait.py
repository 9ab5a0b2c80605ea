"""Wait, deferred (off any worker slot), until a cycle's ECMWF open data is published.

Published means: every index file the date needs exists at the deployment's source
(aifs.inputs.published.opendata_published: the ENS files at t-6h and t, the deterministic run's
constants at t). The operator looks once when it starts (a date long published costs no deferral,
and needs no triggerer), then defers to aifs.orchestration.triggers.OpenDataTrigger, which keeps its
own deadline, so the wait ends on time even under ``dag.test()``.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException


class WaitForOpenDataOperator(BaseOperator):
    """Succeeds once the open data of ``config["date"]`` is published at ``config["source"]``."""

    template_fields = ("config",)

    def __init__(self, *, config: Any, **kwargs):
        super().__init__(**kwargs)
        self.config = config

    def execute(self, context) -> None:
        from aifs.inputs.published import opendata_published

        cfg = self.config
        if opendata_published(cfg["source"], cfg["date"]):
            self.log.info("open data for %s is published at %s", cfg["date"], cfg["source"])
            return
        self.log.info("open data for %s is not published yet at %s; deferring (up to %g minutes)",
                      cfg["date"], cfg["source"], cfg["publish_wait_minutes"])
        from aifs.orchestration.triggers import OpenDataTrigger  # imported by path in the triggerer

        self.defer(
            trigger=OpenDataTrigger(source=cfg["source"], date=cfg["date"], poke_seconds=cfg["publish_poke_seconds"],
                                    deadline=time.time() + cfg["publish_wait_minutes"] * 60),
            method_name="execute_complete",
            # a safety net for a triggerer that dies: the trigger's own deadline normally ends the wait
            timeout=dt.timedelta(minutes=cfg["publish_wait_minutes"], seconds=max(60.0, cfg["publish_poke_seconds"] * 2)),
        )

    def execute_complete(self, context, event: dict[str, Any] | None = None) -> None:
        cfg = self.config
        if event and event.get("status") == "published":
            self.log.info("open data for %s is published at %s", cfg["date"], cfg["source"])
            return
        raise AirflowFailException(
            f"ECMWF open data for {cfg['date']} was not published at {cfg['source']} within {cfg['publish_wait_minutes']:g} "
            f"minutes (param publish_wait_minutes): its index files are not there. Nothing was built. Clear this run "
            f"once the cycle is published (or check AIFS_ENS_OPENDATA_SOURCE)."
        )
