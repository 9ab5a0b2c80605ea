"""The ``local`` backend with the real worker environment, and the DAG's handling of a failed setup."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import FORECAST_DAY, run_conf, task_states

from aifs.exitcodes import ExitCode
from aifs.orchestration.backends.base import GPUBusy, MemberTimeout, RunInfo, WorkerSettings, get_backend

RUN = RunInfo(dag_id="aifs_ens_forecast", run_id="manual__2025-06-01T00:00:00+00:00", date="20250601_0000")


def backend(tmp_path, **settings):
    return get_backend("local", {"scratch_dir": str(tmp_path), "device": "cpu", **settings})


def test_setup_checks_the_worker_environment_and_teardown_removes_scratch(tmp_path, worker_python):
    local = backend(tmp_path)
    lines: list[str] = []

    facts = local.create_host(RUN, lines.append)

    assert facts["python"] and facts["torch"] and facts["cuda"] in (True, False)
    run_dir = local.run_dir(RUN)
    assert (run_dir / "input").is_dir() and (run_dir / "output").is_dir()
    assert any("worker environment ok" in line for line in lines)
    (run_dir / "output" / "leftover.grib").write_bytes(b"x")

    local.delete_host(RUN, lines.append)
    assert not run_dir.exists()
    local.delete_host(RUN, lines.append)  # already gone: not an error
    assert "already gone" in lines[-1]


def test_setup_refuses_a_python_without_the_worker_stack(tmp_path):
    """Airflow's own Python has no torch: exactly the mistake this check exists for."""
    with pytest.raises(RuntimeError, match="cannot run the worker"):
        backend(tmp_path, worker_python=sys.executable).create_host(RUN, print)
    with pytest.raises(RuntimeError, match="not an executable file"):
        backend(tmp_path, worker_python=str(tmp_path / "nope")).create_host(RUN, print)


def test_cuda_requested_without_a_gpu_is_refused(tmp_path, worker_python):
    local = backend(tmp_path, device="cuda")
    try:
        facts = local.create_host(RUN, print)
    except RuntimeError as exc:
        assert "sees no GPU" in str(exc)
    else:
        assert facts["cuda"], "device cuda accepted without a GPU"


def test_member_runs_the_worker_streams_its_log_and_returns_its_exit_code(tmp_path, worker_python):
    """Bad flags reach the real worker, which answers with its USAGE code and says why."""
    local = backend(tmp_path)
    lines: list[str] = []
    settings = WorkerSettings(bucket="b", checkpoint="x.ckpt", lead_time=-6)

    code = local.run_member(RUN, 7, settings, lines.append)

    assert code == ExitCode.USAGE
    assert lines[0].startswith("$ ") and "-m aifs.worker" in lines[0] and "--members 7" in lines[0]
    assert f"--input-dir {local.run_dir(RUN) / 'input'}" in lines[0] and "--device cpu" in lines[0]
    assert any("lead-time" in line for line in lines[1:]), lines


def test_a_worker_left_by_a_killed_task_is_stopped_before_the_next_try(tmp_path):
    local = backend(tmp_path)
    run_dir = local.run_dir(RUN)
    run_dir.mkdir(parents=True)
    # a process that looks like a worker (its command line names aifs.worker), as a SIGKILLed task leaves it
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "aifs.worker"], start_new_session=True)
    (run_dir / "member007.pid").write_text(str(orphan.pid))
    threading.Thread(target=orphan.wait, daemon=True).start()  # reap it, as init would for a real orphan
    while b"aifs.worker" not in Path(f"/proc/{orphan.pid}/cmdline").read_bytes():  # until exec is done
        time.sleep(0.05)
    lines: list[str] = []

    local.delete_host(RUN, lines.append)

    assert orphan.wait(timeout=30) is not None  # it was signalled, not left to sleep
    assert any("left by an earlier try" in line for line in lines)
    assert not run_dir.exists()


