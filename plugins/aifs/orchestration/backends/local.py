"""The ``local`` backend: the worker runs as a subprocess on the machine that runs the task.

For the embedded default (tests, ``make demo``) and for a single-GPU workstation that runs
Airflow itself. There is no host to rent, so:

* ``create_host`` checks the worker environment is usable (its Python imports the worker stack,
  the requested device exists, the scratch dir is writable and has room) and makes the run's
  scratch dirs;
* ``run_member`` starts ``<worker python> -m aifs.worker ... --members N`` and streams its log;
* ``delete_host`` removes the run's scratch dirs; nothing there is not an error.

The machine's GPU is guarded like a remote host's: ``<scratch root>/gpu.lock`` is taken (flock)
before a worker starts and inherited by it, so no worker of any run starts while another holds it
(bounded wait naming the holder, from ``gpu.holder``). The worker runs under coreutils ``timeout``
with the member's deadline, so it stops at its deadline even if the task process vanished.

The worker Python of a run is its checkpoint generation's (aifs.generations): the first of
``host.worker_pythons[<generation>]``, ``$AIFS_WORKER_PYTHON_<GENERATION>`` (e.g.
``AIFS_WORKER_PYTHON_V2``), ``host.worker_python``, ``$AIFS_WORKER_PYTHON``, this Python. create_host
proves it can load that generation (its anemoi-models release line), so a v2 checkpoint never
starts in a v1 environment. Production keeps the worker stack (torch, anemoi) out of Airflow's
environment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
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

from aifs.hostcontract import GPU_HOLDER, GPU_LOCK, KILL_AFTER_S
from aifs.orchestration.backends.base import (
    GPUBusy,
    HostBackend,
    LogSink,
    MemberTimeout,
    RunInfo,
    WorkerSettings,
    env_setting_schema,
    per_generation_schema,
    register,
)

WORKER_PYTHON_ENV = "AIFS_WORKER_PYTHON"


def worker_python_env(generation: str) -> str:
    """The variable naming one generation's worker Python: ``AIFS_WORKER_PYTHON_V2`` for v2."""
    return f"{WORKER_PYTHON_ENV}_{generation.upper()}"

