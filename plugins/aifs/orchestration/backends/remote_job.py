"""Detached member jobs on a host reached over SSH: one implementation for the ``ssh`` and ``gce`` backends.

A member must outlive the SSH session that started it (a dropped connection, a restarted Airflow
worker, a task retry) and must never run twice at once. So the session does not run the worker;
it asks the host to start a *job* and then follows that job.

On the host each job is a directory ``{jobs_dir}/{job_name(date, member)}/``:

==================  ==========================================================================
``launch.lock``     held (flock) while one session decides whether to launch: no two launches race
``running.lock``    held by the job's runner *and inherited by every process of the job*: while
                    anything of the job is alive the lock is held, after a reboot it is free; no
                    pid files to go stale, no pid reuse to fool us
``cmd``             the job's script (plain process or ``docker run``), written at launch
``runner``          the supervisor: takes ``running.lock``, runs ``cmd`` in its own session with
                    output appended to ``log``, then writes the exit status to ``exit`` atomically
``pid``             process group of ``cmd`` (for ``stop``)
``log``             the job's output; ``log.N`` is the output of launch N when a later launch replaced it
``exit``            the exit status, present once the job has ended
``reported``        present once a session handed ``exit`` to its Airflow task
``launches``        one line per launch: time, number, what the previous launch left behind
``args``            the worker arguments of the launch: a job is adopted only by a task asking for the same
``deadline``        epoch second at which the host stops the job (member_timeout after its launch)
``timedout``        present when the runner stopped the job at its deadline
==================  ==========================================================================

Beside the job dirs, ``{jobs_dir}/gpu.lock`` is the host's one GPU: a launch takes it (flock) and
hands it to the runner, so it is held by the whole job until its last process ends, whichever DAG
run the job belongs to; ``gpu.holder`` says who holds it (job, run, member, since, deadline).

The rule a session applies (``ensure``), under ``launch.lock``:

1. ``running.lock`` held -> the job is running: attach (follow its log from the start, then its end).
2. ``exit`` present and not ``reported`` -> the job finished while nobody was connected: its exit
   status is the answer; no launch.
3. otherwise (never launched, or its result was already reported to a task, or it died without a
   status, e.g. the host rebooted) -> launch it, keeping the previous log as ``log.N``, but only once
   ``gpu.lock`` is free: while another job holds it the session waits (bounded, naming the holder).

Rules 1 and 2 apply only when the job's recorded ``args`` are the worker arguments the session asks
for; otherwise the session fails naming the difference (a job started with another bucket,
checkpoint or lead time is never taken for ours).

Rule 3 is what makes a failed member restartable: the task that saw the failure reported it, so
its retry (or a person clearing the task) launches afresh. A member that succeeded and is
launched again costs little: the worker skips members whose completion manifest exists.
If a session dies between reading ``exit`` and marking it ``reported``, the next session reads
the same status again (at least once, never lost).

The session follows the log over one long exec channel. The follower prints the log's bytes as
they come and a heartbeat byte on stderr when the log is quiet, so a silent dead connection is
noticed after ``stall_timeout`` even where TCP never says so; a dropped session is reconnected up
to ``reconnect_attempts`` times, resuming at the byte where it stopped. The member timeout is a
total limit counted from the job's launch and enforced on the host: the runner runs ``cmd`` under
``timeout``, so a retry that re-attaches does not restart it and an Airflow that vanished cannot
leave the job holding the GPU (unlike ``SSHOperator``'s ``cmd_timeout``, which only limits silence).
"""

from __future__ import annotations

import base64
import codecs
import dataclasses
import shlex
import time
from typing import Any, Callable, Sequence

from aifs import hostcontract
from aifs.orchestration.backends import base
from aifs.orchestration.backends.base import check_env_names, env_setting_schema

LogSink = Callable[[str], None]

#: Follower exit statuses (remote side of ``follow``).
FOLLOW_ENDED = 0
FOLLOW_LOST = 3
FOLLOW_NO_JOB = 4

# --------------------------------------------------------------------------------------------
# Host-side scripts. Plain bash + coreutils + util-linux flock: present on Debian/Ubuntu images,
# GCE's GPU images and any Linux GPU box. Each is run as ``bash -c SCRIPT aifs-job ARGS...``.
# --------------------------------------------------------------------------------------------

RUNNER_SH = r"""#!/bin/bash
# aifs detached-job runner: holds running.lock (and, as fd 7 from the launch, the host's gpu.lock)
# for the life of the job, both inherited by the job; stops the job itself at its deadline.
J="$1"; KILL_AFTER="${2:-90}"
exec 9>>"$J/running.lock"
flock -w 30 9 || exit 75
cd "$J" || exit 76
limit=0
if [ -s "$J/deadline" ]; then limit=$(( $(cat "$J/deadline") - $(date +%s) )); [ "$limit" -ge 1 ] || limit=1; fi
if [ "$limit" -gt 0 ]; then
  setsid timeout -k "$KILL_AFTER" "$limit" bash "$J/cmd" >>"$J/log" 2>&1 </dev/null &
else
  setsid bash "$J/cmd" >>"$J/log" 2>&1 </dev/null &
fi
child=$!
echo "$child" >"$J/pid.tmp" && mv -f "$J/pid.tmp" "$J/pid"
wait "$child"
code=$?
if [ "$limit" -gt 0 ] && [ "$code" != 0 ] && [ "$(date +%s)" -ge "$(cat "$J/deadline")" ]; then
  : >"$J/timedout"
  echo "[aifs-job] stopped by the host at its deadline $(date -u -d "@$(cat "$J/deadline")" +%Y-%m-%dT%H:%M:%SZ) (member_timeout after its launch), exit $code" >>"$J/log"
fi
printf '%s\n' "$code" >"$J/exit.tmp" && mv -f "$J/exit.tmp" "$J/exit"
"""

