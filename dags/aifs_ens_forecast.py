"""AIFS-ENS ensemble forecast: one date, members one at a time on a GPU host, verified.

    check_params -> plan -> wait_for_inputs    -> create_host -> run_member x N -> delete_host -> verify
                         -> choose_environment     (setup)     (one at a time)   (teardown)
                 -> other_dates -> forecast_other_dates x K   (inputs events for other dates: a run each)

* **check_params** fails the run before any host exists when a param is wrong or the conf names
  a deployment setting (backend, host settings, connections: an admin's, not a trigger's), saying why.
  A run started by aifs_ens_inputs events (AIFS_ENS_FORECAST_TRIGGER inputs, inputs_or_time) forecasts
  the latest event's date, members, bucket and checkpoint (aifs.orchestration.inputs_asset).
* **other_dates**, **forecast_other_dates**: Airflow makes one run from all the inputs events queued
  since the last (a backfilled or cleared aifs_ens_inputs, or a forecast that overran): every other
  distinct (date, bucket, members, checkpoint) among them gets a forecast run of its own, triggered
  here with those params as its conf (its check_params checks them). Skipped when there are none;
  off the host's path (nothing waits for it), and a failure alerts and fails the run, not its members.
* **wait_for_inputs** waits (deferred, off any worker slot) for the planned members' input pickles
  only: a finished date whose inputs are gone reruns to its verify at once.
* **plan** picks the members not complete for this run (aifs.completeness: a manifest matching the
  run's lead time, checkpoint and windows, every object verifying): complete members never run
  twice, so rerunning a whole date only costs what is missing, and a member left by another run
  (a smoke test's shorter lead time) or with a damaged object is redone.
* **choose_environment** reads the run's checkpoint's own metadata (only its small JSON entry, from
  a file, gs:// or Hugging Face) and picks the worker environment that loads it (aifs.generations:
  v1 = AIFS-ENS 1.0, v2 = AIFS-ENS 2.0): the image (ssh/gce/gke ``images``) or worker Python (local).
  A checkpoint no environment loads, or one it cannot read, fails the run here, before any host.
* **create_host** makes the GPU host (AIFS_ENS_BACKEND: local, ssh, gce, gke). Skipped when nothing
  is planned. A failed try leaves what it made for the next try to adopt (creation is idempotent
  by name); the last try deletes it, since Airflow skips the teardown when its setup failed.
* **run_member** runs ``python -m aifs.worker`` for one member on that host, streaming its log.
  Mapped over the planned members, one at a time; the worker's exit code decides between
  retrying (transient) and failing at once (bad input, full disk, unloadable checkpoint: then
  the run's other members do not start). An operator, so that killing it (timeout, mark failed,
  clear) stops its job or pod; the job's own deadline (AIFS_ENS_MEMBER_TIMEOUT_MIN from its
  launch) is enforced on the host, and no job starts while another of any run holds the GPU.
* **delete_host** removes the host, also when members failed or the run was marked failed; it
  retries with backoff, and a host already gone is success. The summary names a host left behind.
* **verify** reads the bucket back with plan's definition of complete: each member's manifest
  against the run, each window's message count, every object's crc32c. It logs the
  run summary, fails listing what is missing and how to rerun it, and on success emits the
  ``aifs_ens_forecasts`` asset (extra: bucket, date, prefix) for downstream DAGs.

Clearing one ``run_member`` index reruns that member alone, with its own setup and teardown.
Failures alert through the ``aifs_alerts`` connection or Variable (see aifs.orchestration.alerts).
Deployment settings (schedule, cycle hour, retries, backend and host, allowed buckets and
checkpoints) come from AIFS_ENS_* environment variables (see aifs.orchestration.deployment). This file imports neither torch nor anemoi.
"""

from __future__ import annotations

