"""CPU steps: another program of the worker image (``python -m aifs.inputs``, ``python -m aifs.products``)
run as a CPU job through the deployment's backend, as one Airflow operator.

The worker image holds the heavy stack (eccodes, MIR, torch); Composer's environment does not. So a
step that needs it runs where members run, through the same backend mechanism, but on CPUs:

==========  ===================================================================================
backend     where a step runs
==========  ===================================================================================
local       a subprocess of the worker Python (``host.worker_python``, else ``$AIFS_WORKER_PYTHON``)
ssh         a detached job on the configured host: ``docker run`` without ``--gpus`` (or its python)
gce         a CPU VM of its own (``step_machine_type``), made and deleted around the step: never the
            GPU VM, which would bill a GPU for it (aifs.orchestration.backends.gce)
gke         a pod without GPU request, toleration or accelerator selector (a CPU node)
==========  ===================================================================================

On every backend a step never takes the GPU lock (members are not held up by it, nor it by them),
its log streams into the task log, its exit code is mapped through aifs.exitcodes (a retryable code
raises StepFailed, which Airflow retries; any other fails the task at once) and killing the task
(timeout, mark failed, clear) stops the job (``on_kill``).

Secrets: ``secret_env`` maps an environment variable of the step to where its value is, read when
the task runs (``env:NAME``: the deployment's environment; ``var:NAME``: an Airflow Variable). The
values are masked in task logs and reach only the job's environment: never the operator's
arguments, rendered fields, XCom or the logged command line.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import time
from typing import Any, Callable, Sequence

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from aifs.orchestration.backends.base import ENV_NAME_PATTERN, check_step

log = logging.getLogger(__name__)
step_log = logging.getLogger("aifs.step")

#: A step task's execution_timeout is its job's deadline plus this: the host's clock decides, Airflow is the backstop.
STEP_TIMEOUT_MARGIN = dt.timedelta(minutes=15)
#: Where a secret's value may come from: the deployment's own environment, or an Airflow Variable.
SECRET_SOURCE_PATTERN = r"^(env|var):[A-Za-z_][A-Za-z0-9_.-]*$"


class StepFailed(AirflowException):
    """A step failed in a way a retry may fix (its exit code says so); Airflow retries it."""


def check_secret_env(secret_env: dict[str, str]) -> dict[str, str]:
    """``{ENV_NAME: "env:VAR" | "var:NAME"}``, checked when the DAG is parsed (names only, no values)."""
    bad = [f"{k}={v!r}" for k, v in secret_env.items()
           if not re.fullmatch(ENV_NAME_PATTERN, str(k)) or not re.fullmatch(SECRET_SOURCE_PATTERN, str(v))]
    if bad:
        raise ValueError(f"secret_env entries must be NAME: 'env:VARIABLE' or 'var:AIRFLOW_VARIABLE': {', '.join(bad)}")
    return dict(secret_env)


def resolve_secret_env(secret_env: dict[str, str]) -> dict[str, str]:
    """The secrets' values, read now (in the task) and masked in every log from here on."""
    from airflow.sdk.log import mask_secret

    values, missing = {}, []
    for name, source in secret_env.items():
        kind, key = source.split(":", 1)
        if kind == "env":
            value = os.environ.get(key)
        else:
            from airflow.sdk import Variable

            value = Variable.get(key, default=None)
        if value is None or value == "":
            missing.append(f"{name} (from {source})")
            continue
        mask_secret(value, name)
        values[name] = str(value)
    if missing:
        raise AirflowFailException(f"the step's secrets are not set: {', '.join(missing)}; an admin sets them")
    return values


def classify_step(step: str, exit_code: int, said: Sequence[str] = ()) -> tuple[bool, str]:
    """(retryable, message) for a failed step's exit code, from aifs.exitcodes, with what a person should do
    (aifs.orchestration.outcomes) and ``said``: the step's own error lines (which name the member, file, variable)."""
    from aifs.exitcodes import ExitCode, describe
    from aifs.orchestration.outcomes import what_to_do

    its_words = "".join(f"\n  {line}" for line in said)
    try:
        code = ExitCode(exit_code)
    except ValueError:  # a crash or a signal: worth another try
        return True, f"step {step} failed: {describe(exit_code)}; will retry{its_words}"
    advice = what_to_do(code)
    if code.retryable:
        unless = f" (if it keeps failing: {advice})" if advice else ""
        return True, f"step {step} failed: {code.describe} (exit {exit_code}, {code.name}); will retry{unless}{its_words}"
    return False, (f"step {step} failed: {code.describe} (exit {exit_code}, {code.name}); not retried: "
                   f"{advice or 'fix the cause'}, then clear this task{its_words}")


