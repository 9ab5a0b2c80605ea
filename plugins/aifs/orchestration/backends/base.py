"""How a member reaches its GPU: the host-backend interface and its registry.

A backend owns three moments of a run, each called from one Airflow task:

* ``create_host``  (setup task)    make the GPU host exist and be ready; idempotent.
* ``run_member``   (mapped task)   run one member's worker there, stream its log, return its exit code;
                                   when called again for the same (date, member) while the first job
                                   still runs (a retry after a dropped session), re-attach to it.
* ``delete_host``  (teardown task) make the host not exist; "already gone" is success.

Backends are registered by name (``@register("local")``) and chosen by the deployment's
AIFS_ENS_BACKEND, like anemoi-inference's runner and output registries. Implementations live in sibling
modules; importing them must not import torch or anemoi.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
from typing import Any, Callable, ClassVar, Sequence

from aifs.layout import DEFAULT_LEAD_TIME_HOURS, DEFAULT_UPLOAD_THREADS

LogSink = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class WorkerSettings:
    """The worker flags a DAG run passes to every member (see ``python -m aifs.worker --help``)."""

    bucket: str
    checkpoint: str
    lead_time: int = DEFAULT_LEAD_TIME_HOURS
    upload_threads: int = DEFAULT_UPLOAD_THREADS
    precision: str | None = None
    num_chunks: int | None = None
    service_account: str | None = None
    input_dir: str | None = None
    output_dir: str | None = None
    force: bool = False
    #: what the checkpoint must be, by content ("sha256:<hex>" | "hf:<revision>"); the worker
    #: refuses (exit 15) a checkpoint that is something else. None: not declared for this checkpoint.
    checkpoint_identity: str | None = None

    def worker_args(self, date: str, member: int) -> list[str]:
        """Command-line arguments of ``python -m aifs.worker`` for one member (no program name)."""
        args = [
            "--date", date,
            "--members", str(member),
            "--bucket", self.bucket,
            "--checkpoint", self.checkpoint,
            "--lead-time", str(self.lead_time),
            "--upload-threads", str(self.upload_threads),
        ]
        optional = {
            "--precision": self.precision,
            "--num-chunks": self.num_chunks,
            "--service-account": self.service_account,
            "--input-dir": self.input_dir,
            "--output-dir": self.output_dir,
            "--checkpoint-identity": self.checkpoint_identity,
        }
        for flag, value in optional.items():
            if value is not None and value != "":
                args += [flag, str(value)]
        if self.force:
            args.append("--force")
        return args


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """Identity of one DAG run, used to name hosts, jobs and scratch dirs."""

    dag_id: str
    run_id: str
    date: str  # YYYYMMDD_HHMM, the forecast date of this run
    #: the checkpoint's generation (aifs.generations): which image or worker Python runs the members.
    #: None: not chosen (runs checked before generations existed): the deployment's one image/python.
    generation: str | None = None

    @property
    def slug(self) -> str:
        """A name fragment safe for VM names, job names and paths: ``20251127-0000-1a2b3c``.

        The date for people, a short hash of the run id so that two runs of one date (a manual
        trigger while a backfill covers it) never share or delete each other's host or jobs.
        """
        from aifs.hostcontract import run_slug

        return run_slug(self.date, self.run_id)

    @property
    def run_hash(self) -> str:
        from aifs.hostcontract import run_hash

        return run_hash(self.run_id)

    def job_name(self, member: int) -> str:
        from aifs.hostcontract import job_name

        return job_name(self.date, member, self.run_id)

    def step_job_name(self, step: str) -> str:
        """Name of the run's CPU step job, pod or VM: ``aifs-<slug>-<step>`` (a member's ends in ``-mNNN``)."""
        check_step(step)
        return f"aifs-{self.slug}-{step}"


class HostBackend(abc.ABC):
    """One way of reaching a GPU. ``settings`` are the deployment's host settings (AIFS_ENS_HOST)."""

    name: ClassVar[str]
    #: JSON schema of this backend's settings (the deployment's AIFS_ENS_HOST), with defaults.
    #: Declared at class level so the DAG can validate params without creating anything.
    SETTINGS_SCHEMA: ClassVar[dict[str, Any]] = {"type": "object", "properties": {}, "additionalProperties": False}

    def __init__(self, settings: dict[str, Any] | None = None):
        self.settings = validate_settings(self.SETTINGS_SCHEMA, dict(settings or {}), type(self).__name__)
        problems = self.settings_problems(self.settings)
        if problems:
            raise BadSettings(f"{type(self).__name__} settings invalid: {'; '.join(problems)}")

    @classmethod
    def settings_problems(cls, settings: dict[str, Any]) -> list[str]:
        """What the schema cannot say about a backend's settings (the deployment checks it at parse time too)."""
        return []

    # -- the run's generation: which image or Python runs its members ------------------------------

    def settings_for(self, generation: str | None) -> dict[str, Any]:
        """These settings with ``image``/``python``/``worker_python`` of that generation (PER_GENERATION)."""
        return settings_for_generation(self.settings, generation)

    def environment_for(self, generation: str | None) -> str:
        """What runs that generation's members here (an image, a Python), for the log; raises NoEnvironment."""
        return "this backend's worker"

    @abc.abstractmethod
    def create_host(self, run: RunInfo, log: LogSink) -> dict[str, Any]:
        """Make the host exist and be ready for members; idempotent. Returns JSON-able host facts."""

    @abc.abstractmethod
    def run_member(
        self, run: RunInfo, member: int, worker: WorkerSettings, log: LogSink, *, timeout_s: float | None = None
    ) -> int:
        """Run (or re-attach to) the worker for one member; stream its log lines to ``log``.

        ``timeout_s`` (the deployment's member_timeout) is the job's deadline counted from its
        launch and recorded with the job on the host, where the host itself enforces it: a
        re-attaching retry does not restart it and a vanished Airflow cannot extend it. No job
        starts while another job of any run holds the host's GPU (bounded wait, then GPUBusy).

        Returns the worker's exit code (aifs.exitcodes.ExitCode values); raises MemberTimeout when
        the deadline stopped the job, and otherwise only for failures of the backend itself (host
        unreachable after retries, GPU busy, a job of that name started with other worker args).
        """

    def stop_member(self, run: RunInfo, member: int, log: LogSink) -> None:
        """Stop the member's job if it runs (the task was killed: timeout, marked failed, cleared)."""

    @abc.abstractmethod
    def delete_host(self, run: RunInfo, log: LogSink) -> None:
        """Make the host not exist; a host that is already gone is success."""

    # -- CPU steps (aifs.orchestration.steps): the worker image's other programs, without a GPU --------

    def run_step(self, run: RunInfo, step: str, module: str, args: Sequence[str], env: dict[str, str], log: LogSink, *,
                 timeout_s: float | None = None) -> int:
        """Run ``python -m <module> <args>`` of the worker environment as a CPU job; stream its log; return its exit code.

        Never on the GPU and never under the GPU lock: a step (building inputs, making products) must
        not bill or hold a GPU. ``env`` (secrets included) reaches the process only, never a log line.
        ``timeout_s`` is the job's deadline from its launch, enforced where the job runs when the
        backend can. Called again for the same run and step while the job runs, it re-attaches
        where the backend can (ssh, gce); raises StepTimeout when the deadline stopped it.
        """
        raise NotImplementedError(f"the {self.name} backend cannot run CPU steps")

    def stop_step(self, run: RunInfo, step: str, log: LogSink) -> None:
        """Stop the step's job if it runs (its task was killed: timeout, marked failed, cleared)."""


