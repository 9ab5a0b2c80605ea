"""The DAG's params: their JSON schemas and the one check that turns them into a run's config.

A trigger is a forecaster's choice: which date, which members, how far ahead, and a checkpoint and
a bucket from the lists the deployment allows, plus run knobs that only trade speed for memory
(``upload_threads``, ``precision``, ``num_chunks``) or say how long to wait for inputs. Everything
that decides *what runs where* (backend, host settings, connection ids, service account, startup
script, image, docker args, python, GPU check, env) is an admin's, set per deployment by
environment variable (aifs.orchestration.deployment), never by a trigger: whoever may trigger the
DAG must not be able to run code on the GPU host. A run conf naming one of those is refused
(``DEPLOYMENT_KEYS``, host settings), saying where it belongs.

Two layers, on purpose:

* ``PARAM_SPECS`` are JSON schemas. Airflow checks them when a run is created (UI, REST API,
  ``airflow dags trigger``, ``dag.test()``), so most typos are refused before a run even exists.
* ``resolve_run_config`` is the real check, run by the DAG's first task: it re-validates every
  schema (params can reach a run by paths that skip the trigger-time check), then does what a
  schema cannot: member numbers within 1..50 and ranges that run forwards, a date that exists,
  no deployment setting in the conf. It raises BadParams listing every problem, so a bad run
  fails before any host is created and says why.

Nothing here imports Airflow: the checks are plain functions the tests call directly.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from aifs import layout
from aifs.members import DEFAULT_MEMBERS, MEMBERS_PATTERN, BadMembers, format_members, parse_members
from aifs.orchestration.backends.base import BACKEND_NAMES, WorkerSettings, backend_class

if TYPE_CHECKING:
    from aifs.orchestration.deployment import DeploymentSettings

DAG_ID = "aifs_ens_forecast"
DEFAULT_BACKEND = "local"
CYCLE_HOURS = (0, 6, 12, 18)
DEFAULT_GCP_CONN_ID = "google_cloud_default"
#: GCS bucket naming rules, simplified: lowercase, digits, - _ . ; 3..222 characters
BUCKET_PATTERN = r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$"

#: Run settings that only the deployment sets: name a trigger might use -> the variable that sets it.
DEPLOYMENT_KEYS = {
    "backend": "AIFS_ENS_BACKEND",
    "host": "AIFS_ENS_HOST",
    "gcp_conn_id": "AIFS_ENS_GCP_CONN_ID",
    "service_account": "AIFS_ENS_SERVICE_ACCOUNT",
    "checkpoint_identity": "AIFS_ENS_CHECKPOINTS",
    "source": "AIFS_ENS_OPENDATA_SOURCE",  # where aifs_ens_inputs fetches from: a URL is the admin's choice
    "opendata_source": "AIFS_ENS_OPENDATA_SOURCE",
}


def default_cycle_hour() -> int:
    """The forecast cycle a scheduled run is for; set per deployment with AIFS_ENS_CYCLE_HOUR."""
    return int(os.environ.get("AIFS_ENS_CYCLE_HOUR", "0"))


def with_defaults(specs: dict[str, dict[str, Any]], defaults: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``specs`` with a deployment's own defaults (AIFS_ENS_PARAM_DEFAULTS), checked against each schema.

    Scheduled runs and backfills take the defaults, so this is how a Composer environment gives
    the daily run its members, lead time, checkpoint and bucket without code changes. Only
    trigger params may have defaults here: deployment settings have variables of their own.
    """
    import jsonschema

    misplaced = deployment_key_problems(defaults)
    if misplaced:
        raise ValueError("AIFS_ENS_PARAM_DEFAULTS holds deployment settings, which have variables of their own: " + "; ".join(misplaced))
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


def host_setting_names() -> dict[str, list[str]]:
    """Every backend's host setting -> the backends that have it (for saying where a key belongs)."""
    names: dict[str, list[str]] = {}
    for backend in BACKEND_NAMES:
        for key in backend_class(backend).SETTINGS_SCHEMA.get("properties", {}):
            names.setdefault(key, []).append(backend)
    return names


def deployment_key_problems(params: dict[str, Any]) -> list[str]:
    """One line for each key of ``params`` that only the deployment may set, saying where it belongs."""
    problems = []
    host_keys = host_setting_names()
    for key in sorted(params, key=str):
        if key in DEPLOYMENT_KEYS:
            problems.append(f"{key}: set by the deployment ({DEPLOYMENT_KEYS[key]}), not by a trigger")
        elif key in host_keys:
            problems.append(
                f"{key}: a host setting of the {'/'.join(host_keys[key])} backend, set by the deployment "
                f"(AIFS_ENS_HOST), not by a trigger"
            )
    return problems


