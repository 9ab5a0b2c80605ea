"""The ssh backend with the real worker: loopback sshd, tiny real checkpoint, GCS emulator.

The worker runs as a plain process on the "host" ($AIFS_WORKER_PYTHON -m aifs.worker, the repo's
worker environment), with STORAGE_EMULATOR_HOST handed over through the backend's ``env`` setting.
* a member end to end: exit 0, every GRIB window and the completion manifest in the bucket;
* SSH sessions killed mid-member: the retry re-attaches, one job ran, the member completes once;
* a member that finished while disconnected is read as finished, not run again.
"""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from aifs import layout
from aifs.orchestration.backends import RunInfo, WorkerSettings, get_backend, remote_job
from .backend_helpers import SSH_CONN_ID, JobDir, Log, need

REPO = Path(__file__).resolve().parents[3]
DATE = "20250601_0000"
LEAD = 144  # two 72 h windows
RUN = RunInfo(dag_id="aifs_ens_forecast", run_id="manual__e2e", date=DATE)
BUCKET = "ssh-e2e"

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


@pytest.fixture(scope="module")
def world(sshd, tmp_path_factory):
    worker_python = os.environ.get("AIFS_WORKER_PYTHON") or str(REPO / ".venv" / "bin" / "python")
    if not os.path.isfile(worker_python):
        need(f"no worker environment (AIFS_WORKER_PYTHON={worker_python!r}); run `make env`")
    from aifs.testing.emulator import StorageEmulator, anonymous_client

    root = tmp_path_factory.mktemp("ssh-e2e")
    emulator = StorageEmulator(log_path=str(root / "emulator.log")).start()
    try:
        env = dict(os.environ, STORAGE_EMULATOR_HOST=emulator.url,
                   PYTHONPATH=str(REPO / "plugins"), PYTHONUNBUFFERED="1")
        ckpt = root / "tiny.ckpt"
        # ~0.15 s a step (24 steps): a member lasts long enough to lose its session in the middle
        subprocess.run([worker_python, "-m", "aifs.testing", "checkpoint", "--grid", "O48", "--out", str(ckpt),
                        "--step-seconds", "0.15"], check=True, env=env, capture_output=True, timeout=180)
        subprocess.run([worker_python, "-m", "aifs.testing", "seed", "--checkpoint", str(ckpt), "--bucket", BUCKET,
                        "--date", DATE, "--members", "1-3"], check=True, env=env, capture_output=True, timeout=180)
        yield {"python": worker_python, "emulator": emulator, "ckpt": str(ckpt), "root": root,
               "client": anonymous_client(emulator.url)}
    finally:
        emulator.stop()


def backend_and_worker(world, member: int, **overrides):
    scratch = world["root"] / f"scratch-{member}"
    settings = {
        "ssh_conn_id": SSH_CONN_ID,
        "python": world["python"],
        "jobs_dir": str(world["root"] / "jobs"),
        "workdir": str(scratch),
        "gpu_check": None,
        "poll_interval": 0.2,
        "heartbeat": 2,
        "reconnect_attempts": 0,
        "env": {"STORAGE_EMULATOR_HOST": world["emulator"].url, "PYTHONPATH": str(REPO / "plugins"),
                "PYTHONUNBUFFERED": "1"},
    }
    settings.update(overrides)
    worker = WorkerSettings(bucket=BUCKET, checkpoint=world["ckpt"], lead_time=LEAD, upload_threads=2,
                            input_dir=str(scratch / "input"), output_dir=str(scratch / "output"))
    return get_backend("ssh", settings), worker, JobDir(world["root"] / "jobs" / RUN.job_name(member))


def assert_member_complete(world, member: int) -> None:
    names = {b.name for b in world["client"].list_blobs(BUCKET, prefix=f"{DATE}/")}
    for w in layout.windows(LEAD):
        assert layout.forecast_object(DATE, member, w.start, w.end) in names
    assert layout.manifest_object(DATE, member) in names


def test_member_end_to_end_over_ssh(world):
    backend, worker, job = backend_and_worker(world, 1)
    backend.create_host(RUN, Log())
    log = Log()
    code = backend.run_member(RUN, 1, worker, log)
    assert code == 0, "\n".join(log[-60:])
    assert_member_complete(world, 1)
    assert len(job.launches()) == 1 and job.exit_code() == 0


def test_session_killed_mid_member_retry_reattaches_and_completes_once(world, sshd):
    backend, worker, job = backend_and_worker(world, 2)
    log = Log()
    pool = ThreadPoolExecutor(max_workers=1)
    first = pool.submit(backend.run_member, RUN, 2, worker, log)
    log.wait_until(lambda lines: any(not line.startswith("[aifs]") for line in lines), timeout=90)  # worker output
    assert job.exit_code() is None
    assert sshd.kill_sessions()
    with pytest.raises(remote_job.SessionLost):
        first.result(timeout=60)
    pool.shutdown()
    assert job.exit_code() is None, "the member must still be running after its session died"

    retry_log = Log()
    assert backend.run_member(RUN, 2, worker, retry_log) == 0, "\n".join(retry_log[-60:])
    assert any("re-attaching" in line for line in retry_log)
    assert len(job.launches()) == 1, "exactly one job ran"
    assert_member_complete(world, 2)


def test_member_that_finished_while_disconnected_is_read_as_finished(world, sshd):
    backend, worker, job = backend_and_worker(world, 3)
    log = Log()
    pool = ThreadPoolExecutor(max_workers=1)
    first = pool.submit(backend.run_member, RUN, 3, worker, log)
    log.wait_for("launched job", timeout=30)
    assert sshd.kill_sessions()
    with pytest.raises(remote_job.SessionLost):
        first.result(timeout=60)
    pool.shutdown()
    assert job.wait_exit(timeout=180) == 0  # it finished with nobody attached

    later = Log()
    assert backend.run_member(RUN, 3, worker, later) == 0
    assert any("finished while no session was attached; exit status 0" in line for line in later)
    assert len(job.launches()) == 1
    assert_member_complete(world, 3)
