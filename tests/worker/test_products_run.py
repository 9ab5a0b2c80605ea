"""aifs.products end to end on a known ensemble: the probabilities written are exactly the known ones.

Five members on a small N32 grid, written into the emulator bucket as the worker writes them
(aifs.testing.products_data: windows + schema-2 manifests). Member k's 2 m temperature is
c_k + 2 K/h x (step - the middle of the package's period): averaged over the package's steps it is
exactly c_k, over the original scripts' steps (438-576, 582-792) it is not. Precipitation
accumulates at r_k, so each period's sum is r_k x 168 h. The climatology's edges put the members in
known quintiles: one member a quintile (0.2 each), and south of the equator, where the temperature
edges are 10 K higher, 0.4/0.2/0.2/0.2/0.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging

import numpy as np
import pytest

DATE = "20251127_0000"  # a Thursday, 00 UTC
MEMBERS = [1, 2, 3, 4, 5]
TAS = {1: 280.0, 2: 290.0, 3: 300.0, 4: 310.0, 5: 320.0}
MSL = {m: 100000.0 + 200.0 * m for m in MEMBERS}  # 100200 .. 101000
PR_WEEK = {1: 0.005, 2: 0.015, 3: 0.025, 4: 0.035, 5: 0.045}  # m per period


def _values(grid_size):
    def values(short, step, member):
        if short == "2t":
            middle = 513 if step <= 597 else 681  # the package's period 1 (432-594) and 2 (600-762) middles
            return np.full(grid_size, TAS[member] + 2.0 * (step - middle))
        if short == "msl":
            return np.full(grid_size, MSL[member])
        return np.full(grid_size, PR_WEEK[member] / 168.0 * step)

    return values


def _edges(variable, lat, lon):
    if variable == "tas":
        return 300.0 + np.array([-15, -5, 5, 15])[:, None, None] + np.where(lat < 0, 10.0, 0.0)[None]
    if variable == "mslp":
        return np.broadcast_to(np.array([100300.0, 100500, 100700, 100900])[:, None, None], (4,) + lat.shape)
    return np.broadcast_to(np.array([0.01, 0.02, 0.03, 0.04])[:, None, None], (4,) + lat.shape)


def expected(variable, lat):
    south = np.array([0.4, 0.2, 0.2, 0.2, 0.0])
    uniform = np.full(5, 0.2)
    if variable == "tas":
        return np.where((lat < 0)[None, :, None], south[:, None, None], uniform[:, None, None])
    return uniform[:, None, None]


@pytest.fixture(scope="module")
def products_env(emulator, tmp_path_factory):
    from aifs.testing import climatology, products_data
    from aifs.testing.emulator import anonymous_client

    client = anonymous_client(emulator.url)
    bucket = client.create_bucket("products-known")
    values = _values(products_data.grid_size("N32"))
    for m in MEMBERS:
        products_data.write_member(bucket, DATE, m, values, grid="N32", wall_s=400.0 + m)
    clim = str(tmp_path_factory.mktemp("clim"))
    climatology.write(clim, DATE, _edges)
    return bucket, clim


def run(argv, monkeypatch, emulator, capsys):
    from aifs.products.cli import main

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
    monkeypatch.delenv("AIFS_AIWQ_PASSWORD", raising=False)
    root = logging.getLogger()
    saved = list(root.handlers)
    try:
        code = main(argv)
    finally:
        for h in list(root.handlers):
            if h not in saved:
                root.removeHandler(h)
    out, err = capsys.readouterr()
    return code, json.loads(out.strip().splitlines()[-1]), err


@pytest.fixture(scope="module")
def first_run(products_env, emulator):
    """The products of the known ensemble, made once for the module."""
    bucket, clim = products_env
    mp = pytest.MonkeyPatch()
    cap = _Capture()
    try:
        with contextlib.redirect_stdout(cap.out):
            result = run(["--date", DATE, "--bucket", bucket.name, "--members", "1-5", "--climatology", clim,
                      "--team", "ECMWFtest", "--model", "aifsens", "--min-members", "5"], mp, emulator, cap)
    finally:
        mp.undo()
    return result


class _Capture:
    """capsys for a module-scoped fixture: the command's stdout, read back."""

    def __init__(self):
        self.out = io.StringIO()

    def readouterr(self):
        return self.out.getvalue(), ""


