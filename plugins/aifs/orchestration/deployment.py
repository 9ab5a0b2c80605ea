"""Per-deployment DAG settings, read from environment variables when the DAG file is parsed.

Environment variables, not Airflow Variables: they cost nothing at parse time (no metadata
database round trip every parse), and Composer sets them per environment without code changes.

===========================  ========================  ===========================================
variable                     default                   meaning
===========================  ========================  ===========================================
AIFS_ENS_CYCLE_HOUR          0                         forecast cycle (UTC) of scheduled runs
AIFS_ENS_SCHEDULE            ``0 <cycle hour> * * *``  cron of the daily run; ``none`` disables it
AIFS_ENS_START_DATE          2025-01-01                first logical date (for backfills too)
AIFS_ENS_CATCHUP             false                     schedule the runs missed since start
AIFS_ENS_MAX_ACTIVE_RUNS     1                         dates in flight at once (hosts at once)
AIFS_ENS_MEMBER_RETRIES      2                         retries of a member after a transient failure
AIFS_ENS_RETRY_DELAY_S       120                       first retry delay; doubles each try
AIFS_ENS_MEMBER_TIMEOUT_MIN  180                       one member's limit, download to last upload
AIFS_ENS_HOST_RETRIES        2                         retries of host creation (GPU stockouts, quota races)
AIFS_ENS_PARAM_DEFAULTS      {}                        JSON object: this deployment's param defaults, used
                                                       by scheduled runs and backfills, e.g.
                                                       {"bucket": "my-bucket", "backend": "gce",
                                                        "host": {"project_id": "...", ...}}
AIFS_ENS_PARALLEL_MEMBERS    1                         members in flight at once; above 1 only with the
                                                       gke backend (one GPU pod each); VM and ssh hosts
                                                       have one GPU, so members there stay serial
===========================  ========================  ===========================================
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
from typing import Any

from aifs.orchestration.params import CYCLE_HOURS


@dataclasses.dataclass(frozen=True)
class DeploymentSettings:
    schedule: str | None
    start_date: dt.datetime
    catchup: bool
    max_active_runs: int
    member_retries: int
    retry_delay: dt.timedelta
    member_timeout: dt.timedelta
    host_retries: int = 2
    parallel_members: int = 1
    param_defaults: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "DeploymentSettings":
        env = dict(os.environ if env is None else env)
        cycle_hour = int(env.get("AIFS_ENS_CYCLE_HOUR", "0"))
        if cycle_hour not in CYCLE_HOURS:
            raise ValueError(f"AIFS_ENS_CYCLE_HOUR must be one of {CYCLE_HOURS}, got {cycle_hour}")
        schedule = env.get("AIFS_ENS_SCHEDULE") or f"0 {cycle_hour} * * *"
        if schedule.strip().lower() in ("none", "@none", "off"):
            schedule = None
        start = dt.datetime.strptime(env.get("AIFS_ENS_START_DATE", "2025-01-01"), "%Y-%m-%d").replace(tzinfo=dt.timezone.utc)
        return cls(
            schedule=schedule,
            start_date=start,
            catchup=env.get("AIFS_ENS_CATCHUP", "false").strip().lower() in ("1", "true", "yes", "on"),
            max_active_runs=int(env.get("AIFS_ENS_MAX_ACTIVE_RUNS", "1")),
            member_retries=int(env.get("AIFS_ENS_MEMBER_RETRIES", "2")),
            retry_delay=dt.timedelta(seconds=float(env.get("AIFS_ENS_RETRY_DELAY_S", "120"))),
            member_timeout=dt.timedelta(minutes=float(env.get("AIFS_ENS_MEMBER_TIMEOUT_MIN", "180"))),
            host_retries=int(env.get("AIFS_ENS_HOST_RETRIES", "2")),
            parallel_members=_at_least_one("AIFS_ENS_PARALLEL_MEMBERS", env.get("AIFS_ENS_PARALLEL_MEMBERS", "1")),
            param_defaults=_json_object("AIFS_ENS_PARAM_DEFAULTS", env.get("AIFS_ENS_PARAM_DEFAULTS", "")),
        )


def _json_object(name: str, text: str) -> dict[str, Any]:
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object of param defaults, got {type(value).__name__}")
    return value


def _at_least_one(name: str, text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return value
