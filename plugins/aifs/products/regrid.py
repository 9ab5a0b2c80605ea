"""Regrid a field to the competition's global 1.5 degree grid with MIR (mir-python).

The target is the package's template grid: latitudes 90 .. -90 (121), longitudes 0 .. 358.5 (240).
Linear for temperature and pressure, MIR's ``grid-box-average`` (conservative) for precipitation.
MIR caches its weights (``MIR_CACHE_PATH``, default under the system's temporary directory): the
first N320 field costs ~1 s per method, later ones ~10 ms.
"""

from __future__ import annotations

import numpy as np

from aifs.products.errors import ForecastInvalid

RESOLUTION = 1.5
LATITUDES = np.arange(90.0, -91.0, -RESOLUTION)  # 121, north to south, as the package's template
LONGITUDES = np.arange(0.0, 360.0, RESOLUTION)  # 240
SHAPE = (LATITUDES.size, LONGITUDES.size)
_AREA = [90.0, 0.0, -90.0, 360.0 - RESOLUTION]


def to_competition_grid(values: np.ndarray, gridspec: dict, method: str) -> np.ndarray:
    """``values`` on ``gridspec`` (MIR's gridspec, e.g. {"grid": "N320"}) -> (121, 240) float64."""
    import mir

    job = mir.Job()
    job.set("grid", [RESOLUTION, RESOLUTION])
    job.set("area", _AREA)
    job.set("interpolation", method)
    out = mir.ArrayOutput()
    try:
        job.execute(mir.ArrayInput(np.ascontiguousarray(values, dtype=np.float64), gridspec), out)
    except Exception as exc:  # MIR raises its own RuntimeError subclasses
        raise ForecastInvalid(f"MIR cannot regrid {gridspec} to {RESOLUTION} degrees ({method}): {exc}") from None
    result = np.asarray(out.values(), dtype=np.float64).reshape(SHAPE)
    if not np.isfinite(result).all():
        raise ForecastInvalid(f"MIR regridding of {gridspec} ({method}) produced non-finite values")
    return result
