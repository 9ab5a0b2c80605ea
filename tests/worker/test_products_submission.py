"""Submission to the AI Weather Quest through ai-wq-package's own code, against a local stand-in.

The package's submission needs ECMWF's ECBOX SDK, which is not on PyPI; tests/stand_ins/sites stands
in for it (exactly the calls the package makes) and talks HTTP to tests/stand_ins/aiwq_server.py, a
local server that records every request and keeps what was uploaded. The package's registry URL
(hard-coded) is answered by the same server. So the package's real functions run:
``AI_WQ_forecast_submission`` (its checks, its template, its upload), ``AI_WQ_check_submission``, and
``AI_WQ_create_empty_dataarray`` whose periods must be ours. What reached the server is asserted.

Three members on N32, products made once for the module (later runs reuse them from the bucket).
The tests share the bucket and the server and run in file order: each says what it expects before.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

STAND_INS = Path(__file__).resolve().parents[1] / "stand_ins"
DATE = "20251127_0000"  # a Thursday, 00 UTC
TOKEN = "stand-in-token"
TEAM, MODEL = "ECMWFtest", "aifsens"  # the package's own test team: exempt from the submission window only
OTHER_TEAM = "AIFSteam"  # registered too, but held to the window: 2025-11-27's closed on 2025-11-30
MEMBERS = [1, 2, 3]
SUBMISSIONS = "/forecast_submissions/20251127/"


def _values(short, step, member):
    from aifs.testing import products_data

    size = products_data.grid_size("N32")
    if short == "2t":
        return np.full(size, 285.0 + 5.0 * member)
    if short == "msl":
        return np.full(size, 100800.0 + 300.0 * member)
    return np.full(size, 0.01 * member / 168.0 * step)  # accumulated from the start


def _import_server():
    sys.path.insert(0, str(STAND_INS))
    import aiwq_server

    return aiwq_server


@pytest.fixture(scope="module")
def server():
    """The local stand-in for the competition's endpoints; the stand-in SDK importable for the module only."""
    aiwq_server = _import_server()
    from AI_WQ_package import check_fc_submission

    saved_pd = check_fc_submission.pd
    srv = aiwq_server.AIWQServer(TOKEN, registered=[(TEAM, MODEL), (OTHER_TEAM, MODEL)]).start()
    mp = pytest.MonkeyPatch()
    mp.setenv("AIWQ_STANDIN_URL", srv.url)
    try:
        yield srv
    finally:
        srv.stop()
        mp.undo()
        # leave no stand-in behind for other modules of this process
        check_fc_submission.pd = saved_pd
        for name in [n for n in sys.modules if n == "sites" or n.startswith("sites.")] + ["AI_WQ_package.forecast_submission"]:
            sys.modules.pop(name, None)
        sys.path.remove(str(STAND_INS))


@pytest.fixture(scope="module")
def products_env(emulator, tmp_path_factory):
    from aifs.testing import climatology, products_data
    from aifs.testing.emulator import anonymous_client

    bucket = anonymous_client(emulator.url).create_bucket("products-submission")
    for m in MEMBERS:
        products_data.write_member(bucket, DATE, m, _values, grid="N32")
    clim = str(tmp_path_factory.mktemp("clim"))
    climatology.write(clim, DATE)
    return bucket, clim


def run(products_env, emulator, monkeypatch, capsys, *extra, team=TEAM):
    from aifs.products.cli import main

    bucket, clim = products_env
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
    monkeypatch.setenv("AIFS_AIWQ_PASSWORD", TOKEN)
    root = logging.getLogger()
    saved = list(root.handlers)
    try:
        code = main(["--date", DATE, "--bucket", bucket.name, "--members", "1-3", "--climatology", clim,
                     "--team", team, "--model", MODEL, "--points", "Nairobi:-1.29,36.82", "--submit", *extra])
    finally:
        for h in list(root.handlers):
            if h not in saved:
                root.removeHandler(h)
    out, _ = capsys.readouterr()
    return code, json.loads(out.strip().splitlines()[-1])


def expected_names(team=TEAM):
    from aifs import layout
    from aifs.products import periods

    return {layout.aiwq_filename(p.variable, DATE, p.number, team, MODEL) for p in periods.periods()}


def _open(data: bytes, tmp_path: Path, name: str):
    import xarray as xr

    path = tmp_path / name
    path.write_bytes(data)
    with xr.open_dataarray(path) as da:
        return da.load()


def test_package_template_periods_are_the_products_periods(server, tmp_path, monkeypatch):
    """The package's own template (what its submission fills) has our periods and our file layout."""
    from AI_WQ_package import forecast_submission

    from aifs.products import files, periods

    monkeypatch.chdir(tmp_path)  # the package writes its ID table into the working directory
    issue = np.datetime64("2025-11-27T00:00:00")
    for p in periods.periods():
        with contextlib.redirect_stdout(io.StringIO()):
            template = forecast_submission.AI_WQ_create_empty_dataarray(p.variable, DATE[:8], p.number, TEAM, MODEL, TOKEN)
        start = template.coords["forecast_period_start"].values
        end = template.coords["forecast_period_end"].values
        assert (start - issue, end - issue) == (np.timedelta64(p.start_hour, "h"), np.timedelta64(p.end_hour, "h")), p.label
        assert template.attrs["forecast_period_bounds"] == f"[{p.start_day},{p.end_day}]", p.label
        ours = files.data_array(np.zeros(template.shape), p, DATE, TEAM, MODEL, MEMBERS, False)
        assert ours.dims == template.dims
        for name in ("quintile", "latitude", "longitude"):
            np.testing.assert_array_equal(ours[name].values, template[name].values)
        identity = {"originating_centre", "expver"}  # the package's ECBOX identifiers, filled in at submission
        mine = {"ensemble_members_used", "ensemble_members", "ensemble_partial"}
        assert {k: v for k, v in ours.attrs.items() if k not in identity | mine} == \
               {k: v for k, v in template.attrs.items() if k not in identity}, p.label
    # the package registered the team once, in its ID table on the server
    table = server.files["ecbox/AI_Weather_Quest:/AI_WQ_unique_IDs.csv"].decode()
    assert f"{TEAM},{MODEL}" in table


