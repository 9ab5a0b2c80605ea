"""Interpolate open data's 0.25 degree fields to the checkpoint's grid with ECMWF's MIR, offline.

MIR computes its interpolation weights locally the first time a (input grid, output grid) pair
is seen and keeps them in its cache (``MIR_CACHE_PATH``; 0.25 deg -> N320: ~4 s once, ~0.02 s a
field after). Nothing is downloaded. MIR reads each GRIB message itself: the grid as the message
describes it (open data's starts at -180: no shift to get wrong) and its bitmap, so missing
points (waves over land) stay missing and come back as NaN, never mixed into their neighbours.
(Given as an array with a ``missing_value``, MIR 1.30 interpolated the missing value like data.)
"""

from __future__ import annotations

import os
import threading

import numpy as np

from aifs.inputs.decode import Message
from aifs.inputs.errors import InterpolationFailed

CACHE_ENV = "MIR_CACHE_PATH"


def default_cache_dir() -> str:
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(home, "aifs-ens", "mir")


def use_cache_dir(path: str | None) -> str:
    """Point MIR's weight cache at ``path`` (before MIR is first used in this process)."""
    path = path or default_cache_dir()
    os.makedirs(path, exist_ok=True)
    os.environ[CACHE_ENV] = path
    return path


class Regridder:
    """Fields -> the checkpoint's grid, as float64 with NaN where the source is missing."""

    def __init__(self, grid: str, points: int):
        self.grid, self.points = grid, points
        self._first = threading.Lock()
        self._warm = False

    def __call__(self, message: Message) -> np.ndarray:
        if self._warm:
            return self._interpolate(message)
        with self._first:  # the first field computes and caches the weights: one thread does it, the others wait
            values = self._interpolate(message)
            self._warm = True
            return values

    def _interpolate(self, message: Message) -> np.ndarray:
        import mir

        try:
            job = mir.Job()
            job.set("grid", self.grid)
            out = mir.ArrayOutput()
            job.execute(mir.GribMemoryInput(message.data), out)
            values = np.asarray(out.values(), dtype="f8")
        except Exception as exc:  # MIR raises RuntimeError for everything
            raise InterpolationFailed(f"MIR could not interpolate {message.param} to {self.grid}: {exc}") from exc
        if values.size != self.points:
            raise InterpolationFailed(f"MIR made {values.size} points of {self.grid} for {message.param}, "
                                      f"the checkpoint has {self.points}")
        return values  # NaN where the source is missing
