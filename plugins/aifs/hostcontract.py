"""Contract between a GPU host's bootstrap (include/startup-script.sh, the image) and the backends.

The VM startup script prepares the host and then writes READY_MARKER; the ``gce`` backend's
setup waits for it over SSH. The ``ssh`` and ``gce`` backends launch the worker container with
SCRATCH_DIR mounted at CONTAINER_SCRATCH. Keep include/ in step with these names (a test checks).
"""

from __future__ import annotations

#: Written by the startup script once the image is pulled, the GPU answers and scratch is mounted.
READY_MARKER = "/var/lib/aifs/ready"
#: Written by the startup script when bootstrap failed; its content says why.
FAILED_MARKER = "/var/lib/aifs/failed"
#: Local scratch disk on the host (inputs and GRIB windows in flight).
SCRATCH_DIR = "/scratch"
#: Where the scratch disk appears inside the worker container.
CONTAINER_SCRATCH = "/scratch"
#: Where detached member jobs keep their logs and exit status on the host.
JOBS_DIR = "/var/lib/aifs/jobs"
#: Instance metadata keys the startup script reads.
METADATA_WORKER_IMAGE = "aifs-worker-image"
METADATA_SCRATCH_DEVICE = "aifs-scratch-device"
#: uid (and gid) of the non-root user the worker image runs as; the startup script gives it SCRATCH_DIR.
WORKER_UID = 10001
#: Environment variables read by the worker inside the container.
ENV_NUM_CHUNKS = "ANEMOI_INFERENCE_NUM_CHUNKS"


def job_name(date: str, member: int) -> str:
    """Name of the detached job (container or process) for one member of one date.

    Deterministic, so a retry finds the job its predecessor started instead of starting another.
    """
    return f"aifs-{date.replace('_', '-')}-m{member:03d}"
