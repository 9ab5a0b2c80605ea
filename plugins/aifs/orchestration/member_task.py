"""The ``run_member`` task: one member on the run's GPU host, as an operator that can be killed.

A ``@task`` has no ``on_kill``: when Airflow kills it (execution_timeout, "mark failed", a clear,
a scheduler shutdown) its remote job or pod would keep the GPU and the next member would join it.
So ``run_member`` is an operator whose ``on_kill`` reaches the backend's ``stop_member``, mapped
with ``.partial().expand(member=...)``; on ``gke`` it is the provider's own pod operator
(GKEStartPodOperator), so killing and re-attaching a pod behave as the provider defines them.

Both share what happens around the worker (``MemberTaskMixin``):

* a member whose run already saw the checkpoint fail to load (exit 15) does not start a container:
  the one that saw it records it (XCom ``checkpoint_failed``), the others skip at once saying so,
  so the run fails once, with one task alert, instead of once per remaining member;
* the worker's exit code is mapped by aifs.orchestration.outcomes (retry or fail at once) and
  recorded for the run summary (XCom ``outcome``, one per try).

The host's deadline for a member (the deployment's AIFS_ENS_MEMBER_TIMEOUT_MIN from the job's
launch) is enforced on the host; the task's own ``execution_timeout`` (``task_timeout``) is a little
longer, for the bounded wait for the GPU and the stop, so that the host's clock decides.

The DAG file subclasses these operators to bind its ``_backend(config)`` and ``_run_info(config)``.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import time
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

from aifs.exitcodes import ExitCode
from aifs.members import member_label

log = logging.getLogger(__name__)
worker_log = logging.getLogger("aifs.worker")

TASK_ID = "run_member"
#: XCom a member pushes when the checkpoint could not be loaded (exit 15): the run's other members stop.
CHECKPOINT_FAILED_KEY = "checkpoint_failed"
#: Airflow's limit on top of the member's own deadline and the host's GPU wait: connecting and
#: stopping the job (up to 90 s) happen inside the task but outside the job's deadline.
TASK_TIMEOUT_MARGIN = dt.timedelta(minutes=5)


class MemberFailed(AirflowException):
    """A member failed in a way a retry may fix; Airflow retries it with backoff."""


def task_timeout(member_timeout: dt.timedelta, gpu_wait_s: float = 0) -> dt.timedelta:
    """``execution_timeout`` of run_member: the job's own deadline, plus the longest wait for the GPU.

    Always later than the host's own deadline, so the host's clock decides when a member stops;
    Airflow's limit (and the on_kill it brings) is the backstop for a host that cannot.
    """
    return member_timeout + dt.timedelta(seconds=gpu_wait_s) + TASK_TIMEOUT_MARGIN


def checkpoint_failure(ti: Any) -> dict[str, Any] | None:
    """The record of a member of this run that could not load the checkpoint, if any."""
    pulled = ti.xcom_pull(task_ids=TASK_ID, key=CHECKPOINT_FAILED_KEY)
    records = [pulled] if isinstance(pulled, dict) else list(pulled or [])
    return next((r for r in records if isinstance(r, dict)), None)


class MemberTaskMixin:
    """``execute`` of the member operators; subclasses define ``launch(context, config, member) -> exit code``."""

    config: dict
    member: int

    def make_run(self, config: dict):
        from aifs.orchestration.backends.base import RunInfo

        return RunInfo(dag_id=config["dag_id"], run_id=config["run_id"], date=config["date"])

    def make_backend(self, config: dict | None = None):
        raise NotImplementedError("the DAG binds its backend (see dags/aifs_ens_forecast.py)")

    def launch(self, context: dict, config: dict, member: int) -> int:
        raise NotImplementedError

    def execute(self, context):
        from aifs.orchestration.outcomes import classify
        from aifs.orchestration.summary import OUTCOME_KEY, outcome_record

        ti = context["ti"]
        config, member = self.config, int(self.member)
        failed = checkpoint_failure(ti)
        if failed:
            # not a second failure (and alert) per member: the run's one failure is the member that saw it
            raise AirflowSkipException(
                f"not started: {member_label(failed['member'])} of this run (run_member [{failed['map_index']}]) "
                f"could not load the checkpoint {failed['checkpoint']!r} (exit 15), and every member needs it. "
                "Fix the checkpoint, then clear run_member of this run (all indexes)"
            )
        log.info("%s of %s on backend %s, try %s", member_label(member), config["date"], config["backend"], ti.try_number)
        started = time.monotonic()
        try:
            exit_code = self.launch(context, config, member)
        except Exception as exc:
            from aifs.orchestration.backends.base import MemberTimeout

            name = "TIMEOUT" if isinstance(exc, MemberTimeout) else "BACKEND_ERROR"
            # the backend failed (host unreachable, GPU busy) or the host stopped the job at its deadline
            ti.xcom_push(key=OUTCOME_KEY, value=outcome_record(member, -1, name, time.monotonic() - started, ti.try_number))
            raise
        outcome = classify(member, exit_code)
        record = outcome_record(member, exit_code, outcome.name, time.monotonic() - started, ti.try_number)
        ti.xcom_push(key=OUTCOME_KEY, value=record)
        if outcome.ok:
            log.info("%s done in %.1f minutes", member_label(member), record["minutes"])
            return record
        if exit_code == ExitCode.CHECKPOINT_FAILED:
            ti.xcom_push(key=CHECKPOINT_FAILED_KEY, value={
                "member": member, "map_index": ti.map_index, "checkpoint": config.get("checkpoint"), "run_id": config["run_id"],
            })
            raise AirflowFailException(
                f"{outcome.message}. The run's remaining members will not start (they need the same checkpoint)."
            )
        if outcome.retryable:
            raise MemberFailed(outcome.message)
        raise AirflowFailException(outcome.message)


class RunMemberOperator(MemberTaskMixin, BaseOperator):
    """One member on the local, ssh or gce backend; ``on_kill`` stops its job on the host."""

    template_fields = ("config", "member")
    ui_color = "#d5e8d4"

    def __init__(self, *, config: Any, member: Any, member_timeout_s: float | None = None, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.member = member
        self.member_timeout_s = member_timeout_s
        self._running: tuple[Any, Any, int] | None = None

    def launch(self, context: dict, config: dict, member: int) -> int:
        from aifs.orchestration.params import worker_settings_from_config

        backend, run = self.make_backend(config), self.make_run(config)
        self._running = (backend, run, member)
        return backend.run_member(run, member, worker_settings_from_config(config), worker_log.info,
                                  timeout_s=self.member_timeout_s)

    def on_kill(self) -> None:
        """Airflow is killing the task: its job must not keep the GPU (the next member would join it)."""
        if self._running is None:
            return
        backend, run, member = self._running
        log.warning("task killed: stopping %s's job on the %s host", member_label(member), backend.name)
        try:
            backend.stop_member(run, member, log.warning)
        except Exception:  # noqa: BLE001 - the host's own deadline still stops it
            log.exception("stopping the job failed; the host stops it at its deadline")


@functools.lru_cache(maxsize=1)
def gke_run_member_operator_class():
    """The gke member task: the provider's GKEStartPodOperator (its on_kill, its re-attach) around our execute."""
    from aifs.orchestration.backends.gke import member_pod_operator_class

    pod_operator = member_pod_operator_class()

    class GKERunMemberOperator(MemberTaskMixin, pod_operator):
        template_fields = (*pod_operator.template_fields, "config", "member")

        def __init__(self, *, config: Any, member: Any, member_timeout_s: float | None = None, **kwargs):
            static = self.make_backend().pod_kwargs(member_timeout_s)
            super().__init__(**{**static, **kwargs})
            self.config = config
            self.member = member

        def launch(self, context: dict, config: dict, member: int) -> int:
            from aifs.orchestration.params import worker_settings_from_config

            backend, run = self.make_backend(config), self.make_run(config)
            for name, value in backend.member_pod_fields(run, member, worker_settings_from_config(config)).items():
                setattr(self, name, value)
            log.info("starting pod %s-* on %s", self.name, backend.settings["cluster_name"])
            pod_operator.execute(self, context)
            code = 0 if self.aifs_exit_code is None else self.aifs_exit_code
            log.info("%s pod finished with exit code %s", member_label(member), code)
            return code

    return GKERunMemberOperator
