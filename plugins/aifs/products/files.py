"""The competition's NetCDF files: the package's template layout, its checks, its file names.

The DataArray has the layout of ``AI_WQ_create_empty_dataarray`` (quintile 0.2..1.0 x latitude 90..-90
x longitude 0..358.5, its attributes and time coordinates). That function also registers the team
with the competition's ECBOX service (for the ``originating_centre``/``expver`` identifiers), so the
local files leave those two empty; a submission goes through the package's own
``AI_WQ_forecast_submission``, which rebuilds its template with them and copies our values in.

Every written file is read back and run through the package's checker (``check_fc_submission``:
latitudes, longitudes, quintile labels, values in [0, 1], shape, sums to 1); the checker's parts that
need the network (team/model registration) or today's date (the submission window) run at submission.
"""

from __future__ import annotations

import contextlib
import io
import logging

import numpy as np

from aifs import layout
from aifs.products import regrid
from aifs.products.errors import CheckFailed
from aifs.products.periods import Period

log = logging.getLogger("aifs.products")

_META = {  # variable -> (standard_name, cell_methods, shortName), as the package's template
    "tas": ("2 metre temperature probability", "time: mean (interval: 6 hours)", "t2m"),
    "mslp": ("Mean sea level pressure probability", "time: mean (interval: 6 hours)", "mslp"),
    "pr": ("Total precipitation probability", "time: sum (interval: 24 hours)", "tp"),
}


def data_array(probs: np.ndarray, period: Period, date: str, team: str, model: str, members: list[int], partial: bool):
    import xarray as xr

    standard_name, cell_methods, short_name = _META[period.variable]
    issue = np.datetime64(layout.parse_date(date).strftime("%Y-%m-%dT00:00:00"))
    coords = dict(
        quintile=(["quintile"], np.arange(1, 6) / 5),
        latitude=(["latitude"], regrid.LATITUDES, {"units": "degrees_north", "long_name": "latitude",
                                                   "standard_name": "latitude", "axis": "X"}),
        longitude=(["longitude"], regrid.LONGITUDES, {"units": "degrees_east", "long_name": "longitude",
                                                      "standard_name": "longitude", "axis": "Y"}),
        forecast_issue_date=issue,
        forecast_period_start=issue + np.timedelta64(period.start_hour, "h"),
        forecast_period_end=issue + np.timedelta64(period.end_hour, "h"),
    )
    if period.variable == "tas":
        coords["height"] = ((), 2, {"standard_name": "height", "units": "m", "positive": "up", "axis": "Z"})
    da = xr.DataArray(
        probs.astype(np.float64), dims=["quintile", "latitude", "longitude"], coords=coords,
        attrs=dict(standard_name=standard_name, cell_methods=cell_methods, units="1", coordinates="latitude longitude",
                   description=f"{period.variable} prediction from {team} using {model} for forecasting period {period.number}",
                   Conventions="CF-1.6", forecast_period_bounds_units="days into forecast",
                   forecast_period_bounds=f"[{period.start_day},{period.end_day}]", shortName=short_name,
                   originating_centre="", expver="", teamname=team, modelname=model,
                   # ours: how the probabilities were made, so a partial ensemble says so in the file itself
                   ensemble_members_used=len(members), ensemble_members=",".join(map(str, members)),
                   ensemble_partial=int(partial)),
    )
    da.name = period.variable
    da.coords["forecast_issue_date"].attrs = {"standard_name": "forecast_issue_time", "long_name": "forecast issue time", "axis": "T"}
    da.coords["forecast_period_start"].attrs = {"long_name": "forecast period start", "axis": "T"}
    da.coords["forecast_period_end"].attrs = {"long_name": "forecast period end", "axis": "T"}
    return da


def package_check(da, variable: str, date: str, period: int, origin: str) -> None:
    """The package's own offline checks; CheckFailed naming the file and the check's message."""
    from AI_WQ_package import check_fc_submission as checks

    chatter = io.StringIO()  # the package prints each step; keep it for the debug log, not stdout
    try:
        with contextlib.redirect_stdout(chatter):
            checks.check_variable_in_list(variable, ["tas", "mslp", "pr"])
            checks.is_valid_date(date[:8])
            checks.check_variable_in_list(checks.convert_fc_period_to_string(period), ["1", "2"])
            da = checks.check_and_flip_latitudes(da)
            da = checks.check_and_convert_longitudes(da)
            da = checks.check_quintile_range(da)
            checks.check_data_characteristics(da, variable, date[:8], str(period))
    except ValueError as exc:
        raise CheckFailed(f"{origin} fails the AI Weather Quest checks: {exc}") from None
    finally:
        log.debug("package checks of %s: %s", origin, chatter.getvalue().strip().replace("\n", "; "))
    # stricter than the package (it allows 0.2 of slack and NaN): ours are exact fractions
    values = da.values
    if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1 or not np.allclose(values.sum(axis=0), 1.0):
        raise CheckFailed(f"{origin}: probabilities not all finite in [0, 1] summing to 1")


def write_and_check(da, path: str, period: Period, date: str) -> None:
    import xarray as xr

    da.to_netcdf(path)
    with xr.open_dataarray(path) as back:
        package_check(back.load(), period.variable, date, period.number, path)
