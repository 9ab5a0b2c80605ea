"""Per-deployment DAG settings, read from environment variables when the DAG file is parsed.

Environment variables, not Airflow Variables: they cost nothing at parse time (no metadata
database round trip every parse), Composer sets them per environment without code changes, and
only the environment's admins can change them (anyone who may trigger a run cannot). So what
decides where and how code runs on the GPU host is here, never in a trigger's params: the
backend, its host settings, connection ids, service account, and which checkpoints and buckets a
trigger may choose from. Every setting is checked when the DAG file is parsed: a broken one is a
DAG import error naming its variable (and never echoing an ``env`` value, which may be secret).

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
AIFS_ENS_BACKEND             local                     how members reach a GPU: local, ssh, gce or gke
AIFS_ENS_HOST                {}                        JSON object: the backend's settings, checked against
                                                       its schema, e.g. {"project_id": "...", "zone": ...}
AIFS_ENS_GCP_CONN_ID         google_cloud_default      Airflow connection the DAG reads the bucket with
AIFS_ENS_SERVICE_ACCOUNT     (none)                    key file on the GPU host for the worker's
                                                       --service-account; empty: the host's own account
AIFS_ENS_BUCKETS             the original bucket       JSON list (or comma-separated) of the buckets a
                                                       trigger may choose; the first is the default
AIFS_ENS_CHECKPOINTS         {"ecmwf/aifs-ens-2.0":    JSON object: checkpoint a trigger may choose ->
                              {"identity": null},      {"identity": "sha256:<hex>" | "hf:<rev>" | null,
                              "ecmwf/aifs-ens-1.0":     "generation": "v1" | "v2" (optional)}, the identity
                              {"identity": null}}      the worker must find (null, not checked, only on the
                                                       local backend); first: default. The generation (which
                                                       image or worker Python runs it) is read from the
                                                       checkpoint itself when the run starts; a path on an
                                                       ssh/gce/gke host, which Airflow cannot read, declares it
AIFS_ENS_PARAM_DEFAULTS      {}                        JSON object: defaults of trigger params for scheduled
                                                       runs and backfills, e.g. {"members": "1-50",
                                                       "lead_time": 792}; deployment settings refused
AIFS_ENS_PARALLEL_MEMBERS    1                         members in flight at once; above 1 only with the
                                                       gke backend (one GPU pod each); VM and ssh hosts
                                                       have one GPU, so members there stay serial
AIFS_ENS_OPENDATA_SOURCE     ecmwf                     where aifs_ens_inputs reads ECMWF open data: ecmwf,
                                                       aws, azure, google (close to a GCS bucket) or a URL
AIFS_ENS_INPUTS_TIMEOUT_MIN  120                       the inputs step's limit (a CPU job), from its launch
AIFS_ENS_FORECAST_TRIGGER    inputs                    what starts aifs_ens_forecast: ``inputs`` (each
                                                       aifs_ens_inputs asset event, for the event's date: the
                                                       whole day runs itself), ``time`` (AIFS_ENS_SCHEDULE;
                                                       inputs made elsewhere, its sensor waits for them, and
                                                       aifs_ens_inputs runs only when triggered) or
                                                       ``inputs_or_time`` (either)
AIFS_ENS_SUBMIT              false                     aifs_ens_products submits a competition date to the AI
                                                       Weather Quest (once; needs team and model below)
AIFS_ENS_AIWQ_TEAM           (none)                    the competition's team name (in its file names)
AIFS_ENS_AIWQ_MODEL          (none)                    the competition's model name (in its file names)
AIFS_ENS_AIWQ_CONN_ID        aifs_aiwq                 Airflow connection whose password is the competition's
                                                       token (climatology retrieval, submission)
AIFS_ENS_PRODUCTS_MIN_MEMBERS  (the command's)         fewest verified members to submit; below it the
                                                       products are made, labelled, and not submitted
AIFS_ENS_PRODUCTS_POINTS     Nairobi, Addis Ababa,     plume points, ``Name:lat,lon;...``
                             Kampala, Dar es Salaam
AIFS_ENS_CLIMATOLOGY         (none)                    a 20-year climatology file or URL; none: the
                                                       competition's retrieval, with the token
AIFS_ENS_PRODUCTS_TIMEOUT_MIN  60                      the products step's limit (a CPU job), from its launch
===========================  ========================  ===========================================
The products settings are read by aifs.orchestration.products_settings (checked when aifs_ens_products is parsed).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
from typing import Any

from aifs import layout
from aifs.completeness import is_checkpoint_identity
from aifs.generations import DEFAULT_GENERATION, GENERATIONS
from aifs.orchestration.params import BUCKET_PATTERN, CYCLE_HOURS, DEFAULT_BACKEND, DEFAULT_GCP_CONN_ID, param_specs, with_defaults


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
    backend: str = DEFAULT_BACKEND
    #: the backend's settings as the admin wrote them (validated); never copied into a run's config
    host: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)
    gcp_conn_id: str = DEFAULT_GCP_CONN_ID
    service_account: str | None = None
    allowed_buckets: tuple[str, ...] = (layout.DEFAULT_BUCKET,)
    #: checkpoint reference -> identity the worker must find (None: not checked)
    checkpoints: dict[str, str | None] = dataclasses.field(default_factory=lambda: dict(DEFAULT_CHECKPOINTS))
    #: checkpoint reference -> the generation the deployment declares for it (AIFS_ENS_CHECKPOINTS "generation")
    checkpoint_generations: dict[str, str] = dataclasses.field(default_factory=dict)
    #: the DAG's params: name -> ``airflow.sdk.Param`` keyword arguments, with this deployment's
    #: allowed buckets and checkpoints as enums and its AIFS_ENS_PARAM_DEFAULTS as defaults
    param_specs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    #: aifs_ens_inputs: the open-data source (an ecmwf-opendata name or a URL) and the step's limit
    opendata_source: str = "ecmwf"
    inputs_timeout: dt.timedelta = dt.timedelta(minutes=120)
    #: what starts aifs_ens_forecast (FORECAST_TRIGGERS)
    forecast_trigger: str = "inputs"

    @property
    def inputs_schedule(self) -> str | None:
        """aifs_ens_inputs' schedule: daily, unless this deployment's inputs are made elsewhere
        (AIFS_ENS_FORECAST_TRIGGER=time): then it runs only when triggered, and never overwrites them."""
        return None if self.forecast_trigger == "time" else self.schedule

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
        backend = env.get("AIFS_ENS_BACKEND", "").strip() or DEFAULT_BACKEND
        host = _host_settings(backend, env.get("AIFS_ENS_HOST", ""))
        parallel_members = _at_least_one("AIFS_ENS_PARALLEL_MEMBERS", env.get("AIFS_ENS_PARALLEL_MEMBERS", "1"))
        if parallel_members > 1 and backend != "gke":
            raise ValueError(
                f"AIFS_ENS_PARALLEL_MEMBERS={parallel_members} needs AIFS_ENS_BACKEND=gke (one GPU pod per member); "
                f"a {backend} host has one GPU, so its members must run one at a time"
            )
        buckets = _buckets(env.get("AIFS_ENS_BUCKETS", ""))
        checkpoints, generations = _checkpoints(env.get("AIFS_ENS_CHECKPOINTS", ""))
        _require_identities(backend, checkpoints)
        _require_generations(backend, checkpoints, generations)
        defaults = _json_object("AIFS_ENS_PARAM_DEFAULTS", env.get("AIFS_ENS_PARAM_DEFAULTS", ""))
        specs = with_defaults(param_specs(cycle_hour, buckets=buckets, checkpoints=list(checkpoints)), defaults)
        return cls(
            schedule=schedule,
            start_date=start,
            catchup=env.get("AIFS_ENS_CATCHUP", "false").strip().lower() in ("1", "true", "yes", "on"),
            max_active_runs=int(env.get("AIFS_ENS_MAX_ACTIVE_RUNS", "1")),
            member_retries=int(env.get("AIFS_ENS_MEMBER_RETRIES", "2")),
            retry_delay=dt.timedelta(seconds=float(env.get("AIFS_ENS_RETRY_DELAY_S", "120"))),
            member_timeout=dt.timedelta(minutes=float(env.get("AIFS_ENS_MEMBER_TIMEOUT_MIN", "180"))),
            host_retries=int(env.get("AIFS_ENS_HOST_RETRIES", "2")),
            parallel_members=parallel_members,
            param_defaults=defaults,
            backend=backend,
            host=host,
            gcp_conn_id=env.get("AIFS_ENS_GCP_CONN_ID", "").strip() or DEFAULT_GCP_CONN_ID,
            service_account=env.get("AIFS_ENS_SERVICE_ACCOUNT", "").strip() or None,
            allowed_buckets=tuple(buckets),
            checkpoints=checkpoints,
            checkpoint_generations=generations,
            param_specs=specs,
            opendata_source=env.get("AIFS_ENS_OPENDATA_SOURCE", "").strip() or "ecmwf",
            inputs_timeout=dt.timedelta(minutes=_positive("AIFS_ENS_INPUTS_TIMEOUT_MIN", env.get("AIFS_ENS_INPUTS_TIMEOUT_MIN", "120"))),
            forecast_trigger=_choice("AIFS_ENS_FORECAST_TRIGGER", env.get("AIFS_ENS_FORECAST_TRIGGER", ""), FORECAST_TRIGGERS),
        )

    def get_backend(self):
        """The backend these settings describe (building it creates nothing)."""
        from aifs.orchestration.backends.base import get_backend

        return get_backend(self.backend, self.host)


def _host_settings(backend: str, text: str) -> dict[str, Any]:
    """AIFS_ENS_HOST checked against the backend's schema; errors name the setting, never an env value."""
    import jsonschema

    from aifs.orchestration.backends.base import BACKEND_NAMES, backend_class

    if backend not in BACKEND_NAMES:
        raise ValueError(f"AIFS_ENS_BACKEND must be one of {', '.join(BACKEND_NAMES)}, got {backend!r}")
    host = _json_object("AIFS_ENS_HOST", text)
    schema = backend_class(backend).SETTINGS_SCHEMA
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(host), key=lambda e: list(map(str, e.path)))
    if errors:
        raise ValueError(f"AIFS_ENS_HOST is not valid for the {backend} backend: " + "; ".join(_describe(e) for e in errors))
    return host


