"""AIFS-ENS ensemble forecast: one date, members one at a time on a GPU host, verified.

    check_params -> wait_for_inputs -> plan -> create_host -> run_member x N -> delete_host -> verify
                                                 (setup)     (one at a time)   (teardown)

* **check_params** fails the run before any host exists when a param is wrong, saying why.
* **wait_for_inputs** waits (deferred, off any worker slot) for the members' input pickles.
* **plan** picks the members without a completion manifest: finished members never run twice,
  so rerunning a whole date only costs what is missing.
* **create_host** makes the GPU host (backend param: local, ssh, gce, gke). Skipped when nothing
  is planned. If it fails half-way it deletes what it made, since Airflow skips the teardown then.
* **run_member** runs ``python -m aifs.worker`` for one member on that host, streaming its log.
  Mapped over the planned members, one at a time; the worker's exit code decides between
  retrying (transient) and failing at once (bad input, full disk, unloadable checkpoint).
* **delete_host** removes the host, also when members failed or the run was marked failed.
* **verify** reads the bucket back: each member's manifest and every object's crc32c. It logs the
  run summary, fails listing what is missing and how to rerun it, and on success emits the
  ``aifs_ens_forecasts`` asset (extra: bucket, date, prefix) for downstream DAGs.

Clearing one ``run_member`` index reruns that member alone, with its own setup and teardown.
Failures alert through the ``aifs_alerts`` connection or Variable (see aifs.orchestration.alerts).
Deployment settings (schedule, cycle hour, retries) come from AIFS_ENS_* environment variables
(see aifs.orchestration.deployment). This file imports neither torch nor anemoi.
"""

from __future__ import annotations

import logging
import time

from airflow.sdk import Asset, Param, TriggerRule, dag, get_current_context, setup, task, teardown
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

from aifs.members import format_members, member_label
from aifs.orchestration.alerts import FINDINGS_KEY, run_failure_alert, task_failure_alert
from aifs.orchestration.deployment import DeploymentSettings
from aifs.orchestration.params import DAG_ID, BadParams, param_specs, resolve_run_config, with_defaults
from aifs.orchestration.sensors import WaitForInputsSensor

log = logging.getLogger(__name__)
worker_log = logging.getLogger("aifs.worker")

DEPLOYMENT = DeploymentSettings.from_env()

#: Emitted once a date's members all verify; its event's extra says where they are.
FORECASTS = Asset(name="aifs_ens_forecasts", uri="aifs://aifs-ens/forecasts")


class MemberFailed(AirflowException):
    """A member failed in a way a retry may fix; Airflow retries it with backoff."""


def _run_info(config: dict):
    from aifs.orchestration.backends.base import RunInfo

    return RunInfo(dag_id=config["dag_id"], run_id=config["run_id"], date=config["date"])


def _backend(config: dict):
    from aifs.orchestration.backends.base import get_backend

    return get_backend(config["backend"], config["host"])


