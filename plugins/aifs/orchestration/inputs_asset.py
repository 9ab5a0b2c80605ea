"""The forecast DAG's side of the aifs_ens_inputs asset: a run started by inputs events forecasts their dates, one run a date.

An asset-triggered run has no logical date of its own to derive a forecast date from (its run-after
time is when the inputs were made, which for a cleared or backfilled date is not the date), so the
date, members, bucket and checkpoint come from the triggering event's extra (inputs_verify.asset_extra).
Only those four keys are taken, and they then pass the same checks as a trigger's params
(resolve_run_config: a bucket or checkpoint the deployment does not allow is refused): an event
posted by hand through the REST API is no way around them.

Airflow makes ONE asset-triggered run from ALL the events queued since the forecast DAG's last run:
when aifs_ens_inputs is backfilled or cleared for several dates, or a day's forecast overruns
(max_active_runs 1), several dates' events reach one run. One run still forecasts one date: the
latest event's (the newest inputs; a daily loop's current date, as before several events were
looked at). Every OTHER distinct (date, bucket, members, checkpoint) among the events gets a forecast
run of its own, triggered by the run's ``forecast_other_dates`` task with those four keys as its conf
(they then pass resolve_run_config in that run like any trigger's params; a malformed extra fails
that run, with its alert, not this one).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from aifs.members import BadMembers, format_members, parse_members
from aifs.orchestration.assets import INPUTS

#: The extra's keys a forecast run takes as its params.
EVENT_PARAMS = ("date", "members", "bucket", "checkpoint")

#: Characters Airflow allows in a run id (its default ``allowed_run_id_pattern``); others become "_".
_RUN_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_.~:+-]")


def inputs_events(context: Any) -> list[Any]:
    """The aifs_ens_inputs events that triggered this run, oldest first; [] for any other run.

    Airflow hands them over in no guaranteed order, so they are sorted by their timestamps (events
    without one, as in hand-made contexts, keep the order given).
    """
    try:
        events = list(context["triggering_asset_events"][INPUTS] or [])
    except (KeyError, TypeError):
        return []
    if all(getattr(event, "timestamp", None) is not None for event in events):
        events.sort(key=lambda event: event.timestamp)  # stable: equal timestamps keep their order
    return events


class BadInputsEvent(ValueError):
    """An aifs_ens_inputs event whose extra is not a mapping of params (the REST API types it as an object)."""


def event_params(event: Any) -> dict[str, Any]:
    """The four keys a forecast run takes from one event's extra (the others are not a trigger's to set)."""
    extra = getattr(event, "extra", None) or {}
    if not isinstance(extra, Mapping):
        raise BadInputsEvent(
            f"aifs_ens_inputs event of {getattr(event, 'timestamp', '?')} (from {getattr(event, 'source_dag_id', None)} "
            f"run {getattr(event, 'source_run_id', None)}) has extra {extra!r}: expected an object with {', '.join(EVENT_PARAMS)}"
        )
    return {key: extra[key] for key in EVENT_PARAMS if key in extra}


def _run_key(params: dict[str, Any]) -> str:
    """What makes two events one forecast run: their four values, members as the set they name."""
    values = dict(params)
    try:
        values["members"] = format_members(parse_members(values["members"]))  # "1-3" and "1,2,3" are one run
    except (KeyError, BadMembers):
        pass  # absent or malformed: compared as given (the run's own checks refuse a malformed one)
    return json.dumps([values.get(key) for key in EVENT_PARAMS], sort_keys=True, default=str)


def split_inputs_events(events: Iterable[Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(this run's params, the params of every other run the events need), from events oldest first.

    This run takes the latest event's; each other distinct (date, bucket, members, checkpoint) gets
    one entry, oldest first, and none repeats this run's or another's (the same date with other
    members or another bucket is another run). No events: ({}, []).
    """
    params = [event_params(event) for event in events]
    if not params:
        return {}, []
    this_run = params[-1]
    seen = {_run_key(this_run)}
    others = []
    for candidate in params[:-1]:
        key = _run_key(candidate)
        if key not in seen:
            seen.add(key)
            others.append(candidate)
    return this_run, others


def inputs_event_params(context: Any) -> dict[str, Any]:
    """Params from the latest aifs_ens_inputs event that triggered this run; {} for any other run."""
    return split_inputs_events(inputs_events(context))[0]


def other_date_runs(context: Any) -> list[dict[str, Any]]:
    """``forecast_other_dates``' mapped kwargs: one ``{"conf", "trigger_run_id"}`` a run the other events need.

    The run id is made from this run's and the date, so retrying or clearing the task finds the runs
    it made (skip_when_already_exists) instead of forecasting a date twice.
    """
    parent = context["dag_run"].run_id
    _, others = split_inputs_events(inputs_events(context))
    return [
        {"conf": params, "trigger_run_id": f"{parent}__{index}_{_RUN_ID_UNSAFE.sub('_', str(params.get('date', 'nodate')))}"}
        for index, params in enumerate(others, start=1)
    ]


def forecast_schedule(trigger: str, cron: str | None):
    """aifs_ens_forecast's ``schedule`` for AIFS_ENS_FORECAST_TRIGGER (deployment.FORECAST_TRIGGERS)."""
    if trigger == "time":
        return cron
    if trigger == "inputs" or cron is None:
        return [INPUTS]
    from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable

    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(cron, timezone="UTC"), assets=[INPUTS])
