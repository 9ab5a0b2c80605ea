"""aifs_ens_inputs' params and the one check that turns them into a run's config (like the forecast's).

A trigger of the inputs DAG is a forecaster's: which date (empty: the run's logical date at the
cycle hour, so clearing or backfilling a date rebuilds that date), which members, and a bucket and a
checkpoint from the deployment's lists (the same AIFS_ENS_BUCKETS, AIFS_ENS_CHECKPOINTS and
AIFS_ENS_PARAM_DEFAULTS as the forecast DAG), plus how long to wait for open data. Where the data
comes from (AIFS_ENS_OPENDATA_SOURCE: a URL could point anywhere) and everything about the host is
the deployment's: a conf naming one is refused, saying which variable sets it.

Plain functions, no Airflow import: the tests call them directly.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from aifs.members import format_members
from aifs.orchestration.params import check_trigger_params

if TYPE_CHECKING:
    from aifs.orchestration.deployment import DeploymentSettings

INPUTS_DAG_ID = "aifs_ens_inputs"
STEP = "inputs"
MODULE = "aifs.inputs"
#: The forecast's params the inputs DAG shares: same names, schemas and deployment defaults.
SHARED_PARAMS = ("date", "cycle_hour", "members", "bucket", "checkpoint")


def inputs_param_specs(deployment: "DeploymentSettings") -> dict[str, dict[str, Any]]:
    """name -> ``airflow.sdk.Param`` keyword arguments of aifs_ens_inputs."""
    specs = {name: dict(deployment.param_specs[name]) for name in SHARED_PARAMS}
    specs["date"]["description"] = "Date YYYYMMDD_HHMM whose inputs to build. Empty: the run's logical date at the cycle hour."
    specs["members"]["description"] = "Members whose input states to build: 1-50, 1,5,10 or mixes (each 1..50)."
    specs["bucket"]["description"] = "GCS bucket receiving {date}/input/ (one the deployment allows)."
    specs["checkpoint"]["description"] = "The checkpoint whose variables, grid and time levels the inputs are for (one the deployment allows)."
    specs.update({
        "publish_wait_minutes": {
            "default": 720,
            "type": "number",
            "exclusiveMinimum": 0,
            "description": "How long to wait for the cycle's open data to be published before failing.",
        },
        "publish_poke_seconds": {
            "default": 120,
            "type": "number",
            "exclusiveMinimum": 0,
            "description": "How often to look for the cycle's open-data index files.",
        },
        "workers": {
            "default": None,
            "type": ["null", "integer"],
            "minimum": 1,
            "maximum": 64,
            "description": "Members built at once (empty: aifs.inputs' own choice within its memory bound).",
        },
        "force": {
            "default": False,
            "type": "boolean",
            "description": "Rebuild members whose inputs are already complete and match.",
        },
    })
    return specs


def resolve_inputs_config(
    params: dict[str, Any],
    *,
    deployment: "DeploymentSettings",
    dag_id: str,
    run_id: str,
    logical_date: dt.datetime | None,
    run_after: dt.datetime | None = None,
) -> dict[str, Any]:
    """Check a run's params; return its JSON-able config. Raises BadParams listing every problem."""
    merged, members, date = check_trigger_params(
        params, inputs_param_specs(deployment), logical_date=logical_date, run_after=run_after)
    return {
        "dag_id": dag_id,
        "run_id": run_id,
        "date": date,
        "members": members,
        "members_text": format_members(members),
        "bucket": merged["bucket"],
        "checkpoint": merged["checkpoint"],
        "checkpoint_identity": deployment.checkpoints[merged["checkpoint"]],
        "backend": deployment.backend,  # the name only; its settings stay in the deployment
        "gcp_conn_id": deployment.gcp_conn_id,
        "service_account": deployment.service_account,
        "source": deployment.opendata_source,
        "publish_wait_minutes": float(merged["publish_wait_minutes"]),
        "publish_poke_seconds": float(merged["publish_poke_seconds"]),
        "workers": merged["workers"],
        "force": bool(merged["force"]),
    }


def inputs_arguments(config: dict[str, Any]) -> list[str]:
    """``python -m aifs.inputs`` flags for a run's config (no program name)."""
    args = [
        "--date", config["date"],
        "--members", config["members_text"],
        "--bucket", config["bucket"],
        "--checkpoint", config["checkpoint"],
        "--source", config["source"],
    ]
    if config.get("service_account"):
        args += ["--service-account", config["service_account"]]
    if config.get("workers"):
        args += ["--workers", str(config["workers"])]
    if config.get("force"):
        args.append("--force")
    return args
