"""What a products run is for, and who decides what: the asset's events or a forecaster's params for the
date and bucket; the deployment alone for submission, team, model, points and credentials.

Plain functions and a DAG parse: no emulator, no worker (fast).
"""

from __future__ import annotations

import json

import pytest
from conftest import DAGS, TEST_BUCKETS

from aifs.orchestration.deployment import DeploymentSettings
from aifs.orchestration.params import BadParams
from aifs.orchestration.products_params import products_param_specs, resolve_products_config
from aifs.orchestration.products_settings import BadProductsSetting, ProductsSettings, parse_points

DEPLOYMENT = DeploymentSettings.from_env({"AIFS_ENS_BUCKETS": json.dumps(["team-forecasts", "team-scratch"])})
SPECS = products_param_specs(DEPLOYMENT.allowed_buckets)


def resolve(params=None, events=()):
    return resolve_products_config(params or {}, deployment=DEPLOYMENT, specs=SPECS, events=events, run_id="r")


def test_a_forecasts_event_names_the_target_and_several_events_make_several_targets():
    config = resolve(events=[
        {"bucket": "team-forecasts", "date": "20251127_0000", "members": "1-50", "prefix": "gs://team-forecasts/20251127_0000/forecasts/"},
        {"bucket": "team-scratch", "date": "20251204_0000", "members": "1-3,7"},
        {"bucket": "team-forecasts", "date": "20251127_0000", "members": "1-10"},  # a later event for the same date wins
    ])
    assert [(t["bucket"], t["date"], t["members_text"]) for t in config["targets"]] == [
        ("team-forecasts", "20251127_0000", "1-10"),
        ("team-scratch", "20251204_0000", "1-3,7"),
    ]
    assert config["targets"][1]["members"] == [1, 2, 3, 7]
    assert config["date"] == "20251127_0000, 20251204_0000"  # what alerts name the run by


def test_a_run_by_hand_takes_its_params_and_needs_a_date():
    config = resolve({"date": "20251127_0000", "bucket": "team-scratch", "members": "1-5"})
    assert [(t["bucket"], t["date"], t["members"]) for t in config["targets"]] == [("team-scratch", "20251127_0000", [1, 2, 3, 4, 5])]
    assert resolve({"date": "20251127_0000"})["targets"][0]["bucket"] == "team-forecasts"  # the deployment's first
    with pytest.raises(BadParams, match="date: needed for a run by hand"):
        resolve({})


@pytest.mark.parametrize(
    "params, says",
    [
        ({"date": "20251127_0000; rm -rf /"}, "date: '20251127_0000; rm -rf /' does not match"),
        ({"date": "20250231_0000"}, "date: bad forecast date '20250231_0000'"),
        ({"date": "20251127_0000", "bucket": "someone-elses"}, "bucket: 'someone-elses' is not one of"),
        ({"date": "20251127_0000", "members": "1-51"}, "members:"),
        ({"date": "20251127_0000", "members": "1-3 --submit"}, "members: '1-3 --submit' does not match"),
        ({"date": "20251127_0000", "submit": True}, "submit: set by the deployment (AIFS_ENS_SUBMIT), not by a trigger"),
        ({"date": "20251127_0000", "team": "other"}, "team: set by the deployment (AIFS_ENS_AIWQ_TEAM)"),
        ({"date": "20251127_0000", "climatology": "http://evil/x.nc"}, "climatology: set by the deployment (AIFS_ENS_CLIMATOLOGY)"),
        ({"date": "20251127_0000", "aiwq_conn_id": "prod_db"}, "aiwq_conn_id: set by the deployment (AIFS_ENS_AIWQ_CONN_ID)"),
        ({"date": "20251127_0000", "force": True}, "force: set by the deployment"),
        ({"date": "20251127_0000", "backend": "ssh"}, "backend: set by the deployment (AIFS_ENS_BACKEND)"),
        ({"date": "20251127_0000", "python": "/bin/sh"}, "python: a host setting"),
        ({"date": "20251127_0000", "extra_args": ["--force"]}, "unknown params: extra_args"),
    ],
    ids=["date-shell", "date-feb31", "bucket", "members-range", "members-flag", "submit", "team", "climatology",
         "conn", "force", "backend", "host-setting", "unknown"],
)
def test_hostile_params_are_refused_naming_the_problem(params, says):
    with pytest.raises(BadParams) as err:
        resolve(params)
    assert says in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "extra, says",
    [
        ({"bucket": "attacker-bucket", "date": "20251127_0000"}, "bucket 'attacker-bucket' is not one this deployment allows"),
        ({"bucket": "team-forecasts", "date": "../../etc"}, "date: bad forecast date '../../etc'"),
        ({"bucket": "team-forecasts", "date": "20251127_0000", "members": "0-99"}, "members:"),
        ({"bucket": "team-forecasts", "date": "20251127_0000", "members": ["--submit"]}, "members: ['--submit'] is not a member selection"),
        ({"date": "20251127_0000"}, "bucket None is not one this deployment allows"),
    ],
    ids=["bucket", "date", "members", "members-type", "no-bucket"],
)
def test_an_event_naming_a_bucket_or_date_it_may_not_is_refused(extra, says):
    """An asset event can be posted through the REST API: its extra is input like any other."""
    with pytest.raises(BadParams) as err:
        resolve(events=[{"bucket": "team-forecasts", "date": "20251120_0000"}, extra])
    assert says in str(err.value) and "asset event 2" in str(err.value), str(err.value)