ENSURE_SH = r"""
set -u
D="$1"; J="$1/$2"; CMD_B64="$3"; RUNNER_B64="$4"; ARGS_B64="$5"; LIMIT="$6"; WHO_B64="$7"; KILL_AFTER="$8"; GPU="${9:-1}"
mkdir -p "$J" || { echo "error cannot create $J"; exit 20; }
exec 8>>"$J/launch.lock"
flock -w 60 8 || { echo "error launch lock of $J busy for 60 s"; exit 21; }
launches() { if [ -e "$J/launches" ]; then wc -l <"$J/launches"; else echo 0; fi; }
deadline() { cat "$J/deadline" 2>/dev/null || echo 0; }
ours() { [ -e "$J/args" ] && [ "$(base64 -w0 <"$J/args")" = "$ARGS_B64" ]; }
if ! flock -n "$J/running.lock" true 2>/dev/null; then
  ours || { echo "mismatch $(base64 -w0 <"$J/args" 2>/dev/null)"; exit 0; }
  echo "running $(launches) $(deadline)"; exit 0
fi
if [ -e "$J/exit" ] && [ ! -e "$J/reported" ]; then
  ours || { echo "mismatch $(base64 -w0 <"$J/args" 2>/dev/null)"; exit 0; }
  echo "finished $(cat "$J/exit") $([ -e "$J/timedout" ] && echo timedout)"; exit 0
fi
# a launch needs the host's GPU: take gpu.lock here and hand it (fd 7) to the runner, which keeps it
# for the whole job; no job of any run starts while another holds it. A CPU step (GPU=0) neither
# takes nor waits for it: it must not hold up members, nor be held up by them
if [ "$GPU" = 1 ]; then
  exec 7>>"$D/gpu.lock"
  flock -n 7 || { echo "busy $(head -c 2000 "$D/gpu.holder" 2>/dev/null | tr '\n' ' ')"; exit 0; }
fi
prev=none
if [ -e "$J/exit" ]; then prev="reported:$(cat "$J/exit")"; elif [ -e "$J/pid" ]; then prev=lost; fi
n=$(( $(launches) + 1 ))
if [ -e "$J/log" ]; then mv -f "$J/log" "$J/log.$((n - 1))"; fi
rm -f "$J/exit" "$J/reported" "$J/pid" "$J/timedout" "$J/deadline"
printf %s "$CMD_B64" | base64 -d >"$J/cmd.tmp" && mv -f "$J/cmd.tmp" "$J/cmd" || { echo "error writing cmd"; exit 22; }
printf %s "$RUNNER_B64" | base64 -d >"$J/runner" || { echo "error writing runner"; exit 22; }
printf %s "$ARGS_B64" | base64 -d >"$J/args" || { echo "error writing args"; exit 22; }
chmod 700 "$J/cmd" "$J/runner"
now=$(date +%s)
[ "$LIMIT" -gt 0 ] && echo $((now + LIMIT)) >"$J/deadline"
[ "$GPU" = 1 ] && printf 'job=%s %s since=%s deadline=%s\n' "$2" "$(printf %s "$WHO_B64" | base64 -d)" \
  "$(date -u -d "@$now" +%Y-%m-%dT%H:%M:%SZ)" "$([ "$LIMIT" -gt 0 ] && date -u -d "@$((now + LIMIT))" +%Y-%m-%dT%H:%M:%SZ || echo none)" >"$D/gpu.holder"
: >"$J/log"
printf '%s launch %s prev=%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$n" "$prev" >>"$J/launches"
setsid nohup bash "$J/runner" "$J" "$KILL_AFTER" </dev/null >/dev/null 2>&1 8>&- &
for _ in $(seq 200); do [ -e "$J/pid" ] && break; sleep 0.05; done
[ -e "$J/pid" ] || { echo "error runner of $J did not start"; exit 23; }
echo "launched $n $prev $(deadline)"
"""

FOLLOW_SH = r"""
J="$1"; off="$2"; poll="$3"; hb="$4"
[ -e "$J/log" ] || exit 4
last=$(date +%s)
while :; do
  fin=0; [ -e "$J/exit" ] && fin=1
  size=$(stat -c %s "$J/log" 2>/dev/null || echo 0)
  if [ "$size" -gt "$off" ]; then
    tail -c +"$((off + 1))" "$J/log" | head -c "$((size - off))" || exit 5
    off=$size
  fi
  [ "$fin" = 1 ] && exit 0
  if flock -n "$J/running.lock" true 2>/dev/null; then
    [ -e "$J/exit" ] && continue
    exit 3
  fi
  now=$(date +%s)
  if [ $((now - last)) -ge "$hb" ]; then printf . >&2 || exit 5; last=$now; fi
  sleep "$poll"
done
"""

