"""The DAG's params: their JSON schemas and the one check that turns them into a run's config.

Two layers, on purpose:

* ``PARAM_SPECS`` are JSON schemas. Airflow checks them when a run is created (UI, REST API,
  ``airflow dags trigger``, ``dag.test()``), so most typos are refused before a run even exists.
* ``resolve_run_config`` is the real check, run by the DAG's first task: it re-validates every
  schema (params can reach a run by paths that skip the trigger-time check), then does what a
  schema cannot: member numbers within 1..50 and ranges that run forwards, a date that exists,
  and the chosen backend's own ``host`` settings. It raises BadParams listing every problem,
  so a bad run fails before any host is created and says why.

Nothing here imports Airflow: the checks are plain functions the tests call directly.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

from aifs import layout
from aifs.members import DEFAULT_MEMBERS, MEMBERS_PATTERN, BadMembers, format_members, parse_members
from aifs.orchestration.backends.base import BACKEND_NAMES, WorkerSettings

DAG_ID = "aifs_ens_forecast"
DEFAULT_BACKEND = "local"
CYCLE_HOURS = (0, 6, 12, 18)
DEFAULT_GCP_CONN_ID = "google_cloud_default"


def default_cycle_hour() -> int:
    """The forecast cycle a scheduled run is for; set per deployment with AIFS_ENS_CYCLE_HOUR."""
    return int(os.environ.get("AIFS_ENS_CYCLE_HOUR", "0"))


def with_defaults(specs: dict[str, dict[str, Any]], defaults: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``specs`` with a deployment's own defaults (AIFS_ENS_PARAM_DEFAULTS), checked against each schema.

    Scheduled runs and backfills take the defaults, so this is how a Composer environment points
    the daily run at its bucket and GPU backend without code changes.
    """
    import jsonschema

    unknown = sorted(set(defaults) - set(specs))
    if unknown:
        raise ValueError(f"AIFS_ENS_PARAM_DEFAULTS names unknown params: {', '.join(unknown)} (known: {', '.join(specs)})")
    merged = {}
    for name, spec in specs.items():
        spec = dict(spec)
        if name in defaults:
            schema = {k: v for k, v in spec.items() if k not in ("default", "description")}
            try:
                jsonschema.validate(defaults[name], schema)
            except jsonschema.ValidationError as exc:
                raise ValueError(f"AIFS_ENS_PARAM_DEFAULTS[{name!r}]: {exc.message}") from None
            spec["default"] = defaults[name]
        merged[name] = spec
    return merged


def param_specs(cycle_hour: int | None = None) -> dict[str, dict[str, Any]]:
    """name -> keyword arguments of ``airflow.sdk.Param`` (``default``, ``description``, JSON schema)."""
    return {
        "members": {
            "default": DEFAULT_MEMBERS,
            "type": "string",
            "pattern": MEMBERS_PATTERN,
            "description": "Members to run: 1-50, 1,5,10 or mixes like 1-3,7 (each 1..50).",
        },
        "date": {
            "default": None,
            "type": ["null", "string"],
            "pattern": r"^\d{8}_\d{4}$",
            "description": "Forecast date YYYYMMDD_HHMM. Empty: the run's logical date at the cycle hour.",
        },
        "cycle_hour": {
            "default": default_cycle_hour() if cycle_hour is None else cycle_hour,
            "type": "integer",
            "enum": list(CYCLE_HOURS),
            "description": "Forecast cycle (UTC hour) used when 'date' is empty.",
        },
        "bucket": {
            "default": layout.DEFAULT_BUCKET,
            "type": "string",
            # GCS bucket naming rules, simplified: lowercase, digits, - _ . ; 3..222 characters
            "pattern": r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$",
            "description": "GCS bucket holding {date}/input/ and receiving {date}/forecasts/.",
        },
        "backend": {
            "default": DEFAULT_BACKEND,
            "type": "string",
            "enum": list(BACKEND_NAMES),
            "description": "How members reach a GPU: local (this machine), ssh, gce or gke.",
        },
        "host": {
            "default": {},
            "type": "object",
            "description": "Settings of the chosen backend (checked against that backend's schema).",
        },
        "checkpoint": {
            "default": layout.DEFAULT_CHECKPOINT,
            "type": "string",
            "minLength": 1,
            "description": "Checkpoint path on the GPU host, or a Hugging Face repo id.",
        },
        "lead_time": {
            "default": layout.DEFAULT_LEAD_TIME_HOURS,
            "type": "integer",
            "minimum": 6,
            "multipleOf": 6,
            "description": "Forecast length in hours (6-hourly steps; 792 = 33 days).",
        },
        "upload_threads": {
            "default": layout.DEFAULT_UPLOAD_THREADS,
            "type": "integer",
            "minimum": 1,
            "maximum": 64,
            "description": "Parallel uploads per member.",
        },
        "precision": {
            "default": None,
            "type": ["null", "string"],
            "enum": [None, "16", "bf16", "32"],
            "description": "Model precision; empty: the checkpoint's own.",
        },
        "num_chunks": {
            "default": None,
            "type": ["null", "integer"],
            "minimum": 1,
            "description": "ANEMOI_INFERENCE_NUM_CHUNKS (e.g. 16): less GPU memory, slower.",
        },
        "service_account": {
            "default": None,
            "type": ["null", "string"],
            "description": "Service-account key file on the GPU host; empty: the host's own credentials.",
        },
        "gcp_conn_id": {
            "default": DEFAULT_GCP_CONN_ID,
            "type": "string",
            "minLength": 1,
            "description": "Airflow connection the DAG uses to read the bucket (ignored with STORAGE_EMULATOR_HOST).",
        },
        "input_wait_minutes": {
            "default": 360,
            "type": "number",
            "exclusiveMinimum": 0,
            "description": "How long to wait for the members' input pickles before failing.",
        },
        "input_poke_seconds": {
            "default": 60,
            "type": "number",
            "exclusiveMinimum": 0,
            "description": "How often to look for missing input pickles.",
        },
    }


