"""How a member reaches its GPU: the host-backend interface and its registry.

A backend owns three moments of a run, each called from one Airflow task:

* ``create_host``  (setup task)    make the GPU host exist and be ready; idempotent.
* ``run_member``   (mapped task)   run one member's worker there, stream its log, return its exit code;
                                   when called again for the same (date, member) while the first job
                                   still runs (a retry after a dropped session), re-attach to it.
* ``delete_host``  (teardown task) make the host not exist; "already gone" is success.

Backends are registered by name (``@register("local")``) and chosen by the DAG's ``backend``
param, like anemoi-inference's runner and output registries. Implementations live in sibling
modules; importing them must not import torch or anemoi.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
from typing import Any, Callable, ClassVar

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

    @property
    def slug(self) -> str:
        """A name fragment safe for VM names, job names and paths: ``20251127-0000``."""
        return self.date.replace("_", "-").lower()


class HostBackend(abc.ABC):
    """One way of reaching a GPU. ``settings`` are the DAG's backend-specific params."""

    name: ClassVar[str]
    #: JSON schema of this backend's settings (the DAG's ``host`` param), with defaults.
    #: Declared at class level so the DAG can validate params without creating anything.
    SETTINGS_SCHEMA: ClassVar[dict[str, Any]] = {"type": "object", "properties": {}, "additionalProperties": False}

    def __init__(self, settings: dict[str, Any] | None = None):
        self.settings = validate_settings(self.SETTINGS_SCHEMA, dict(settings or {}), type(self).__name__)

    @abc.abstractmethod
    def create_host(self, run: RunInfo, log: LogSink) -> dict[str, Any]:
        """Make the host exist and be ready for members; idempotent. Returns JSON-able host facts."""

    @abc.abstractmethod
    def run_member(self, run: RunInfo, member: int, worker: WorkerSettings, log: LogSink) -> int:
        """Run (or re-attach to) the worker for one member; stream its log lines to ``log``.

        Returns the worker's exit code (aifs.exitcodes.ExitCode values); raises only for
        failures of the backend itself (host unreachable after retries, ...).
        """

    @abc.abstractmethod
    def delete_host(self, run: RunInfo, log: LogSink) -> None:
        """Make the host not exist; a host that is already gone is success."""


class BadSettings(ValueError):
    """Backend settings that do not match the backend's SETTINGS_SCHEMA."""


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


def get_backend(name: str, settings: dict[str, Any] | None = None) -> HostBackend:
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKEND_NAMES)}")
    if name not in _REGISTRY:
        importlib.import_module(_MODULES[name])
    return _REGISTRY[name](settings)