#: A step's output line that reports an error (the aifs commands log ``... ERROR [FAILED] member 002: ...``).
_ERROR_LINE = re.compile(r"\b(ERROR|CRITICAL)\b")
#: How many of a step's last error lines its failure message quotes.
ERROR_LINES_KEPT = 5
#: ... and of each line, at most this much (an alert is no place for a whole listing).
ERROR_LINE_CHARS = 2000


class _ErrorLines:
    """Passes a step's output lines on to its log and keeps the last few error lines for the failure message."""

    def __init__(self, log: Callable[[str], None]):
        self._log = log
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self._log(line)
        if _ERROR_LINE.search(line):
            from airflow.sdk.log import redact

            # the message goes into alerts too, which Airflow's log masking does not cover: mask the step's secrets here
            self.lines = [*self.lines, str(redact(line.strip()[:ERROR_LINE_CHARS]))][-ERROR_LINES_KEPT:]


def deployment_backend(config: dict[str, Any]):
    """The deployment's backend, built when the task runs (its settings never travel in XCom or arguments)."""
    from aifs.orchestration.deployment import DeploymentSettings

    deployment = DeploymentSettings.from_env()
    if config.get("backend") != deployment.backend:
        raise AirflowFailException(
            f"this run was checked for the {config.get('backend')} backend, but the deployment now says "
            f"AIFS_ENS_BACKEND={deployment.backend}: trigger a new run"
        )
    return deployment.get_backend()


class RunStepOperator(BaseOperator):
    """Run ``python -m <module> <arguments>`` of the worker image as a CPU job on the deployment's backend.

    ``config``: the run's config (XCom of its check task): ``dag_id``, ``run_id``, ``date`` name the
    job, ``backend`` must still be the deployment's. ``arguments``: the module's flags, a list or a
    function of ``config`` returning one. ``secret_env``: see the module docstring. ``step_timeout``:
    the job's deadline from its launch, enforced where it runs (execution_timeout should be longer).
    Returns (XCom) ``{"step", "exit_code", "minutes"}``.
    """

    template_fields = ("config",)
    ui_color = "#dae8fc"

    def __init__(
        self,
        *,
        step: str,
        module: str,
        config: Any,
        arguments: Sequence[str] | Callable[[dict], Sequence[str]] = (),
        secret_env: dict[str, str] | None = None,
        step_timeout: dt.timedelta | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_step(step, module)
        self.step = step
        self.module = module
        self.config = config
        self.arguments = arguments
        self.secret_env = check_secret_env(dict(secret_env or {}))
        self.step_timeout = step_timeout
        self._running: tuple[Any, Any] | None = None

    def make_backend(self, config: dict):
        return deployment_backend(config)

    def step_arguments(self, config: dict) -> list[str]:
        args = self.arguments(config) if callable(self.arguments) else self.arguments
        return [str(a) for a in args]

    def execute(self, context):
        from aifs.orchestration.backends.base import MemberTimeout, RunInfo, StepTimeout

        config = self.config
        run = RunInfo(dag_id=config["dag_id"], run_id=config["run_id"], date=config["date"])
        backend = self.make_backend(config)
        args = self.step_arguments(config)
        env = resolve_secret_env(self.secret_env)
        timeout_s = self.step_timeout.total_seconds() if self.step_timeout else None
        log.info("step %s (python -m %s) of %s on backend %s (CPU, no GPU lock)%s", self.step, self.module, config["date"],
                 backend.name, f"; deadline {timeout_s / 60:.0f} min from launch" if timeout_s else "")
        self._running = (backend, run)
        started = time.monotonic()
        output = _ErrorLines(step_log.info)
        try:
            code = backend.run_step(run, self.step, self.module, args, env, output, timeout_s=timeout_s)
        except (StepTimeout, MemberTimeout) as exc:  # the host stopped it at its deadline: a retry starts afresh
            raise StepFailed(f"step {self.step}: {exc}") from None
        finally:
            self._running = None
        minutes = (time.monotonic() - started) / 60
        if code == 0:
            log.info("step %s done in %.1f minutes", self.step, minutes)
            return {"step": self.step, "exit_code": 0, "minutes": round(minutes, 2)}
        retryable, message = classify_step(self.step, code, output.lines)
        if retryable:
            raise StepFailed(message)
        raise AirflowFailException(message)

    def on_kill(self) -> None:
        """Airflow is killing the task: its job (process, container, pod, VM) must not run on."""
        if self._running is None:
            return
        backend, run = self._running
        log.warning("task killed: stopping step %s on the %s backend", self.step, backend.name)
        try:
            backend.stop_step(run, self.step, log.warning)
        except Exception:  # noqa: BLE001 - the job's own deadline still stops it
            log.exception("stopping the step failed; its deadline stops it")