def test_submission_sends_the_bucket_files_once(server, products_env, emulator, monkeypatch, capsys, tmp_path):
    from aifs import layout

    bucket, _ = products_env
    code, summary = run(products_env, emulator, monkeypatch, capsys)
    assert code == 0, summary
    assert summary["submission"] == "submitted 6 files"
    sent = server.uploads(prefix=SUBMISSIONS, suffix=".nc")
    assert sorted(path.rsplit("/", 1)[1] for path, _ in sent) == sorted(expected_names())
    assert not [r for r in server.requests if r.status == 401]  # the token from AIFS_AIWQ_PASSWORD reached it
    table = server.files["ecbox/AI_Weather_Quest:/AI_WQ_unique_IDs.csv"].decode().splitlines()
    origin, expver = next(line.split(",")[:2] for line in table if line.endswith(f"{TEAM},{MODEL}"))
    for path, data in sent:
        name = path.rsplit("/", 1)[1]
        uploaded = _open(data, tmp_path, "sent-" + name)
        stored = _open(bucket.blob(layout.product_object(DATE, name)).download_as_bytes(), tmp_path, name)
        # the package writes the file it sends from its own template: the probabilities are ours, bit for bit
        assert uploaded.values.dtype == stored.values.dtype and uploaded.values.tobytes() == stored.values.tobytes(), name
        for coord in ("quintile", "latitude", "longitude", "forecast_issue_date", "forecast_period_start", "forecast_period_end"):
            np.testing.assert_array_equal(uploaded[coord].values, stored[coord].values, err_msg=f"{name} {coord}")
        assert (uploaded.attrs["originating_centre"], uploaded.attrs["expver"]) == (origin, expver)
    marker = json.loads(bucket.blob(layout.submission_marker_object(DATE)).download_as_bytes())
    assert sorted(marker["files"]) == sorted(expected_names()) and marker["members"] == MEMBERS

    before = len(server.requests)
    code, summary = run(products_env, emulator, monkeypatch, capsys)
    assert code == 0 and summary["submission"].startswith("already submitted"), summary
    assert len(server.requests) == before  # the second run sent nothing, asked nothing


def test_server_failure_mid_submission_exits_33_without_marker_then_resends(server, products_env, emulator, monkeypatch,
                                                                            capsys):
    from aifs import layout

    bucket, _ = products_env
    bucket.blob(layout.submission_marker_object(DATE)).delete()  # as if the date had never been submitted
    before = len(server.uploads(prefix=SUBMISSIONS, suffix=".nc"))
    server.fail_uploads(after=2)  # the third file's upload answers 500
    code, summary = run(products_env, emulator, monkeypatch, capsys)
    assert code == 33, summary
    assert "failed" in summary["error"] and "_20251127_p" in summary["error"]
    assert len(server.uploads(prefix=SUBMISSIONS, suffix=".nc")) == before + 2
    assert bucket.get_blob(layout.submission_marker_object(DATE)) is None  # nothing marked as submitted

    code, summary = run(products_env, emulator, monkeypatch, capsys)
    assert code == 0 and summary["submission"] == "submitted 6 files", summary
    resent = server.uploads(prefix=SUBMISSIONS, suffix=".nc")[before + 2:]
    assert sorted(p.rsplit("/", 1)[1] for p, _ in resent) == sorted(expected_names())
    assert bucket.get_blob(layout.submission_marker_object(DATE)) is not None


def test_package_periods_moved_stops_submission_before_anything_is_sent(server, products_env, emulator, monkeypatch,
                                                                        capsys):
    from aifs import layout
    from aifs.products import periods

    bucket, _ = products_env
    bucket.blob(layout.submission_marker_object(DATE)).delete()
    # our table one step off the package's period 1 for the means: what a package release moving the weeks looks like
    monkeypatch.setitem(periods._PACKAGE_BOUNDS, ("mean", 1), (18.25, 24.75))
    before = len(server.uploads(prefix=SUBMISSIONS))
    code, summary = run(products_env, emulator, monkeypatch, capsys)
    assert code == 33, summary
    assert "hours 432-594" in summary["error"] and "438-594" in summary["error"] and "nothing was submitted" in summary["error"]
    assert len(server.uploads(prefix=SUBMISSIONS)) == before
    assert bucket.get_blob(layout.submission_marker_object(DATE)) is None


def test_not_a_competition_date_sends_nothing(server, products_env, emulator, monkeypatch, capsys):
    from aifs import layout

    bucket, _ = products_env
    if bucket.get_blob(layout.submission_marker_object(DATE)) is not None:
        bucket.blob(layout.submission_marker_object(DATE)).delete()  # a marker would answer first
    before = len(server.requests)
    code, summary = run(products_env, emulator, monkeypatch, capsys, team=OTHER_TEAM)  # remakes the products for it
    assert code == 0, summary
    assert summary["submission"].startswith("not submitted: not a competition date now"), summary
    assert len(server.requests) == before
    assert bucket.get_blob(layout.submission_marker_object(DATE)) is None
    stored = {b.name.rsplit("/", 1)[1] for b in bucket.list_blobs(prefix=layout.products_prefix(DATE))}
    assert expected_names(OTHER_TEAM) <= stored  # the products are in the bucket either way
