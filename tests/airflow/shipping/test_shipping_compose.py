"""docker-compose.yaml: the local Airflow 3 stack. No Docker engine runs here, so this checks what can
be checked without one: its structure (services, commands, mounts, healthchecks, start order), that
every Airflow option it sets exists in this Airflow version, that every other variable it sets is
read by the code (plugins/, dags/, include/), and that its `local` preset agrees with the image.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
COMPOSE = REPO / "docker-compose.yaml"
AIRFLOW_SERVICES = {"airflow-apiserver": "api-server", "airflow-scheduler": "scheduler",
                    "airflow-dag-processor": "dag-processor", "airflow-triggerer": "triggerer"}
#: Variables read by the images' own entrypoints, not by our code (documented by those images).
IMAGE_VARIABLES = {
    "postgres": {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"},
    "airflow-init": {"_AIRFLOW_DB_MIGRATE"},  # apache/airflow's entrypoint: run `airflow db migrate`
}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def code_text() -> str:
    """Everything that runs in the stack: the Airflow side, the worker, the scripts and images."""
    parts = []
    for folder in ("plugins", "dags", "include"):
        for path in (REPO / folder).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".sh", "") and "__pycache__" not in path.parts:
                parts.append(path.read_text(errors="replace"))
    return "\n".join(parts)


def test_services_and_commands(compose):
    services = compose["services"]
    for name, command in AIRFLOW_SERVICES.items():
        assert services[name]["command"] == command
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["airflow-init"]["environment"]["_AIRFLOW_DB_MIGRATE"] == "true"
    # one image for every Airflow component (LocalExecutor: the scheduler runs the worker too)
    images = {services[n]["image"] for n in AIRFLOW_SERVICES} | {services["airflow-init"]["image"]}
    assert len(images) == 1
    for name in AIRFLOW_SERVICES:
        assert services[name]["build"] == {"context": ".", "dockerfile": "include/Dockerfile.cpu"}
        assert (REPO / services[name]["build"]["dockerfile"]).is_file()
        assert services[name]["environment"]["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"


def test_dags_plugins_and_include_are_mounted_where_airflow_and_the_gce_backend_look(compose):
    for name in AIRFLOW_SERVICES:
        mounts = dict(v.split(":", 1) for v in compose["services"][name]["volumes"] if v.startswith("./"))
        # the package alone, as the operator's guide uploads it (test_shipping_deploy.py)
        assert mounts == {"./dags": "/opt/airflow/dags", "./plugins/aifs": "/opt/airflow/plugins/aifs", "./include": "/opt/airflow/include"}
        for host in mounts:
            assert (REPO / host).is_dir()
    # the gce backend finds include/startup-script.sh four levels above its own module
    gce = Path("/opt/airflow/plugins/aifs/orchestration/backends/gce.py")
    assert str(gce.parents[4] / "include") == "/opt/airflow/include"


def test_healthchecks_and_start_order(compose):
    services = compose["services"]
    for name in list(AIRFLOW_SERVICES) + ["postgres", "gcs-emulator"]:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert "8974/health" in " ".join(services["airflow-scheduler"]["healthcheck"]["test"])
    assert services["airflow-scheduler"]["environment"]["AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK"] == "true"
    for name, svc in services.items():
        for dep, spec in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if spec["condition"] == "service_healthy":
                assert services[dep].get("healthcheck"), f"{name} waits for {dep} to be healthy; it has no healthcheck"
            if spec["condition"] == "service_completed_successfully":
                assert services[dep].get("restart") == "no", f"{dep} is one-shot"
    for name in AIRFLOW_SERVICES:
        deps = services[name]["depends_on"]
        assert deps["postgres"]["condition"] == "service_healthy"
        assert deps["airflow-init"]["condition"] == "service_completed_successfully"
    # the scheduler runs members: the demo data must be in the emulator first
    assert services["airflow-scheduler"]["depends_on"]["aifs-demo-seed"]["condition"] == "service_completed_successfully"
    assert services["aifs-demo-seed"]["depends_on"]["gcs-emulator"]["condition"] == "service_healthy"


def test_airflow_options_exist_in_this_airflow(compose):
    from airflow.configuration import retrieve_configuration_description

    description = retrieve_configuration_description(include_providers=True)
    for name, svc in compose["services"].items():
        for key in svc.get("environment") or {}:
            m = re.fullmatch(r"AIRFLOW__([A-Z0-9_]+?)__([A-Z0-9_]+)", key)
            if m:
                section, option = m.group(1).lower(), m.group(2).lower()
                assert option in description.get(section, {}).get("options", {}), f"{name}: {key} is not an Airflow option"


def test_every_other_variable_is_read_by_the_code(compose):
    code = code_text()
    for name, svc in compose["services"].items():
        for key in svc.get("environment") or {}:
            if key.startswith("AIRFLOW__") or key in IMAGE_VARIABLES.get(name, set()):
                continue
            if key.startswith(("AIRFLOW_CONN_", "AIRFLOW_VAR_")):
                ident = key.split("_", 2)[2].lower()
                assert re.search(rf"['\"]{re.escape(ident)}['\"]", code), f"{name}: nothing reads {key} ({ident})"
                continue
            assert re.search(rf"['\"]{re.escape(key)}['\"]|\${{?{re.escape(key)}\b", code), f"{name}: nothing reads {key}"


def test_local_preset_agrees_with_the_image_and_the_emulator(compose):
    services = compose["services"]
    env = services["airflow-scheduler"]["environment"]
    cpu = (REPO / "include" / "Dockerfile.cpu").read_text()
    assert f"python -m venv {env['AIFS_WORKER_PYTHON'].rsplit('/bin/', 1)[0]}" in cpu
    assert f"ENV AIFS_WORKER_PYTHON={env['AIFS_WORKER_PYTHON']}" in cpu
    host, port = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", env["STORAGE_EMULATOR_HOST"]).groups()
    assert host in services and f"--port={port}" in services[host]["command"]
    assert "--host=0.0.0.0" in services[host]["command"], "other containers must reach the emulator"
    seed = " ".join(services["aifs-demo-seed"]["command"])
    assert f"--out {env['AIFS_CHECKPOINT']}" in seed and f"--checkpoint {env['AIFS_CHECKPOINT']}" in seed
    bucket = re.search(r"--bucket (\S+)", seed).group(1)
    assert f"--default-bucket={bucket}" in services[host]["command"]
    assert env["AIFS_ENS_SCHEDULE"] == "none"
    # the seeded date and the documented trigger agree
    assert re.search(r"--date (\d{8}_\d{4})", seed).group(1) in COMPOSE.read_text().split("services:")[0]