def param_specs(
    cycle_hour: int | None = None,
    *,
    buckets: Sequence[str] = (layout.DEFAULT_BUCKET,),
    checkpoints: Sequence[str] = (layout.DEFAULT_CHECKPOINT,),
) -> dict[str, dict[str, Any]]:
    """name -> keyword arguments of ``airflow.sdk.Param`` (``default``, ``description``, JSON schema).

    ``buckets`` and ``checkpoints`` are what the deployment allows (AIFS_ENS_BUCKETS,
    AIFS_ENS_CHECKPOINTS); the first of each is the default.
    """
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
            "default": buckets[0],
            "type": "string",
            "enum": list(buckets),
            "description": "GCS bucket holding {date}/input/ and receiving {date}/forecasts/ (one the deployment allows).",
        },
        "checkpoint": {
            "default": checkpoints[0],
            "type": "string",
            "enum": list(checkpoints),
            "description": ("Model checkpoint (one the deployment allows): a path on the GPU host, a gs://bucket/object "
                            "(the worker downloads it once per host) or a Hugging Face repo id."),
        },
        "lead_time": {
            "default": layout.DEFAULT_LEAD_TIME_HOURS,
            "type": "integer",
            "minimum": 6,
            # a trigger must not be able to hold the GPU for longer than the product's forecast
            "maximum": layout.DEFAULT_LEAD_TIME_HOURS,
            "multipleOf": 6,
            "description": "Forecast length in hours (6-hourly steps; 792 = 33 days, the longest allowed).",
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


def schema_problems(specs: Mapping[str, Mapping[str, Any]], params: Mapping[str, Any]) -> list[str]:
    """``name: message`` for each way a param (else its default) fails its spec's JSON schema."""
    import jsonschema  # ships with Airflow

    problems = []
    for name, spec in specs.items():
        schema = {k: v for k, v in spec.items() if k not in ("default", "description")}
        value = params.get(name, spec["default"])
        for error in jsonschema.Draft7Validator(schema).iter_errors(value):
            problems.append(f"{name}: {error.message}")
    return problems


def check_trigger_params(
    params: dict[str, Any] | None,
    specs: dict[str, dict[str, Any]],
    *,
    logical_date: dt.datetime | None,
    run_after: dt.datetime | None = None,
) -> tuple[dict[str, Any], list[int], str]:
    """A forecaster's trigger of a date and members (forecast or inputs DAG) checked against ``specs``.

    Returns (params merged over the specs' defaults, the member numbers, the date). Raises BadParams
    listing every problem: deployment settings in the conf, unknown params, schema failures, bad
    members, a date that does not exist.
    """
    params = dict(params or {})
    problems = deployment_key_problems(params)
    unknown = sorted(set(params) - set(specs) - set(DEPLOYMENT_KEYS) - set(host_setting_names()), key=str)
    if unknown:
        problems.append(f"unknown params: {', '.join(map(str, unknown))}")
    merged = {name: spec["default"] for name, spec in specs.items()}
    merged.update((k, v) for k, v in params.items() if k in specs)
    problems += schema_problems(specs, merged)

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

    if problems:
        raise BadParams("invalid run params:\n  - " + "\n  - ".join(problems))
    return merged, members, date


def resolve_run_config(
    params: dict[str, Any],
    *,
    deployment: "DeploymentSettings",
    dag_id: str,
    run_id: str,
    logical_date: dt.datetime | None,
    run_after: dt.datetime | None = None,
) -> dict[str, Any]:
    """Check a run's params; return its JSON-able config (what every later task reads).

    Raises BadParams naming each problem. The config names the backend but holds none of its
    settings: it goes to XCom and into rendered task arguments, which every viewer of the run
    can read, so tasks take the host settings from the deployment when they run.
    """
    merged, members, date = check_trigger_params(params, deployment.param_specs, logical_date=logical_date, run_after=run_after)
    worker = WorkerSettings(
        bucket=merged["bucket"],
        checkpoint=merged["checkpoint"],
        lead_time=int(merged["lead_time"]),
        upload_threads=int(merged["upload_threads"]),
        precision=merged["precision"],
        num_chunks=merged["num_chunks"],
        service_account=deployment.service_account,
        checkpoint_identity=deployment.checkpoints[merged["checkpoint"]],  # what the worker must find in it
    )
    return {
        "dag_id": dag_id,
        "run_id": run_id,
        "date": date,
        "members": members,
        "members_text": format_members(members),
        "bucket": merged["bucket"],
        "backend": deployment.backend,  # the name only; its settings stay in the deployment
        "worker": worker_settings_to_dict(worker),
        "gcp_conn_id": deployment.gcp_conn_id,
        "input_wait_minutes": float(merged["input_wait_minutes"]),
        "input_poke_seconds": float(merged["input_poke_seconds"]),
    }


def worker_settings_to_dict(worker: WorkerSettings) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(worker)


def worker_settings_from_config(config: dict[str, Any]) -> WorkerSettings:
    return WorkerSettings(**config["worker"])
