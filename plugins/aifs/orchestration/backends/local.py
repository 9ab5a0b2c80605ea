"""The ``local`` backend: the worker runs as a subprocess on the machine that runs the task.

For the embedded default (tests, ``make demo``) and for a single-GPU workstation that runs
Airflow itself. There is no host to rent, so:

* ``create_host`` checks the worker environment is usable (its Python imports the worker stack,
  the requested device exists, the scratch dir is writable and has room) and makes the run's
  scratch dirs;
* ``run_member`` starts ``<worker python> -m aifs.worker ... --members N`` and streams its log;
* ``delete_host`` removes the run's scratch dirs; nothing there is not an error.

The worker Python is ``host.worker_python``, else ``$AIFS_WORKER_PYTHON``, else this Python:
production keeps the worker stack (torch, anemoi) out of Airflow's environment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aifs.orchestration.backends.base import HostBackend, LogSink, RunInfo, WorkerSettings, register

WORKER_PYTHON_ENV = "AIFS_WORKER_PYTHON"

#: What create_host asks the worker Python to prove: the stack imports, and which devices it has.
_CHECK_SCRIPT = """
import json, sys
import aifs.worker.cli, torch, anemoi.inference
print(json.dumps({"python": sys.executable, "torch": torch.__version__,
                  "cuda": torch.cuda.is_available(), "gpus": torch.cuda.device_count()}))
"""


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


@register("local")
class LocalBackend(HostBackend):
    SETTINGS_SCHEMA = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "worker_python": {
                "type": "string",
                "default": "",
                "description": f"Python of the worker environment; empty: ${WORKER_PYTHON_ENV}, else Airflow's own",
            },
            "scratch_dir": {
                "type": "string",
                "default": "",
                "description": "Where runs keep inputs and GRIB windows in flight; empty: <tmp>/aifs-scratch",
            },
            "device": {
                "type": "string",
                "enum": ["auto", "cpu", "cuda"],
                "default": "auto",
                "description": "torch device for the worker; auto: cuda when available, else cpu",
            },
            "min_free_gb": {
                "type": "number",
                "minimum": 0,
                "default": 1,
                "description": "Refuse to start with less free scratch space than this",
            },
            "check_timeout_s": {"type": "number", "exclusiveMinimum": 0, "default": 300},
        },
    }

    # -- where things are -------------------------------------------------------------------

    @property
    def worker_python(self) -> str:
        return self.settings["worker_python"] or os.environ.get(WORKER_PYTHON_ENV) or sys.executable

    def scratch_root(self) -> Path:
        return Path(self.settings["scratch_dir"] or os.path.join(tempfile.gettempdir(), "aifs-scratch"))

    def run_dir(self, run: RunInfo) -> Path:
        """One dir per DAG run, so two runs of one date (a backfill and a manual rerun) never share."""
        return self.scratch_root() / _safe(run.dag_id) / f"{run.slug}--{_safe(run.run_id)}"

    def _env(self) -> dict[str, str]:
        """The worker imports the same ``aifs`` package the DAG did (plugins/ may not be installed there)."""
        import aifs

        env = dict(os.environ)
        package_parent = str(Path(aifs.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    # -- the three moments ------------------------------------------------------------------

    def create_host(self, run: RunInfo, log: LogSink) -> dict[str, Any]:
        python = self.worker_python
        if not (os.path.isfile(python) and os.access(python, os.X_OK)):
            raise RuntimeError(f"worker Python {python!r} is not an executable file (host.worker_python / ${WORKER_PYTHON_ENV})")
        log(f"checking the worker environment: {python}")
        try:
            probe = subprocess.run(
                [python, "-c", _CHECK_SCRIPT],
                env=self._env(),
                capture_output=True,
                text=True,
                timeout=self.settings["check_timeout_s"],
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the worker environment did not answer within {self.settings['check_timeout_s']} s") from None
        if probe.returncode != 0:
            raise RuntimeError(
                f"the worker environment at {python} cannot run the worker (exit {probe.returncode}):\n{probe.stderr[-3000:]}"
            )
        facts = json.loads(probe.stdout.strip().splitlines()[-1])
        if self.settings["device"] == "cuda" and not facts["cuda"]:
            raise RuntimeError(f"host.device is cuda but torch {facts['torch']} at {python} sees no GPU")

        run_dir = self.run_dir(run)
        for sub in ("input", "output"):
            (run_dir / sub).mkdir(parents=True, exist_ok=True)
        free_gb = shutil.disk_usage(run_dir).free / 1e9
        if free_gb < self.settings["min_free_gb"]:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise RuntimeError(f"only {free_gb:.1f} GB free in {run_dir}; host.min_free_gb is {self.settings['min_free_gb']}")
        facts.update(scratch=str(run_dir), free_gb=round(free_gb, 1))
        log(f"worker environment ok: torch {facts['torch']}, cuda {facts['cuda']} ({facts['gpus']} GPUs), "
            f"scratch {run_dir} ({free_gb:.1f} GB free)")
        return facts

    def run_member(self, run: RunInfo, member: int, worker: WorkerSettings, log: LogSink) -> int:
        run_dir = self.run_dir(run)
        worker = dataclasses.replace(worker, input_dir=str(run_dir / "input"), output_dir=str(run_dir / "output"))
        cmd = [self.worker_python, "-m", "aifs.worker", *worker.worker_args(run.date, member)]
        if self.settings["device"] != "auto":
            cmd += ["--device", self.settings["device"]]
        pid_file = run_dir / f"member{member:03d}.pid"
        self._stop_orphan(pid_file, log)

        log("$ " + " ".join(cmd))
        process = subprocess.Popen(
            cmd,
            env=self._env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
            start_new_session=True,  # its own process group: we can stop it and its children together
        )
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        pid_file.write_text(str(process.pid))
        try:
            assert process.stdout is not None
            for line in process.stdout:
                log(line.rstrip("\n"))
            return process.wait()
        finally:
            # Any way out of here but the worker's own exit (the task was killed, timed out or
            # marked failed) must not leave a worker holding the GPU.
            if process.poll() is None:
                _signal_group(process.pid, signal.SIGTERM)  # first, before anything else can fail
                log(f"stopped worker process group {process.pid}")
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    _signal_group(process.pid, signal.SIGKILL)
                    process.wait()
            with contextlib.suppress(FileNotFoundError):
                pid_file.unlink()

    def delete_host(self, run: RunInfo, log: LogSink) -> None:
        run_dir = self.run_dir(run)
        if not run_dir.exists():
            log(f"scratch {run_dir} already gone")
            return
        for pid_file in run_dir.glob("member*.pid"):
            self._stop_orphan(pid_file, log)
        shutil.rmtree(run_dir)
        log(f"removed scratch {run_dir}")

    # -- helpers ----------------------------------------------------------------------------

    def _stop_orphan(self, pid_file: Path, log: LogSink) -> None:
        """A worker left by a task process that was SIGKILLed: stop it before starting another."""
        try:
            pid = int(pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return
        if _alive(pid) and _is_worker(pid):
            log(f"stopping worker {pid} left by an earlier try")
            _stop_group(pid)
        with contextlib.suppress(FileNotFoundError):
            pid_file.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_worker(pid: int) -> bool:
    try:
        return b"aifs.worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (macOS): trust the pid file


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _stop_group(pid: int, grace: float = 20.0) -> None:
    """Stop a process group that is not our child (we cannot wait() for it)."""
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.2)
    _signal_group(pid, signal.SIGKILL)
