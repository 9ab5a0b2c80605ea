"""aifs_ens_products' deployment settings: submission, team and model, minimum members, points, climatology.

Like the forecast DAG's (aifs.orchestration.deployment), these are ``AIFS_ENS_*`` environment
variables that only the environment's admins set, read and checked when the DAG file is parsed: a
broken one is the products DAG's import error naming its variable. Whether a date is submitted to
the AI Weather Quest, under which team and model, is an admin's decision, never a trigger's: a run
conf naming one of these is refused (``PRODUCTS_DEPLOYMENT_KEYS``).

The competition's credentials are never a setting: they live in an Airflow connection
(AIFS_ENS_AIWQ_CONN_ID, default ``aifs_aiwq``), read only when the products step runs and handed to
it as secret environment variables (``credential_env``), so they appear in no XCom, rendered
field, log or DAG file.

Nothing here imports Airflow at module level: the checks are plain functions the tests call.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
from typing import Any, Mapping

#: Connection holding the AI Weather Quest credentials: its password is the competition's token.
DEFAULT_AIWQ_CONN_ID = "aifs_aiwq"
#: The competition's default points of interest (ICPAC's region), as ``python -m aifs.products --points`` takes them.
DEFAULT_POINTS = "Nairobi:-1.29,36.82;Addis Ababa:9.03,38.74;Kampala:0.35,32.58;Dar es Salaam:-6.79,39.21"
#: The products step's limit (regridding, probabilities and pictures of 50 members take minutes).
DEFAULT_TIMEOUT_MIN = 60.0
#: Airflow's own limit on the step's task comes this long after the step's deadline (enforced where it runs)
STEP_GRACE = dt.timedelta(minutes=5)

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")
#: team and model names go into the competition's file names: keep them to what a file name can hold
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_POINT = re.compile(r"^\s*([^:;,]{1,64}?)\s*:\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*$")

#: Products run settings that only the deployment sets: a name a trigger might use -> its variable.
PRODUCTS_DEPLOYMENT_KEYS = {
    "submit": "AIFS_ENS_SUBMIT",
    "team": "AIFS_ENS_AIWQ_TEAM",
    "model": "AIFS_ENS_AIWQ_MODEL",
    "min_members": "AIFS_ENS_PRODUCTS_MIN_MEMBERS",
    "points": "AIFS_ENS_PRODUCTS_POINTS",
    "climatology": "AIFS_ENS_CLIMATOLOGY",
    "aiwq_conn_id": "AIFS_ENS_AIWQ_CONN_ID",
    "force": "nothing: a date's products are made again by clearing the run; a submitted date is never resubmitted",
}


class BadProductsSetting(ValueError):
    """A products deployment setting that cannot work; the message names the variable."""


@dataclasses.dataclass(frozen=True)
class ProductsSettings:
    submit: bool = False
    team: str | None = None
    model: str | None = None
    min_members: int | None = None
    points: str = DEFAULT_POINTS
    #: a local path or URL of the 20-year climatology; None: the competition's own retrieval (with the credentials)
    climatology: str | None = None
    aiwq_conn_id: str = DEFAULT_AIWQ_CONN_ID
    timeout: dt.timedelta = dt.timedelta(minutes=DEFAULT_TIMEOUT_MIN)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "ProductsSettings":
        env = dict(os.environ if env is None else env)
        submit = _flag("AIFS_ENS_SUBMIT", env.get("AIFS_ENS_SUBMIT", ""))
        team = _name("AIFS_ENS_AIWQ_TEAM", env.get("AIFS_ENS_AIWQ_TEAM", ""))
        model = _name("AIFS_ENS_AIWQ_MODEL", env.get("AIFS_ENS_AIWQ_MODEL", ""))
        if submit and not (team and model):
            raise BadProductsSetting(
                "AIFS_ENS_SUBMIT=true needs AIFS_ENS_AIWQ_TEAM and AIFS_ENS_AIWQ_MODEL: the competition files a "
                "submission under its team and model names"
            )
        min_members = None
        if env.get("AIFS_ENS_PRODUCTS_MIN_MEMBERS", "").strip():
            min_members = _int_in("AIFS_ENS_PRODUCTS_MIN_MEMBERS", env["AIFS_ENS_PRODUCTS_MIN_MEMBERS"], 1, 50)
        points = env.get("AIFS_ENS_PRODUCTS_POINTS", "").strip() or DEFAULT_POINTS
        parse_points(points, "AIFS_ENS_PRODUCTS_POINTS")
        timeout_min = _positive("AIFS_ENS_PRODUCTS_TIMEOUT_MIN", env.get("AIFS_ENS_PRODUCTS_TIMEOUT_MIN", "") or str(DEFAULT_TIMEOUT_MIN))
        return cls(
            submit=submit,
            team=team,
            model=model,
            min_members=min_members,
            points=points,
            climatology=env.get("AIFS_ENS_CLIMATOLOGY", "").strip() or None,
            aiwq_conn_id=env.get("AIFS_ENS_AIWQ_CONN_ID", "").strip() or DEFAULT_AIWQ_CONN_ID,
            timeout=dt.timedelta(minutes=timeout_min),
        )

    def command_args(self) -> list[str]:
        """The deployment's part of ``python -m aifs.products``'s arguments (the run adds date, bucket, members)."""
        args: list[str] = []
        if self.team and self.model:
            args += ["--team", self.team, "--model", self.model]
        if self.climatology:
            args += ["--climatology", self.climatology]
        if self.min_members is not None:
            args += ["--min-members", str(self.min_members)]
        args += ["--points", self.points]
        if self.submit:
            args.append("--submit")
        return args


def parse_points(text: str, where: str = "points") -> list[tuple[str, float, float]]:
    """``"Nairobi:-1.29,36.82;Kampala:0.35,32.58"`` -> [(name, lat, lon), ...]; errors name ``where`` and the point."""
    points = []
    for part in (p for p in text.split(";") if p.strip()):
        match = _POINT.match(part)
        if not match:
            raise BadProductsSetting(f"{where}: {part.strip()!r} is not Name:lat,lon (e.g. Nairobi:-1.29,36.82)")
        name, lat, lon = match.group(1), float(match.group(2)), float(match.group(3))
        if not (-90 <= lat <= 90 and -180 <= lon <= 360):
            raise BadProductsSetting(f"{where}: {name}: latitude {lat} or longitude {lon} is off the globe")
        points.append((name, lat, lon))
    if not points:
        raise BadProductsSetting(f"{where}: no points")
    return points


def _flag(name: str, text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise BadProductsSetting(f"{name} must be true or false, got {text!r}")


def _name(name: str, text: str) -> str | None:
    text = text.strip()
    if text and not _NAME.match(text):
        raise BadProductsSetting(f"{name} must be letters, digits, '-' or '_' (it goes into the competition's file names), got {text!r}")
    return text or None


def _int_in(name: str, text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise BadProductsSetting(f"{name} must be a whole number, got {text!r}") from None
    if not low <= value <= high:
        raise BadProductsSetting(f"{name} must be within {low}..{high}, got {value}")
    return value


def _positive(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BadProductsSetting(f"{name} must be a number, got {text!r}") from None
    if value <= 0:
        raise BadProductsSetting(f"{name} must be positive, got {value}")
    return value


# -- the competition's credentials, from the Airflow connection ------------------------------------

#: connection field -> the environment variable ``python -m aifs.products`` reads it from
#: (aifs.products.climatology.PASSWORD_ENV: the competition's token, for the climatology's retrieval
#: and the submission; a test keeps the two in step). Only what the command reads is handed over.
CREDENTIAL_ENV: dict[str, str] = {
    "password": "AIFS_AIWQ_PASSWORD",
}


def credential_env(conn_id: str) -> dict[str, str]:
    """The secret environment of the products step, from the Airflow connection ``conn_id``.

    Called only when the step runs (never at parse time). A missing connection is no error when
    nothing needs it (a local climatology, submission off): the command then says what it lacks.
    """
    from airflow.sdk import BaseHook

    try:
        conn = BaseHook.get_connection(conn_id)
    except Exception:  # AirflowNotFoundException; the command reports what it needs and lacks
        return {}
    values: dict[str, Any] = {field: getattr(conn, field, None) for field in CREDENTIAL_ENV}
    return {CREDENTIAL_ENV[field]: str(value) for field, value in values.items() if value}
