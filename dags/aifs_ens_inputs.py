"""AIFS-ENS input states from ECMWF open data: one date, every member, verified, then the asset.

    check_params -> wait_for_opendata -> build_inputs -> verify_inputs  ==> asset aifs_ens_inputs
                    (deferred)           (CPU step)

* **check_params** fails the run at once when a param is wrong or the conf names a deployment
  setting (the open-data source, the backend, host settings), saying why.
* **wait_for_opendata** waits, deferred (off any worker slot), until the cycle's open data is
  published at AIFS_ENS_OPENDATA_SOURCE (its index files exist); it fails with a clear message
  after ``publish_wait_minutes``.
* **build_inputs** runs ``python -m aifs.inputs`` of the worker image as a CPU job through the
  deployment's backend (a subprocess on ``local``, a container without GPU on ``ssh``, a CPU VM of
  its own on ``gce``, a CPU pod on ``gke``; never the GPU). Members already complete and matching
  are skipped by aifs.inputs itself. Its exit code decides between retrying and failing at once.
* **verify_inputs** reads the bucket back: each member's pickle, its input manifest for this date,
  member and checkpoint, the pickle's size and crc32c against the manifest. On success it emits the
  ``aifs_ens_inputs`` asset (extra: bucket, date, members, checkpoint, prefix), on which
  aifs_ens_forecast runs for that date when AIFS_ENS_FORECAST_TRIGGER says so.

Daily at the deployment's cycle (AIFS_ENS_SCHEDULE, AIFS_ENS_CYCLE_HOUR; only by hand when
AIFS_ENS_FORECAST_TRIGGER=time says the inputs are made elsewhere), with the forecast's
members, buckets and checkpoints (AIFS_ENS_* in aifs.orchestration.deployment). Clearing or
backfilling a date rebuilds that date: the date comes from the logical date, as for forecasts.
This file imports neither eccodes nor MIR: they live in the worker image.
"""

from __future__ import annotations

import logging

from airflow.sdk import Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from aifs.orchestration.alerts import run_failure_alert, task_failure_alert
from aifs.orchestration.assets import INPUTS
from aifs.orchestration.deployment import DeploymentSettings
from aifs.orchestration.inputs_params import INPUTS_DAG_ID, MODULE, STEP, inputs_arguments, inputs_param_specs
from aifs.orchestration.inputs_wait import WaitForOpenDataOperator
from aifs.orchestration.retrying import STORAGE_TASK_RETRIES
from aifs.orchestration.steps import STEP_TIMEOUT_MARGIN, RunStepOperator

log = logging.getLogger(__name__)

DEPLOYMENT = DeploymentSettings.from_env()


@dag(
    dag_id=INPUTS_DAG_ID,
    schedule=DEPLOYMENT.inputs_schedule,  # daily at the cycle; only by hand where inputs are made elsewhere
    start_date=DEPLOYMENT.start_date,
    catchup=DEPLOYMENT.catchup,
    max_active_runs=DEPLOYMENT.max_active_runs,
    params={name: Param(**spec) for name, spec in inputs_param_specs(DEPLOYMENT).items()},
    default_args={"retries": 0, "on_failure_callback": task_failure_alert},
    on_failure_callback=run_failure_alert,
    doc_md=__doc__,
    tags=["aifs", "inputs"],
)
def aifs_ens_inputs():
    @task
    def check_params() -> dict:
        from aifs.orchestration.inputs_params import resolve_inputs_config
        from aifs.orchestration.params import BadParams

        context = get_current_context()
        dag_run = context["dag_run"]
        try:
            config = resolve_inputs_config(dict(context["params"]), deployment=DEPLOYMENT, dag_id=dag_run.dag_id,
                                           run_id=dag_run.run_id, logical_date=dag_run.logical_date, run_after=dag_run.run_after)
        except BadParams as exc:
            raise AirflowFailException(f"{exc}\nNothing was fetched or built. Fix the params and trigger the run again.") from None
        log.info("inputs of %s, members %s, checkpoint %s, into gs://%s/, from open data at %s (backend %s)",
                 config["date"], config["members_text"], config["checkpoint"], config["bucket"], config["source"], config["backend"])
        return config

    @task(outlets=[INPUTS], retries=STORAGE_TASK_RETRIES, retry_delay=DEPLOYMENT.retry_delay, retry_exponential_backoff=True)
    def verify_inputs(config: dict) -> dict:
        from aifs.orchestration.inputs_verify import asset_extra, check_inputs, findings
        from aifs.orchestration.storage import storage_client

        report = check_inputs(storage_client(config["gcp_conn_id"]), config)
        if not report.ok:
            raise AirflowFailException(findings(report, config))
        extra = asset_extra(config)
        get_current_context()["outlet_events"][INPUTS].extra = extra
        log.info("the inputs of all %d members verify; asset event %s", len(config["members"]), extra)
        return extra

    config = check_params()
    published = WaitForOpenDataOperator(task_id="wait_for_opendata", config=config)
    built = RunStepOperator(
        task_id="build_inputs",
        step=STEP,
        module=MODULE,
        config=config,
        arguments=inputs_arguments,
        step_timeout=DEPLOYMENT.inputs_timeout,  # the job's deadline, from its launch, where it runs
        execution_timeout=DEPLOYMENT.inputs_timeout + STEP_TIMEOUT_MARGIN,  # Airflow's backstop, after the host's own
        retries=DEPLOYMENT.member_retries,
        retry_delay=DEPLOYMENT.retry_delay,
        retry_exponential_backoff=True,
    )
    published >> built >> verify_inputs(config)


aifs_ens_inputs()