RESULT_SH = r"""
J="$1"
[ -e "$J/exit" ] || exit 4
echo "$(cat "$J/exit") $([ -e "$J/timedout" ] && echo timedout)"
"""

ACK_SH = r"""
J="$1"
: >"$J/reported"
"""

STATE_SH = r"""
J="$1"
[ -d "$J" ] || { echo "absent 0"; exit 0; }
n=0; [ -e "$J/launches" ] && n=$(wc -l <"$J/launches")
if ! flock -n "$J/running.lock" true 2>/dev/null; then echo "running $n"
elif [ -e "$J/exit" ] && [ -e "$J/reported" ]; then echo "reported $n $(cat "$J/exit")"
elif [ -e "$J/exit" ]; then echo "finished $n $(cat "$J/exit")"
elif [ -e "$J/pid" ]; then echo "lost $n"
else echo "absent $n"; fi
"""

STOP_SH = r"""
J="$1"; grace="$2"
pid=$(cat "$J/pid" 2>/dev/null) || exit 0
kill -TERM -- "-$pid" 2>/dev/null
for _ in $(seq $((grace * 10))); do [ -e "$J/exit" ] && exit 0; sleep 0.1; done
kill -KILL -- "-$pid" 2>/dev/null
for _ in $(seq 50); do [ -e "$J/exit" ] && exit 0; sleep 0.1; done
"""

PROBE_SH = r"""
ready="$1"; failed="$2"; gpu_cmd="$3"; image="$4"; docker="${5:-docker}"
if [ -n "$failed" ] && [ -e "$failed" ]; then echo "failed $(head -c 2000 "$failed" | tr '\n' ' ')"; exit 0; fi
if [ -n "$ready" ] && [ ! -e "$ready" ]; then echo "waiting bootstrap has not written $ready yet"; exit 0; fi
if [ -n "$gpu_cmd" ]; then
  out=$(bash -c "$gpu_cmd" 2>&1) || { echo "nogpu $(printf %s "$out" | head -c 500 | tr '\n' ' ')"; exit 0; }
  echo "gpu $(printf %s "$out" | head -n 1)"
fi
if [ -n "$image" ]; then
  "$docker" image inspect "$image" >/dev/null 2>&1 || { echo "noimage $image"; exit 0; }
  echo "image $image"
fi
echo ok
"""


class RemoteJobError(RuntimeError):
    """The host could not start, follow or read a job (not a failure of the member itself)."""


class SessionLost(RemoteJobError):
    """The SSH session dropped or went silent, and reconnecting did not bring it back."""


class JobLost(RemoteJobError):
    """The job ended without recording an exit status (host rebooted, runner killed); a retry relaunches it."""


class MemberTimeout(RemoteJobError, base.MemberTimeout):
    """The member ran longer than its timeout (counted from the job's launch); the job was stopped."""


class GPUBusy(RemoteJobError, base.GPUBusy):
    """Another job held the host's GPU for longer than ``gpu_wait``."""


class JobMismatch(RemoteJobError):
    """A job of this name exists on the host but was started with other worker arguments."""


class HostNotReady(RemoteJobError):
    """The host did not become ready (SSH, bootstrap marker, GPU, image) in time."""


def remote_command(script: str, args: Sequence[Any], sudo: bool = False) -> str:
    """``bash -c SCRIPT aifs-job ARGS...``, quoted for the remote login shell; optionally via sudo."""
    parts = ["bash", "-c", script, "aifs-job", *(str(a) for a in args)]
    command = " ".join(shlex.quote(p) for p in parts)
    return f"sudo -n {command}" if sudo else command


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# --------------------------------------------------------------------------------------------
# What a job runs: the worker as a plain process or in a container.
# --------------------------------------------------------------------------------------------


def process_script(argv: Sequence[str], env: dict[str, str] | None = None, workdir: str | None = None) -> str:
    """The job script for a plain process: environment, working directory, then ``exec argv``."""
    lines = ["#!/bin/bash"]
    check_env_names(env or {})  # a name is written unquoted (``export NAME=``): shell syntax must not get in
    for key, value in sorted((env or {}).items()):
        lines.append(f"export {key}={shlex.quote(str(value))}")
    if workdir:
        lines.append(f"mkdir -p {shlex.quote(workdir)} && cd {shlex.quote(workdir)} || exit 2")
    lines.append("exec " + " ".join(shlex.quote(a) for a in argv))
    return "\n".join(lines) + "\n"


