"""The forecast DAG's side of the aifs_ens_inputs asset: a run started by an inputs event forecasts that event's date.

An asset-triggered run has no logical date of its own to derive a forecast date from (its run-after
time is when the inputs were made, which for a cleared or backfilled date is not the date), so the
date, members, bucket and checkpoint come from the triggering event's extra (inputs_verify.asset_extra).
Only those four keys are taken, and they then pass the same checks as a trigger's params
(resolve_run_config: a bucket or checkpoint the deployment does not allow is refused): an event
posted by hand through the REST API is no way around them.
"""

from __future__ import annotations

from typing import Any

from aifs.orchestration.assets import INPUTS

#: The extra's keys a forecast run takes as its params.
EVENT_PARAMS = ("date", "members", "bucket", "checkpoint")


def inputs_event_params(context: Any) -> dict[str, Any]:
    """Params from the latest aifs_ens_inputs event that triggered this run; {} for any other run."""
    try:
        events = context["triggering_asset_events"][INPUTS]
    except (KeyError, TypeError):
        return {}
    events = list(events or [])
    if not events:
        return {}
    extra = dict(events[-1].extra or {})
    return {key: extra[key] for key in EVENT_PARAMS if key in extra}


def forecast_schedule(trigger: str, cron: str | None):
    """aifs_ens_forecast's ``schedule`` for AIFS_ENS_FORECAST_TRIGGER (deployment.FORECAST_TRIGGERS)."""
    if trigger == "time":
        return cron
    if trigger == "inputs" or cron is None:
        return [INPUTS]
    from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable

    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(cron, timezone="UTC"), assets=[INPUTS])
