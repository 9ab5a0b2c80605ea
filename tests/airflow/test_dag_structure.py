"""The DAG file: imports cleanly and light, and has the shape the issue asks for."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys

import pytest

from conftest import DAG_FILE, PLUGINS

from aifs.orchestration.deployment import DeploymentSettings


def test_dag_imports_without_torch_or_anemoi_and_fast():
    """A fresh interpreter loads the DAG the way the dag-processor does; the worker stack stays out."""
    probe = f"""
import json, sys, time
import airflow.sdk  # Airflow's own import cost is not the DAG's
from airflow.dag_processing.dagbag import DagBag
started = time.perf_counter()
bag = DagBag(dag_folder={str(DAG_FILE)!r})
seconds = time.perf_counter() - started
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'anemoi', 'earthkit', 'eccodes', 'apprise'))
print(json.dumps({{"errors": {{k: str(v) for k, v in bag.import_errors.items()}}, "dags": sorted(bag.dag_ids),
                  "heavy": heavy, "seconds": seconds}}))
"""
    env = dict(os.environ, PYTHONPATH=str(PLUGINS))
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["errors"] == {}
    assert result["dags"] == ["aifs_ens_forecast"]
    assert result["heavy"] == [], f"the DAG file pulled in {result['heavy']}"
    assert result["seconds"] < 5, f"parsing the DAG file took {result['seconds']:.1f} s"


def _parse_in_fresh_interpreter(extra_env: dict[str, str]) -> dict:
    probe = f"""
import json
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder={str(DAG_FILE)!r})
dag = bag.dags.get("aifs_ens_forecast")
print(json.dumps({{"errors": {{k: str(v) for k, v in bag.import_errors.items()}},
                  "defaults": {{k: dag.params[k] for k in dag.params}} if dag else None,
                  "parallel": dag.get_task("run_member").max_active_tis_per_dagrun if dag else None}}))
