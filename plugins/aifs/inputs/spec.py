"""What the checkpoint needs, read from its metadata with the worker's own code (aifs.worker.model).

The variables (inputs the model reads, computed forcings excluded; a model input the worker makes
from another variable, e.g. cos/sin of ``mwd``, as that variable), grid points and time levels are
the worker's ModelSpec: what this writes is exactly what the worker validates. The grid's
name and coordinates come from the same anemoi metadata object.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import re

import numpy as np

from aifs.inputs.errors import InterpolationFailed

LOG = logging.getLogger("aifs.inputs")

#: Arrays are written as float32 (what the model runs on; half the bytes of float64), the worker accepts any float.
DTYPE = np.float32
#: Grid names MIR builds itself: octahedral/classic reduced Gaussian, regular Gaussian.
_MIR_GRID = re.compile(r"([NOF])(\d+)", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class InputSpec:
    checkpoint: str
    variables: tuple[str, ...]
    time_levels: int
    timestep: dt.timedelta
    grid: str  # as MIR names it, e.g. N320, O96
    grid_points: int
    latitudes: np.ndarray | None
    longitudes: np.ndarray | None


def mir_grid_name(grid) -> str:
    """The metadata's grid (``n320``, ``O96``) as MIR names it; InterpolationFailed for anything else."""
    match = _MIR_GRID.fullmatch(str(grid or "").strip())
    if not match:
        raise InterpolationFailed(
            f"the checkpoint's grid {grid!r} is not one MIR can name (N<n>, O<n>, F<n>); "
            "interpolating to an arbitrary point list is not supported here")
    return match.group(1).upper() + match.group(2)


def read_input_spec(checkpoint: str, client=None) -> InputSpec:
    """The checkpoint's input needs (metadata only: no torch, no weights); ``client`` fetches a gs:// checkpoint."""
    from aifs.worker.model import Model

    # the metadata only, loads nothing else: any generation's checkpoint (its weights need their own environment)
    model = Model(checkpoint, device=None, precision=None, num_chunks=None, weights=False, client=client)
    md, spec = model.metadata, model.spec
    timestep = spec.timestep
    if timestep % dt.timedelta(hours=6):
        raise InterpolationFailed(f"the checkpoint's step {timestep} is not a multiple of 6 h: open-data cycles are 6-hourly")
    lat, lon = md.latitudes, md.longitudes
    # what the pickle carries: a model input made on the worker from another variable (cos_mwd, sin_mwd from mwd
    # in degrees, the worker's field_rules) is written as that variable, once
    sources = getattr(spec, "input_sources", {}) or {}
    variables = tuple(dict.fromkeys(sources.get(v, v) for v in spec.input_variables))
    return InputSpec(
        checkpoint=checkpoint,
        variables=variables,
        time_levels=spec.time_levels,
        timestep=timestep,
        grid=mir_grid_name(md.grid),
        grid_points=spec.grid_points,
        latitudes=None if lat is None else np.asarray(lat, "f8"),
        longitudes=None if lon is None else np.asarray(lon, "f8"),
    )


def check_grid_points(spec: InputSpec) -> None:
    """MIR's points for the grid name must be the checkpoint's own (count, then order where it has coordinates)."""
    from eckit.geo import Grid

    grid = Grid({"grid": spec.grid})
    size = grid.size()
    if size != spec.grid_points:
        raise InterpolationFailed(f"grid {spec.grid} has {size} points but the checkpoint has {spec.grid_points}")
    if spec.latitudes is None or spec.longitudes is None:
        LOG.warning("[GRID] checkpoint %s has no latitudes/longitudes: trusting its grid name %s", spec.checkpoint, spec.grid)
        return
    lat, lon = grid.to_latlons()
    dlon = (np.asarray(lon) - spec.longitudes + 180.0) % 360.0 - 180.0
    worst = max(float(np.abs(np.asarray(lat) - spec.latitudes).max()), float(np.abs(dlon).max()))
    if worst > 1e-3:
        raise InterpolationFailed(f"grid {spec.grid}'s points are not the checkpoint's (up to {worst:.3g} degrees apart): "
                                  "the checkpoint orders or places its points differently")
