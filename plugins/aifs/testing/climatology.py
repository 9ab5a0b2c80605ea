"""Write a 20-year quintile climatology in the AI Weather Quest package's file format (tests, demo, bench).

The competition's climatology (``retrieve_evaluation_data.retrieve_20yr_quantile_clim``) is one file
per variable and valid week: ``{var}_20yrCLIM_WEEKLYMEAN_quintiles_{YYYYMMDD}.nc`` (tas, mslp) or
``pr_20yrCLIM_WEEKLYSUM_quintiles_{YYYYMMDD}.nc``, a DataArray of the four quintile edges
(``quantile`` 0.2..0.8) on the 1.5 degree grid (``lat`` 90..-90, ``lon`` 0..358.5, renamed by the
package on reading). ``edges(variable, lat2d, lon2d) -> (4, 121, 240)`` chooses the values; the
default is a plausible zonal climate (K, Pa, m per week) so the demo's maps look like maps.

    python -m aifs.testing climatology --date 20251127_0000 --out DIR
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np


def plausible_edges(variable: str, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    coslat = np.cos(np.radians(lat))
    if variable == "tas":
        middle, spread = 250.0 + 50.0 * coslat, 1.0 + 2.0 * (1 - coslat)
    elif variable == "mslp":
        middle, spread = 101325.0 - 800.0 * np.cos(np.radians(3 * lat)), 150.0 + 500.0 * (1 - coslat)
    else:  # weekly precipitation, m
        middle = 0.004 + 0.03 * np.exp(-(lat / 12.0) ** 2)
        spread = middle * 0.4
    offsets = np.array([-0.84, -0.25, 0.25, 0.84])[:, None, None]  # normal quintiles
    edges = middle[None] + offsets * spread[None]
    return np.maximum(edges, 0.0) if variable == "pr" else edges


def write(out_dir: str, date: str, edges: Callable[[str, np.ndarray, np.ndarray], np.ndarray] = plausible_edges) -> list[str]:
    """Every file a date's products need; returns their paths."""
    import xarray as xr

    from aifs.products import climatology, periods, regrid

    os.makedirs(out_dir, exist_ok=True)
    lon2d, lat2d = np.meshgrid(regrid.LONGITUDES, regrid.LATITUDES)
    written = []
    for p in periods.periods():
        week = climatology.valid_week_start(date, p)
        path = os.path.join(out_dir, climatology.filename(p.variable, week))
        da = xr.DataArray(np.asarray(edges(p.variable, lat2d, lon2d), dtype=np.float64)[None],
                          dims=("time", "quantile", "lat", "lon"),
                          coords={"time": [np.datetime64(f"{week[:4]}-{week[4:6]}-{week[6:]}")],
                                  "quantile": list(climatology.QUINTILE_EDGES), "lat": regrid.LATITUDES, "lon": regrid.LONGITUDES},
                          name=p.variable, attrs={"units": p.units, "description": "synthetic 20-year quintile climatology"})
        da.to_netcdf(path)
        written.append(path)
    return written