def docker_run_argv(
    name: str,
    image: str,
    entrypoint: Sequence[str],
    args: Sequence[str],
    env: dict[str, str] | None = None,
    gpus: str | None = "all",
    scratch_dir: str | None = hostcontract.SCRATCH_DIR,
    extra: Sequence[str] = (),
    docker: str = "docker",
) -> list[str]:
    """``docker run -d --name NAME --gpus all -v SCRATCH:/scratch -e K=V ... --entrypoint P IMAGE REST... ARGS...``."""
    argv = [docker, "run", "-d", "--name", name, "--label", f"aifs-job={name}"]
    if gpus:
        argv += ["--gpus", gpus]
    argv += ["--shm-size", f"{hostcontract.WORKER_SHM_GIB}g"]  # the GRIB writers' step ring lives in /dev/shm
    if scratch_dir:
        argv += ["-v", f"{scratch_dir}:{hostcontract.CONTAINER_SCRATCH}"]
    check_env_names(env or {})  # docker splits ``-e`` at the first '=': a name must not hold one
    for key, value in sorted((env or {}).items()):
        argv += ["-e", f"{key}={value}"]
    argv += list(extra)
    if entrypoint:
        argv += ["--entrypoint", entrypoint[0], image, *entrypoint[1:]]
    else:
        argv += [image]
    return argv + list(args)


def container_script(name: str, run_argv: Sequence[str], docker: str = "docker") -> str:
    """The job script for a container: start it detached (or adopt one a lost runner left), stream, wait.

    The container's own name is the job name, so ``docker ps`` on the host shows which member runs.
    A container that exists when the script starts was left by a runner that died before it could
    record the status: its log and exit code are adopted rather than a second copy started.
    """
    q = shlex.quote(name)
    d = shlex.quote(docker)
    return f"""#!/bin/bash
trap 'stopping=1' TERM INT HUP
if {d} container inspect {q} >/dev/null 2>&1; then
  echo "[aifs-job] adopting container {name} left by an earlier runner"
else
  {" ".join(shlex.quote(a) for a in run_argv)} >/dev/null || exit $?
fi
{d} logs -f {q} 2>&1 &
logs=$!
code=$({d} wait {q})
if [ -z "$code" ]; then
  {d} stop -t 60 {q} >/dev/null 2>&1
  code=$({d} inspect -f '{{{{.State.ExitCode}}}}' {q} 2>/dev/null || echo 137)
fi
wait "$logs" 2>/dev/null
{d} rm {q} >/dev/null 2>&1
exit "$code"
"""


# --------------------------------------------------------------------------------------------
# Settings shared by the backends that run jobs over SSH.
# --------------------------------------------------------------------------------------------


def job_settings_properties(**defaults: Any) -> dict[str, Any]:
    """JSON-schema properties for the member-job settings; ``defaults`` override per backend."""
    props: dict[str, Any] = {
        "launch": {"enum": ["process", "container"], "default": "process",
                   "description": "run the worker as a plain process or as a docker container"},
        "python": {"type": "string", "default": "python3",
                   "description": "process launch: interpreter on the host that has the aifs package"},
        "image": {"type": ["string", "null"], "default": None,
                  "description": "container launch: worker image (of every generation 'images' does not name)"},
        "images": base.per_generation_schema("container launch: worker image"),
        "pythons": base.per_generation_schema("process launch: interpreter on the host"),
        "entrypoint": {"type": "array", "items": {"type": "string"}, "default": ["python", "-m", "aifs.worker"],
                       "description": "container launch: program run in the image (first item becomes --entrypoint)"},
        "gpus": {"type": ["string", "null"], "default": "all", "description": "container launch: docker --gpus"},
        "docker": {"type": "string", "default": "docker", "description": "container launch: the docker CLI on the host"},
        "docker_args": {"type": "array", "items": {"type": "string"}, "default": [],
                        "description": "container launch: extra docker run arguments"},
        "scratch_dir": {"type": ["string", "null"], "default": hostcontract.SCRATCH_DIR,
                        "description": "container launch: host scratch directory mounted at /scratch"},
        "env": env_setting_schema("extra environment variables for the worker on the host"),
        "workdir": {"type": ["string", "null"], "default": None, "description": "process launch: working directory"},
        "jobs_dir": {"type": "string", "default": hostcontract.JOBS_DIR,
                     "description": "where detached jobs keep their log and exit status on the host"},
        "sudo": {"type": "boolean", "default": False, "description": "run the host-side commands via sudo -n"},
        "poll_interval": {"type": "number", "exclusiveMinimum": 0, "default": 1.0},
        "heartbeat": {"type": "integer", "minimum": 1, "default": 15,
                      "description": "seconds between keep-alive bytes while the log is quiet"},
        "stall_timeout": {"type": "number", "exclusiveMinimum": 0, "default": 120,
                          "description": "seconds without any byte from the host before the session counts as dropped"},
        "gpu_wait": {"type": "number", "minimum": 0, "default": 600,
                     "description": "seconds a member waits for the host's GPU while another job (of any run) holds it"},
        "reconnect_attempts": {"type": "integer", "minimum": 0, "default": 5},
        "reconnect_delay": {"type": "number", "minimum": 0, "default": 10},
        "keepalive_interval": {"type": "integer", "minimum": 0, "default": 30},
        "connect_timeout": {"type": "integer", "minimum": 1, "default": 30},
        "ready_marker": {"type": ["string", "null"], "default": None,
                         "description": "file whose presence says the host's bootstrap finished"},
        "failed_marker": {"type": ["string", "null"], "default": None,
                          "description": "file whose presence says the host's bootstrap failed (content: why)"},
        "gpu_check": {"type": ["string", "null"], "default": "nvidia-smi -L",
                      "description": "command that must succeed on a ready host (null: no GPU check)"},
        "ready_timeout": {"type": "number", "exclusiveMinimum": 0, "default": 600},
    }
    for key, value in defaults.items():
        props[key] = {**props[key], "default": value}
    return props


