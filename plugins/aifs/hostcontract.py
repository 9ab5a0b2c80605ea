"""Contract between a GPU host's bootstrap (include/startup-script.sh, the image) and the backends.

The VM startup script prepares the host and then writes READY_MARKER; the ``gce`` backend's
setup waits for it over SSH. The ``ssh`` and ``gce`` backends launch the worker container with
SCRATCH_DIR mounted at CONTAINER_SCRATCH. Keep include/ in step with these names (a test checks).
"""

from __future__ import annotations

import hashlib

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
#: Shared memory the worker container gets (docker ``--shm-size``; a memory-backed /dev/shm on GKE).
#: The GRIB writer processes take each step through /dev/shm: N+2 steps of ~260 MB at N320 with
#: 120 fields, ~3.4 GB with 11 writers. Docker's default of 64 MB would make the worker fall back
#: to encoding on the model's own process. A tmpfs cap, not a reservation.
WORKER_SHM_GIB = 16
#: Environment variables read by the worker inside the container.
ENV_NUM_CHUNKS = "ANEMOI_INFERENCE_NUM_CHUNKS"


#: In JOBS_DIR: the host's one GPU lock. A job's runner holds it (flock, inherited by the whole job)
#: from launch to exit, whichever run the job belongs to; GPU_HOLDER says who holds it.
GPU_LOCK = "gpu.lock"
GPU_HOLDER = "gpu.holder"
#: Seconds between SIGTERM and SIGKILL when a job passes its deadline (a container gets docker stop -t 60).
KILL_AFTER_S = 90


def run_hash(run_id: str) -> str:
    """Six hex digits of the DAG run's id: two runs of one date (a trigger and a backfill) get two names."""
    return hashlib.sha256(run_id.encode()).hexdigest()[:6]


def run_slug(date: str, run_id: str) -> str:
    """``20251127-0000-1a2b3c``: the forecast date (for people) and the run's hash (for uniqueness)."""
    return f"{date.replace('_', '-').lower()}-{run_hash(run_id)}"


def job_name(date: str, member: int, run_id: str) -> str:
    """Name of the detached job (container, process or pod) for one member of one DAG run.

    Deterministic, so a retry finds the job its predecessor started instead of starting another;
    scoped to the run, so another run of the same date never adopts (or stops) it.
    """
    return f"aifs-{run_slug(date, run_id)}-m{member:03d}"
