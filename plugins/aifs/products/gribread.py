"""Read only the messages the products need from a member's forecast windows in the bucket.

Two ways, chosen per window by what its manifest entry carries:

* **by index** (windows written since the worker indexes them): the window's GRIB index
  (aifs.worker.grib_index, ``{date}/forecast_indexes/``: one JSON line per message with its byte
  offset and length) is downloaded and checked against the crc32c the manifest recorded; the lines
  of the wanted (``shortName``, end step) pairs give byte ranges, adjacent ones merged, and only
  those ranges of the window object are fetched (``Blob.download_as_bytes(start=, end=)``). Each
  message is decoded and must be what its line says (shortName, end step, date and time) before any
  value reaches the caller. For the products (3 fields a step of ~100) that is ~3% of a window.
* **streaming** (windows without an index, e.g. older runs): the whole object is read sequentially
  in ranged reads of ``CHUNK_BYTES`` (google-cloud-storage's ``BlobReader``); message boundaries come
  from GRIB section 0 (the total length), eccodes parses each header, and only wanted messages have
  their values decoded.

An index that cannot be read, does not match the manifest, misses a wanted message of the window or
points at a message that is not the one it names falls back to streaming the window, with a WARNING
naming the window and the index (``WindowRead.fallback``; the products' summary lists them): a bad
index costs time, never a wrong value. Nothing is handed to the caller before a window's indexed
messages have all been checked, so a fall-back never counts a field twice.

Memory bound per member being read: one read chunk (8 MiB) or one window's wanted messages
(~40 MB on N320: 3 fields x 12 steps), plus one decoded message and the caller's accumulators.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import logging
import struct
from typing import Callable, Iterable

import numpy as np

from aifs import layout
from aifs.manifest import IndexObject
from aifs.products.errors import ForecastInvalid, ForecastsMissing
from aifs.worker import grib_index

log = logging.getLogger("aifs.products")

CHUNK_BYTES = 8 << 20
#: ranged reads of one window in flight at once: each costs a round trip (tens of ms on GCS) for ~1.4 MB,
#: so a window's ~36 wanted messages are fetched side by side rather than one after another
RANGED_READS_AT_ONCE = 8


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


@dataclasses.dataclass
class WindowRead:
    """What reading one window found and cost."""

    found: set[tuple[str, int]]  # (shortName, end step) handed to the caller
    bytes_read: int  # bytes fetched from the bucket for this window (its index included)
    via: str  # "index" or "stream"
    fallback: str = ""  # why an index was not used (empty: it was, or there was none)


class _IndexNotUsable(Exception):
    """The index cannot serve this window; the message says why (the caller streams the window instead)."""


class _Decoder:
    """Decodes wanted messages of one window into Fields, checking each against the run's date."""

    def __init__(self, url: str, wanted: dict[str, set[int]], date: str, grids: dict):
        when = layout.parse_date(date)
        self.url, self.wanted, self.date, self.grids = url, wanted, date, grids
        self.want_date, self.want_time = int(when.strftime("%Y%m%d")), when.hour * 100 + when.minute

    @staticmethod
    def identity(handle) -> tuple[str, int, int, int]:
        """(shortName, end step, dataDate, dataTime) of a message."""
        import eccodes

        return (eccodes.codes_get(handle, "shortName"), int(eccodes.codes_get(handle, "endStep")),
                int(eccodes.codes_get(handle, "dataDate")), int(eccodes.codes_get(handle, "dataTime")))

    def field(self, handle) -> Field | None:
        """The message as a Field when it is wanted, else None; ForecastInvalid when it does not fit the run."""
        import eccodes

        url = self.url
        short_name, step, data_date, data_time = self.identity(handle)
        if step not in self.wanted.get(short_name, ()):
            return None
        if (data_date, data_time) != (self.want_date, self.want_time):
            raise ForecastInvalid(f"{url}: {short_name} step {step} is for {data_date} {data_time:04d}, "
                                  f"not the run's date {self.date}")
        key = (eccodes.codes_get(handle, "gridType"), eccodes.codes_get_size(handle, "values"),
               eccodes.codes_get(handle, "md5GridSection"))
        field = Field(short_name, step, eccodes.codes_get_values(handle).astype(np.float64), {})
        if key not in self.grids:
            try:
                spec = _gridspec(handle)
            except ValueError as exc:
                raise ForecastInvalid(f"{url}: {exc}") from None
            self.grids[key] = (spec, eccodes.codes_get_array(handle, "latitudes"),
                               eccodes.codes_get_array(handle, "longitudes"))
        field.grid, field.latitudes, field.longitudes = self.grids[key]
        if eccodes.codes_get(handle, "missingValuesPresent") if eccodes.codes_is_defined(handle, "missingValuesPresent") else 0:
            raise ForecastInvalid(f"{url}: {short_name} step {step} has missing values")
        return field