"""
    env = dict(os.environ, PYTHONPATH=str(PLUGINS), **extra_env)
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_deployment_sets_the_defaults_scheduled_runs_use():
    """Scheduled runs and backfills take param defaults: a Composer environment sets its own by env var."""
    host = {"project_id": "p", "zone": "us-central1-a", "service_account": "w@p.iam.gserviceaccount.com",
            "image": "us-docker.pkg.dev/p/aifs/worker:1"}
    result = _parse_in_fresh_interpreter({
        "AIFS_ENS_BACKEND": "gce",
        "AIFS_ENS_HOST": json.dumps(host),
        "AIFS_ENS_BUCKETS": "team-forecasts,team-scratch",
        "AIFS_ENS_CHECKPOINTS": json.dumps({"ecmwf/aifs-ens-1.0": {"identity": "hf:" + "a" * 40}}),
        "AIFS_ENS_PARAM_DEFAULTS": json.dumps({"bucket": "team-scratch", "lead_time": 360}),
        "AIFS_ENS_PARALLEL_MEMBERS": "1",
    })
    assert result["errors"] == {}
    assert (result["defaults"]["bucket"], result["defaults"]["lead_time"]) == ("team-scratch", 360)
    assert "backend" not in result["defaults"] and "host" not in result["defaults"]  # not a trigger's to set
    assert result["defaults"]["members"] == "1-50"  # untouched defaults stay
    assert result["parallel"] == 1


@pytest.mark.parametrize("defaults, says", [
    ({"bucket": "UPPER"}, "AIFS_ENS_PARAM_DEFAULTS['bucket']"),
    ({"backend": "slurm"}, "backend: set by the deployment (AIFS_ENS_BACKEND), not by a trigger"),
    ({"buckett": "x"}, "unknown params: buckett"),
])
def test_bad_deployment_defaults_are_an_import_error_naming_them(defaults, says):
    result = _parse_in_fresh_interpreter({"AIFS_ENS_PARAM_DEFAULTS": json.dumps(defaults)})
    assert result["defaults"] is None
    assert any(says in error for error in result["errors"].values()), result["errors"]


def test_tasks_in_order(dag):
    def downstream(task_id):
        return dag.get_task(task_id).downstream_task_ids

    assert set(dag.task_ids) == {
        "check_params", "wait_for_inputs", "plan", "choose_environment", "create_host", "run_member", "delete_host", "verify",
        "other_dates", "forecast_other_dates",
    }
    assert "plan" in downstream("check_params")
    assert "wait_for_inputs" in downstream("plan")  # plan first: the wait covers only planned members
    assert "create_host" in downstream("wait_for_inputs")
    assert "create_host" in downstream("plan")
    # the checkpoint's generation picks the image or worker Python before any host exists
    assert "choose_environment" in downstream("plan") and "create_host" in downstream("choose_environment")
    assert {"run_member", "delete_host"} <= downstream("choose_environment")  # they take its config (with the generation)
    assert "run_member" in downstream("create_host")
    assert "delete_host" in downstream("run_member")
    assert downstream("delete_host") == {"verify"}
    assert downstream("verify") == set()


def test_other_dates_get_runs_of_their_own_off_the_hosts_path(dag):
    """Inputs events for other dates (one asset-triggered run takes all queued): each gets its own run of this DAG."""
    from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    from aifs.orchestration.alerts import task_failure_alert

    others, trigger = dag.get_task("other_dates"), dag.get_task("forecast_other_dates")
    assert "other_dates" in dag.get_task("check_params").downstream_task_ids
    assert others.trigger_rule == "all_done"  # this run's own date refused: the other dates are still forecast
    assert others.downstream_task_ids == {"forecast_other_dates"}
    assert isinstance(trigger, MappedOperator) and issubclass(trigger.operator_class, TriggerDagRunOperator)
    kwargs = trigger.partial_kwargs
    assert (kwargs["trigger_dag_id"], kwargs["logical_date"], kwargs["wait_for_completion"]) == (dag.dag_id, None, False)
    assert kwargs["skip_when_already_exists"]  # a retry or clear finds the runs it made
    assert trigger.downstream_task_ids == set()  # nothing on the host's path waits for it
    upstream_of_host = dag.get_task("create_host").get_flat_relative_ids(upstream=True)
    assert not {"other_dates", "forecast_other_dates"} & upstream_of_host
    callbacks = trigger.on_failure_callback
    assert task_failure_alert in (callbacks if isinstance(callbacks, list) else [callbacks])


def test_host_setup_and_teardown_pair_around_members(dag):
    create, delete = dag.get_task("create_host"), dag.get_task("delete_host")
    assert create.is_setup and not create.is_teardown
    assert delete.is_teardown and not delete.is_setup
    assert "create_host" in delete.upstream_task_ids  # the pairing: teardown directly downstream of its setup
    # everything between them is in the setup's scope, so clearing a member clears both
    assert "run_member" in create.downstream_task_ids and "run_member" in delete.upstream_task_ids


def test_members_are_mapped_serial_retried_and_labelled(dag):
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    run_member = dag.get_task("run_member")
    assert isinstance(run_member, MappedOperator)
    assert run_member.max_active_tis_per_dagrun == 1
    assert run_member.retries >= 1
    assert run_member.retry_exponential_backoff
    assert "member %03d" in run_member.map_index_template


def test_verify_always_runs_and_emits_the_forecasts_asset(dag):
    verify = dag.get_task("verify")
    assert verify.trigger_rule == "all_done"
    assert [o.name for o in verify.outlets] == ["aifs_ens_forecasts"]


def test_params_cover_the_run_settings(dag):
    assert set(dag.params.keys()) == {
        "members", "date", "cycle_hour", "bucket", "checkpoint", "lead_time",
        "upload_threads", "precision", "num_chunks", "input_wait_minutes", "input_poke_seconds",
    }
    assert dag.params["members"] == "1-50"
    assert dag.params["lead_time"] == 792


def test_alerts_are_wired(dag):
    from aifs.orchestration.alerts import run_failure_alert, task_failure_alert

    assert dag.on_failure_callback in (run_failure_alert, [run_failure_alert])
    for task_id in ("check_params", "wait_for_inputs", "plan", "choose_environment", "create_host", "run_member", "delete_host"):
        callbacks = dag.get_task(task_id).on_failure_callback
        assert task_failure_alert in (callbacks if isinstance(callbacks, list) else [callbacks]), task_id


def test_deployment_settings_daily_cron_no_catchup_by_default():
    default = DeploymentSettings.from_env({})
    assert default.schedule == "0 0 * * *"
    assert default.catchup is False
    assert default.max_active_runs == 1
    evening = DeploymentSettings.from_env({"AIFS_ENS_CYCLE_HOUR": "18", "AIFS_ENS_CATCHUP": "true"})
    assert evening.schedule == "0 18 * * *" and evening.catchup is True
    custom = DeploymentSettings.from_env({"AIFS_ENS_SCHEDULE": "30 5 * * *", "AIFS_ENS_START_DATE": "2025-11-01"})
    assert custom.schedule == "30 5 * * *"
    assert custom.start_date == dt.datetime(2025, 11, 1, tzinfo=dt.timezone.utc)
    assert DeploymentSettings.from_env({"AIFS_ENS_SCHEDULE": "none"}).schedule is None
