"""Check an input state against the checkpoint before any model time is spent on it."""

from __future__ import annotations

import datetime as dt

import numpy as np

from aifs.worker.errors import InputInvalid
from aifs.worker.model import ModelSpec


def check_input_state(state: dict, spec: ModelSpec, date: dt.datetime, member: int, path: str) -> dict:
    """Return the state ready for the runner, or raise InputInvalid saying what is wrong.

    Checks: a ``date`` equal to the forecast date, a ``fields`` dict holding every variable the
    model reads (or the variable it is made from, e.g. ``mwd`` in degrees for ``cos_mwd``/``sin_mwd``),
    each a real-valued array of (time levels, grid points) with no infinities and not entirely
    NaN. NaN is allowed exactly in the variables the checkpoint's processors impute (snow and soil
    over sea, waves over land: ``spec.nan_allowed``, from the checkpoint's metadata), refused
    anywhere else: the model would spread it over the globe. Then the checkpoint's forward
    transforms make the model's variables (``cos_mwd``/``sin_mwd`` from ``mwd``).
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
    # a variable the model reads, or the one it is made from when the pickle does not have it itself
    read = {v: (v if v in fields else spec.input_sources.get(v, v)) for v in spec.input_variables}
    missing = sorted({v if v not in spec.input_sources else f"{v} (or {spec.input_sources[v]})"
                      for v, source in read.items() if source not in fields})
    if missing:
        raise invalid(f"missing variable(s) the model needs: {', '.join(missing)}")
    # NaN is allowed in a source exactly when every model variable made from it allows it
    nan_allowed = set(spec.nan_allowed)
    for source in set(read.values()) - set(spec.input_variables):
        nan_allowed.discard(source)
        if all(v in spec.nan_allowed for v, s in read.items() if s == source):
            nan_allowed.add(source)

    expected = (spec.time_levels, spec.grid_points)
    for name in dict.fromkeys(read.values()):
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
            if name not in nan_allowed:
                _refuse_nan(values, name, invalid, sorted(nan_allowed))

    # hand the runner only what the model reads, so stray extra fields cannot confuse it
    taken = {name: fields[name] for name in dict.fromkeys(read.values())}
    for transform in spec.input_transforms:
        if transform.written in taken and not all(c in fields for c in transform.carried):
            from aifs.worker.field_rules import forward_transform

            taken = forward_transform(taken, transform)
    return {"date": when.replace(tzinfo=None), "fields": {name: taken[name] for name in spec.input_variables}}


def _refuse_nan(values: np.ndarray, name: str, invalid, allowed: list[str]) -> None:
    """InputInvalid saying where a variable that may not have NaN has them (time level, points)."""
    nan = np.isnan(values)
    if not nan.any():
        return
    level, point = (int(i[0]) for i in np.nonzero(nan))
    raise invalid(
        f"variable {name!r} has {int(nan.sum())} NaN value(s) (first at time level {level}, grid point {point}), "
        f"but the checkpoint's processors do not impute it (NaN is allowed only in: {', '.join(allowed) or 'none of its inputs'})"
    )
