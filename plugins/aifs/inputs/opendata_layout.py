"""Where ECMWF open data keeps a field: file names, streams, cycles. Standard library only.

``{root}/{yyyymmdd}/{HH}z/ifs/0p25/{stream}/{yyyymmddHHMMSS}-{step}h-{stream}-{ef|fc}.grib2`` with
a ``.index`` beside each file (one JSON object a line). The same layout serves the published check
(Airflow side), the local mirror (tests, demo) and, through the ecmwf-opendata client, the fetch:
the fetch checks that the client's URLs are these, so the three cannot drift apart unnoticed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os

#: Known sources, as ecmwf-opendata names them (ecmwf.opendata.urls). A copy, because importing the
#: client pulls requests and multiurl into the Airflow side; the fetch checks that the client's URLs
#: are the ones built here, so a drift fails loudly. $ECMWF_OPENDATA_URLS overrides both alike.
SOURCE_URLS = {
    "aws": "https://ecmwf-forecasts.s3.eu-central-1.amazonaws.com",
    "azure": "https://ai4edataeuwest.blob.core.windows.net/ecmwf",
    "ecmwf": "https://data.ecmwf.int/forecasts",
    "google": "https://storage.googleapis.com/ecmwf-open-data",
}
#: IFS cycle 50r1 (12 May 2026): from then on the 06/18 UTC deterministic runs are under ``oper``, before under ``scda``.
IFS_50R1 = dt.date(2026, 5, 12)
RESOLUTION = "0p25"
#: What a stream's files are called after the step: ensemble streams hold every member in one file.
FILE_TYPE = {"enfo": "ef", "waef": "ef", "oper": "fc", "scda": "fc", "wave": "fc", "scwv": "fc"}


class UnknownSource(ValueError):
    """A --source that is neither a known name nor an http(s) URL."""


def source_url(source: str) -> str:
    """``google`` -> its URL; an http(s) URL as it is (no trailing slash)."""
    if source.startswith(("http://", "https://")):
        return source.rstrip("/")
    URLS = {**SOURCE_URLS, **json.loads(os.environ.get("ECMWF_OPENDATA_URLS", "{}"))}
    if source not in URLS:
        raise UnknownSource(f"unknown open-data source {source!r}: use one of {', '.join(sorted(URLS))} or an http(s) URL")
    return URLS[source].rstrip("/")


def deterministic_stream(cycle: dt.datetime) -> str:
    """The deterministic forecast's stream at ``cycle``: ``scda`` for 06/18 UTC before IFS 50r1, else ``oper``."""
    return "scda" if cycle.hour in (6, 18) and cycle.date() < IFS_50R1 else "oper"


@dataclasses.dataclass(frozen=True)
class DataFile:
    """One open-data GRIB file: a stream of one cycle at one step."""

    stream: str
    cycle: dt.datetime
    step: int = 0

    def path(self) -> str:
        c = self.cycle
        return (f"{c:%Y%m%d}/{c:%H}z/ifs/{RESOLUTION}/{self.stream}/"
                f"{c:%Y%m%d%H%M%S}-{self.step}h-{self.stream}-{FILE_TYPE[self.stream]}.grib2")

    def index_path(self) -> str:
        return self.path()[: -len(".grib2")] + ".index"

    def url(self, root: str) -> str:
        return f"{root}/{self.path()}"

    def index_url(self, root: str) -> str:
        return f"{root}/{self.index_path()}"

    def __str__(self) -> str:
        return self.path()


def time_level_cycles(date: dt.datetime, time_levels: int = 2, timestep: dt.timedelta = dt.timedelta(hours=6)) -> list[dt.datetime]:
    """The analysis times of the input state's time levels, oldest first: (t-6h, t) for AIFS-ENS."""
    return [date - timestep * k for k in range(time_levels - 1, -1, -1)]


def needed_files(date: dt.datetime, time_levels: int = 2, timestep: dt.timedelta = dt.timedelta(hours=6),
                 waves: bool = False) -> list[DataFile]:
    """Every file a date's input states read: ENS (and ENS waves) at each time level, constants at t.

    Each time level is its own cycle's step 0 (the original script's way); the constant fields
    come from the deterministic forecast at ``date``, step 0.
    """
    files = []
    for cycle in time_level_cycles(date, time_levels, timestep):
        files.append(DataFile("enfo", cycle))
        if waves:
            files.append(DataFile("waef", cycle))
    files.append(DataFile(deterministic_stream(date), date))
    return files
