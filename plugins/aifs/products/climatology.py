"""The 20-year weekly quintile climatology the probabilities are measured against.

Files are the competition's own: ``{var}_20yrCLIM_WEEKLYMEAN_quintiles_{YYYYMMDD}.nc`` (tas, mslp)
and ``pr_20yrCLIM_WEEKLYSUM_quintiles_{YYYYMMDD}.nc``, YYYYMMDD the first day of the valid week
(issue date + 18 or + 25 days), one DataArray of the four quintile edges (0.2 .. 0.8) on the 1.5
degree grid. Two sources, one registry:

* ``--climatology PATH_OR_URL``: a directory or an http(s) prefix holding those files (tests, demo:
  ``python -m aifs.testing climatology`` writes them);
* otherwise the competition's retrieval, ``AI_WQ_package.retrieve_evaluation_data.retrieve_20yr_quantile_clim``,
  with the token in ``AIFS_AIWQ_PASSWORD``. That module needs ECMWF's ECBOX ``sites`` SDK, which
  is not on PyPI: without it this source fails with a message saying so (exit CLIMATOLOGY_FAILED).
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile

import numpy as np

from aifs import layout
from aifs.products import regrid
from aifs.products.errors import ClimatologyFailed
from aifs.products.periods import Period

PASSWORD_ENV = "AIFS_AIWQ_PASSWORD"
QUINTILE_EDGES = (0.2, 0.4, 0.6, 0.8)
_KIND = {"tas": "WEEKLYMEAN", "mslp": "WEEKLYMEAN", "pr": "WEEKLYSUM"}


def valid_week_start(date: str, period: Period) -> str:
    """YYYYMMDD of the first day of the period's week (the climatology file's date)."""
    return (layout.parse_date(date) + dt.timedelta(days=period.start_day)).strftime("%Y%m%d")


def filename(variable: str, week_start: str) -> str:
    """The package's own climatology file name (retrieve_evaluation_data.retrieve_20yr_quantile_clim)."""
    return f"{variable}_20yrCLIM_{_KIND[variable]}_quintiles_{week_start}.nc"


def _open(path: str, origin: str):
    import xarray as xr

    try:
        da = xr.open_dataarray(path).squeeze().load()
    except Exception as exc:
        raise ClimatologyFailed(f"climatology {origin} unreadable: {exc}") from None
    return _normalise(da, origin)


def _normalise(da, origin: str) -> np.ndarray:
    """(4, 121, 240) quintile edges, north to south, longitudes 0..358.5, or a clear error."""
    renames = {k: v for k, v in (("lat", "latitude"), ("lon", "longitude")) if k in da.dims}
    da = da.rename(renames)
    qdim = next((d for d in da.dims if d in ("quantile", "quintile")), None)
    if qdim is None or set(da.dims) != {qdim, "latitude", "longitude"}:
        raise ClimatologyFailed(f"climatology {origin}: dims {da.dims}, expected (quantile, latitude, longitude)")
    da = da.transpose(qdim, "latitude", "longitude").sortby("latitude", ascending=False).sortby("longitude")
    if da.shape != (len(QUINTILE_EDGES), *regrid.SHAPE) or not np.allclose(da[qdim].values, QUINTILE_EDGES):
        raise ClimatologyFailed(f"climatology {origin}: shape {da.shape} quantiles {da[qdim].values}, expected "
                                f"{QUINTILE_EDGES} on the {regrid.SHAPE} 1.5 degree grid")
    if not (np.allclose(da.latitude.values, regrid.LATITUDES) and np.allclose(da.longitude.values % 360, regrid.LONGITUDES)):
        raise ClimatologyFailed(f"climatology {origin}: not the competition's 1.5 degree grid")
    values = da.values.astype(np.float64)
    if np.any(np.diff(values, axis=0) < 0):
        raise ClimatologyFailed(f"climatology {origin}: quintile edges decrease somewhere")
    return values


def _from_location(location: str, name: str, workdir: str) -> np.ndarray:
    if location.startswith(("http://", "https://")):
        import requests

        url = location.rstrip("/") + "/" + name
        try:
            response = requests.get(url, timeout=120)
            response.raise_for_status()
        except requests.RequestException as exc:
            raise ClimatologyFailed(f"climatology {url}: {exc}") from None
        path = os.path.join(workdir, name)
        with open(path, "wb") as f:
            f.write(response.content)
        return _open(path, url)
    path = os.path.join(location, name)
    if not os.path.isfile(path):
        raise ClimatologyFailed(f"climatology {path} is missing")
    return _open(path, path)


def _from_competition(variable: str, week_start: str, workdir: str) -> np.ndarray:
    password = os.environ.get(PASSWORD_ENV)
    if not password:
        raise ClimatologyFailed(f"no --climatology and no {PASSWORD_ENV}: the competition's climatology needs its token")
    try:
        from AI_WQ_package import retrieve_evaluation_data
    except ImportError as exc:
        raise ClimatologyFailed(f"the competition's climatology retrieval cannot load ({exc}): it needs ECMWF's "
                                "ECBOX 'sites' SDK; give --climatology instead") from None
    try:
        da = retrieve_evaluation_data.retrieve_20yr_quantile_clim(week_start, variable, password, local_destination=workdir)
    except Exception as exc:  # the package wraps its transfer errors in RuntimeError
        raise ClimatologyFailed(f"competition climatology {filename(variable, week_start)}: {exc}") from None
    return _normalise(da, filename(variable, week_start))


def load(location: str | None, date: str, period: Period) -> np.ndarray:
    """Quintile edges (4, 121, 240) for one (variable, period) of a forecast date."""
    week_start = valid_week_start(date, period)
    with tempfile.TemporaryDirectory(prefix="aifs-clim-") as workdir:
        if location:
            return _from_location(location, filename(period.variable, week_start), workdir)
        return _from_competition(period.variable, week_start, workdir)