class MemberTimeout(RuntimeError):
    """The member's job ran past its deadline (member_timeout from launch) and was stopped."""


class StepTimeout(RuntimeError):
    """A CPU step ran past its deadline (from its launch) and was stopped."""


#: A step's name goes into job, pod and VM names (lowercase, short); its module is a dotted Python name.
STEP_PATTERN = r"^[a-z][a-z0-9]{0,11}$"
MODULE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"


def check_step(step: str, module: str | None = None) -> None:
    """Refuse a step name that cannot name a VM or pod, or a module that is not a dotted name."""
    import re

    if not re.fullmatch(STEP_PATTERN, str(step)):
        raise ValueError(f"step name {step!r} must match {STEP_PATTERN} (it names the step's job, pod or VM)")
    if module is not None and not re.fullmatch(MODULE_PATTERN, str(module)):
        raise ValueError(f"step module {module!r} is not a dotted Python module name")


class GPUBusy(RuntimeError):
    """Another job (of any run) held the host's GPU for longer than this member may wait."""


class BadSettings(ValueError):
    """Backend settings that do not match the backend's SETTINGS_SCHEMA."""


class NoEnvironment(ValueError):
    """The deployment has no image or worker Python for the generation a run's checkpoint needs."""


#: Host settings a deployment gives once per generation (``{"v1": ..., "v2": ...}``) -> the single
#: setting they stand for. The single one (``image``, ``python``, ``worker_python``) stays valid: it
#: is what runs a generation the map does not name (a deployment of one generation; deployments
#: made before generations existed, whose image is v1's).
PER_GENERATION = {"images": "image", "pythons": "python", "worker_pythons": "worker_python"}


