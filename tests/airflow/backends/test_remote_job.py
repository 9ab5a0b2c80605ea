"""Detached member jobs over a real SSH server (loopback sshd), with a fake worker process.

What these prove, against a real OpenSSH server and real process/session semantics:
* a member's output streams line by line and its exit code comes back (0 and non-zero);
* the job survives the SSH session: sessions killed mid-member -> the next call re-attaches,
  exactly one worker process ran, the member completes once (with and without in-call reconnect);
* a job that finished while nobody was connected is read as finished (its status, not a rerun);
* the documented restart rule: a result already handed to a task is relaunched by the next call;
* two sessions racing for the same member start one job;
* member_timeout is a total limit that stops the job; a job killed without a status is JobLost;
* readiness probing: bootstrap marker, failed marker, GPU check, bounded timeout.
"""

from __future__ import annotations

import os
import signal
import threading
import types
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from aifs.orchestration.backends import RunInfo, WorkerSettings, get_backend
from aifs.orchestration.backends import remote_job
from .backend_helpers import FAKE_DOCKER, FAKE_WORKER, SSH_CONN_ID, JobDir, runs_of, wait_pgid_gone

RUN = RunInfo(dag_id="aifs_ens_forecast", run_id="manual__2025-06-01T00:00:00+00:00", date="20250601_0000")
WORKER = WorkerSettings(bucket="test-bucket", checkpoint="/ckpt/tiny.ckpt", lead_time=144)
MEMBER = 7


@pytest.fixture
def env(sshd, tmp_path):
    """Settings factory for an ssh backend running the fake worker; cleans up stray jobs afterwards."""
    jobs = tmp_path / "jobs"
    runs = tmp_path / "runs"

    def make(fake: dict | None = None, **overrides):
        settings = {
            "ssh_conn_id": SSH_CONN_ID,
            "python": str(FAKE_WORKER),
            "jobs_dir": str(jobs),
            "gpu_check": None,
            "poll_interval": 0.1,
            "heartbeat": 1,
            "stall_timeout": 10,
            "reconnect_attempts": 0,
            "reconnect_delay": 0.1,
            "env": {"FAKE_RUNS": str(runs), **{k: str(v) for k, v in (fake or {}).items()}},
        }
        settings.update(overrides)
        return get_backend("ssh", settings)

    make.jobs = jobs
    make.runs = runs
    make.job = JobDir(jobs / RUN.job_name(MEMBER))
    yield make
    for pid_file in jobs.glob("*/pid"):  # never leave a test's job running
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def run_in_thread(fn):
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(fn)
    pool.shutdown(wait=False)
    return future


def test_member_streams_log_and_returns_exit_code(env, log):
    backend = env(fake={"FAKE_STEPS": 3})
    assert backend.run_member(RUN, MEMBER, WORKER, log) == 0

    worker_lines = [line for line in log if not line.startswith("[aifs]")]
    expected_args = " ".join(WORKER.worker_args(RUN.date, MEMBER))
    assert worker_lines == [
        f"fake worker started: {expected_args}",
        "step 1",
        "step 2",
        "step 3",
        "fake worker done, exit 0",
    ]
    assert len(runs_of(env.runs)) == 1
    assert env.job.exit_code() == 0
    assert (env.job.path / "reported").exists()
    # the job's name is the contract's, so a person on the host finds it
    assert env.job.path.name == "aifs-20250601-0000-b2d715-m007"  # date, run hash, member
    assert (env.job.path / "args").read_text() == expected_args.replace(" ", "\n") + "\n"  # what adoption is checked against


def test_failed_member_code_is_returned_and_the_retry_relaunches(env, log):
    backend = env(fake={"FAKE_STEPS": 1, "FAKE_EXIT": 13})
    assert backend.run_member(RUN, MEMBER, WORKER, log) == 13
    # the task saw 13 and failed; its retry must run the member again, not re-read 13
    second = type(log)()
    assert backend.run_member(RUN, MEMBER, WORKER, second) == 13
    assert len(runs_of(env.runs)) == 2
    launches = env.job.launches()
    assert [line.split()[1:] for line in launches] == [["launch", "1", "prev=none"], ["launch", "2", "prev=reported:13"]]
    assert any("previous result 13 was already reported" in line for line in second)
    assert (env.job.path / "log.1").read_text().count("step 1") == 1  # the first attempt's log is kept


