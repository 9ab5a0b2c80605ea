"""``ssh`` backend: any GPU host reachable over SSH (on-prem, another cloud, a workstation).

Host, user and key come from an Airflow SSH connection (``ssh_conn_id``). Members run as detached
jobs (remote_job.py): a dropped session or a task retry re-attaches instead of starting a second
copy. Nothing is created or deleted: ``create_host`` checks the host is ready, ``delete_host`` is a
no-op. Launch the worker as a plain process (``launch: process``, ``python`` = an interpreter with
the aifs package) or as the worker container (``launch: container``, ``image``).
"""

from __future__ import annotations

from typing import Any

from aifs.hostcontract import job_name
from aifs.orchestration.backends import remote_job
from aifs.orchestration.backends.base import HostBackend, LogSink, RunInfo, WorkerSettings, register


def open_ssh_client(hook: Any, keepalive_interval: int) -> Any:
    """``hook.get_conn()`` plus transport keep-alives (ComputeEngineSSHHook does not set them)."""
    client = hook.get_conn()
    transport = client.get_transport()
    if transport is not None and keepalive_interval:
        transport.set_keepalive(keepalive_interval)
    return client


def new_remote_job(backend: HostBackend, connect, run: RunInfo, member: int, log: LogSink, **extra) -> remote_job.RemoteJob:
    s = backend.settings
    return remote_job.RemoteJob(
        connect,
        s["jobs_dir"],
        job_name(run.date, member),
        log,
        sudo=s["sudo"],
        poll_interval=s["poll_interval"],
        heartbeat=s["heartbeat"],
        stall_timeout=s["stall_timeout"],
        member_timeout=s["member_timeout"],
        reconnect_attempts=s["reconnect_attempts"],
        reconnect_delay=s["reconnect_delay"],
        **extra,
    )


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

    def create_host(self, run: RunInfo, log: LogSink) -> dict[str, Any]:
        said = remote_job.wait_until_ready(self._connect, self.settings, log, f"SSH host {self.settings['ssh_conn_id']!r}")
        return {"backend": "ssh", "ssh_conn_id": self.settings["ssh_conn_id"], "probe": said}

    def run_member(self, run: RunInfo, member: int, worker: WorkerSettings, log: LogSink) -> int:
        name = job_name(run.date, member)
        script = remote_job.job_script(self.settings, name, worker.worker_args(run.date, member))
        return new_remote_job(self, self._connect, run, member, log).run(script)

    def delete_host(self, run: RunInfo, log: LogSink) -> None:
        log(f"[aifs] ssh backend: host {self.settings['ssh_conn_id']!r} is not ours to delete; nothing to do")