def test_known_ensemble_gives_known_probabilities(first_run, products_env, tmp_path):
    import xarray as xr

    from aifs import layout
    from aifs.products import files, periods

    code, summary, _ = first_run
    bucket, _ = products_env
    assert code == 0, summary
    assert summary["members_used"] == MEMBERS and not summary["partial"]
    assert summary["report"] == f"gs://{bucket.name}/{DATE}/products/report.html"
    for p in periods.periods():
        name = layout.aiwq_filename(p.variable, DATE, p.number, "ECMWFtest", "aifsens")
        path = tmp_path / name
        bucket.blob(layout.product_object(DATE, name)).download_to_filename(str(path))
        with xr.open_dataarray(path) as da:
            da = da.load()
        want = np.broadcast_to(expected(p.variable, da.latitude.values), da.shape)
        np.testing.assert_array_equal(da.values, want, err_msg=p.label)
        assert da.attrs["ensemble_members_used"] == 5 and da.attrs["ensemble_partial"] == 0
        files.package_check(da, p.variable, DATE, p.number, name)  # the package's checker passes the file


def test_products_listed_pictures_not_blank_report_links_them(first_run, products_env, tmp_path):
    from PIL import Image

    from aifs import layout

    _, summary, _ = first_run
    bucket, _ = products_env
    manifest = json.loads(bucket.blob(layout.products_manifest_object(DATE)).download_as_bytes())
    stored = {b.name.rsplit("/", 1)[1] for b in bucket.list_blobs(prefix=layout.products_prefix(DATE))}
    assert set(manifest["files"]) <= stored and "report.html" in stored
    pngs = [f for f in manifest["files"] if f.endswith(".png")]
    assert len([f for f in pngs if f.startswith("map_")]) == 6 and len([f for f in pngs if f.startswith("plume_")]) == 4
    page = bucket.blob(layout.products_report_object(DATE)).download_as_text()
    for png in pngs:
        assert f'src="{png}"' in page  # relative: works opened from the prefix
        path = tmp_path / png
        bucket.blob(layout.product_object(DATE, png)).download_to_filename(str(path))
        pixels = np.asarray(Image.open(path).convert("L"), dtype=float)
        assert pixels.std() > 5, f"{png} looks blank"


def test_second_run_is_not_redone_and_submits_nothing_after_marker(products_env, emulator, monkeypatch, capsys, caplog):
    from aifs import layout

    bucket, clim = products_env
    bucket.blob(layout.submission_marker_object(DATE)).upload_from_string('{"submitted_at": "earlier"}')
    caplog.set_level(logging.INFO)
    try:
        code, summary, err = run(["--date", DATE, "--bucket", bucket.name, "--members", "1-5", "--climatology", clim,
                                  "--team", "ECMWFtest", "--model", "aifsens", "--submit"], monkeypatch, emulator, capsys)
    finally:
        bucket.blob(layout.submission_marker_object(DATE)).delete()
    assert code == 0
    assert summary["submission"].startswith("already submitted")
    assert "already made from the same 5 members" in caplog.text


def test_missing_window_leaves_member_out_labelled_partial_and_min_members_blocks(products_env, emulator, monkeypatch, capsys):
    from aifs import layout

    bucket, clim = products_env
    name = layout.forecast_object(DATE, 3, 504, 576)
    data = bucket.blob(name).download_as_bytes()
    bucket.blob(name).delete()
    try:
        code, summary, err = run(["--date", DATE, "--bucket", bucket.name, "--members", "1-5", "--climatology", clim,
                                  "--min-members", "5", "--force", "--team", "ECMWFtest", "--model", "aifsens",
                                  "--points", "Nairobi:-1.29,36.82"],
                                 monkeypatch, emulator, capsys)
        manifest = json.loads(bucket.blob(layout.products_manifest_object(DATE)).download_as_bytes())
    finally:
        bucket.blob(name).upload_from_string(data, checksum="crc32c")
        bucket.blob(layout.products_manifest_object(DATE)).delete()
    assert code == 31, summary  # TOO_FEW_MEMBERS
    assert "fewer than the minimum 5" in summary["error"]
    assert manifest["partial"] is True and manifest["members_used"] == [1, 2, 4, 5]
    assert name in manifest["members_excluded"]["3"] and "missing" in manifest["members_excluded"]["3"]
