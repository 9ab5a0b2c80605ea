"""AIFS-ENS products: from a date's verified forecasts to AI Weather Quest files, pictures and a report.

    check_params -> make_products x N (one at a time) -> check_products

Scheduled on the ``aifs_ens_forecasts`` asset: the forecast DAG's verify emits it once a date's members
all verify, and its event's extra names the bucket, date and members. Also triggerable by hand
with params ``date``, ``bucket`` (one the deployment allows) and ``members``.

* **check_params** turns the triggering asset events (or the params) into targets, one per bucket and
  date, and fails before anything runs when one is wrong: a bucket the deployment does not allow, a
  date that does not exist, a conf naming a deployment setting (submission, team, model...).
* **make_products** runs ``python -m aifs.products`` for one target as a CPU step on the deployment's
  backend (aifs.orchestration.steps): regridding, period means, quintile probabilities, the
  competition's files, maps, plumes and report.html in ``{date}/products/``, and the submission when
  the deployment enables it (AIFS_ENS_SUBMIT) and enough members verified. The competition's
  credentials come from the ``aifs_aiwq`` connection (AIFS_ENS_AIWQ_CONN_ID) as the step's secret
  environment, read when it runs: never in XCom, rendered fields or logs.
* **check_products** reads the products manifest back from the bucket, checks every object it lists
  (present, the bucket's own crc32c) and that the report exists, logs the run summary (members used,
  partial or not, submitted or why not) with the report's gs:// address and console URL, and fails
  saying what is missing. The run alert carries the report's address.

Deployment settings: AIFS_ENS_* environment variables (aifs.orchestration.deployment and
aifs.orchestration.products_settings). This file imports neither torch nor anemoi.
"""

from __future__ import annotations

import logging

from airflow.sdk import Param, TriggerRule, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from aifs.orchestration.alerts import FINDINGS_KEY, run_failure_alert, task_failure_alert
from aifs.orchestration.assets import FORECASTS
from aifs.orchestration.deployment import DeploymentSettings
from aifs.orchestration.params import BadParams
from aifs.orchestration.products_params import PRODUCTS_DAG_ID, products_param_specs, resolve_products_config
from aifs.orchestration.products_settings import STEP_GRACE, ProductsSettings

log = logging.getLogger(__name__)

DEPLOYMENT = DeploymentSettings.from_env()
PRODUCTS = ProductsSettings.from_env()
PARAM_SPECS = products_param_specs(DEPLOYMENT.allowed_buckets)


def _products_step():
    """make_products' operator: the generic CPU step, with the competition's credentials read when it runs."""
    from aifs.orchestration.products_step import products_step_operator

    return products_step_operator(PRODUCTS)


@dag(
    dag_id=PRODUCTS_DAG_ID,
    schedule=[FORECASTS],
    start_date=DEPLOYMENT.start_date,
    catchup=False,
    max_active_runs=1,
    params={name: Param(**spec) for name, spec in PARAM_SPECS.items()},
    default_args={"retries": 0, "on_failure_callback": task_failure_alert},
    on_failure_callback=run_failure_alert,
    doc_md=__doc__,
    tags=["aifs", "products"],
)
def aifs_ens_products():
    @task
    def check_params() -> dict:
        from aifs.orchestration.products_params import triggering_extras

        context = get_current_context()
        dag_run = context["dag_run"]
        try:
            config = resolve_products_config(
                dict(context["params"]),
                deployment=DEPLOYMENT,
                specs=PARAM_SPECS,
                events=triggering_extras(context, FORECASTS),
                dag_id=dag_run.dag_id,
                run_id=dag_run.run_id,
            )
        except BadParams as exc:
            raise AirflowFailException(f"{exc}\nNothing was made. Fix the params and trigger the run again.") from None
        for target in config["targets"]:
            log.info("products of %s (gs://%s), members %s, from %s", target["date"], target["bucket"], target["members_text"], target["source"])
        log.info("submission %s", "enabled (AIFS_ENS_SUBMIT)" if PRODUCTS.submit else "off (AIFS_ENS_SUBMIT is not true)")
        return config

    @task
    def step_kwargs(config: dict) -> list[dict]:
        from aifs.orchestration.products_step import step_kwargs_for

        return step_kwargs_for(config, PRODUCTS, DEPLOYMENT)

    @task(trigger_rule=TriggerRule.ALL_DONE, on_failure_callback=None)  # the run alert covers it
    def check_products() -> list[dict]:
        from aifs.orchestration.products_check import check_targets
        from aifs.orchestration.products_report import REPORT_KEY
        from aifs.orchestration.products_step import STEP_OUTCOME_KEY
        from aifs.orchestration.storage import storage_client

        ti = get_current_context()["ti"]
        config = ti.xcom_pull(task_ids="check_params")
        if not config:
            raise AirflowFailException("the run's params were not accepted (see check_params): nothing was made, nothing to check")
        steps = ti.xcom_pull(task_ids="make_products", key=STEP_OUTCOME_KEY)
        outcome = check_targets(storage_client(config["gcp_conn_id"]), config, log.info, steps)
        reports = [r["report"] for r in outcome.results if r.get("report")]
        if reports:
            ti.xcom_push(key=REPORT_KEY, value=reports)  # for the run alert
        if not outcome.ok:
            ti.xcom_push(key=FINDINGS_KEY, value=outcome.findings)  # for the run alert
            raise AirflowFailException(outcome.findings)
        return outcome.results

    config = check_params()
    made = _products_step().partial(
        task_id="make_products",
        max_active_tis_per_dagrun=1,  # one products job at a time: each holds a few GB
        retries=DEPLOYMENT.member_retries,  # only exit codes that say a retry can help (StepFailed) are retried
        retry_delay=DEPLOYMENT.retry_delay,
        retry_exponential_backoff=True,
        execution_timeout=PRODUCTS.timeout + STEP_GRACE,  # the step's own deadline holds where it runs; this one comes after
        map_index_template="{{ task.config['date'] }}",
    ).expand_kwargs(step_kwargs(config))
    made >> check_products()


aifs_ens_products()