import logging

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Param, TriggerRule, dag, get_current_context, setup, task, teardown
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from aifs.members import format_members, member_label
from aifs.orchestration.alerts import FINDINGS_KEY, run_failure_alert, task_failure_alert
from aifs.orchestration.assets import FORECASTS  # emitted by verify: where the forecasts are (consumers: aifs_ens_products)
from aifs.orchestration.deployment import DeploymentSettings
from aifs.orchestration.inputs_asset import BadInputsEvent, forecast_schedule, inputs_event_params, other_date_runs
from aifs.orchestration.member_task import MemberFailed, task_timeout  # noqa: F401 - MemberFailed: tests and alerts name it
from aifs.orchestration.params import DAG_ID, BadParams, resolve_run_config
from aifs.orchestration.retrying import DELETE_HOST_RETRIES, STORAGE_TASK_RETRIES
from aifs.orchestration.sensors import WaitForInputsSensor

log = logging.getLogger(__name__)

DEPLOYMENT = DeploymentSettings.from_env()



def _run_info(config: dict):
    from aifs.orchestration.backends.base import RunInfo

    # generation: set by choose_environment (absent in runs checked before it existed: the deployment's one image)
    return RunInfo(dag_id=config["dag_id"], run_id=config["run_id"], date=config["date"], generation=config.get("generation"))


def _backend(config: dict):
    """The deployment's backend, built when a task runs: its settings never travel in XCom or task arguments."""
    if config["backend"] != DEPLOYMENT.backend:
        raise AirflowFailException(
            f"this run was checked for the {config['backend']} backend, but the deployment now says "
            f"AIFS_ENS_BACKEND={DEPLOYMENT.backend}: trigger a new run"
        )
    return DEPLOYMENT.get_backend()


def _member_operator():
    """run_member's operator for the deployment's backend: on_kill stops the member's job or pod.

    On gke it is the provider's pod operator (its kill and re-attach); elsewhere our operator,
    whose on_kill reaches the backend's stop_member. Both take the backend from _backend(config).
    """
    if DEPLOYMENT.backend == "gke":
        from aifs.orchestration.member_task import gke_run_member_operator_class

        base = gke_run_member_operator_class()
    else:
        from aifs.orchestration.member_task import RunMemberOperator as base

    class RunMember(base):
        def make_backend(self, config=None):
            return DEPLOYMENT.get_backend() if config is None else _backend(config)

        def make_run(self, config):
            return _run_info(config)

    return RunMember


