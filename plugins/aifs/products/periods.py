"""The AI Weather Quest's two forecast periods and the forecast steps each variable uses.

The competition package (ai-wq-package, ``AI_WQ_package.forecast_submission.AI_WQ_create_empty_dataarray``)
defines each period by days after the forecast's issue time (00 UTC on a Thursday), per variable:

=========  ========================  =========================  =========================
variable   aggregation               period 1 (days)            period 2 (days)
=========  ========================  =========================  =========================
tas, mslp  mean of 6-hourly values   18.0 .. 24.75 (inclusive)  25.0 .. 31.75 (inclusive)
pr         sum over the period       18.0 .. 25.0               25.0 .. 32.0
=========  ========================  =========================  =========================

that is steps 432, 438, ..., 594 h (28 values) and 600, ..., 762 h for the means, and the
accumulation between 432 h and 600 h (600 h and 768 h) for precipitation: the competition's
"days 19 to 25" and "days 26 to 32". The original hand-run scripts averaged steps 438-576 and
582-792, which match neither.

The package is the source of truth; this table mirrors it and is checked against it twice:
``tests/worker/test_products_submission.py`` runs the package's own template (with the ECBOX SDK
stand-in of tests/stand_ins) and compares every period, so a new ai-wq-package release that moves
the weeks fails the tests; and every submission asks the package's template for the bounds before
sending anything (aifs.products.submission), so a drift in production stops the submission rather
than filing values under the wrong days. The table is not read from the package at run time because
the only code holding the bounds, ``AI_WQ_create_empty_dataarray``, needs ECMWF's ECBOX SDK (not on
PyPI) and registers the team with ECBOX on every call: no place for an import-time side effect.
Plain Python: the Airflow side imports it (the products DAG checks the lead time against ``LAST_STEP``).
"""

from __future__ import annotations

import dataclasses

STEP_HOURS = 6
HOURS_PER_DAY = 24

#: competition variable -> (GRIB shortName in our forecasts, aggregation, MIR interpolation, units)
VARIABLES: dict[str, tuple[str, str, str, str]] = {
    "tas": ("2t", "mean", "linear", "K"),
    "mslp": ("msl", "mean", "linear", "Pa"),
    # precipitation is regridded conservatively: MIR's grid-box average keeps each box's total
    "pr": ("tp", "sum", "grid-box-average", "m"),
}

#: (variable kind, period) -> (start day, end day) exactly as the package's template sets
#: forecast_period_start / forecast_period_end (days after the issue time)
_PACKAGE_BOUNDS: dict[tuple[str, int], tuple[float, float]] = {
    ("mean", 1): (18.0, 24.75),
    ("mean", 2): (25.0, 31.75),
    ("sum", 1): (18.0, 25.0),
    ("sum", 2): (25.0, 32.0),
}

PERIOD_NUMBERS = (1, 2)


@dataclasses.dataclass(frozen=True)
class Period:
    variable: str  # the competition's name: tas, mslp, pr
    number: int  # 1 or 2
    short_name: str  # the GRIB shortName in our forecasts: 2t, msl, tp
    aggregation: str  # "mean" of 6-hourly values, or "sum" (accumulation difference)
    interpolation: str  # MIR method to 1.5 degrees
    units: str  # units of the period value (those of the climatology)
    start_day: float
    end_day: float

    @property
    def start_hour(self) -> int:
        return round(self.start_day * HOURS_PER_DAY)

    @property
    def end_hour(self) -> int:
        return round(self.end_day * HOURS_PER_DAY)

    @property
    def steps(self) -> tuple[int, ...]:
        """Forecast steps (hours) whose values make the period: every 6 h for a mean, both ends for a sum."""
        if self.aggregation == "mean":
            return tuple(range(self.start_hour, self.end_hour + 1, STEP_HOURS))
        return (self.start_hour, self.end_hour)

    @property
    def label(self) -> str:
        return f"{self.variable} p{self.number} (days {self.start_day:g}-{self.end_day:g})"


def periods() -> list[Period]:
    """Every (variable, period) the products make, in a stable order."""
    out = []
    for variable, (short_name, aggregation, interpolation, units) in VARIABLES.items():
        for number in PERIOD_NUMBERS:
            start, end = _PACKAGE_BOUNDS[(aggregation, number)]
            out.append(Period(variable, number, short_name, aggregation, interpolation, units, start, end))
    return out


def needed_steps() -> dict[str, set[int]]:
    """GRIB shortName -> every step (hours) any period needs."""
    need: dict[str, set[int]] = {}
    for p in periods():
        need.setdefault(p.short_name, set()).update(p.steps)
    return need


#: the last forecast step the products read: a run must reach it (792 h does; the demo must too)
LAST_STEP = max(max(s) for s in needed_steps().values())
FIRST_STEP = min(min(s) for s in needed_steps().values())