def test_a_task_that_is_stopped_stops_its_worker(tmp_path, worker_python):
    """The task being killed (timeout, marked failed) raises inside run_member: the worker must go too."""
    local = backend(tmp_path)
    lines = []

    def log(line):
        lines.append(line)
        if len(lines) == 2:  # the command, then the worker's first line: it is up and talking
            raise KeyboardInterrupt  # stands in for AirflowTaskTerminated or a timeout, raised mid-stream

    with pytest.raises(KeyboardInterrupt):
        local.run_member(RUN, 3, WorkerSettings(bucket="b", checkpoint="x"), log)
    assert "stopped worker process group" in lines[-1]
    ps = subprocess.run(["pgrep", "-f", f"{local.run_dir(RUN) / 'input'}"], capture_output=True, text=True)
    assert ps.stdout.strip() == "", "the worker outlived its task"
    assert not (local.run_dir(RUN) / "member003.pid").exists()


# -- the DAG: a setup that fails half-way ---------------------------------------------------------


def test_half_made_host_is_deleted_by_the_failed_setup(dag, bucket, seed, tiny_checkpoint, tmp_path, monkeypatch, alert_sink):
    """Airflow skips a teardown whose setup failed, so create_host itself must delete what it made."""
    from aifs.orchestration.backends.local import LocalBackend

    seed(bucket, "20250601_0000", "1")
    made = []

    def create_then_fail(self, run, log):
        run_dir = self.run_dir(run)
        (run_dir / "input").mkdir(parents=True, exist_ok=True)  # a later try adopts what an earlier one made
        made.append(run_dir)
        raise RuntimeError("quota exceeded half-way")

    monkeypatch.setattr(LocalBackend, "create_host", create_then_fail)

    dr = dag.test(logical_date=FORECAST_DAY, run_conf=run_conf(bucket, tiny_checkpoint, members="1", lead_time=72))

    states = task_states(dr)
    assert dr.state == "failed"
    assert states[("create_host", -1)] == "failed"
    assert states[("delete_host", -1)] in ("skipped", "upstream_failed")  # the teardown did not run
    # creation is retried (GPU stockouts pass); the last try removed the half-made host
    assert len(made) == 1 + dag.get_task("create_host").retries
    assert not any(path.exists() for path in made), "a half-made host was left behind"
    assert any("create_host failed" in m["title"] and "quota exceeded half-way" in m["message"] for m in alert_sink.messages)


# -- one member per GPU, a run owns its jobs (fake worker: it records its own start and end) ------

FAKE_PYTHON = Path(__file__).resolve().parent / "fake_python.sh"
BACKFILL = RunInfo(dag_id="aifs_ens_forecast", run_id="backfill__2025-06-01T00:00:00+00:00", date="20250601_0000")


def fake_backend(tmp_path, fake: dict | None = None, **settings):
    env = {"FAKE_RUNS": str(tmp_path / "runs"), "FAKE_TIMES": str(tmp_path / "times"), **{k: str(v) for k, v in (fake or {}).items()}}
    return backend(tmp_path / "scratch", worker_python=str(FAKE_PYTHON), env=env, **settings)


def spans(tmp_path):
    from backends.backend_helpers import job_spans

    return job_spans(tmp_path / "times")


def in_thread(fn):
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(fn)
    pool.shutdown(wait=False)
    return future


def wait_for_line(lines, text, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in line for line in list(lines)):
            return next(line for line in list(lines) if text in line)
        time.sleep(0.02)
    raise AssertionError(f"{text!r} not logged within {timeout} s: {lines}")