def job_script(settings: dict[str, Any], name: str, worker_args: Sequence[str]) -> str:
    """The job script for one member under the backend's settings (process or container launch)."""
    env = {str(k): str(v) for k, v in settings["env"].items()}
    if settings["launch"] == "container":
        if not settings.get("image"):
            raise ValueError("launch 'container' needs an 'image' setting")
        argv = docker_run_argv(
            name,
            settings["image"],
            settings["entrypoint"],
            worker_args,
            env=env,
            gpus=settings["gpus"],
            scratch_dir=settings["scratch_dir"],
            extra=settings["docker_args"],
            docker=settings["docker"],
        )
        return container_script(name, argv, docker=settings["docker"])
    argv = [settings["python"], "-m", "aifs.worker", *worker_args]
    return process_script(argv, env=env, workdir=settings.get("workdir"))


def step_script(settings: dict[str, Any], name: str, module: str, args: Sequence[str], env: dict[str, str]) -> str:
    """The job script of a CPU step: ``python -m <module> <args>`` of the worker image, without a GPU.

    Container launch: the worker image with the same entrypoint program but ``-m <module>``, and no
    ``--gpus`` (the container sees no GPU). Process launch: the host's ``python``. ``env`` (the step's
    secrets) joins the backend's ``env`` in the script, which only the job's owner may read (mode 700).
    """
    merged = {**{str(k): str(v) for k, v in settings["env"].items()}, **{str(k): str(v) for k, v in env.items()}}
    if settings["launch"] == "container":
        if not settings.get("image"):
            raise ValueError("launch 'container' needs an 'image' setting")
        program = (settings["entrypoint"] or ["python"])[0]
        argv = docker_run_argv(name, settings["image"], [program, "-m", module], list(args), env=merged, gpus=None,
                               scratch_dir=settings["scratch_dir"], extra=settings["docker_args"], docker=settings["docker"])
        return container_script(name, argv, docker=settings["docker"])
    return process_script([settings["python"], "-m", module, *args], env=merged, workdir=settings.get("workdir"))


# --------------------------------------------------------------------------------------------
# The session side.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class JobState:
    """What the host says about one job: ``absent``, ``running``, ``finished``, ``reported`` or ``lost``."""

    state: str
    launches: int
    exit_code: int | None = None