def test_session_killed_mid_member_retry_reattaches_and_one_job_runs(env, sshd, log):
    backend = env(fake={"FAKE_STEPS": 12, "FAKE_SLEEP": 0.25})
    first = run_in_thread(lambda: backend.run_member(RUN, MEMBER, WORKER, log))
    log.wait_for("step 2")
    assert sshd.kill_sessions(), "no SSH session to kill"
    with pytest.raises(remote_job.SessionLost, match="keeps running on the host"):
        first.result(timeout=30)
    assert env.job.exit_code() is None, "the job must outlive the session"

    retry_log = type(log)()
    assert backend.run_member(RUN, MEMBER, WORKER, retry_log) == 0
    assert any("already running on the host: re-attaching" in line for line in retry_log)
    assert "step 12" in retry_log and "fake worker done, exit 0" in retry_log
    assert len(runs_of(env.runs)) == 1, "exactly one worker process ran"
    assert len(env.job.launches()) == 1
    assert env.job.exit_code() == 0


def test_in_call_reconnect_resumes_the_log_without_gaps_or_repeats(env, sshd, log):
    backend = env(fake={"FAKE_STEPS": 12, "FAKE_SLEEP": 0.25}, reconnect_attempts=3)
    call = run_in_thread(lambda: backend.run_member(RUN, MEMBER, WORKER, log))
    log.wait_for("step 3")
    assert sshd.kill_sessions()
    assert call.result(timeout=60) == 0
    steps = [line for line in log if line.startswith("step ")]
    assert steps == [f"step {i}" for i in range(1, 13)]
    assert any("reconnecting" in line for line in log)
    assert len(runs_of(env.runs)) == 1


def test_job_that_finished_while_disconnected_is_read_as_finished(env, sshd, log):
    backend = env(fake={"FAKE_STEPS": 6, "FAKE_SLEEP": 0.2, "FAKE_EXIT": 11})
    first = run_in_thread(lambda: backend.run_member(RUN, MEMBER, WORKER, log))
    log.wait_for("step 1")
    sshd.kill_sessions()
    with pytest.raises(remote_job.SessionLost):
        first.result(timeout=30)
    assert env.job.wait_exit() == 11  # finished with nobody attached

    later = type(log)()
    assert backend.run_member(RUN, MEMBER, WORKER, later) == 11
    assert any("finished while no session was attached; exit status 11" in line for line in later)
    assert "step 6" in later  # its output is shown to the task that reads the result
    assert len(runs_of(env.runs)) == 1 and len(env.job.launches()) == 1
    # once reported, the next call (a retry of the failed member) launches afresh
    assert backend.run_member(RUN, MEMBER, WORKER, type(log)()) == 11
    assert len(runs_of(env.runs)) == 2


def test_two_sessions_racing_for_one_member_start_one_job(env):
    backend = env(fake={"FAKE_STEPS": 4, "FAKE_SLEEP": 0.2})
    barrier = threading.Barrier(3)

    def call():
        barrier.wait()
        return backend.run_member(RUN, MEMBER, WORKER, lambda line: None)

    futures = [run_in_thread(call) for _ in range(3)]
    assert [f.result(timeout=60) for f in futures] == [0, 0, 0]
    assert len(runs_of(env.runs)) == 1
    assert len(env.job.launches()) == 1


def test_member_timeout_stops_the_job(env, log):
    backend = env(fake={"FAKE_STEPS": 200, "FAKE_SLEEP": 0.1})
    started = time.monotonic()
    with pytest.raises(remote_job.MemberTimeout, match="member_timeout"):
        backend.run_member(RUN, MEMBER, WORKER, log, timeout_s=1.5)
    assert time.monotonic() - started < 15
    assert env.job.exit_code() == 124  # the host's timeout stopped the worker; the runner recorded it
    assert (env.job.path / "timedout").exists()
    assert any("stopped by the host at its deadline" in line for line in log)
    wait_pgid_gone(env.job.pgid())
    # the stopped result counts as reported: a retry starts the member again
    backend2 = env(fake={"FAKE_STEPS": 1})
    assert backend2.run_member(RUN, MEMBER, WORKER, type(log)()) == 0
    assert len(env.job.launches()) == 2


def test_job_killed_without_status_is_lost_and_the_retry_relaunches(env, log):
    backend = env(fake={"FAKE_STEPS": 100, "FAKE_SLEEP": 0.1})
    call = run_in_thread(lambda: backend.run_member(RUN, MEMBER, WORKER, log))
    log.wait_for("step 2")
    # what a host reboot does: every process of the job dies at once, the runner too
    runner = int(next(p for p in os.listdir("/proc") if p.isdigit() and _is_runner(p, env.job.path)))
    os.kill(runner, signal.SIGKILL)  # the runner first: dead, it cannot record the job's status
    os.killpg(env.job.pgid(), signal.SIGKILL)
    with pytest.raises(remote_job.JobLost, match="without recording an exit status"):
        call.result(timeout=30)
    retry = env(fake={"FAKE_STEPS": 1})
    retry_log = type(log)()
    assert retry.run_member(RUN, MEMBER, WORKER, retry_log) == 0
    assert env.job.launches()[-1].endswith("launch 2 prev=lost")
    assert any("ended without an exit status" in line for line in retry_log)


