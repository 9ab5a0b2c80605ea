"""Bucket layout and forecast dates: the one source of truth for object names.

Both the DAG (Airflow side) and the worker (GPU side) import this module, so it must stay
free of heavy imports. The names are byte-exact copies of the original hand-run scripts'
contract (see ../shared/design.md): downstream post-processing depends on them.
"""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass

#: Defaults inherited from the original orchestration script.
DEFAULT_BUCKET = "aifs-aiquest-us-20251127"
DEFAULT_SERVICE_ACCOUNT = "coiled-data.json"
DEFAULT_INPUT_DIR = "/scratch/input_states"
DEFAULT_OUTPUT_DIR = "/scratch/ensemble_outputs"
DEFAULT_UPLOAD_THREADS = 5
UPLOAD_CHUNK_BYTES = 32 * 1024 * 1024
DEFAULT_CHECKPOINT = "ecmwf/aifs-ens-2.0"  # AIFS-ENS 2.0, operational at ECMWF since 12 May 2026 (aifs.generations)
DEFAULT_LEAD_TIME_HOURS = 792
WINDOW_HOURS = 72

DATE_FORMAT = "%Y%m%d_%H%M"
_DATE_RE = re.compile(r"^\d{8}_\d{4}$")


class BadDate(ValueError):
    """A forecast date string that is not YYYYMMDD_HHMM or not a real date."""


def parse_date(text: str) -> _dt.datetime:
    """``"20251127_0000"`` -> ``datetime(2025, 11, 27, 0, 0)``; clear error otherwise."""
    if not isinstance(text, str) or not _DATE_RE.match(text):
        raise BadDate(f"bad forecast date {text!r}: expected YYYYMMDD_HHMM, e.g. 20251127_0000")
    try:
        return _dt.datetime.strptime(text, DATE_FORMAT)
    except ValueError as exc:
        raise BadDate(f"bad forecast date {text!r}: {exc}") from None


def format_date(when: _dt.datetime) -> str:
    return when.strftime(DATE_FORMAT)


def input_object(date: str, member: int) -> str:
    return f"{date}/input/input_state_member_{member:03d}.pkl"


def input_manifest_object(date: str, member: int) -> str:
    """Manifest of one member's input state (aifs.inputs): sources, sizes, crc32c, checkpoint.

    In its own folder, so nothing that lists or waits for ``{date}/input/*.pkl`` ever sees it.
    """
    return f"{date}/input_manifests/input_state_member_{member:03d}.json"


def input_filename(member: int) -> str:
    return f"input_state_member_{member:03d}.pkl"


def forecast_prefix(date: str) -> str:
    return f"{date}/forecasts/"


def forecast_filename(date: str, member: int, start: int, end: int) -> str:
    return f"aifs_ens_forecast_{date}_member{member:03d}_h{start:03d}-{end:03d}.grib"


def forecast_object(date: str, member: int, start: int, end: int) -> str:
    return forecast_prefix(date) + forecast_filename(date, member, start, end)


def forecast_index_object(date: str, member: int, start: int, end: int) -> str:
    """The GRIB index of one forecast window (aifs.worker.grib_index): one JSON line per message.

    ECMWF open data's ``.index`` style (the window's name with ``.index`` for ``.grib``), under a
    prefix of its own so that nothing listing ``{date}/forecasts/`` ever sees an index.
    """
    return f"{date}/forecast_indexes/" + forecast_filename(date, member, start, end).removesuffix(".grib") + ".index"


def member_forecast_prefix(date: str, member: int) -> str:
    """Prefix of every forecast object of one member of one date (one listing finds them all)."""
    return forecast_prefix(date) + f"aifs_ens_forecast_{date}_member{member:03d}_h"


def member_grib_glob(member: int) -> str:
    """Glob matching every local GRIB of one member (any date), for cleanup sweeps."""
    return f"aifs_ens_forecast_*_member{member:03d}_h*.grib"


def member_index_glob(member: int) -> str:
    """Glob matching every local GRIB index of one member (written beside its window, then uploaded)."""
    return f"aifs_ens_forecast_*_member{member:03d}_h*.index"


def manifest_object(date: str, member: int) -> str:
    """Per-member completion manifest; deliberately outside the ``*.grib`` names.

    Its presence is the one and only signal that a member is complete.
    """
    return f"{date}/manifests/aifs_ens_forecast_{date}_member{member:03d}.json"


def manifest_prefix(date: str) -> str:
    return f"{date}/manifests/"


@dataclass(frozen=True)
class Window:
    start: int  # hours, exclusive
    end: int  # hours, inclusive

    def contains(self, hour: int) -> bool:
        return self.start < hour <= self.end


def windows(lead_time: int, window: int = WINDOW_HOURS) -> list[Window]:
    """Output windows ``(start, end]`` covering ``lead_time`` hours; the last may be shorter.

    >>> [(w.start, w.end) for w in windows(150)]
    [(0, 72), (72, 144), (144, 150)]
    """
    if lead_time <= 0:
        raise ValueError(f"lead time must be positive, got {lead_time}")
    return [Window(s, min(s + window, lead_time)) for s in range(0, lead_time, window)]


def window_of(hour: int, lead_time: int, window: int = WINDOW_HOURS) -> Window:
    start = (hour - 1) // window * window
    return Window(start, min(start + window, lead_time))


# -- products (aifs.products): AI Weather Quest files, pictures and the report -------------------


def products_prefix(date: str) -> str:
    return f"{date}/products/"


def product_object(date: str, filename: str) -> str:
    """Any products file (NetCDF, PNG) by its plain file name, under the date's products prefix."""
    if "/" in filename or not filename:
        raise ValueError(f"bad products file name {filename!r}")
    return products_prefix(date) + filename


def products_manifest_object(date: str) -> str:
    """Lists every products file, the members used and whether the ensemble was partial; written last."""
    return products_prefix(date) + "products_manifest.json"


def products_report_object(date: str) -> str:
    """The HTML page linking the pictures (relative links: it works opened from the prefix)."""
    return products_prefix(date) + "report.html"


def submission_marker_object(date: str) -> str:
    """Written only after a successful AI Weather Quest submission: its presence means never submit again."""
    return products_prefix(date) + "submitted.json"


def aiwq_filename(variable: str, date: str, period: int, team: str, model: str) -> str:
    """The competition's file name, ``{var}_{YYYYMMDD}_p{1|2}_{team}_{model}.nc`` (date: YYYYMMDD_HHMM or YYYYMMDD)."""
    return f"{variable}_{date[:8]}_p{period}_{team}_{model}.nc"