class RemoteJob:
    """Launch-or-attach, follow and read one detached job; see the module docstring for the rules."""

    def __init__(
        self,
        connect: Callable[[], Any],
        jobs_dir: str,
        name: str,
        log: LogSink,
        *,
        sudo: bool = False,
        poll_interval: float = 1.0,
        heartbeat: int = 15,
        stall_timeout: float = 120.0,
        member_timeout: float | None = None,
        reconnect_attempts: int = 5,
        reconnect_delay: float = 10.0,
        command_timeout: float = 120.0,
        on_session_lost: Callable[[Exception], None] | None = None,
        gpu_wait: float = 600.0,
        gpu_poll: float = 10.0,
        kill_after: int = hostcontract.KILL_AFTER_S,
        gpu: bool = True,
    ):
        self.connect = connect
        self.jobs_dir = jobs_dir.rstrip("/") or "/"
        self.name = name
        self.dir = f"{self.jobs_dir}/{name}"
        self.log = log
        self.sudo = sudo
        self.poll_interval = poll_interval
        self.heartbeat = heartbeat
        self.stall_timeout = stall_timeout
        #: seconds from the job's launch after which the host stops it (None: no limit)
        self.member_timeout = member_timeout
        self.gpu_wait = gpu_wait
        self.gpu_poll = gpu_poll
        self.kill_after = kill_after
        #: False for a CPU step: its launch neither takes nor waits for the host's GPU lock
        self.gpu = gpu
        self.reconnect_attempts = reconnect_attempts
        self.reconnect_delay = reconnect_delay
        self.command_timeout = command_timeout
        #: called with the error before each reconnect; may raise to give up (e.g. the VM is gone)
        self.on_session_lost = on_session_lost
        self._client: Any = None

    # -- connection -------------------------------------------------------------------------

    def _session(self) -> Any:
        if self._client is None:
            self._client = self.connect()
        return self._client

    def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - a dead client may fail to close; it is gone either way
                pass

    def close(self) -> None:
        self._drop()

    def _reconnect(self, error: Exception, attempt: int) -> None:
        self._drop()
        if self.on_session_lost is not None:
            self.on_session_lost(error)
        if attempt > self.reconnect_attempts:
            raise SessionLost(
                f"lost the SSH session to job {self.name} and {self.reconnect_attempts} reconnect attempt(s) "
                f"failed ({error}); the job keeps running on the host and a retry re-attaches to it"
            ) from error
        delay = self.reconnect_delay * attempt
        self.log(f"[aifs] SSH session to job {self.name} lost ({error}); reconnecting in {delay:.0f} s "
                 f"(attempt {attempt}/{self.reconnect_attempts})")
        time.sleep(delay)

    def _exec(self, script: str, *args: Any, timeout: float | None = None) -> tuple[int, str, str]:
        """Run a short host-side script; (exit status, stdout, stderr). Raises SessionLost-worthy errors as OSError."""
        client = self._session()
        transport = client.get_transport()
        if transport is None or not transport.is_active():
            raise ConnectionError("SSH transport is not active")
        channel = transport.open_session(timeout=timeout or self.command_timeout)
        try:
            channel.settimeout(timeout or self.command_timeout)
            channel.exec_command(remote_command(script, args, sudo=self.sudo))
            out, err = bytearray(), bytearray()
            while True:
                chunk = channel.recv(65536)
                if not chunk:
                    break
                out += chunk
            while channel.recv_stderr_ready():
                err += channel.recv_stderr(65536)
            status = channel.recv_exit_status()
            while channel.recv_stderr_ready():
                err += channel.recv_stderr(65536)
        finally:
            channel.close()
        if status == -1:
            raise ConnectionError("SSH session closed before the command reported its exit status")
        return status, out.decode(errors="replace"), err.decode(errors="replace")

    def _with_reconnects(self, what: str, fn: Callable[[], Any]) -> Any:
        attempt = 0
        while True:
            try:
                return fn()
            except _network_errors() as exc:
                attempt += 1
                self._reconnect(exc, attempt)

    # -- host-side operations ---------------------------------------------------------------

    def state(self) -> JobState:
        """The job's state on the host (for diagnostics and tests)."""
        status, out, err = self._with_reconnects("state", lambda: self._exec(STATE_SH, self.dir))
        if status != 0:
            raise RemoteJobError(f"reading the state of job {self.name} failed ({status}): {err.strip()}")
        parts = out.split()
        return JobState(parts[0], int(parts[1]), int(parts[2]) if len(parts) > 2 else None)

    def ensure(self, script: str, args: Sequence[str] = (), who: str = "") -> tuple[str, dict[str, Any]]:
        """Apply the launch rule once: ``(what, facts)`` with what one of ``running``, ``finished``,
        ``launched`` (facts: launch, deadline, exit_code, timedout), ``busy`` (facts: holder) or
        ``mismatch`` (facts: recorded args)."""
        limit = int(-(-self.member_timeout // 1)) if self.member_timeout else 0
        status, out, err = self._with_reconnects(
            "ensure",
            lambda: self._exec(ENSURE_SH, self.jobs_dir, self.name, _b64(script), _b64(RUNNER_SH),
                               _b64(args_text(args)), limit, _b64(who), self.kill_after,
                               1 if self.gpu else 0),
        )
        words = out.split()
        if status != 0 or not words or words[0] not in ("running", "finished", "launched", "busy", "mismatch"):
            raise RemoteJobError(
                f"could not start job {self.name} in {self.jobs_dir} (status {status}): {(out + err).strip()}"
            )
        what = words[0]
        if what == "busy":
            return what, {"holder": out.strip()[len("busy"):].strip() or "unknown (no gpu.holder)"}
        if what == "mismatch":
            recorded = base64.b64decode(words[1]).decode(errors="replace") if len(words) > 1 else ""
            return what, {"args": recorded.splitlines()}
        if what == "finished":
            return what, {"exit_code": int(words[1]), "timedout": "timedout" in words[2:]}
        if what == "launched":
            previous = words[2] if len(words) > 2 else "none"
            deadline = int(words[3]) if len(words) > 3 else 0
            note = {"none": "", "lost": " (the previous launch ended without an exit status)"}.get(
                previous, f" (previous result {previous.split(':', 1)[-1]} was already reported)"
            )
            until = f"; the host stops it at {_utc(deadline)}" if deadline else ""
            self.log(f"[aifs] launched job {self.name} (launch {words[1]}) on the host{note}{until}")
            return what, {"launch": int(words[1]), "deadline": deadline}
        deadline = int(words[2]) if len(words) > 2 else 0
        until = f" (its deadline, from its launch: {_utc(deadline)})" if deadline else ""
        self.log(f"[aifs] job {self.name} is already running on the host: re-attaching to it{until}")
        return what, {"deadline": deadline}

    def result(self) -> int:
        return self._result()[0]

    def _result(self) -> tuple[int, bool]:
        """(exit status, stopped by the host at its deadline?)"""
        status, out, err = self._with_reconnects("result", lambda: self._exec(RESULT_SH, self.dir))
        if status != 0 or not out.strip():
            raise RemoteJobError(f"job {self.name} has no exit status to read ({status}): {err.strip()}")
        words = out.split()
        return int(words[0]), "timedout" in words[1:]

    def acknowledge(self) -> None:
        """Mark the result as handed to a task, so that the next call launches afresh."""
        try:
            self._with_reconnects("ack", lambda: self._exec(ACK_SH, self.dir))
        except RemoteJobError as exc:  # the result stays unreported: the next call reads it again
            self.log(f"[aifs] could not mark job {self.name} reported ({exc}); a later call reads its status again")

    def stop(self, grace: int = 60) -> None:
        self._with_reconnects("stop", lambda: self._exec(STOP_SH, self.dir, grace, timeout=grace + 30))

    # -- following ----------------------------------------------------------------------------

    def follow(self, deadline: float | None = None) -> int:
        """Stream the job's log to ``log`` (reconnecting as needed) until it ends; return its exit code."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        state = {"offset": 0, "pending": ""}

        def emit(data: bytes, final: bool = False) -> None:
            text = state["pending"] + decoder.decode(data, final=final)
            *lines, state["pending"] = text.split("\n")
            for line in lines:
                self.log(line.rstrip("\r"))
            if final and state["pending"]:
                self.log(state["pending"])
                state["pending"] = ""

        attempt = 0
        while True:
            try:
                outcome = self._follow_once(state, emit, deadline)
            except (MemberTimeout, _SessionDeadline):
                raise
            except _network_errors() as exc:
                attempt += 1
                self._reconnect(exc, attempt)
                continue
            attempt = 0
            if outcome == FOLLOW_ENDED:
                emit(b"", final=True)
                code, timedout = self._result()
                if timedout:
                    self.acknowledge()
                    raise self._timeout_error()
                return code
            if outcome == FOLLOW_LOST:
                emit(b"", final=True)
                raise JobLost(
                    f"job {self.name} ended without recording an exit status (host rebooted or runner killed); "
                    "a retry launches it again"
                )
            if outcome == FOLLOW_NO_JOB:
                raise JobLost(f"job {self.name} vanished from {self.jobs_dir} (host replaced?); a retry launches it again")
            raise RemoteJobError(f"following job {self.name} failed with status {outcome}")

    def _follow_once(self, state: dict, emit: Callable[[bytes], None], deadline: float | None) -> int:
        client = self._session()
        transport = client.get_transport()
        if transport is None or not transport.is_active():
            raise ConnectionError("SSH transport is not active")
        channel = transport.open_session(timeout=self.command_timeout)
        try:
            channel.settimeout(0.0)
            channel.exec_command(
                remote_command(FOLLOW_SH, [self.dir, state["offset"], self.poll_interval, self.heartbeat], sudo=self.sudo)
            )
            last_data = time.monotonic()
            while True:
                got = False
                if channel.recv_ready():
                    data = channel.recv(65536)
                    if data:
                        state["offset"] += len(data)
                        emit(data)
                        got = True
                if channel.recv_stderr_ready():
                    channel.recv_stderr(65536)  # heartbeat bytes
                    got = True
                now = time.monotonic()
                if got:
                    last_data = now
                    continue
                if channel.exit_status_ready() and not channel.recv_ready():
                    status = channel.recv_exit_status()
                    if status == -1:
                        raise ConnectionError("SSH session closed while following the job")
                    return status
                if not transport.is_active():
                    raise ConnectionError("SSH transport closed while following the job")
                if now - last_data > self.stall_timeout:
                    raise TimeoutError(f"no byte from the host for {self.stall_timeout:.0f} s")
                if deadline is not None and time.time() > deadline:
                    raise _SessionDeadline(f"job {self.name} exceeded its time limit")
                time.sleep(min(0.05, self.poll_interval))
        finally:
            try:
                channel.close()
            except Exception:  # noqa: BLE001
                pass

    # -- the whole thing ------------------------------------------------------------------------

    def run(self, script: str, args: Sequence[str] = (), who: str = "") -> int:
        """Launch the job (or attach to it, or read its finished status) and return its exit code.

        ``args`` are the worker arguments the job runs with: a job of this name recorded with other
        arguments is not adopted (JobMismatch). ``who`` (run and member) is shown to whoever waits for
        the GPU while this job holds it. Raises MemberTimeout when the host stopped the job at its
        deadline, GPUBusy when another job kept the GPU longer than ``gpu_wait``.
        """
        try:
            what, facts = self._ensure_gpu(script, args, who)
            if what == "finished":
                self.log(f"[aifs] job {self.name} finished while no session was attached; exit status {facts['exit_code']}")
                self._replay_log()
                if facts["timedout"]:
                    self.acknowledge()
                    raise self._timeout_error()
                code = int(facts["exit_code"])
            else:
                # the deadline is the job's own (written at its launch), so a re-attach does not restart it;
                # the host enforces it; this session gives up only if the host has not, well after it
                deadline = facts.get("deadline") or 0
                session_deadline = deadline + self.kill_after + 60 if deadline else None
                try:
                    code = self.follow(session_deadline)
                except MemberTimeout:
                    raise
                except _SessionDeadline:
                    self.log(f"[aifs] job {self.name} is still running past its deadline {_utc(deadline)}: stopping it")
                    self.stop()
                    self.acknowledge()
                    raise self._timeout_error() from None
            self.acknowledge()
            return code
        finally:
            self.close()

    def _ensure_gpu(self, script: str, args: Sequence[str], who: str) -> tuple[str, dict[str, Any]]:
        """``ensure`` until the job runs or has a result: wait (bounded) while another job holds the GPU."""
        waited_since = time.monotonic()
        last_said = None
        while True:
            what, facts = self.ensure(script, args, who)
            if what == "mismatch":
                raise JobMismatch(
                    f"job {self.name} on the host was started with other worker arguments ({describe_args_change(facts['args'], list(args))}); "
                    "not adopting it. It belongs to an earlier launch of this member with other settings: "
                    "stop it on the host (or wait for it to end), then clear this task"
                )
            if what != "busy":
                return what, facts
            waited = time.monotonic() - waited_since
            if waited >= self.gpu_wait:
                raise GPUBusy(
                    f"the host's GPU is held by another job ({facts['holder']}); waited {waited:.0f} s (gpu_wait "
                    f"{self.gpu_wait:.0f} s) without starting job {self.name}. Two runs (a trigger and a backfill?) "
                    "share this host: let the other finish, bound them with the pool (see the operator's guide), then clear this task"
                )
            if facts["holder"] != last_said or waited // 60 != (waited - self.gpu_poll) // 60:
                self.log(f"[aifs] the host's GPU is busy: held by {facts['holder']}; job {self.name} waits "
                         f"(up to {self.gpu_wait:.0f} s, {waited:.0f} s so far)")
                last_said = facts["holder"]
            time.sleep(min(self.gpu_poll, max(0.05, self.gpu_wait - waited)))

    def _timeout_error(self) -> "MemberTimeout":
        limit = f"{self.member_timeout:.0f} s" if self.member_timeout else "its limit"
        return MemberTimeout(
            f"job {self.name} exceeded member_timeout ({limit} from its launch) and was stopped on the host"
        )

    def _replay_log(self) -> None:
        """Show the output of a job that finished unattended (bounded, the task log stays readable)."""
        status, out, _ = self._with_reconnects(
            "replay", lambda: self._exec("tail -c 200000 \"$1/log\" 2>/dev/null", self.dir)
        )
        for line in out.splitlines():
            self.log(line)


class _SessionDeadline(Exception):
    """The session saw the job's deadline pass (well after the host should have stopped it)."""


def args_text(args: Sequence[str]) -> str:
    """The worker arguments as recorded in the job dir: one a line."""
    return "".join(f"{a}\n" for a in args)


def describe_args_change(recorded: Sequence[str], wanted: Sequence[str]) -> str:
    """``--bucket: host has a, this task b; ...`` for flags whose values differ (else both lists)."""
    def flags(args: Sequence[str]) -> dict[str, str]:
        out, key = {}, None
        for a in args:
            if a.startswith("--"):
                key = a
                out[key] = ""
            elif key is not None:
                out[key] = a if not out[key] else f"{out[key]} {a}"
        return out

    old, new = flags(recorded), flags(wanted)
    diffs = [f"{k}: host has {old.get(k, '(none)')!s}, this task {new.get(k, '(none)')!s}"
             for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return "; ".join(diffs) or f"host has {list(recorded)}, this task {list(wanted)}"


def _utc(epoch: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the session is gone", as opposed to a failure of the job or the host."""
    try:
        import paramiko
    except ImportError:  # pragma: no cover - paramiko ships with the ssh provider
        return (OSError, EOFError)
    return (OSError, EOFError, paramiko.SSHException)


# --------------------------------------------------------------------------------------------
# Readiness of a host.
# --------------------------------------------------------------------------------------------


def probe_host(job: RemoteJob, settings: dict[str, Any]) -> tuple[bool, str]:
    """One readiness probe: (ready?, what the host said). Raises HostNotReady for a failed bootstrap."""
    image = settings.get("image") if settings.get("launch") == "container" else ""
    status, out, err = job._exec(
        PROBE_SH,
        settings.get("ready_marker") or "",
        settings.get("failed_marker") or "",
        settings.get("gpu_check") or "",
        image or "",
        settings.get("docker") or "docker",
        timeout=60,
    )
    lines = out.strip().splitlines()
    if status != 0 or not lines:
        return False, f"probe failed with status {status}: {(out + err).strip()}"
    first = lines[0]
    if first.startswith("failed"):
        raise HostNotReady(f"host bootstrap failed: {first[len('failed'):].strip()}")
    if first.startswith(("waiting", "nogpu", "noimage")):
        return False, first
    return lines[-1] == "ok", "; ".join(lines)


def wait_until_ready(
    connect: Callable[[], Any], settings: dict[str, Any], log: LogSink, what: str, timeout: float | None = None
) -> str:
    """Poll until SSH answers, the bootstrap marker is there, the GPU answers and the image is present."""
    timeout = settings["ready_timeout"] if timeout is None else timeout
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    interval = min(10.0, max(0.2, timeout / 60))
    while True:
        probe = RemoteJob(connect, settings["jobs_dir"], "probe", log, sudo=settings["sudo"],
                          reconnect_attempts=0, command_timeout=60)
        try:
            ready, said = probe_host(probe, settings)
            if ready:
                log(f"[aifs] {what} is ready: {said}")
                return said
            last = said
        except HostNotReady:
            raise
        except Exception as exc:  # noqa: BLE001 - SSH not up yet, auth not propagated, ...: keep polling
            last = f"{type(exc).__name__}: {exc}"
        finally:
            probe.close()
        if time.monotonic() + interval > deadline:
            raise HostNotReady(f"{what} was not ready after {timeout:.0f} s; last answer: {last}")
        log(f"[aifs] waiting for {what}: {last}")
        time.sleep(interval)
