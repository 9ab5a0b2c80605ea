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


#: How MIR hands back a field without missing values: GRIB2 in memory, IEEE 64-bit packing (lossless: the same
#: doubles ArrayOutput holds, checked in tests). ArrayOutput costs ~15 ms more a field on N320 (it builds a grid
#: spec and scans every value for the missing value); the GRIB is read with numpy from its data section.
_LOSSLESS = {"packing": "ieee", "accuracy": 64}
#: GRIB2 data representation template 5.4 (IEEE floating point), precision code 2: 64-bit
_IEEE_TEMPLATE, _IEEE_64 = 4, 2
#: Room for the GRIB sections around the values (a reduced Gaussian grid's row lengths, 2 bytes a latitude)
_HEADER_ROOM = 1 << 20


class Regridder:
    """Fields -> the checkpoint's grid, as float64 with NaN where the source is missing.

    One MIR job and one output buffer per thread, reused for every field (MIR's job holds no field state).
    A field with a bitmap (missing points) goes through MIR's ArrayOutput, which marks them NaN; MIR's IEEE
    GRIB output of such a field prints eccodes errors (the result is right, the log would not be).
    """

    def __init__(self, grid: str, points: int):
        self.grid, self.points = grid, points
        self._first = threading.Lock()
        self._warm = False
        self._local = threading.local()

    def __call__(self, message: Message) -> np.ndarray:
        if self._warm:
            return self._interpolate(message)
        with self._first:  # the first field computes and caches the weights: one thread does it, the others wait
            values = self._interpolate(message)
            self._warm = True
            return values

    def _jobs(self):
        local = self._local
        if not hasattr(local, "lossless"):
            import mir

            local.lossless, local.array = mir.Job(), mir.Job()
            for job, options in ((local.lossless, {"grid": self.grid, **_LOSSLESS}), (local.array, {"grid": self.grid})):
                for key, value in options.items():
                    job.set(key, value)
            local.buffer = bytearray(self.points * 8 + self.points // 8 + _HEADER_ROOM)
        return local

    def _interpolate(self, message: Message) -> np.ndarray:
        import mir

        local = self._jobs()
        try:
            if message.missing:
                out = mir.ArrayOutput()
                local.array.execute(mir.GribMemoryInput(message.data), out)
                values = np.asarray(out.values(), dtype="f8")  # NaN where missing
            else:
                out = mir.GribMemoryOutput(local.buffer)
                local.lossless.execute(mir.GribMemoryInput(message.data), out)
                values = ieee64_values(memoryview(local.buffer)[: len(out)], self.points)
        except InterpolationFailed as exc:
            raise InterpolationFailed(f"MIR's output for {message.param} on {self.grid}: {exc}") from exc
        except Exception as exc:  # MIR raises RuntimeError for everything
            raise InterpolationFailed(f"MIR could not interpolate {message.param} to {self.grid}: {exc}") from exc
        if values.size != self.points:
            raise InterpolationFailed(f"MIR made {values.size} points of {self.grid} for {message.param}, "
                                      f"the checkpoint has {self.points}")
        return values  # NaN where the source is missing


def _sections(grib: memoryview) -> dict[int, memoryview]:
    """A GRIB2 message's sections by number (WMO FM 92 GRIB edition 2: 16-byte indicator, then length-prefixed sections)."""
    if bytes(grib[:4]) != b"GRIB" or grib[7] != 2 or bytes(grib[-4:]) != b"7777":
        raise InterpolationFailed("not a GRIB edition 2 message")
    sections, offset, end = {}, 16, len(grib) - 4
    while offset < end:
        length = int.from_bytes(grib[offset: offset + 4], "big")
        if length < 5 or offset + length > end:
            raise InterpolationFailed(f"GRIB section at byte {offset} has length {length}")
        sections[grib[offset + 4]] = grib[offset: offset + length]
        offset += length
    return sections


def ieee64_values(grib: memoryview, points: int) -> np.ndarray:
    """The values of one GRIB2 message that MIR wrote with IEEE 64-bit packing and no bitmap, as native float64."""
    sections = _sections(grib)
    if not {5, 6, 7} <= set(sections):
        raise InterpolationFailed(f"GRIB sections {sorted(sections)}, expected 5, 6 and 7")
    s5, s6, s7 = sections[5], sections[6], sections[7]
    template, precision = int.from_bytes(s5[9:11], "big"), s5[11]
    if (template, precision) != (_IEEE_TEMPLATE, _IEEE_64):
        raise InterpolationFailed(f"data representation template {template} precision {precision}, expected IEEE 64-bit")
    if s6[5] != 255:
        raise InterpolationFailed("the output has a bitmap: missing points where the input had none")
    count = int.from_bytes(s5[5:9], "big")
    if count != points or len(s7) != 5 + 8 * count:
        raise InterpolationFailed(f"{count} values in {len(s7) - 5} bytes, expected {points}")
    return np.frombuffer(s7, ">f8", count, 5).astype("f8")  # big-endian in GRIB; one copy, native order