# -- the deployment's products settings --------------------------------------------------------


def test_products_settings_become_the_commands_flags():
    settings = ProductsSettings.from_env({
        "AIFS_ENS_SUBMIT": "true", "AIFS_ENS_AIWQ_TEAM": "icpac", "AIFS_ENS_AIWQ_MODEL": "aifsens",
        "AIFS_ENS_PRODUCTS_MIN_MEMBERS": "40", "AIFS_ENS_PRODUCTS_POINTS": "Nairobi:-1.29,36.82; Goma:-1.68,29.22",
        "AIFS_ENS_CLIMATOLOGY": "/data/clim.nc",
    })
    assert settings.command_args() == [
        "--team", "icpac", "--model", "aifsens", "--climatology", "/data/clim.nc", "--min-members", "40",
        "--points", "Nairobi:-1.29,36.82; Goma:-1.68,29.22", "--submit",
    ]
    default = ProductsSettings.from_env({})
    assert not default.submit and "--submit" not in default.command_args() and default.aiwq_conn_id == "aifs_aiwq"
    assert [name for name, _, _ in parse_points(default.points)] == ["Nairobi", "Addis Ababa", "Kampala", "Dar es Salaam"]


@pytest.mark.parametrize(
    "env, says",
    [
        ({"AIFS_ENS_SUBMIT": "maybe"}, "AIFS_ENS_SUBMIT must be true or false"),
        ({"AIFS_ENS_SUBMIT": "true"}, "AIFS_ENS_SUBMIT=true needs AIFS_ENS_AIWQ_TEAM and AIFS_ENS_AIWQ_MODEL"),
        ({"AIFS_ENS_AIWQ_TEAM": "../x"}, "AIFS_ENS_AIWQ_TEAM must be letters, digits"),
        ({"AIFS_ENS_PRODUCTS_MIN_MEMBERS": "60"}, "AIFS_ENS_PRODUCTS_MIN_MEMBERS must be within 1..50"),
        ({"AIFS_ENS_PRODUCTS_POINTS": "Nairobi -1.29 36.82"}, "AIFS_ENS_PRODUCTS_POINTS: 'Nairobi -1.29 36.82' is not Name:lat,lon"),
        ({"AIFS_ENS_PRODUCTS_POINTS": "Pole:95,0"}, "off the globe"),
    ],
)
def test_a_broken_products_setting_is_a_dag_import_error_naming_it(env, says, monkeypatch, airflow_db):
    with pytest.raises(BadProductsSetting, match="AIFS_ENS_"):
        ProductsSettings.from_env(env)
    from airflow.dag_processing.dagbag import DagBag

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    bag = DagBag(dag_folder=str(DAGS / "aifs_ens_products.py"))
    errors = "\n".join(map(str, bag.import_errors.values()))
    assert says in errors, errors


def test_the_products_dag_parses_without_worker_libraries_and_is_scheduled_on_the_forecasts_asset(airflow_db):
    import sys

    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS / "aifs_ens_products.py"))
    assert not bag.import_errors, bag.import_errors
    dag = bag.get_dag("aifs_ens_products")
    assert [t.task_id for t in dag.tasks] == ["check_params", "step_kwargs", "make_products", "check_products"]
    assert dag.params["bucket"] == TEST_BUCKETS[0] and dag.params.get_param("bucket").schema["enum"] == TEST_BUCKETS
    from aifs.orchestration.assets import FORECASTS

    assert [(a.name, a.uri) for a in dag.timetable.asset_condition.objects] == [(FORECASTS.name, FORECASTS.uri)]
    assert not {"torch", "anemoi", "eccodes", "mir", "matplotlib", "xarray"} & set(sys.modules)