def test_two_runs_of_one_date_never_run_workers_at_once_nor_remove_each_others_scratch(tmp_path):
    from backends.backend_helpers import assert_no_overlap

    long, short = fake_backend(tmp_path, {"FAKE_STEPS": 20, "FAKE_SLEEP": 0.1}), fake_backend(tmp_path, {"FAKE_STEPS": 2}, gpu_wait=60)
    assert long.run_dir(RUN) != long.run_dir(BACKFILL)
    first_log, second_log = [], []
    first = in_thread(lambda: long.run_member(RUN, 1, WorkerSettings(bucket="b", checkpoint="x"), first_log.append, timeout_s=600))
    wait_for_line(first_log, "step 1")
    second = in_thread(lambda: short.run_member(BACKFILL, 1, WorkerSettings(bucket="b", checkpoint="x"), second_log.append, timeout_s=600))
    said = wait_for_line(second_log, "the GPU is busy")
    assert f"run={RUN.run_id} member=001 since=20" in said  # who holds it, since when

    short.delete_host(BACKFILL, print)  # the other run's teardown: its own scratch only
    assert long.run_dir(RUN).is_dir()
    assert first.result(timeout=60) == 0 and second.result(timeout=60) == 0
    assert len(spans(tmp_path)) == 2
    assert_no_overlap(spans(tmp_path))

    blocker = in_thread(lambda: long.run_member(RUN, 2, WorkerSettings(bucket="b", checkpoint="x"), [].append, timeout_s=600))
    time.sleep(1)
    with pytest.raises(GPUBusy, match=re.escape(f"the GPU is held by another worker (run={RUN.run_id} member=002")):
        fake_backend(tmp_path, gpu_wait=0.5).run_member(BACKFILL, 2, WorkerSettings(bucket="b", checkpoint="x"), print, timeout_s=600)
    long.stop_member(RUN, 2, print)
    assert blocker.result(timeout=30) != 0
    assert len(spans(tmp_path)) == 3  # the refused member never started a worker


def test_the_deadline_stops_the_worker_even_without_the_task(tmp_path):
    local = fake_backend(tmp_path, {"FAKE_STEPS": 300, "FAKE_SLEEP": 0.1})
    with pytest.raises(MemberTimeout, match="from its launch"):
        local.run_member(RUN, 4, WorkerSettings(bucket="b", checkpoint="x"), print, timeout_s=2)
    (start, end, _), = spans(tmp_path)
    assert end is not None and end - start < 4
    # the deadline is kept by a process beside the worker (coreutils timeout), not by this task
    job = json.loads((local.run_dir(RUN) / "member004.job.json").read_text())
    assert job["deadline"] - job["launched"] == 2 and job["run_id"] == RUN.run_id


def test_stop_member_stops_the_worker(tmp_path):
    """What the run_member operator's on_kill calls when Airflow kills the task."""
    local = fake_backend(tmp_path, {"FAKE_STEPS": 300, "FAKE_SLEEP": 0.1})
    lines = []
    running = in_thread(lambda: local.run_member(RUN, 5, WorkerSettings(bucket="b", checkpoint="x"), lines.append, timeout_s=600))
    wait_for_line(lines, "step 1")
    local.stop_member(RUN, 5, lines.append)
    assert running.result(timeout=30) == 143
    (start, end, _), = spans(tmp_path)
    assert end is not None
    assert any("left by an earlier try" in line or "stopping worker" in line for line in lines)


def test_a_checkpoint_that_cannot_load_stops_the_remaining_members(bucket, seed, tiny_checkpoint, tmp_path, monkeypatch, alert_sink, airflow_db):
    """Exit 15 on the first member to run: the others skip at once without starting a worker, one task alert.

    dag.test() picks the order of mapped indexes itself, so which index fails first is not fixed.
    """
    from conftest import load_dag, local_deployment

    seed(bucket, "20250601_0000", "1-3")
    env = {"FAKE_RUNS": str(tmp_path / "runs"), "FAKE_TIMES": str(tmp_path / "times"), "FAKE_STEPS": "1", "FAKE_EXIT": "15"}
    for name, value in local_deployment(tmp_path / "scratch", worker_python=str(FAKE_PYTHON), env=env).items():
        monkeypatch.setenv(name, value)
    dag = load_dag()

    # a real checkpoint (choose_environment reads it); the fake worker says it could not load it
    dr = dag.test(logical_date=FORECAST_DAY, run_conf=run_conf(bucket, tiny_checkpoint, members="1-3", lead_time=72))

    states = task_states(dr)
    assert dr.state == "failed"
    assert sorted(states[("run_member", i)] for i in range(3)) == ["failed", "skipped", "skipped"]
    assert len(spans(tmp_path)) == 1, "a member after the checkpoint failure started a worker"
    member_alerts = [m for m in alert_sink.messages if "run_member" in m.get("title", "")]
    assert len(member_alerts) == 1 and "checkpoint could not be loaded" in member_alerts[0]["message"]