def read_window(bucket, name: str, wanted: dict[str, set[int]], on_field: Callable[[Field], None],
                date: str, grids: dict, *, index: IndexObject | None = None, window: layout.Window | None = None,
                **request) -> WindowRead:
    """Read one window object; call ``on_field`` for each wanted (shortName, step). Returns what was found and read.

    With ``index`` (the manifest's entry for the window's index) and ``window`` (its hours), only the
    wanted messages' bytes are fetched; otherwise, or when the index is not usable, the window is streamed.
    ``grids`` caches gridspec and coordinates by grid (the caller keeps it per run).
    """
    url = f"gs://{bucket.name}/{name}"
    decoder = _Decoder(url, wanted, date, grids)
    result = WindowRead(set(), 0, "index")
    if index is not None and window is not None:
        try:
            _read_by_index(bucket, name, index, window, decoder, on_field, result, **request)
            return result
        except _IndexNotUsable as exc:
            result.fallback = str(exc)
            log.warning("[PRODUCTS] %s: index gs://%s/%s not used (%s): streaming the whole window instead",
                        url, bucket.name, index.name, result.fallback)
    result.via = "stream"
    _stream_window(bucket, name, decoder, on_field, result, **request)
    return result


def _deliver(message: bytes, decoder: "_Decoder", on_field, found: set) -> None:
    """Decode one message; hand it on (and note it found) when it is one the products want."""
    import eccodes

    handle = eccodes.codes_new_from_message(message)
    try:
        field = decoder.field(handle)
    finally:
        eccodes.codes_release(handle)
    if field is not None:
        found.add((field.short_name, field.step))
        on_field(field)


def _stream_window(bucket, name: str, decoder: _Decoder, on_field, result: WindowRead, **request) -> None:
    import eccodes
    from google.api_core import exceptions as gexc

    url = decoder.url
    found = result.found
    try:
        with bucket.blob(name).open("rb", chunk_size=CHUNK_BYTES, **request) as stream:
            for _offset, message in iter_messages(stream, url):
                _deliver(message, decoder, on_field, found)
            result.bytes_read += stream.tell()  # read sequentially to its end: the whole object crossed the network
    except gexc.NotFound:
        raise ForecastsMissing(f"{url} is missing") from None
    except eccodes.CodesInternalError as exc:
        raise ForecastInvalid(f"{url}: unreadable GRIB message: {exc}") from None


def _crc32c(data: bytes) -> str:
    import google_crc32c

    return base64.b64encode(google_crc32c.Checksum(data).digest()).decode()


def _index_lines(bucket, index: IndexObject, result: WindowRead, **request) -> list[grib_index.IndexLine]:
    """The index's lines, once its bytes match what the manifest recorded; _IndexNotUsable otherwise."""
    from google.api_core import exceptions as gexc

    url = f"gs://{bucket.name}/{index.name}"
    try:
        data = bucket.blob(index.name).download_as_bytes(**request)
    except gexc.NotFound:
        raise _IndexNotUsable(f"{url} is missing") from None
    result.bytes_read += len(data)
    if len(data) != index.size or _crc32c(data) != index.crc32c:
        raise _IndexNotUsable(f"{url} has {len(data)} bytes, crc32c {_crc32c(data)}; the manifest says "
                              f"{index.size} bytes, crc32c {index.crc32c}")
    try:
        return grib_index.parse(data, url)
    except (grib_index.IndexUnreadable, UnicodeDecodeError) as exc:
        raise _IndexNotUsable(str(exc)) from None


