"""Submission to the AI Weather Quest through the package's own ``AI_WQ_forecast_submission``.

Only with ``--submit``, only for a competition date, at most once per date: the marker
``{date}/products/submitted.json`` (aifs.layout.submission_marker_object) is written after every
file of the date was submitted and confirmed (``AI_WQ_check_submission``); while it exists, nothing
is submitted again. A failure half-way writes no marker: the retry submits every file again under
the same names (the competition keeps the latest file of a name).

Before anything is sent, the package's own template (``AI_WQ_create_empty_dataarray``, the one its
submission fills) is asked for each period's bounds and compared with aifs.products.periods, from
which the values were made: a package release that moves the weeks stops the submission (exit
SUBMISSION_FAILED) instead of filing week-3 values under other days. (periods.py stays a table:
the template function registers the team with ECBOX, so it cannot run when the module is imported.)

The package runs all its checks before sending (team and model registration, submission window,
data) and uploads to ECMWF's ECBOX with the token from ``AIFS_AIWQ_PASSWORD``. Its submission
module needs ECMWF's ECBOX ``sites`` SDK (``sites-toolkit``, from ECMWF's package index, not PyPI):
without it a submission fails with a message saying so (exit SUBMISSION_FAILED), and the products
stay in the bucket. Tests and the demo put a stand-in SDK on PYTHONPATH that talks to a local
server (tests/stand_ins).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import logging
import os
import tempfile

from aifs import layout
from aifs.products import periods
from aifs.products.climatology import PASSWORD_ENV
from aifs.products.errors import SubmissionFailed

log = logging.getLogger("aifs.products")

#: the package's own test team: it skips the submission-window check for it (check_fc_submission.all_checks)
PACKAGE_TEST_TEAM = "ECMWFtest"


def competition_date_problem(date: str, team: str) -> str | None:
    """Why ``date`` cannot be submitted now (the package's rule: a Thursday, within its window), or None."""
    from AI_WQ_package import check_fc_submission as checks

    when = layout.parse_date(date)
    if when.hour or when.minute:
        return f"{date} is not a 00 UTC run: the competition's forecasts are issued at 00 UTC"
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            if team == PACKAGE_TEST_TEAM:  # the package exempts its test team from the window, not from Thursdays
                if when.weekday() != 3:
                    raise ValueError(f"Forecast start date of {date[:8]} is not a Thursday.")
            else:
                checks.check_forecast_data_window(date[:8])
    except ValueError as exc:
        return str(exc)
    return None


def read_marker(bucket, date: str, **request) -> dict | None:
    blob = bucket.get_blob(layout.submission_marker_object(date), **request)
    if blob is None:
        return None
    try:
        return json.loads(bucket.blob(blob.name).download_as_bytes(**request))
    except ValueError:
        return {"unreadable": True}  # present is what counts: never resubmit


def submit(files: dict[tuple[str, int], str], date: str, team: str, model: str) -> list[str]:
    """Submit each (variable, period) file; returns the competition's file names. Raises SubmissionFailed."""
    import xarray as xr

    password = os.environ.get(PASSWORD_ENV)
    if not password:
        raise SubmissionFailed(f"--submit needs the competition's token in {PASSWORD_ENV}")
    try:
        from AI_WQ_package import forecast_submission
    except ImportError as exc:
        raise SubmissionFailed(f"the AI Weather Quest package cannot submit here ({exc}): its submission needs "
                               "ECMWF's ECBOX 'sites' SDK installed beside it") from None
    sent = []
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="aifs-submit-") as workdir:
        os.chdir(workdir)  # the package writes its files (the submission, its ID table) into the working directory
        try:
            _check_periods_against_package(forecast_submission, sorted(files), date, team, model, password)
            for (variable, period), path in sorted(files.items()):
                name = layout.aiwq_filename(variable, date, period, team, model)
                chatter = io.StringIO()
                try:
                    with xr.open_dataarray(path) as da, contextlib.redirect_stdout(chatter):
                        forecast_submission.AI_WQ_forecast_submission(da.load(), variable, date[:8], period, team, model, password)
                        forecast_submission.AI_WQ_check_submission(variable, date[:8], period, team, model, password)
                except Exception as exc:  # the package raises ValueError (checks), RuntimeError/FileNotFoundError (ECBOX)
                    raise SubmissionFailed(f"submission of {name} failed: {type(exc).__name__}: {exc}") from None
                finally:
                    log.debug("package output for %s: %s", name, chatter.getvalue().strip().replace("\n", "; "))
                sent.append(name)
                log.info("[PRODUCTS] submitted %s and confirmed by the competition (%d/%d)", name, len(sent), len(files))
        finally:
            os.chdir(cwd)
    return sent


def _check_periods_against_package(forecast_submission, keys, date: str, team: str, model: str, password: str) -> None:
    """SubmissionFailed, before anything is sent, where the package's template disagrees with aifs.products.periods."""
    import importlib.metadata

    import numpy as np

    by_key = {(p.variable, p.number): p for p in periods.periods()}
    version = importlib.metadata.version("ai-wq-package")
    for variable, number in keys:
        ours = by_key[(variable, number)]
        chatter = io.StringIO()
        try:
            with contextlib.redirect_stdout(chatter):
                template = forecast_submission.AI_WQ_create_empty_dataarray(variable, date[:8], number, team, model, password)
        except Exception as exc:
            raise SubmissionFailed(f"the package's template for {ours.label} could not be made: {type(exc).__name__}: {exc}") from None
        hours = [float((template.coords[c].values - template.coords["forecast_issue_date"].values) / np.timedelta64(1, "h"))
                 for c in ("forecast_period_start", "forecast_period_end")]
        if hours != [ours.start_hour, ours.end_hour]:
            raise SubmissionFailed(
                f"ai-wq-package {version} defines {variable} period {number} as hours {hours[0]:g}-{hours[1]:g} after the "
                f"issue time; the products were made for {ours.start_hour}-{ours.end_hour} (aifs/products/periods.py): "
                "update the table to the package's periods; nothing was submitted")
    log.info("[PRODUCTS] periods of %d file(s) match ai-wq-package %s's template", len(keys), version)


def marker(date: str, team: str, model: str, sent: list[str], members: list[int]) -> str:
    return json.dumps({"date": date, "team": team, "model": model, "files": sent, "members": members,
                       "submitted_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}, indent=2)