def _is_runner(pid: str, job_path: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return cmdline[:2] == [b"bash", str(job_path / "runner").encode()]


# -- container launch (the gce default), with a stand-in docker CLI ---------------------------------


@pytest.fixture
def docker(tmp_path):
    """A copy of fake_docker.sh whose containers keep their state beside it."""
    exe = tmp_path / "docker-bin" / "docker"
    exe.parent.mkdir()
    exe.write_text(FAKE_DOCKER.read_text().replace("${FAKE_DOCKER_STATE:?}", str(tmp_path / "docker-state")))
    exe.chmod(0o755)
    yield types.SimpleNamespace(exe=exe, state=tmp_path / "docker-state")
    for pid_file in (tmp_path / "docker-state").glob("*.pid"):
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def container_settings(docker) -> dict:
    return {"launch": "container", "image": "worker:test", "docker": str(docker.exe),
            "entrypoint": [str(FAKE_WORKER), "-m", "aifs.worker"]}


def test_container_launch_runs_the_worker_detached_and_returns_its_code(env, docker, log):
    backend = env(fake={"FAKE_STEPS": 2, "FAKE_EXIT": 12}, **container_settings(docker))
    assert backend.run_member(RUN, MEMBER, WORKER, log) == 12
    assert "step 2" in log and "fake worker done, exit 12" in log
    calls = (docker.state / "calls").read_text().splitlines()
    name = RUN.job_name(MEMBER)
    run_call = next(c for c in calls if c.startswith("run "))
    assert run_call.startswith(f"run -d --name {name} --label aifs-job={name} --gpus all --shm-size 16g -v /scratch:/scratch -e FAKE_EXIT=12")
    assert f"--entrypoint {FAKE_WORKER} worker:test -m aifs.worker --date 20250601_0000 --members 7" in run_call
    assert calls[-1] == f"rm {name}"  # the container is removed once its status is recorded
    assert len(runs_of(env.runs)) == 1


def test_container_left_by_a_dead_runner_is_adopted_not_started_twice(env, docker, log):
    backend = env(fake={"FAKE_STEPS": 15, "FAKE_SLEEP": 0.2}, **container_settings(docker))
    call = run_in_thread(lambda: backend.run_member(RUN, MEMBER, WORKER, log))
    log.wait_for("step 2")
    # the runner and the docker CLI die (OOM killer, someone's kill); the container lives on
    runner = next(p for p in os.listdir("/proc") if p.isdigit() and _is_runner(p, env.job.path))
    os.kill(int(runner), signal.SIGKILL)
    os.killpg(env.job.pgid(), signal.SIGKILL)
    with pytest.raises(remote_job.JobLost):
        call.result(timeout=30)
    retry_log = type(log)()
    assert backend.run_member(RUN, MEMBER, WORKER, retry_log) == 0
    assert any("adopting container" in line for line in retry_log)
    assert "step 15" in retry_log
    assert len(runs_of(env.runs)) == 1, "the member ran once"
    assert sum(c.startswith("run ") for c in (docker.state / "calls").read_text().splitlines()) == 1


# -- readiness ---------------------------------------------------------------------------------


def test_create_host_checks_bootstrap_marker_gpu_and_times_out_clearly(env, tmp_path, log):
    ready = tmp_path / "ready"
    failed = tmp_path / "failed"
    backend = env(ready_marker=str(ready), failed_marker=str(failed), ready_timeout=1.5,
                  gpu_check="echo 'GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-x)'")
    with pytest.raises(remote_job.HostNotReady, match=r"not ready after 2 s.*has not written .*ready"):
        backend.create_host(RUN, log)

    ready.write_text("")
    facts = backend.create_host(RUN, log)
    assert "gpu GPU 0: NVIDIA A100-SXM4-80GB" in facts["probe"]

    no_gpu = env(ready_marker=str(ready), gpu_check="echo 'NVIDIA-SMI has failed' >&2; exit 9", ready_timeout=1)
    with pytest.raises(remote_job.HostNotReady, match="nogpu NVIDIA-SMI has failed"):
        no_gpu.create_host(RUN, log)

    failed.write_text("docker pull failed: unauthorized\n")
    started = time.monotonic()
    with pytest.raises(remote_job.HostNotReady, match="bootstrap failed: docker pull failed: unauthorized"):
        env(ready_marker=str(ready), failed_marker=str(failed), ready_timeout=60).create_host(RUN, log)
    assert time.monotonic() - started < 10, "a failed bootstrap must fail at once, not after the timeout"


def test_delete_host_is_a_no_op_for_ssh(env, log):
    env().delete_host(RUN, log)
    assert "not ours to delete" in log[-1]