@dag(
    dag_id=DAG_ID,
    # AIFS_ENS_FORECAST_TRIGGER: the cron (time), each aifs_ens_inputs asset event (inputs), or either
    schedule=forecast_schedule(DEPLOYMENT.forecast_trigger, DEPLOYMENT.schedule),
    start_date=DEPLOYMENT.start_date,
    catchup=DEPLOYMENT.catchup,
    max_active_runs=DEPLOYMENT.max_active_runs,
    params={name: Param(**spec) for name, spec in DEPLOYMENT.param_specs.items()},
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
                # a run started by an aifs_ens_inputs event forecasts that event's date (members, bucket, checkpoint)
                {**dict(context["params"]), **inputs_event_params(context)},
                deployment=DEPLOYMENT,
                dag_id=dag_run.dag_id,
                run_id=dag_run.run_id,
                logical_date=dag_run.logical_date,
                run_after=dag_run.run_after,
            )
        except (BadParams, BadInputsEvent) as exc:
            raise AirflowFailException(f"{exc}\nNo host was created. Fix the params and trigger the run again.") from None
        log.info("forecast date %s, members %s, backend %s, bucket %s", config["date"], config["members_text"], config["backend"], config["bucket"])
        return config

    # a bucket hiccup that outlasts the storage layer's own retries is retried by the task
    @task(retries=STORAGE_TASK_RETRIES, retry_delay=DEPLOYMENT.retry_delay, retry_exponential_backoff=True)
    def plan(config: dict) -> list[int]:
        from aifs.orchestration.plan import plan_members, run_spec
        from aifs.orchestration.storage import storage_client

        found = plan_members(storage_client(config["gcp_conn_id"]), config["bucket"], run_spec(config), config["members"])
        for state in found.redo:  # the worker withdraws these manifests before redoing the member
            log.info("%s will be redone: %s", member_label(state.member), "; ".join(state.problems))
        log.info(
            "members to run: %s; already complete for this run (skipped): %s",
            format_members(found.todo) or "none",
            format_members(found.finished) or "none",
        )
        return found.todo

    # reads the checkpoint's metadata (a file here, gs:// or Hugging Face): a network hiccup retries
    @task(retries=STORAGE_TASK_RETRIES, retry_delay=DEPLOYMENT.retry_delay, retry_exponential_backoff=True)
    def choose_environment(config: dict, planned: list[int]) -> dict:
        """The run's config plus ``generation``: which image or worker Python loads its checkpoint."""
        if not planned:
            raise AirflowSkipException("every selected member is finished: no worker environment needed")
        from aifs.generations import UnsupportedCheckpoint
        from aifs.orchestration.backends.base import NoEnvironment
        from aifs.orchestration.checkpoints import CheckpointUnreadable, GenerationMismatch, choose_generation

        checkpoint = config["worker"]["checkpoint"]
        try:
            generation = choose_generation(
                checkpoint,
                backend=config["backend"],
                declared=DEPLOYMENT.checkpoint_generations.get(checkpoint),
                identity=config["worker"]["checkpoint_identity"],
                gcp_conn_id=config["gcp_conn_id"],
                log=log.info,
            )
            environment = _backend(config).environment_for(generation.name)
        except (UnsupportedCheckpoint, CheckpointUnreadable, GenerationMismatch, NoEnvironment) as exc:
            raise AirflowFailException(f"{exc}\nNo host was created.") from None
        log.info("%s runs in generation %s's environment: %s", checkpoint, generation.name, environment)
        return {**config, "generation": generation.name}

    @setup
    @task(retries=DEPLOYMENT.host_retries, retry_delay=DEPLOYMENT.retry_delay, retry_exponential_backoff=True)
    def create_host(config: dict, planned: list[int]) -> dict:
        if not planned:
            raise AirflowSkipException("every selected member is finished: no host needed")
        from aifs.orchestration.retrying import will_retry
        from aifs.orchestration.summary import HOST_LEFT_KEY, half_made_host

        ti = get_current_context()["ti"]
        backend, run = _backend(config), _run_info(config)
        try:
            return backend.create_host(run, log.info)
        except BaseException as exc:
            if will_retry(exc, ti.try_number, ti.max_tries):
                # creation is idempotent by name: the next try adopts this host (a slow first boot
                # then costs one boot, not one per try)
                log.exception("creating the host failed on try %s of %s; the next try adopts what was made",
                              ti.try_number, ti.max_tries + 1)
                raise
            # Airflow skips a teardown whose setup failed, so a half-made host is ours to remove.
            log.exception("creating the host failed on its last try; deleting whatever was made")
            try:
                backend.delete_host(run, log.info)
            except Exception as cleanup_error:
                log.exception("deleting the half-made host failed too; the run summary names it")
                ti.xcom_push(key=HOST_LEFT_KEY, value=half_made_host(config["backend"], backend, run, cleanup_error))
            raise

    @teardown
    @task(retries=DELETE_HOST_RETRIES, retry_delay=DEPLOYMENT.retry_delay, retry_exponential_backoff=True)
    def delete_host(config: dict, host: dict) -> dict:
        # every backend's delete_host takes "already gone" as success, so a retry after a try that
        # deleted the host but lost the answer succeeds
        _backend(config).delete_host(_run_info(config), log.info)
        return {"deleted": True}

    @task(
        trigger_rule=TriggerRule.ALL_DONE,
        outlets=[FORECASTS],
        on_failure_callback=None,  # the run alert covers it
        retries=STORAGE_TASK_RETRIES,  # findings fail at once (AirflowFailException); storage errors retry
        retry_delay=DEPLOYMENT.retry_delay,
        retry_exponential_backoff=True,
    )
    def verify() -> dict:
        from aifs.orchestration.outcomes import rerun_instructions
        from aifs.orchestration.storage import storage_client
        from aifs.orchestration.summary import (
            HOST_LEFT_KEY, OUTCOME_KEY, format_summary, host_left_behind, member_states, normalise_outcomes,
        )
        from aifs.orchestration.verify import verify_run

        context = get_current_context()
        ti = context["ti"]
        config = ti.xcom_pull(task_ids="check_params")
        if not config:
            raise AirflowFailException("the run's params were not accepted (see check_params): nothing ran, nothing to verify")
        planned = ti.xcom_pull(task_ids="plan")
        outcomes = normalise_outcomes(ti.xcom_pull(task_ids="run_member", key=OUTCOME_KEY))

        host_left = host_left_behind(
            config["backend"],
            ti.xcom_pull(task_ids="create_host"),
            ti.xcom_pull(task_ids="delete_host"),
            ti.xcom_pull(task_ids="create_host", key=HOST_LEFT_KEY),
        )
        report = verify_run(storage_client(config["gcp_conn_id"]), config)
        rows = member_states(config["members"], planned, outcomes, set(report.bad_members))
        log.info("\n%s", format_summary(config["date"], config["bucket"], rows, host_left))

        if host_left:
            # a teardown's failure does not fail the run by itself; a host left running costs money
            ti.xcom_push(key=FINDINGS_KEY, value=host_left)  # for the run-failure alert
            raise AirflowFailException(host_left)
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

    # not on the host's path; all_done: a refused date of this run's own still leaves the others theirs
    @task(trigger_rule=TriggerRule.ALL_DONE)
    def other_dates() -> list[dict]:
        """One forecast_other_dates entry (conf, run id) a date this run's inputs events name besides its own."""
        runs = other_date_runs(get_current_context())
        for run in runs:
            log.info("another date's inputs: run %s forecasts %s", run["trigger_run_id"], run["conf"])
        return runs

    config = check_params()
    others = other_dates()
    config >> others
    # each other date gets its own run (this DAG, no logical date: its conf names the date); queued
    # behind this run by max_active_runs. A retry or clear finds the runs it made (same run ids).
    TriggerDagRunOperator.partial(
        task_id="forecast_other_dates",
        trigger_dag_id=DAG_ID,
        logical_date=None,
        wait_for_completion=False,
        skip_when_already_exists=True,
        openlineage_inject_parent_info=False,  # the conf is exactly the event's params: check_params refuses other keys
        map_index_template="{{ task.conf.date }}",
    ).expand_kwargs(others)
    planned = plan(config)
    # only the planned members' inputs: a finished member needs none (its inputs may be long gone)
    wait_for_inputs = WaitForInputsSensor(task_id="wait_for_inputs", config=config, members=planned)
    # the checkpoint's own record picks the image or worker Python; no environment loads it: no host
    run_config = choose_environment(config, planned)
    host = create_host(run_config, planned)
    members = _member_operator().partial(
        task_id="run_member",
        config=run_config,
        member_timeout_s=DEPLOYMENT.member_timeout.total_seconds(),  # the job's deadline, from its launch, on the host
        max_active_tis_per_dagrun=DEPLOYMENT.parallel_members,  # 1: one GPU host, one member at a time
        retries=DEPLOYMENT.member_retries,
        retry_delay=DEPLOYMENT.retry_delay,
        retry_exponential_backoff=True,
        execution_timeout=task_timeout(DEPLOYMENT.member_timeout, DEPLOYMENT.host.get("gpu_wait", 0)),
        map_index_template="{{ 'member %03d' % task.member }}",
    ).expand(member=planned)
    removed = delete_host(run_config, host)

    wait_for_inputs >> host
    host >> members >> removed
    removed.as_teardown(setups=host)
    removed >> verify()


aifs_ens_forecast()