@dag(
    dag_id=DAG_ID,
    schedule=DEPLOYMENT.schedule,
    start_date=DEPLOYMENT.start_date,
    catchup=DEPLOYMENT.catchup,
    max_active_runs=DEPLOYMENT.max_active_runs,
    params={name: Param(**spec) for name, spec in with_defaults(param_specs(), DEPLOYMENT.param_defaults).items()},
    default_args={"retries": 0, "on_failure_callback": task_failure_alert},
    on_failure_callback=run_failure_alert,
    doc_md=__doc__,
    tags=["aifs", "forecast"],
)
def aifs_ens_forecast():
    @task
    def check_params() -> dict:
        context = get_current_context()
        dag_run = context["dag_run"]
        try:
            config = resolve_run_config(
                dict(context["params"]),
                dag_id=dag_run.dag_id,
                run_id=dag_run.run_id,
                logical_date=dag_run.logical_date,
                run_after=dag_run.run_after,
            )
        except BadParams as exc:
            raise AirflowFailException(f"{exc}\nNo host was created. Fix the params and trigger the run again.") from None
        if DEPLOYMENT.parallel_members > 1 and config["backend"] != "gke":
            raise AirflowFailException(
                f"AIFS_ENS_PARALLEL_MEMBERS={DEPLOYMENT.parallel_members} needs the gke backend (one GPU pod per member); "
                f"a {config['backend']} host has one GPU, so its members must run one at a time. No host was created."
            )
        log.info("forecast date %s, members %s, backend %s, bucket %s", config["date"], config["members_text"], config["backend"], config["bucket"])
        return config

    @task
    def plan(config: dict) -> list[int]:
        from aifs.orchestration.plan import finished_members, members_to_run
        from aifs.orchestration.storage import storage_client

        finished = finished_members(storage_client(config["gcp_conn_id"]), config["bucket"], config["date"], config["members"])
        todo = members_to_run(config["members"], finished)
        log.info(
            "members to run: %s; already finished (manifest present, skipped): %s",
            format_members(todo) or "none",
            format_members(finished) or "none",
        )
        return todo

    @setup
    @task(retries=DEPLOYMENT.host_retries, retry_delay=DEPLOYMENT.retry_delay, retry_exponential_backoff=True)
    def create_host(config: dict, planned: list[int]) -> dict:
        if not planned:
            raise AirflowSkipException("every selected member is finished: no host needed")
        backend, run = _backend(config), _run_info(config)
        try:
            return backend.create_host(run, log.info)
        except BaseException:
            # Airflow skips a teardown whose setup failed, so a half-made host is ours to remove.
            log.exception("creating the host failed; deleting whatever was made")
            try:
                backend.delete_host(run, log.info)
            except Exception:
                log.exception("deleting the half-made host failed too; check the backend's console")
            raise

    @task(
        max_active_tis_per_dagrun=DEPLOYMENT.parallel_members,  # 1: one GPU host, one member at a time
        retries=DEPLOYMENT.member_retries,
        retry_delay=DEPLOYMENT.retry_delay,
        retry_exponential_backoff=True,
        execution_timeout=DEPLOYMENT.member_timeout,
        map_index_template="{{ 'member %03d' % task.op_kwargs['member'] }}",
    )
    def run_member(config: dict, member: int) -> dict:
        from aifs.orchestration.outcomes import classify
        from aifs.orchestration.params import worker_settings_from_config
        from aifs.orchestration.summary import OUTCOME_KEY, outcome_record

        ti = get_current_context()["ti"]
        started = time.monotonic()
        log.info("%s of %s on backend %s, try %s", member_label(member), config["date"], config["backend"], ti.try_number)
        try:
            exit_code = _backend(config).run_member(_run_info(config), member, worker_settings_from_config(config), worker_log.info)
        except Exception:
            # the backend itself failed (host unreachable...): worth a retry
            ti.xcom_push(key=OUTCOME_KEY, value=outcome_record(member, -1, "BACKEND_ERROR", time.monotonic() - started, ti.try_number))
            raise
        outcome = classify(member, exit_code)
        record = outcome_record(member, exit_code, outcome.name, time.monotonic() - started, ti.try_number)
        ti.xcom_push(key=OUTCOME_KEY, value=record)
        if outcome.ok:
            log.info("%s done in %.1f minutes", member_label(member), record["minutes"])
            return record
        if outcome.retryable:
            raise MemberFailed(outcome.message)
        raise AirflowFailException(outcome.message)

    @teardown
    @task
    def delete_host(config: dict, host: dict) -> dict:
        _backend(config).delete_host(_run_info(config), log.info)
        return {"deleted": True}

    @task(trigger_rule=TriggerRule.ALL_DONE, outlets=[FORECASTS], on_failure_callback=None)  # the run alert covers it
    def verify() -> dict:
        from aifs.orchestration.outcomes import rerun_instructions
        from aifs.orchestration.storage import storage_client
        from aifs.orchestration.summary import OUTCOME_KEY, format_summary, member_states, normalise_outcomes
        from aifs.orchestration.verify import verify_members

        context = get_current_context()
        ti = context["ti"]
        config = ti.xcom_pull(task_ids="check_params")
        if not config:
            raise AirflowFailException("the run's params were not accepted (see check_params): nothing ran, nothing to verify")
        planned = ti.xcom_pull(task_ids="plan")
        outcomes = normalise_outcomes(ti.xcom_pull(task_ids="run_member", key=OUTCOME_KEY))

        host_left = ti.xcom_pull(task_ids="create_host") is not None and ti.xcom_pull(task_ids="delete_host") is None
        report = verify_members(storage_client(config["gcp_conn_id"]), config["bucket"], config["date"], config["members"])
        rows = member_states(config["members"], planned, outcomes, set(report.bad_members))
        log.info("\n%s", format_summary(config["date"], config["bucket"], rows))

        if host_left:
            # a teardown's failure does not fail the run by itself; a host left running costs money
            raise AirflowFailException(
                f"delete_host did not finish: the {config['backend']} host of this run may still exist; "
                "check delete_host's log, remove the host by hand or clear delete_host"
            )
        if not report.ok:
            bad = report.bad_members
            failed = [(m, planned.index(m) if planned and m in planned else None) for m in bad]
            findings = (
                f"{len(bad)} of {len(config['members'])} members are not complete in gs://{config['bucket']}/{config['date']}/: "
                f"{format_members(bad)}\n{report.describe_problems()}\n"
                f"{rerun_instructions(config['dag_id'], config['run_id'], config['date'], failed)}"
            )
            ti.xcom_push(key=FINDINGS_KEY, value=findings)  # for the run-failure alert
            raise AirflowFailException(findings)
        extra = {
            "bucket": config["bucket"],
            "date": config["date"],
            "prefix": f"gs://{config['bucket']}/{config['date']}/forecasts/",
            "members": config["members_text"],
            "objects": len(report.objects),
        }
        context["outlet_events"][FORECASTS].extra = extra
        log.info("all %d members verified (%d objects); asset event %s", len(config["members"]), len(report.objects), extra)
        return extra

    config = check_params()
    wait_for_inputs = WaitForInputsSensor(task_id="wait_for_inputs", config=config)
    planned = plan(config)
    host = create_host(config, planned)
    members = run_member.partial(config=config).expand(member=planned)
    removed = delete_host(config, host)

    wait_for_inputs >> planned
    host >> members >> removed
    removed.as_teardown(setups=host)
    removed >> verify()


aifs_ens_forecast()
