"""Is a date's open data published? Standard library only: the Airflow side polls it from a trigger.

    from aifs.inputs.published import opendata_published
    opendata_published("google", "20250601_0000")  # True once every index file the date needs exists
"""

from __future__ import annotations

import datetime as dt
import logging
import urllib.error
import urllib.request

from aifs.inputs.opendata_layout import needed_files, source_url

LOG = logging.getLogger("aifs.inputs")

#: Seconds one HEAD may take: a poll must not hang a triggerer.
HEAD_TIMEOUT = 20.0


def _as_datetime(date: str | dt.datetime) -> dt.datetime:
    if isinstance(date, dt.datetime):
        return date.replace(tzinfo=None)
    from aifs.layout import parse_date

    return parse_date(date)


def index_urls(source: str, date: str | dt.datetime, waves: bool = False) -> list[str]:
    """The index files a date needs (ENS at t-6h and t, the deterministic run's constants at t; ENS waves if asked)."""
    root = source_url(source)
    return [f.index_url(root) for f in needed_files(_as_datetime(date), waves=waves)]


def _exists(url: str) -> bool:
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=HEAD_TIMEOUT) as response:
            return 200 <= response.status < 300
    except urllib.error.HTTPError as exc:
        if exc.code not in (403, 404):  # cloud buckets answer 403 for a missing object without list rights
            LOG.warning("open data: HEAD %s answered %d %s; taking it as not published yet", url, exc.code, exc.reason)
        return False
    except (urllib.error.URLError, OSError) as exc:
        LOG.warning("open data: HEAD %s failed (%s); taking it as not published yet", url, exc)
        return False


def opendata_published(source: str, date: str | dt.datetime, *, waves: bool = False) -> bool:
    """True when every index file ``date`` (``YYYYMMDD_HHMM`` or a datetime) needs exists at ``source``.

    ``source``: an ecmwf-opendata name (``ecmwf``, ``aws``, ``azure``, ``google``) or a URL. Never
    raises for network trouble (it logs it and answers False: the caller polls again); raises
    ValueError for a bad date or an unknown source name. ``waves``: also the ENS wave stream's
    index files (checkpoints with ocean-wave inputs).
    """
    return all(_exists(url) for url in index_urls(source, date, waves=waves))