def _describe(error: Any) -> str:
    path = ".".join(map(str, error.path)) or "<settings>"
    if error.path and error.path[0] == "env":
        if "propertyNames" in error.schema_path:
            return f"{path}: variable name {error.instance!r} is not a shell identifier ({error.validator_value})"
        return f"{path}: must be {'a string' if len(error.path) > 1 else 'an object of strings'} (value not shown: env values may be secret)"
    return f"{path}: {error.message}"


def _buckets(text: str) -> list[str]:
    if not text.strip():
        return [layout.DEFAULT_BUCKET]
    if text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"AIFS_ENS_BUCKETS is not valid JSON: {exc}") from None
    else:
        value = [part.strip() for part in text.split(",") if part.strip()]
    if not isinstance(value, list) or not value:
        raise ValueError("AIFS_ENS_BUCKETS must be a non-empty JSON list (or comma-separated list) of bucket names")
    bad = [b for b in value if not isinstance(b, str) or not re.fullmatch(BUCKET_PATTERN, b)]
    if bad:
        raise ValueError(f"AIFS_ENS_BUCKETS: not GCS bucket names: {', '.join(map(repr, bad))}")
    return list(dict.fromkeys(value))


#: Without AIFS_ENS_CHECKPOINTS: each generation's own checkpoint, the one ECMWF runs now
#: (DEFAULT_GENERATION) first, so it is the default and the other stays selectable.
DEFAULT_CHECKPOINTS: dict[str, str | None] = {
    ref: None for ref in (GENERATIONS[DEFAULT_GENERATION].default_checkpoint, *(g.default_checkpoint for g in GENERATIONS.values()))
}


