"""Check an input state against the checkpoint before any model time is spent on it."""

from __future__ import annotations

import datetime as dt

import numpy as np

from aifs.worker.errors import InputInvalid
from aifs.worker.model import ModelSpec


def check_input_state(state: dict, spec: ModelSpec, date: dt.datetime, member: int, path: str) -> dict:
    """Return the state ready for the runner, or raise InputInvalid saying what is wrong.

    Checks: a ``date`` equal to the forecast date, a ``fields`` dict holding every variable the
    model reads, each a real-valued array of (time levels, grid points) with no infinities and
    not entirely NaN. Partial NaNs pass: real inputs carry them (sea-surface fields over land)
    and the checkpoint's own imputers handle them, as anemoi-inference's checks allow.
    """

    def invalid(problem: str) -> InputInvalid:
        return InputInvalid(member, problem, path)

    if "fields" not in state or not isinstance(state["fields"], dict):
        raise invalid("input state has no 'fields' dict")
    when = state.get("date")
    if not isinstance(when, dt.datetime):
        raise invalid(f"input state 'date' is {type(when).__name__}, expected a datetime")
    if when.replace(tzinfo=None) != date:
        raise invalid(f"input state is for {when:%Y-%m-%d %H:%M}, but the run is for {date:%Y-%m-%d %H:%M}")

    fields = state["fields"]
    missing = [v for v in spec.input_variables if v not in fields]
    if missing:
        raise invalid(f"missing variable(s) the model needs: {', '.join(missing)}")

    expected = (spec.time_levels, spec.grid_points)
    for name in spec.input_variables:
        values = fields[name]
        if not isinstance(values, np.ndarray) or values.dtype.kind not in "fiu":
            raise invalid(f"variable {name!r} is not a numeric array ({type(values).__name__})")
        if values.shape != expected:
            raise invalid(
                f"variable {name!r} has shape {values.shape}, expected {expected} "
                f"({spec.time_levels} time levels x {spec.grid_points} grid points)"
            )
        if values.dtype.kind == "f":
            if np.isinf(values).any():
                raise invalid(f"variable {name!r} contains infinite values")
            if np.isnan(values).all(axis=-1).any():
                raise invalid(f"variable {name!r} is entirely NaN at some time level")

    # hand the runner only what the model reads, so stray extra fields cannot confuse it
    return {"date": when.replace(tzinfo=None), "fields": {name: fields[name] for name in spec.input_variables}}
