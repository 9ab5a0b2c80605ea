"""GPU host backends (local, ssh, gce, gke) behind one interface: see base.py."""

from aifs.orchestration.backends.base import (  # noqa: F401
    BACKEND_NAMES,
    HostBackend,
    RunInfo,
    WorkerSettings,
    get_backend,
    register,
)
