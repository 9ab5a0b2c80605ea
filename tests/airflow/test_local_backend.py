"""The ``local`` backend with the real worker environment, and the DAG's handling of a failed setup."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import FORECAST_DAY, run_conf, task_states

from aifs.exitcodes import ExitCode
from aifs.orchestration.backends.base import RunInfo, WorkerSettings, get_backend

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
        (run_dir / "input").mkdir(parents=True)
        made.append(run_dir)
        raise RuntimeError("quota exceeded half-way")

    monkeypatch.setattr(LocalBackend, "create_host", create_then_fail)

    dr = dag.test(logical_date=FORECAST_DAY, run_conf=run_conf(bucket, tiny_checkpoint, tmp_path, members="1", lead_time=72))

    states = task_states(dr)
    assert dr.state == "failed"
    assert states[("create_host", -1)] == "failed"
    assert states[("delete_host", -1)] in ("skipped", "upstream_failed")  # the teardown did not run
    # every try (creation is retried: GPU stockouts pass) cleaned up its own half-made host
    assert len(made) == 1 + dag.get_task("create_host").retries
    assert not any(path.exists() for path in made), "a half-made host was left behind"
    assert any("create_host failed" in m["title"] and "quota exceeded half-way" in m["message"] for m in alert_sink.messages)