#: What create_host asks the worker Python to prove: the stack imports, and which devices it has.
_CHECK_SCRIPT = """
import json, sys
from importlib.metadata import version
import aifs.worker.cli, torch, anemoi.inference
print(json.dumps({"python": sys.executable, "torch": torch.__version__, "anemoi_models": version("anemoi-models"),
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
                "description": f"Python of the worker environment of every generation worker_pythons does not name; "
                               f"empty: ${WORKER_PYTHON_ENV}, else Airflow's own",
            },
            "worker_pythons": per_generation_schema("Python of the worker environment"),
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
            "gpu_wait": {"type": "number", "minimum": 0, "default": 600,
                         "description": "seconds a member waits for the GPU while another worker (of any run) holds it"},
            "env": env_setting_schema("extra environment variables for the worker process (e.g. HF_TOKEN)"),
        },
    }

    # -- where things are -------------------------------------------------------------------

    @property
    def worker_python(self) -> str:
        """The worker Python when no generation is chosen (CPU steps, runs checked before generations)."""
        return self.worker_python_for(None)[0]

    def worker_python_for(self, generation: str | None) -> tuple[str, str]:
        """``(python, the setting that named it)`` for a generation's members (see the module doc)."""
        candidates = []
        if generation:
            env_name = worker_python_env(generation)
            candidates += [(self.settings["worker_pythons"].get(generation), f"host.worker_pythons.{generation}"),
                           (os.environ.get(env_name), f"${env_name}")]
        candidates += [(self.settings["worker_python"], "host.worker_python"),
                       (os.environ.get(WORKER_PYTHON_ENV), f"${WORKER_PYTHON_ENV}")]
        return next(((python, source) for python, source in candidates if python), (sys.executable, "Airflow's own Python"))

    def environment_for(self, generation: str | None) -> str:
        python, source = self.worker_python_for(generation)
        return f"worker Python {python} ({source})"

    def scratch_root(self) -> Path:
        return Path(self.settings["scratch_dir"] or os.path.join(tempfile.gettempdir(), "aifs-scratch"))

    def run_dir(self, run: RunInfo) -> Path:
        """One dir per DAG run, so two runs of one date (a backfill and a manual rerun) never share."""
        return self.scratch_root() / _safe(run.dag_id) / f"{run.slug}--{_safe(run.run_id)}"

    def _env(self) -> dict[str, str]:
        """This process's environment plus the ``env`` setting; the worker imports the same ``aifs``
        package the DAG did (plugins/ may not be installed there)."""
        import aifs

        env = dict(os.environ)
        env.update(self.settings["env"])
        package_parent = str(Path(aifs.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    # -- the three moments ------------------------------------------------------------------

    def create_host(self, run: RunInfo, log: LogSink) -> dict[str, Any]:
        python, source = self.worker_python_for(run.generation)
        if not (os.path.isfile(python) and os.access(python, os.X_OK)):
            raise RuntimeError(f"worker Python {python!r} is not an executable file ({source})")
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
        self._check_generation(run.generation, facts, python, source)
        if self.settings["device"] == "cuda" and not facts["cuda"]:
            raise RuntimeError(f"host.device is cuda but torch {facts['torch']} at {python} sees no GPU")

        run_dir = self.run_dir(run)
        for sub in ("input", "output"):
            (run_dir / sub).mkdir(parents=True, exist_ok=True)
        free_gb = shutil.disk_usage(run_dir).free / 1e9
        if free_gb < self.settings["min_free_gb"]:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise RuntimeError(f"only {free_gb:.1f} GB free in {run_dir}; host.min_free_gb is {self.settings['min_free_gb']}")
        facts.update(scratch=str(run_dir), free_gb=round(free_gb, 1), generation=run.generation)
        log(f"worker environment ok: torch {facts['torch']}, anemoi-models {facts.get('anemoi_models', '?')}"
            f"{f' (generation {run.generation})' if run.generation else ''}, cuda {facts['cuda']} ({facts['gpus']} GPUs), "
            f"scratch {run_dir} ({free_gb:.1f} GB free)")
        return facts

    def run_member(self, run: RunInfo, member: int, worker: WorkerSettings, log: LogSink, *,
                   timeout_s: float | None = None) -> int:
        run_dir = self.run_dir(run)
        worker = dataclasses.replace(worker, input_dir=str(run_dir / "input"), output_dir=str(run_dir / "output"))
        cmd = [self.worker_python_for(run.generation)[0], "-m", "aifs.worker", *worker.worker_args(run.date, member)]
        if self.settings["device"] != "auto":
            cmd += ["--device", self.settings["device"]]
        pid_file = run_dir / f"member{member:03d}.pid"
        self._stop_orphan(pid_file, log)

        log("$ " + " ".join(cmd))
        lock = self._take_gpu(run, member, timeout_s, log)
        launched = time.time()
        supervised = _under_deadline(cmd, timeout_s)
        if timeout_s and supervised is cmd:
            log("[aifs] coreutils timeout not found: the member's deadline is only Airflow's execution_timeout")
        try:
            process = subprocess.Popen(
                supervised,
                env=self._env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                bufsize=1,
                start_new_session=True,  # its own process group: we can stop it and its children together
                pass_fds=(lock.fileno(),),  # the worker holds the GPU lock for as long as it lives
            )
        finally:
            lock.close()  # ours only: the worker's copy keeps the lock until the worker is gone
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        pid_file.write_text(str(process.pid))
        deadline = launched + timeout_s if timeout_s else None
        (run_dir / f"member{member:03d}.job.json").write_text(json.dumps(
            {"pid": process.pid, "run_id": run.run_id, "member": member, "launched": launched, "deadline": deadline,
             "args": cmd}))
        code = _stream_until_exit(process, pid_file, log, "worker")  # a killed task must not leave a worker holding the GPU
        if deadline is not None and code != 0 and time.time() >= deadline:
            raise MemberTimeout(
                f"member {member:03d} exceeded member_timeout ({timeout_s:.0f} s from its launch) and was stopped (exit {code})"
            )
        return code

    def stop_member(self, run: RunInfo, member: int, log: LogSink) -> None:
        self._stop_orphan(self.run_dir(run) / f"member{member:03d}.pid", log)

    @staticmethod
    def _check_generation(name: str | None, facts: dict[str, Any], python: str, source: str) -> None:
        """The environment's anemoi-models must be the release line that unpickles the run's checkpoint."""
        if not name:
            return
        from aifs.generations import GENERATIONS

        generation, found = GENERATIONS[name], facts.get("anemoi_models")
        if not (found and generation.loads(found)):
            line = ".".join(map(str, generation.anemoi_models))
            raise RuntimeError(
                f"the worker environment at {python} ({source}) has anemoi-models {found or 'unknown'}, which cannot load "
                f"this run's {generation.model} checkpoint (generation {name}, anemoi-models {line}.x): point "
                f"host.worker_pythons.{name} or ${worker_python_env(name)} at the {generation.local_venv} environment "
                f"({generation.requirements})"
            )

    # -- CPU steps ------------------------------------------------------------------------------

    def step_pid_file(self, run: RunInfo, step: str) -> Path:
        return self.scratch_root() / "steps" / f"{run.step_job_name(step)}.pid"

    def run_step(self, run: RunInfo, step: str, module: str, args, env: dict[str, str], log: LogSink, *,
                 timeout_s: float | None = None) -> int:
        """``<worker python> -m <module> <args>`` as a subprocess: no GPU lock, its own process group.

        Under coreutils ``timeout`` with the step's deadline, like a member, so the deadline holds
        even when the task process is SIGKILLed; an orphan of an earlier try is stopped first.
        ``env`` goes to the process's environment only (never into the logged command line).
        """
        from aifs.orchestration.backends.base import StepTimeout, check_step

        check_step(step, module)
        cmd = [self.worker_python, "-m", module, *map(str, args)]
        pid_file = self.step_pid_file(run, step)
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        self._stop_orphan(pid_file, log, marker=b"-m\0" + module.encode())
        log("$ " + " ".join(cmd))
        launched = time.time()
        process = subprocess.Popen(
            _under_deadline(cmd, timeout_s),
            env={**self._env(), **{str(k): str(v) for k, v in env.items()}},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
            start_new_session=True,  # its own process group: stopped with its children
        )
        pid_file.write_text(str(process.pid))
        code = _stream_until_exit(process, pid_file, log, "step")  # a killed task: the step must not outlive it
        if timeout_s and code != 0 and time.time() >= launched + timeout_s:
            raise StepTimeout(f"step {step} exceeded its timeout ({timeout_s:.0f} s from its launch) and was stopped (exit {code})")
        return code

    def stop_step(self, run: RunInfo, step: str, log: LogSink) -> None:
        self._stop_orphan(self.step_pid_file(run, step), log, marker=b"-m\0aifs.")

    # -- the GPU lock -------------------------------------------------------------------------

    def _take_gpu(self, run: RunInfo, member: int, timeout_s: float | None, log: LogSink):
        """The machine's GPU lock (an open file holding flock), waiting up to ``gpu_wait`` for it."""
        root = self.scratch_root()
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / GPU_LOCK, "a+")
        started, last_said = time.monotonic(), None
        while True:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            holder = _read(root / GPU_HOLDER) or "unknown (no gpu.holder)"
            waited = time.monotonic() - started
            if waited >= self.settings["gpu_wait"]:
                lock.close()
                raise GPUBusy(
                    f"the GPU is held by another worker ({holder}); waited {waited:.0f} s (gpu_wait "
                    f"{self.settings['gpu_wait']:.0f} s) without starting member {member:03d}. Two runs share this "
                    "machine: let the other finish (or bound runs with the pool, see the operator's guide), then clear this task"
                )
            if holder != last_said:
                log(f"[aifs] the GPU is busy: held by {holder}; member {member:03d} waits (up to {self.settings['gpu_wait']:.0f} s)")
                last_said = holder
            time.sleep(min(1.0, max(0.05, self.settings["gpu_wait"] - waited)))
        now = time.time()
        until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + timeout_s)) if timeout_s else "none"
        (root / GPU_HOLDER).write_text(
            f"run={run.run_id} member={member:03d} since={time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(now))} "
            f"deadline={until}\n"
        )
        return lock

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

    def _stop_orphan(self, pid_file: Path, log: LogSink, marker: bytes = b"aifs.worker") -> None:
        """A worker left by a task process that was SIGKILLed: stop it before starting another."""
        try:
            pid = int(pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return
        if _alive(pid) and _is_worker(pid, marker):
            log(f"stopping worker {pid} left by an earlier try")
            _stop_group(pid)
        with contextlib.suppress(FileNotFoundError):
            pid_file.unlink()


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_worker(pid: int, marker: bytes = b"aifs.worker") -> bool:
    try:
        return marker in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (macOS): trust the pid file


def _under_deadline(cmd: list[str], timeout_s: float | None) -> list[str]:
    """``cmd`` under coreutils ``timeout`` with the deadline (``cmd`` itself when there is none, or no ``timeout``).

    The deadline is enforced by a process beside the command, not by this task: it holds even when
    Airflow's task process is SIGKILLed.
    """
    timeout_bin = shutil.which("timeout")
    if not (timeout_s and timeout_bin):
        return cmd
    return [timeout_bin, "-k", str(KILL_AFTER_S), f"{max(1, int(-(-timeout_s // 1)))}", *cmd]


def _stream_until_exit(process: subprocess.Popen, pid_file: Path, log: LogSink, what: str) -> int:
    """Log each line ``process`` prints until it exits; its exit code. Then ``pid_file`` is removed.

    Any way out of here but the process's own exit (the task was killed, timed out or marked
    failed) stops its process group: SIGTERM first, before anything else can fail, SIGKILL 20 s later.
    """
    try:
        assert process.stdout is not None
        for line in process.stdout:
            log(line.rstrip("\n"))
        return process.wait()
    finally:
        if process.poll() is None:
            _signal_group(process.pid, signal.SIGTERM)
            log(f"stopped {what} process group {process.pid}")
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
                process.wait()
        with contextlib.suppress(FileNotFoundError):
            pid_file.unlink()


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