def _read_by_index(bucket, name: str, index: IndexObject, window: layout.Window, decoder: _Decoder, on_field,
                   result: WindowRead, **request) -> None:
    import eccodes
    from google.api_core import exceptions as gexc

    url = decoder.url
    lines = _index_lines(bucket, index, result, **request)
    chosen = grib_index.select(lines, decoder.wanted)
    listed = {(line.param, line.step) for line in chosen}
    lacking = sorted((short, step) for short, steps in decoder.wanted.items() for step in steps
                     if window.contains(step) and (short, step) not in listed)
    if lacking:  # the window may still hold them: let the stream say, not the index
        raise _IndexNotUsable(f"it lists no {', '.join(f'{s} h{t:03d}' for s, t in lacking[:4])}"
                              f"{' ...' if len(lacking) > 4 else ''}")
    blob = bucket.blob(name)

    def fetch(start: int, end: int) -> bytes:
        try:
            return blob.download_as_bytes(start=start, end=end - 1, checksum=None, **request)
        except gexc.NotFound:
            raise ForecastsMissing(f"{url} is missing") from None
        except gexc.RequestRangeNotSatisfiable:
            raise _IndexNotUsable(f"bytes {start}-{end - 1} are beyond the window's end") from None

    groups = grib_index.byte_ranges(chosen)
    fetched: list[bytes] = []
    if groups:  # every range fetched and checked before any value is used
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(RANGED_READS_AT_ONCE, len(groups))) as pool:
            fetched = list(pool.map(lambda group: fetch(group[0], group[1]), groups))
    messages: list[tuple[grib_index.IndexLine, bytes]] = []
    for (start, end, group), data in zip(groups, fetched):
        result.bytes_read += len(data)
        if len(data) != end - start:
            raise _IndexNotUsable(f"bytes {start}-{end - 1} gave {len(data)} bytes (the window is shorter)")
        for line in group:
            message = data[line.offset - start:line.end - start]
            messages.append((line, message))
            _check_message(line, message)
    try:  # first every message must be what its line says: only then may any value reach the caller
        for line, message in messages:
            handle = eccodes.codes_new_from_message(message)
            try:
                short_name, step, data_date, data_time = decoder.identity(handle)
            finally:
                eccodes.codes_release(handle)
            if (short_name, step, str(data_date), f"{data_time:04d}") != (line.param, line.step, line.date, line.time):
                raise _IndexNotUsable(f"bytes {line.offset}-{line.end - 1} hold {short_name} step {step} of "
                                      f"{data_date} {data_time:04d}, the index says {line.param} step {line.step} of "
                                      f"{line.date} {line.time}")
    except eccodes.CodesInternalError as exc:  # the bytes are not a GRIB message: the index is wrong
        raise _IndexNotUsable(f"the bytes of a message it lists do not decode: {exc}") from None
    try:
        for line, message in messages:
            _deliver(message, decoder, on_field, result.found)
    except eccodes.CodesInternalError as exc:  # a message whose header reads but whose values do not
        raise ForecastInvalid(f"{url}: unreadable GRIB message: {exc}") from None


def _check_message(line: grib_index.IndexLine, message: bytes) -> None:
    """The bytes at an index line's range must be one whole GRIB message of that length."""
    if len(message) < 16 or message[:4] != b"GRIB" or message[-4:] != b"7777":
        raise _IndexNotUsable(f"bytes {line.offset}-{line.end - 1} ({line.param} step {line.step}) "
                              "are not a whole GRIB message")
    edition = message[7]
    length = struct.unpack(">Q", message[8:16])[0] if edition == 2 else int.from_bytes(message[4:7], "big")
    if length != line.length:
        raise _IndexNotUsable(f"the message at byte {line.offset} is {length} bytes long, the index says {line.length}")


def windows_needed(lead_time: int, steps: Iterable[int]) -> list[layout.Window]:
    """The run's windows that hold any of ``steps`` (in order)."""
    steps = sorted(set(steps))
    return [w for w in layout.windows(lead_time) if any(w.contains(s) for s in steps)]
