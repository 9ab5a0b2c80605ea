"""``ssh`` backend: any GPU host reachable over SSH (on-prem, another cloud, a workstation).

Host, user and key come from an Airflow SSH connection (``ssh_conn_id``). Members run as detached
jobs (remote_job.py): a dropped session or a task retry re-attaches instead of starting a second
copy. Nothing is created or deleted: ``create_host`` checks the host is ready, ``delete_host`` stops
whatever job of this run is still running there (an orphan must not hold the box into the next day).
Every run of every date shares the box, so its GPU is guarded by the host-wide lock of remote_job.py
and job names carry the run's hash. Launch the worker as a plain process (``launch: process``, ``python`` = an interpreter with
the aifs package) or as the worker container (``launch: container``, ``image``).
"""

from __future__ import annotations

from typing import Any

from aifs.orchestration.backends import remote_job
from aifs.orchestration.backends.base import HostBackend, LogSink, RunInfo, WorkerSettings, register, require_image


def open_ssh_client(hook: Any, keepalive_interval: int) -> Any:
    """``hook.get_conn()`` plus transport keep-alives (ComputeEngineSSHHook does not set them)."""
    client = hook.get_conn()
    transport = client.get_transport()
    if transport is not None and keepalive_interval:
        transport.set_keepalive(keepalive_interval)
    return client


def job_owner(run: RunInfo, member: int) -> str:
    """Who a job is, for the log line of whoever waits for the GPU it holds."""
    return f"run={run.run_id} member={member:03d}"


def run_remote_member(job: remote_job.RemoteJob, settings: dict[str, Any], run: RunInfo, member: int,
                      worker: WorkerSettings) -> int:
    args = worker.worker_args(run.date, member)
    script = remote_job.job_script(settings, job.name, args)
    return job.run(script, args=args, who=job_owner(run, member))


def stop_remote_member(job: remote_job.RemoteJob, log: LogSink) -> None:
    """Stop the job if it runs and mark its result reported (a retry launches afresh)."""
    try:
        state = job.state()
        if state.state == "running":
            log(f"[aifs] stopping job {job.name} on the host")
            job.stop()
            job.acknowledge()
            log(f"[aifs] job {job.name} stopped")
    finally:
        job.close()


def new_remote_job(backend: HostBackend, connect, run: RunInfo, member: int, log: LogSink,
                   timeout_s: float | None = None, **extra) -> remote_job.RemoteJob:
    s = backend.settings
    return remote_job.RemoteJob(
        connect,
        s["jobs_dir"],
        run.job_name(member),
        log,
        sudo=s["sudo"],
        poll_interval=s["poll_interval"],
        heartbeat=s["heartbeat"],
        stall_timeout=s["stall_timeout"],
        member_timeout=timeout_s,
        gpu_wait=s["gpu_wait"],
        gpu_poll=min(10.0, s["poll_interval"] * 10),
        reconnect_attempts=s["reconnect_attempts"],
        reconnect_delay=s["reconnect_delay"],
        **extra,
    )


def _step_job(settings: dict[str, Any], connect, run: RunInfo, step: str, log: LogSink,
              timeout_s: float | None = None, **extra) -> remote_job.RemoteJob:
    return remote_job.RemoteJob(
        connect, settings["jobs_dir"], run.step_job_name(step), log,
        sudo=settings["sudo"], poll_interval=settings["poll_interval"], heartbeat=settings["heartbeat"],
        stall_timeout=settings["stall_timeout"], member_timeout=timeout_s,
        reconnect_attempts=settings["reconnect_attempts"], reconnect_delay=settings["reconnect_delay"],
        gpu=False,  # a CPU step neither takes nor waits for the host's GPU lock
        **extra,
    )


def run_remote_step(settings: dict[str, Any], connect, run: RunInfo, step: str, module: str, args, env: dict[str, str],
                    log: LogSink, timeout_s: float | None = None, **extra) -> int:
    """A CPU step as a detached job (re-attach, deadline on the host), without the GPU lock or ``--gpus``."""
    from aifs.orchestration.backends.base import check_step

    check_step(step, module)
    args = [str(a) for a in args]
    job = _step_job(settings, connect, run, step, log, timeout_s, **extra)
    # the recorded args decide adoption: another module or other flags under the same step name are not ours
    script = remote_job.step_script(settings, job.name, module, args, env)
    return job.run(script, args=["-m", module, *args], who=f"run={run.run_id} step={step}")


