"""One member per GPU whatever happens to Airflow, and a run owns its jobs: ssh backend, real loopback sshd.

The fake worker records its own start and end on the "host" (FAKE_TIMES), so overlap is judged by
what ran there, not by what a session or Airflow believed:
* two runs of one date get different job names and never run jobs at the same time (the host-wide
  GPU lock: the second waits, naming the holder, or fails clearly); neither's teardown stops the other;
* a job recorded with other worker arguments (bucket, checkpoint, lead time) is not adopted;
* the deadline counts from the job's launch, is kept with the job, survives a re-attach, and is
  enforced by the host even with no session attached (an Airflow that vanished);
* the run_member operator's on_kill (timeout, mark failed, clear) stops the job on the host.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import time
import types
from concurrent.futures import ThreadPoolExecutor

import pytest

from aifs.orchestration.backends import RunInfo, WorkerSettings, get_backend, remote_job
from .backend_helpers import FAKE_WORKER, SSH_CONN_ID, JobDir, assert_no_overlap, job_spans, wait_pgid_gone

DATE = "20250601_0000"
TRIGGERED = RunInfo(dag_id="aifs_ens_forecast", run_id="manual__2025-06-01T00:00:00+00:00", date=DATE)
BACKFILL = RunInfo(dag_id="aifs_ens_forecast", run_id="backfill__2025-06-01T00:00:00+00:00", date=DATE)
WORKER = WorkerSettings(bucket="test-bucket", checkpoint="/ckpt/tiny.ckpt", lead_time=144)


@pytest.fixture
def host(sshd, tmp_path):
    """ssh backends sharing one host (one jobs dir, one GPU lock), running the fake worker."""
    jobs, runs, times = tmp_path / "jobs", tmp_path / "runs", tmp_path / "times"

    def backend(fake: dict | None = None, **overrides):
        settings = {
            "ssh_conn_id": SSH_CONN_ID, "python": str(FAKE_WORKER), "jobs_dir": str(jobs), "gpu_check": None,
            "poll_interval": 0.1, "heartbeat": 1, "stall_timeout": 10, "reconnect_attempts": 0, "reconnect_delay": 0.1,
            "env": {"FAKE_RUNS": str(runs), "FAKE_TIMES": str(times), **{k: str(v) for k, v in (fake or {}).items()}},
            **overrides,
        }
        return get_backend("ssh", settings)

    ns = types.SimpleNamespace(backend=backend, jobs=jobs, times=times, job=lambda run, m: JobDir(jobs / run.job_name(m)))
    yield ns
    for pid_file in jobs.glob("*/pid"):
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def in_thread(fn):
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(fn)
    pool.shutdown(wait=False)
    return future


class Log(list):
    def __call__(self, line):
        self.append(line)

    def wait_for(self, text, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in list(self)):
                return
            time.sleep(0.02)
        raise AssertionError(f"{text!r} not logged within {timeout} s: {list(self)}")


def test_two_runs_of_one_date_never_share_the_gpu_nor_stop_each_others_jobs(host):
    assert TRIGGERED.job_name(1) != BACKFILL.job_name(1)  # a run's names carry its hash
    long, short = host.backend({"FAKE_STEPS": 25, "FAKE_SLEEP": 0.1}), host.backend({"FAKE_STEPS": 2}, gpu_wait=60)
    first_log, second_log = Log(), Log()
    first = in_thread(lambda: long.run_member(TRIGGERED, 1, WORKER, first_log, timeout_s=600))
    first_log.wait_for("step 1")

    second = in_thread(lambda: short.run_member(BACKFILL, 1, WORKER, second_log, timeout_s=600))
    second_log.wait_for("the host's GPU is busy")
    # the waiting run says who holds the GPU: job, run, member, since when
    said = next(line for line in second_log if "GPU is busy" in line)
    assert f"job={TRIGGERED.job_name(1)} run={TRIGGERED.run_id} member=001 since=20" in said

    # the backfill's teardown stops only its own jobs: the triggered run's member carries on
    teardown = Log()
    short.delete_host(BACKFILL, teardown)
    assert "no job of this run was running" in teardown[-1]
    assert first.result(timeout=60) == 0 and "step 25" in first_log
    assert second.result(timeout=60) == 0
    spans = job_spans(host.times)
    assert [args.split()[3] for _, _, args in spans] == ["1", "1"] and len(spans) == 2
    assert_no_overlap(spans)

    # a run that cannot get the GPU in time fails saying who holds it
    blocker = in_thread(lambda: long.run_member(TRIGGERED, 2, WORKER, Log(), timeout_s=600))
    time.sleep(0.5)
    with pytest.raises(remote_job.GPUBusy, match=re.escape(f"held by another job (job={TRIGGERED.job_name(2)} run={TRIGGERED.run_id}")):
        host.backend(gpu_wait=1).run_member(BACKFILL, 2, WORKER, Log(), timeout_s=600)
    # and the triggered run's teardown stops what is left of its own
    teardown = Log()
    long.delete_host(TRIGGERED, teardown)
    assert f"stopped {TRIGGERED.job_name(2)}" in teardown[-1]
    assert blocker.result(timeout=30) == 143
    assert host.job(BACKFILL, 2).launches() == []  # it never started


def test_a_job_recorded_with_other_worker_args_is_not_adopted(host, sshd):
    backend = host.backend({"FAKE_STEPS": 60, "FAKE_SLEEP": 0.1})
    log = Log()
    first = in_thread(lambda: backend.run_member(TRIGGERED, 3, WORKER, log, timeout_s=600))
    log.wait_for("step 1")
    assert sshd.kill_sessions()
    with pytest.raises(remote_job.SessionLost):
        first.result(timeout=30)

    other = dataclasses.replace(WORKER, bucket="other-bucket", checkpoint="/ckpt/other.ckpt")
    with pytest.raises(remote_job.JobMismatch, match="--bucket: host has test-bucket, this task other-bucket; "
                                                     "--checkpoint: host has /ckpt/tiny.ckpt, this task /ckpt/other.ckpt"):
        backend.run_member(TRIGGERED, 3, other, Log(), timeout_s=600)
    with pytest.raises(remote_job.JobMismatch, match="--lead-time: host has 144, this task 72"):
        backend.run_member(TRIGGERED, 3, dataclasses.replace(WORKER, lead_time=72), Log(), timeout_s=600)
    # the same arguments re-attach to it
    again = Log()
    assert backend.run_member(TRIGGERED, 3, WORKER, again, timeout_s=600) == 0
    assert any("re-attaching" in line for line in again)
    assert len(job_spans(host.times)) == 1


def test_the_deadline_counts_from_launch_survives_reattach_and_is_enforced_by_the_host(host, sshd):
    backend = host.backend({"FAKE_STEPS": 200, "FAKE_SLEEP": 0.1})
    job = host.job(TRIGGERED, 4)
    log = Log()
    first = in_thread(lambda: backend.run_member(TRIGGERED, 4, WORKER, log, timeout_s=4))
    log.wait_for("step 1")
    deadline = int((job.path / "deadline").read_text())
    time.sleep(1.5)
    assert sshd.kill_sessions()
    with pytest.raises(remote_job.SessionLost):
        first.result(timeout=30)

    # the retry re-attaches and is stopped at the launch's deadline, not 4 s after re-attaching
    retry = Log()
    with pytest.raises(remote_job.MemberTimeout, match="from its launch"):
        backend.run_member(TRIGGERED, 4, WORKER, retry, timeout_s=4)
    assert any("re-attaching" in line for line in retry)
    assert int((job.path / "deadline").read_text()) == deadline
    (start, end, _), = job_spans(host.times)
    # stopped at the deadline written at launch (epoch seconds), not before it, and not 4 s after the re-attach
    # (>= 1.5 s after the job started): measured from the launch, not from the job's own start, which a
    # loaded machine delays by a second or more
    assert deadline - 1 <= end <= deadline + 1.5, f"the job ended {end - deadline:+.1f} s from its launch's deadline"
    assert end - start <= 5.5, f"the job ran {end - start:.1f} s for a 4 s deadline from its launch"
    assert job.exit_code() == 124

    # with nobody attached at all (Airflow gone), the host still stops the job at its deadline
    lonely = Log()
    gone = in_thread(lambda: backend.run_member(TRIGGERED, 5, WORKER, lonely, timeout_s=2))
    lonely.wait_for("step 1")
    assert sshd.kill_sessions()
    with pytest.raises(remote_job.SessionLost):
        gone.result(timeout=30)
    assert host.job(TRIGGERED, 5).wait_exit(timeout=15) == 124
    assert (host.job(TRIGGERED, 5).path / "timedout").exists()
    wait_pgid_gone(host.job(TRIGGERED, 5).pgid())


def test_on_kill_of_the_member_task_stops_its_job_on_the_host(host):
    """What Airflow does on execution_timeout, "mark failed", a clear or a shutdown: task.on_kill()."""
    from aifs.orchestration.member_task import RunMemberOperator

    backend = host.backend({"FAKE_STEPS": 300, "FAKE_SLEEP": 0.1})

    class Op(RunMemberOperator):
        def make_backend(self, config=None):
            return backend

    config = {"dag_id": TRIGGERED.dag_id, "run_id": TRIGGERED.run_id, "date": DATE, "backend": "ssh", "members": [6],
              "checkpoint": WORKER.checkpoint, "worker": dataclasses.asdict(WORKER)}
    op = Op(task_id="run_member", config=config, member=6, member_timeout_s=600)
    pushed = {}
    ti = types.SimpleNamespace(try_number=1, map_index=0, xcom_pull=lambda **kw: None,
                               xcom_push=lambda key, value: pushed.__setitem__(key, value))
    running = in_thread(lambda: op.execute({"ti": ti}))
    job = host.job(TRIGGERED, 6)
    deadline = time.monotonic() + 20
    while not (job.path / "pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)

    op.on_kill()

    assert job.exit_code() is not None, "on_kill returned before the job stopped"
    wait_pgid_gone(job.pgid())
    (start, end, _), = job_spans(host.times)
    assert end is not None
    with pytest.raises(Exception):  # the task fails (retryable 143), it does not hang
        running.result(timeout=30)
    assert pushed["outcome"]["exit_code"] == 143
    assert (job.path / "reported").exists()  # a retry launches afresh instead of re-reading 143
