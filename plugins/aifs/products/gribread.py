"""Read only the messages the products need from a member's forecast windows in the bucket.

Each window object is streamed in ranged reads of ``CHUNK_BYTES`` (google-cloud-storage's
``BlobReader``); message boundaries come from GRIB section 0 (the total length), eccodes parses
each message's header lazily, and only messages whose ``shortName`` and end step the periods need
have their values decoded. Memory bound per member being read: one read chunk (8 MiB) plus one
message plus the caller's accumulators; never a whole window, let alone a whole member.

Every window is read sequentially to its end: the GRIB files carry no index, so skipping a message
needs its header first (the bytes of the ~100 unwanted fields a step still cross the network; a
sidecar index written by the worker would let this become ranged reads of the wanted messages only).
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Callable, Iterable

import numpy as np

from aifs import layout
from aifs.products.errors import ForecastInvalid, ForecastsMissing

CHUNK_BYTES = 8 << 20


@dataclasses.dataclass
class Field:
    short_name: str
    step: int  # end step, hours (an accumulation 0-N reads as N)
    values: np.ndarray  # float64, the GRIB's own point order
    grid: dict  # gridspec MIR takes, from the GRIB's keys
    latitudes: np.ndarray | None = None  # only on the first message of a grid (for point look-ups)
    longitudes: np.ndarray | None = None


def _gridspec(handle) -> dict:
    """The MIR gridspec of a message's grid, from its GRIB keys (a table: one builder per grid type)."""
    import eccodes

    grid_type = eccodes.codes_get(handle, "gridType")
    builder = _GRIDSPECS.get(grid_type)
    if builder is None:
        raise ValueError(f"grid type {grid_type!r} is not supported (supported: {', '.join(_GRIDSPECS)})")
    return builder(handle)


def _reduced_gg(handle) -> dict:
    import eccodes

    return {"grid": eccodes.codes_get(handle, "gridName")}  # "N320", "O96": MIR knows both families


def _regular_ll(handle) -> dict:
    import eccodes

    get = lambda key: float(eccodes.codes_get(handle, key))  # noqa: E731
    return {
        "grid": [get("iDirectionIncrementInDegrees"), get("jDirectionIncrementInDegrees")],
        "area": [get("latitudeOfFirstGridPointInDegrees"), get("longitudeOfFirstGridPointInDegrees"),
                 get("latitudeOfLastGridPointInDegrees"), get("longitudeOfLastGridPointInDegrees")],
    }


_GRIDSPECS: dict[str, Callable] = {"reduced_gg": _reduced_gg, "regular_gg": _reduced_gg, "regular_ll": _regular_ll}


def iter_messages(stream, url: str) -> Iterable[tuple[int, bytes]]:
    """(offset, message bytes) of each GRIB message of a binary stream; clear error on a broken one."""
    offset = 0
    while True:
        head = stream.read(16)
        if not head:
            return
        if len(head) < 16 or head[:4] != b"GRIB":
            raise ForecastInvalid(f"{url}: no GRIB message at byte {offset} (truncated or not GRIB)")
        edition = head[7]
        if edition == 2:
            length = struct.unpack(">Q", head[8:16])[0]
        elif edition == 1:
            length = int.from_bytes(head[4:7], "big")
        else:
            raise ForecastInvalid(f"{url}: GRIB edition {edition} at byte {offset}")
        rest = stream.read(length - 16)
        if len(rest) != length - 16 or not rest.endswith(b"7777"):
            raise ForecastInvalid(f"{url}: message at byte {offset} is truncated ({16 + len(rest)} of {length} bytes)")
        yield offset, head + rest
        offset += length


def read_window(bucket, name: str, wanted: dict[str, set[int]], on_field: Callable[[Field], None],
                date: str, grids: dict, **request) -> set[tuple[str, int]]:
    """Stream one window object; call ``on_field`` for each wanted (shortName, step). Returns what was found.

    ``grids`` caches gridspec and coordinates by grid (the caller keeps it per run).
    """
    import eccodes
    from google.api_core import exceptions as gexc

    url = f"gs://{bucket.name}/{name}"
    found: set[tuple[str, int]] = set()
    when = layout.parse_date(date)
    want_date, want_time = int(when.strftime("%Y%m%d")), when.hour * 100 + when.minute
    try:
        with bucket.blob(name).open("rb", chunk_size=CHUNK_BYTES, **request) as stream:
            for offset, message in iter_messages(stream, url):
                handle = eccodes.codes_new_from_message(message)
                try:
                    short_name = eccodes.codes_get(handle, "shortName")
                    step = int(eccodes.codes_get(handle, "endStep"))
                    if step not in wanted.get(short_name, ()):
                        continue
                    if (eccodes.codes_get(handle, "dataDate"), eccodes.codes_get(handle, "dataTime")) != (want_date, want_time):
                        raise ForecastInvalid(f"{url}: {short_name} step {step} is for "
                                              f"{eccodes.codes_get(handle, 'dataDate')} {eccodes.codes_get(handle, 'dataTime'):04d}, "
                                              f"not the run's date {date}")
                    key = (eccodes.codes_get(handle, "gridType"), eccodes.codes_get_size(handle, "values"),
                           eccodes.codes_get(handle, "md5GridSection"))
                    field = Field(short_name, step, eccodes.codes_get_values(handle).astype(np.float64), {})
                    if key not in grids:
                        try:
                            spec = _gridspec(handle)
                        except ValueError as exc:
                            raise ForecastInvalid(f"{url}: {exc}") from None
                        grids[key] = (spec, eccodes.codes_get_array(handle, "latitudes"),
                                      eccodes.codes_get_array(handle, "longitudes"))
                    field.grid, field.latitudes, field.longitudes = grids[key]
                    if eccodes.codes_get(handle, "missingValuesPresent") if eccodes.codes_is_defined(handle, "missingValuesPresent") else 0:
                        raise ForecastInvalid(f"{url}: {short_name} step {step} has missing values")
                    found.add((short_name, step))
                    on_field(field)
                finally:
                    eccodes.codes_release(handle)
    except gexc.NotFound:
        raise ForecastsMissing(f"{url} is missing") from None
    except eccodes.CodesInternalError as exc:
        raise ForecastInvalid(f"{url}: unreadable GRIB message: {exc}") from None
    return found


def windows_needed(lead_time: int, steps: Iterable[int]) -> list[layout.Window]:
    """The run's windows that hold any of ``steps`` (in order)."""
    steps = sorted(set(steps))
    return [w for w in layout.windows(lead_time) if any(w.contains(s) for s in steps)]