def stop_remote_step(settings: dict[str, Any], connect, run: RunInfo, step: str, log: LogSink) -> None:
    stop_remote_member(_step_job(settings, connect, run, step, log), log)


@register("ssh")
class SSHBackend(HostBackend):
    SETTINGS_SCHEMA = {
        "type": "object",
        "properties": {
            "ssh_conn_id": {"type": "string", "default": "aifs_gpu_host",
                            "description": "Airflow SSH connection: host, port, login, key_file/private_key"},
            **remote_job.job_settings_properties(),
        },
        "additionalProperties": False,
    }

    def _connect(self) -> Any:
        from airflow.providers.ssh.hooks.ssh import SSHHook

        hook = SSHHook(
            ssh_conn_id=self.settings["ssh_conn_id"],
            conn_timeout=self.settings["connect_timeout"],
            keepalive_interval=self.settings["keepalive_interval"],
            cmd_timeout=None,
        )
        return open_ssh_client(hook, self.settings["keepalive_interval"])

    def environment_for(self, generation: str | None) -> str:
        settings = self.settings_for(generation)
        if settings["launch"] == "container":
            return f"worker image {require_image('ssh', self.settings, generation)}"
        return f"python {settings['python']} on the host"

    def create_host(self, run: RunInfo, log: LogSink) -> dict[str, Any]:
        # ready means this run's generation's image is on the host (container launch)
        said = remote_job.wait_until_ready(self._connect, self.settings_for(run.generation), log,
                                           f"SSH host {self.settings['ssh_conn_id']!r}")
        return {"backend": "ssh", "ssh_conn_id": self.settings["ssh_conn_id"], "probe": said}

    def run_member(self, run: RunInfo, member: int, worker: WorkerSettings, log: LogSink, *,
                   timeout_s: float | None = None) -> int:
        job = new_remote_job(self, self._connect, run, member, log, timeout_s=timeout_s)
        return run_remote_member(job, self.settings_for(run.generation), run, member, worker)

    def stop_member(self, run: RunInfo, member: int, log: LogSink) -> None:
        stop_remote_member(new_remote_job(self, self._connect, run, member, log), log)

    def run_step(self, run: RunInfo, step: str, module: str, args, env: dict[str, str], log: LogSink, *,
                 timeout_s: float | None = None) -> int:
        """On the same box as members, but as a CPU job: no GPU lock (members keep the GPU), no ``--gpus``."""
        return run_remote_step(self.settings, self._connect, run, step, module, args, env, log, timeout_s)

    def stop_step(self, run: RunInfo, step: str, log: LogSink) -> None:
        stop_remote_step(self.settings, self._connect, run, step, log)

    def delete_host(self, run: RunInfo, log: LogSink) -> None:
        """The host is not ours to delete, but this run's jobs on it are ours to stop."""
        probe = new_remote_job(self, self._connect, run, 0, log)
        try:
            stopped = stop_run_jobs(probe, run)
        finally:
            probe.close()
        what = f"stopped {', '.join(stopped)}" if stopped else "no job of this run was running"
        log(f"[aifs] ssh backend: host {self.settings['ssh_conn_id']!r} is not ours to delete; {what}")


#: Stop every running job of one run (names ``aifs-<slug>-m*``); prints the names it stopped.
STOP_RUN_SH = r"""
D="$1"; prefix="$2"; grace="$3"
for J in "$D/$prefix"*; do
  [ -d "$J" ] || continue
  flock -n "$J/running.lock" true 2>/dev/null && continue
  pid=$(cat "$J/pid" 2>/dev/null) || continue
  kill -TERM -- "-$pid" 2>/dev/null
  for _ in $(seq $((grace * 10))); do [ -e "$J/exit" ] && break; sleep 0.1; done
  [ -e "$J/exit" ] || kill -KILL -- "-$pid" 2>/dev/null
  : >"$J/reported"
  basename "$J"
done
"""


def stop_run_jobs(job: remote_job.RemoteJob, run: RunInfo, grace: int = 60) -> list[str]:
    prefix = run.job_name(0)[: -len("000")]  # aifs-<slug>-m
    status, out, err = job._with_reconnects(
        "stop run", lambda: job._exec(STOP_RUN_SH, job.jobs_dir, prefix, grace, timeout=grace * 4 + 60)
    )
    if status != 0:
        raise remote_job.RemoteJobError(f"stopping the jobs of run {run.run_id} failed ({status}): {err.strip()}")
    return out.split()
