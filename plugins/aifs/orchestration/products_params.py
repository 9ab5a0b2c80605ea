"""What a products run is for: the forecasts asset's events, or a forecaster's params; checked.

aifs_ens_products starts in two ways:

* **by the ``aifs_ens_forecasts`` asset**: the forecast DAG's verify emits an event whose extra names
  the bucket, the date and the members it verified. Several events can reach one run (a backfill
  finishing dates while the products DAG was paused or busy): each is a target, none is dropped.
* **by hand**, with params ``date``, ``bucket`` (one the deployment allows) and ``members``.

Either way the same checks apply: a date that exists, a bucket from AIFS_ENS_BUCKETS (an asset event
can be posted through the REST API by anyone allowed to: its extra is input like any other), member
numbers within 1..50. Submission, team, model, climatology and the rest are the deployment's
(aifs.orchestration.products_settings): a conf naming one is refused, saying where it belongs.
``resolve_products_config`` raises BadParams listing every problem, before anything runs.

Nothing here imports Airflow: the checks are plain functions the tests call directly.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from aifs import layout
from aifs.members import MEMBERS_PATTERN, BadMembers, format_members, parse_members
from aifs.orchestration.params import BadParams, deployment_key_problems, schema_problems
from aifs.orchestration.products_settings import PRODUCTS_DEPLOYMENT_KEYS

if TYPE_CHECKING:
    from aifs.orchestration.deployment import DeploymentSettings

PRODUCTS_DAG_ID = "aifs_ens_products"
#: A products run defaults to the whole ensemble; the command uses the verified ones among them.
DEFAULT_PRODUCT_MEMBERS = "1-50"


def products_param_specs(buckets: Sequence[str]) -> dict[str, dict[str, Any]]:
    """name -> ``airflow.sdk.Param`` keyword arguments for a run by hand (an asset's run takes its event's)."""
    return {
        "date": {
            "default": None,
            "type": ["null", "string"],
            "pattern": r"^\d{8}_\d{4}$",
            "description": "Forecast date YYYYMMDD_HHMM whose products to make (runs started by the forecasts asset take its event's).",
        },
        "bucket": {
            "default": buckets[0],
            "type": "string",
            "enum": list(buckets),
            "description": "GCS bucket holding {date}/forecasts/ and receiving {date}/products/ (one the deployment allows).",
        },
        "members": {
            "default": DEFAULT_PRODUCT_MEMBERS,
            "type": "string",
            "pattern": MEMBERS_PATTERN,
            "description": "Members to use: 1-50, 1,5,10 or mixes (each 1..50); only verified ones count.",
        },
    }


def _target(bucket: Any, date: Any, members: Any, source: str, allowed: Sequence[str]) -> tuple[dict[str, Any] | None, list[str]]:
    problems = []
    if not isinstance(bucket, str) or bucket not in allowed:
        problems.append(f"{source}: bucket {bucket!r} is not one this deployment allows (AIFS_ENS_BUCKETS: {', '.join(allowed)})")
    try:
        layout.parse_date(date)
    except layout.BadDate as exc:
        problems.append(f"{source}: date: {exc}")
    chosen: list[int] = []
    try:
        if not isinstance(members, str):
            raise BadMembers(f"{members!r} is not a member selection like 1-50")
        chosen = parse_members(members)
    except BadMembers as exc:
        problems.append(f"{source}: members: {exc}")
    if problems:
        return None, problems
    return {"bucket": bucket, "date": date, "members": chosen, "members_text": format_members(chosen), "source": source}, []


def event_targets(events: Iterable[Mapping[str, Any]], allowed: Sequence[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """Targets from the forecasts asset's events (their ``extra``), oldest first, one per bucket and date."""
    targets: dict[tuple[str, str], dict[str, Any]] = {}
    problems: list[str] = []
    for number, extra in enumerate(events, 1):
        extra = dict(extra or {})
        source = f"asset event {number} ({json.dumps(extra, default=str)[:200]})"
        target, found = _target(extra.get("bucket"), extra.get("date"), extra.get("members", DEFAULT_PRODUCT_MEMBERS), source, allowed)
        problems += found
        if target:
            targets[(target["bucket"], target["date"])] = target  # a later event for the same date wins
    return list(targets.values()), problems


def resolve_products_config(
    params: Mapping[str, Any] | None,
    *,
    deployment: "DeploymentSettings",
    specs: Mapping[str, Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]] = (),
    dag_id: str = PRODUCTS_DAG_ID,
    run_id: str = "",
) -> dict[str, Any]:
    """Check a products run; return its JSON-able config: the targets (bucket, date, members) to make.

    ``events``: the extras of the run's triggering ``aifs_ens_forecasts`` events (empty for a run by hand).
    Raises BadParams naming each problem.
    """
    params = dict(params or {})
    problems = deployment_key_problems(params)
    for key in sorted(set(params) & set(PRODUCTS_DEPLOYMENT_KEYS)):
        problems.append(f"{key}: set by the deployment ({PRODUCTS_DEPLOYMENT_KEYS[key]}), not by a trigger")
    flagged = {p.split(":", 1)[0] for p in problems}
    unknown = sorted((set(params) - set(specs) - flagged), key=str)
    if unknown:
        problems.append(f"unknown params: {', '.join(map(str, unknown))} (a products run takes {', '.join(specs)})")
    merged = {name: spec["default"] for name, spec in specs.items()}
    merged.update((k, v) for k, v in params.items() if k in specs)
    problems += schema_problems(specs, merged)

    allowed = list(deployment.allowed_buckets)
    if events:
        targets, found = event_targets(events, allowed)
        problems += found
    elif merged.get("date") is None:
        targets = []
        problems.append("date: needed for a run by hand (a run the forecasts asset starts takes its event's date)")
    elif problems:  # the schema's messages already say what is wrong with the params
        targets = []
    else:
        target, found = _target(merged["bucket"], merged["date"], merged["members"], "params", allowed)
        targets, problems = ([target] if target else []), problems + found
    if problems:
        raise BadParams("invalid products run:\n  - " + "\n  - ".join(problems))
    return {
        "dag_id": dag_id,
        "run_id": run_id,
        "targets": targets,
        # what alerts and summaries name the run by (aifs.orchestration.alerts reads check_params' date/bucket)
        "date": ", ".join(t["date"] for t in targets),
        "bucket": ", ".join(dict.fromkeys(t["bucket"] for t in targets)),
        "members_text": "; ".join(t["members_text"] for t in targets),
        "gcp_conn_id": deployment.gcp_conn_id,
        "backend": deployment.backend,  # the name only; the step checks it is still the deployment's
    }


def triggering_extras(context: Mapping[str, Any], asset: Any) -> list[dict[str, Any]]:
    """The ``extra`` of each event of ``asset`` that triggered this run, oldest first; [] for a run by hand.

    Airflow 3 puts them in the task context as ``triggering_asset_events`` (asset -> events).
    """
    accessor = context.get("triggering_asset_events") or {}
    try:
        events = list(accessor[asset])
    except KeyError:
        return []
    events.sort(key=lambda e: getattr(e, "timestamp", None) or 0)
    return [dict(getattr(e, "extra", None) or {}) for e in events]