def per_generation_schema(what: str) -> dict[str, Any]:
    """JSON schema of a ``{generation: value}`` host setting; keys are aifs.generations' names."""
    from aifs.generations import GENERATIONS

    return {
        "type": "object",
        "propertyNames": {"enum": list(GENERATIONS)},
        "additionalProperties": {"type": "string", "minLength": 1},
        "default": {},
        "description": f"{what} per checkpoint generation, e.g. {{\"v1\": ..., \"v2\": ...}}; a generation not named here uses the single setting",
    }


def settings_for_generation(settings: dict[str, Any], generation: str | None) -> dict[str, Any]:
    """``settings`` with each PER_GENERATION single setting replaced by the generation's entry, if any."""
    resolved = dict(settings)
    for many, one in PER_GENERATION.items():
        chosen = (settings.get(many) or {}).get(generation) if generation else None
        if chosen:
            resolved[one] = chosen
    return resolved


def require_image(backend: str, settings: dict[str, Any], generation: str | None) -> str:
    """The worker image that runs ``generation`` under these host settings; NoEnvironment when there is none."""
    image = settings_for_generation(settings, generation).get("image")
    if not image:
        named = ", ".join(sorted(settings.get("images") or {})) or "none"
        raise NoEnvironment(
            f"the {backend} backend has no worker image for {generation or 'this'} checkpoints: AIFS_ENS_HOST names "
            f"images for {named} and no 'image'; add images.{generation} (the image built with GENERATION={generation}, "
            "see the operator's guide)"
        )
    return image


#: What a worker environment variable's name may be: a shell identifier. Names end up in job scripts
#: (``export NAME=...``), ``docker run -e NAME=VALUE`` and pod specs; anything else could smuggle
#: shell syntax onto the GPU host.
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"


def env_setting_schema(description: str) -> dict[str, Any]:
    """JSON schema of a backend's ``env`` setting: shell-identifier names, string values."""
    return {
        "type": "object",
        "propertyNames": {"pattern": ENV_NAME_PATTERN},
        "additionalProperties": {"type": "string"},
        "default": {},
        "description": description,
    }


def check_env_names(env: dict[str, Any]) -> None:
    """Refuse names that are not shell identifiers, where env is rendered (the schema checks it too)."""
    import re

    bad = sorted(str(k) for k in env if not re.fullmatch(ENV_NAME_PATTERN, str(k)))
    if bad:
        raise ValueError(f"environment variable names must match {ENV_NAME_PATTERN}: {', '.join(map(repr, bad))}")


def validate_settings(schema: dict[str, Any], settings: dict[str, Any], owner: str) -> dict[str, Any]:
    """Validate against ``schema`` and fill in the schema's defaults; raise BadSettings saying why."""
    import jsonschema  # ships with Airflow; imported here to keep module import cheap

    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(settings), key=lambda e: list(e.path))
    if errors:
        details = "; ".join(f"{'.'.join(map(str, e.path)) or '<settings>'}: {e.message}" for e in errors)
        raise BadSettings(f"{owner} settings invalid: {details}")
    filled = {k: v["default"] for k, v in schema.get("properties", {}).items() if "default" in v}
    filled.update(settings)
    return filled


_REGISTRY: dict[str, type[HostBackend]] = {}
#: name -> module that registers it; imported lazily so a backend's provider is only needed when used.
_MODULES = {
    "local": "aifs.orchestration.backends.local",
    "ssh": "aifs.orchestration.backends.ssh",
    "gce": "aifs.orchestration.backends.gce",
    "gke": "aifs.orchestration.backends.gke",
}
BACKEND_NAMES = tuple(_MODULES)


def register(name: str):
    def decorate(cls: type[HostBackend]) -> type[HostBackend]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def backend_class(name: str) -> type[HostBackend]:
    """The class registered as ``name`` (its SETTINGS_SCHEMA, without making an instance)."""
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKEND_NAMES)}")
    if name not in _REGISTRY:
        importlib.import_module(_MODULES[name])
    return _REGISTRY[name]


def get_backend(name: str, settings: dict[str, Any] | None = None) -> HostBackend:
    return backend_class(name)(settings)