def _checkpoints(text: str) -> tuple[dict[str, str | None], dict[str, str]]:
    """``({ref: identity}, {ref: declared generation})`` of AIFS_ENS_CHECKPOINTS."""
    if not text.strip():
        return dict(DEFAULT_CHECKPOINTS), {}
    value = _json_object("AIFS_ENS_CHECKPOINTS", text)
    if not value:
        raise ValueError("AIFS_ENS_CHECKPOINTS must allow at least one checkpoint")
    checkpoints: dict[str, str | None] = {}
    generations: dict[str, str] = {}
    for ref, spec in value.items():
        if not ref.strip():
            raise ValueError("AIFS_ENS_CHECKPOINTS: a checkpoint reference is empty")
        if not isinstance(spec, dict) or set(spec) - {"identity", "generation"}:
            raise ValueError(f'AIFS_ENS_CHECKPOINTS[{ref!r}] must be {{"identity": "sha256:<hex>" | "hf:<revision>" | null'
                             f'[, "generation": {" | ".join(map(repr, GENERATIONS))}]}}')
        identity = spec.get("identity")
        if identity is not None and not is_checkpoint_identity(identity):  # the worker's own rule
            raise ValueError(f"AIFS_ENS_CHECKPOINTS[{ref!r}]: identity {identity!r} is not sha256:<64 hex>, hf:<revision> or null")
        checkpoints[ref] = identity
        if spec.get("generation") is not None:
            if spec["generation"] not in GENERATIONS:
                raise ValueError(f"AIFS_ENS_CHECKPOINTS[{ref!r}]: generation {spec['generation']!r} is not one of "
                                 f"{', '.join(GENERATIONS)}")
            generations[ref] = spec["generation"]
    return checkpoints, generations