class BadParams(ValueError):
    """Run params that cannot make a run; the message lists every problem."""


def forecast_date(explicit: str | None, logical_date: dt.datetime | None, run_after: dt.datetime | None, cycle_hour: int) -> str:
    """The ``YYYYMMDD_HHMM`` a run is for.

    An explicit ``date`` param wins (manual reruns of one date). Otherwise the latest cycle at
    or before the run's logical date (or, for runs without one, its run-after time): a cron of
    ``0 6 * * *`` with cycle hour 0 gives that day's ``_0000``; cycle 18 with a cron just after
    midnight gives the previous day's ``_1800``.
    """
    if explicit:
        layout.parse_date(explicit)
        return explicit
    when = logical_date or run_after
    if when is None:
        raise BadParams("the run has neither a logical date nor a 'date' param")
    if when.tzinfo is not None:
        when = when.astimezone(dt.timezone.utc).replace(tzinfo=None)
    cycle = when.replace(hour=cycle_hour, minute=0, second=0, microsecond=0)
    if cycle > when:
        cycle -= dt.timedelta(days=1)
    return layout.format_date(cycle)


def _schema_problems(params: dict[str, Any]) -> list[str]:
    import jsonschema  # ships with Airflow

    problems = []
    for name, spec in param_specs().items():
        schema = {k: v for k, v in spec.items() if k not in ("default", "description")}
        value = params.get(name, spec["default"])
        for error in jsonschema.Draft7Validator(schema).iter_errors(value):
            problems.append(f"{name}: {error.message}")
    unknown = sorted(set(params) - set(param_specs()))
    if unknown:
        problems.append(f"unknown params: {', '.join(unknown)}")
    return problems


def resolve_run_config(
    params: dict[str, Any],
    *,
    dag_id: str,
    run_id: str,
    logical_date: dt.datetime | None,
    run_after: dt.datetime | None = None,
) -> dict[str, Any]:
    """Check a run's params; return its JSON-able config (what every later task reads).

    Raises BadParams naming each problem. Creates nothing: backend settings are validated by
    constructing the backend object, which by contract has no side effects.
    """
    specs = param_specs()
    merged = {name: spec["default"] for name, spec in specs.items()}
    merged.update(params or {})
    problems = _schema_problems(merged)

    members: list[int] = []
    try:
        members = parse_members(merged["members"])
    except BadMembers as exc:
        problems.append(f"members: {exc}")

    date = ""
    try:
        date = forecast_date(merged.get("date"), logical_date, run_after, int(merged["cycle_hour"]))
    except (layout.BadDate, BadParams, TypeError, ValueError) as exc:
        problems.append(f"date: {exc}")

    host: dict[str, Any] = {}
    backend = merged["backend"]
    if backend in BACKEND_NAMES and isinstance(merged.get("host"), dict):
        from aifs.orchestration.backends.base import get_backend

        try:
            host = get_backend(backend, merged["host"]).settings
        except ImportError as exc:
            problems.append(f"backend: {backend!r} is not available here ({exc})")
        except ValueError as exc:  # BadSettings
            problems.append(f"host: {exc}")

    if problems:
        raise BadParams("invalid run params:\n  - " + "\n  - ".join(problems))

    worker = WorkerSettings(
        bucket=merged["bucket"],
        checkpoint=merged["checkpoint"],
        lead_time=int(merged["lead_time"]),
        upload_threads=int(merged["upload_threads"]),
        precision=merged["precision"],
        num_chunks=merged["num_chunks"],
        service_account=merged["service_account"] or None,
    )
    return {
        "dag_id": dag_id,
        "run_id": run_id,
        "date": date,
        "members": members,
        "members_text": format_members(members),
        "bucket": merged["bucket"],
        "backend": backend,
        "host": host,
        "worker": worker_settings_to_dict(worker),
        "gcp_conn_id": merged["gcp_conn_id"],
        "input_wait_minutes": float(merged["input_wait_minutes"]),
        "input_poke_seconds": float(merged["input_poke_seconds"]),
    }


def worker_settings_to_dict(worker: WorkerSettings) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(worker)


def worker_settings_from_config(config: dict[str, Any]) -> WorkerSettings:
    return WorkerSettings(**config["worker"])
