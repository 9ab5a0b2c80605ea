"""Bad params fail the run before any host exists, and say why; good ones become the run's config."""

from __future__ import annotations

import datetime as dt

import pytest
from conftest import FORECAST_DAY, task_states

from aifs.orchestration.deployment import DeploymentSettings
from aifs.orchestration.params import BadParams, forecast_date, resolve_run_config

#: a deployment with every setting at its default (the local backend, the original bucket)
RUN = dict(deployment=DeploymentSettings.from_env({}), dag_id="aifs_ens_forecast", run_id="manual__x", logical_date=FORECAST_DAY)


def resolve(**params):
    return resolve_run_config(params, **RUN)


def test_defaults_resolve_to_the_logical_dates_cycle():
    config = resolve()
    assert config["date"] == "20250601_0000"
    assert config["members"] == list(range(1, 51))
    assert config["backend"] == "local"
    assert "host" not in config  # host settings stay in the deployment, out of XCom
    assert config["worker"]["lead_time"] == 792
    assert config["bucket"] == "aifs-aiquest-us-20251127" and config["gcp_conn_id"] == "google_cloud_default"


def test_member_selection_syntax_and_explicit_date():
    config = resolve(members="1-3, 7,20-21", date="20251127_1200", lead_time=144, precision="16", num_chunks=16)
    assert config["members"] == [1, 2, 3, 7, 20, 21]
    assert config["members_text"] == "1-3,7,20-21"
    assert config["date"] == "20251127_1200"
    assert config["worker"] == {
        **config["worker"], "lead_time": 144, "precision": "16", "num_chunks": 16, "checkpoint": "ecmwf/aifs-ens-2.0"
    }


@pytest.mark.parametrize(
    "params, says",
    [
        ({"members": "51"}, "member 51 is outside 1..50"),
        ({"members": "1-51"}, "member 51 is outside 1..50"),
        ({"members": "0"}, "member 0 is outside"),
        ({"members": "5-3"}, "runs backwards"),
        ({"members": "1-"}, "members: '1-' does not match"),
        ({"members": ""}, "members:"),
        ({"date": "2025-06-01"}, "date: '2025-06-01' does not match"),
        ({"date": "20251332_0000"}, "bad forecast date '20251332_0000'"),
        ({"lead_time": 100}, "lead_time: 100 is not a multiple of 6"),
        ({"upload_threads": 0}, "upload_threads: 0 is less than the minimum"),
        ({"precision": "64"}, "precision: '64' is not one of"),
        ({"bucket": "Bad Bucket"}, "bucket: 'Bad Bucket' is not one of ['aifs-aiquest-us-20251127']"),
        ({"checkpoint": "/tmp/mine.ckpt"}, "checkpoint: '/tmp/mine.ckpt' is not one of ['ecmwf/aifs-ens-2.0', 'ecmwf/aifs-ens-1.0']"),
        ({"colour": "red"}, "unknown params: colour"),
    ],
)
def test_bad_params_are_refused_saying_why(params, says):
    with pytest.raises(BadParams) as err:
        resolve(**params)
    assert says in str(err.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(BadParams) as err:
        resolve(members="60", backend="nope", lead_time=5)
    text = str(err.value)
    assert "member 60" in text and "backend: set by the deployment" in text and "lead_time" in text


@pytest.mark.parametrize(
    "when, cycle, expected",
    [
        (dt.datetime(2025, 6, 1, 0, 0), 0, "20250601_0000"),
        (dt.datetime(2025, 6, 1, 6, 0), 0, "20250601_0000"),  # cron after the cycle: same day's cycle
        (dt.datetime(2025, 6, 2, 1, 0), 18, "20250601_1800"),  # cron past midnight: yesterday's 18Z
        (dt.datetime(2025, 6, 1, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=2))), 6, "20250601_0600"),
    ],
)
def test_forecast_date_is_the_latest_cycle_at_or_before_the_logical_date(when, cycle, expected):
    assert forecast_date(None, when, None, cycle) == expected


def test_runs_without_logical_date_use_run_after():
    assert forecast_date(None, None, dt.datetime(2025, 6, 3, 7, 0, tzinfo=dt.timezone.utc), 0) == "20250603_0000"


# -- through Airflow ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "conf",
    [
        {"members": "1-"},
        {"bucket": "someone-elses-bucket"},
        {"checkpoint": "/home/me/my.ckpt"},
        {"date": "2025-6-1"},
    ],
    ids=["members-1-", "bucket-not-allowed", "checkpoint-not-allowed", "malformed-date"],
)
def test_schema_errors_refuse_the_run_at_trigger_time(dag, conf, scratch):
    """Airflow validates params against the schemas when the run is created: no run, no host."""
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError) as err:
        dag.test(logical_date=FORECAST_DAY, run_conf=conf)
    assert next(iter(conf)) in str(err.value)
    assert not scratch.exists()


@pytest.mark.parametrize(
    "conf, says",
    [
        ({"members": "49-51"}, "member 51 is outside 1..50"),
        ({"date": "20250230_0000"}, "bad forecast date '20250230_0000'"),
    ],
    ids=["member-51", "impossible-date"],
)
def test_semantic_errors_fail_the_run_before_any_host(dag, conf, says, scratch, alert_sink):
    """What a schema cannot see, check_params does: the run fails there and no host is created."""
    dr = dag.test(logical_date=FORECAST_DAY, run_conf=conf)
    states = task_states(dr)
    assert dr.state == "failed"
    assert states[("check_params", -1)] == "failed"
    assert states[("create_host", -1)] == "upstream_failed"
    assert states[("delete_host", -1)] in ("skipped", "upstream_failed")
    assert states[("verify", -1)] == "failed"
    assert not scratch.exists()  # the local backend's host is its scratch dir: never made
    alert = next(m for m in alert_sink.messages if "check_params failed" in m["title"])
    assert says in alert["message"]