def _require_generations(backend: str, checkpoints: dict[str, str | None], generations: dict[str, str]) -> None:
    """A path on a GPU host (ssh, gce, gke) declares its generation: Airflow cannot read the file there.

    Everything else (gs://, a Hugging Face id, a file the local backend's worker shares with Airflow)
    is read when a run starts, and a declaration, if any, must agree with the checkpoint's record.
    """
    from aifs.orchestration.checkpoints import is_host_path

    if backend == "local":
        return
    missing = [ref for ref in checkpoints if is_host_path(ref) and ref not in generations]
    if missing:
        raise ValueError(
            f"AIFS_ENS_CHECKPOINTS: {', '.join(map(repr, missing))} is a path on the {backend} host, which Airflow "
            f'cannot read to learn which worker environment loads it: declare it, "generation": '
            f'{" or ".join(map(repr, GENERATIONS))} (the image build prints it), or name the checkpoint by its '
            "Hugging Face id or gs:// URL"
        )


def _require_identities(backend: str, checkpoints: dict[str, str | None]) -> None:
    """On a GPU host, every allowed checkpoint names its identity.

    Planning and verifying run here, where the checkpoint file is not: without an identity they can
    only compare names, and a rebuilt image with another checkpoint at the same path would find
    yesterday's members complete. Only the local backend (this machine's own file) may go without.
    """
    if backend == "local":
        return
    missing = [ref for ref, identity in checkpoints.items() if identity is None]
    if missing:
        raise ValueError(
            f"AIFS_ENS_CHECKPOINTS: {', '.join(map(repr, missing))} has no identity; on the {backend} backend every "
            'checkpoint needs one, {"identity": "sha256:<hex>"} for a file (the worker image build prints it: '
            '"checkpoint identity: ...") or "hf:<commit>" for a Hugging Face id (the commit the image baked), '
            "so that a member made with another checkpoint under the same name is never taken as complete"
        )


def _json_object(name: str, text: str) -> dict[str, Any]:
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object, got {type(value).__name__}")
    return value


#: AIFS_ENS_FORECAST_TRIGGER's values; the first is the default.
FORECAST_TRIGGERS = ("inputs", "time", "inputs_or_time")


def _choice(name: str, text: str, choices: tuple[str, ...]) -> str:
    value = text.strip() or choices[0]
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _positive(name: str, text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {text!r}")
    return value


def _at_least_one(name: str, text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return value
