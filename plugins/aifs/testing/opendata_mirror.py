"""A local ECMWF open-data mirror: GRIB2 files and ``.index`` files in open data's layout, served over HTTP.

Tests and the demo fetch from it with the real ecmwf-opendata client, exactly as from ECMWF:

    python -m aifs.testing opendata-mirror --root DIR --date 20250601_0000 --checkpoint tiny.ckpt --members 1-3 --serve

The files hold what the checkpoint needs (its variables mapped to open-data fields by
aifs.inputs.rules) plus a few fields it does not need, for every member in one ENS file as open
data does (control ``cf`` and ``pf`` 1..N), at each time level's cycle, and the deterministic
run's constants. Values are :func:`analytic` functions of latitude, longitude, member and time,
written with eccodes on open data's real grid (0.25 deg, 1440 x 721, longitudes from -180, north
to south), so a test can compare what comes out of interpolation with the exact value.

The server honours single and multiple byte ranges (``multipart/byteranges``), counts requests,
and can drop a connection half-way through a body (:meth:`MirrorServer.drop`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterable

import numpy as np

#: Open data's grid: 0.25 deg, first point (90N, 180W), rows north to south.
NI, NJ, STEP = 1440, 721, 0.25
GRID_LATITUDES = 90.0 - STEP * np.arange(NJ)
GRID_LONGITUDES = -180.0 + STEP * np.arange(NI)
#: (typical value, amplitude) per open-data parameter; others: (0, 1).
MAGNITUDES = {
    "2t": (285.0, 20.0), "2d": (280.0, 15.0), "skt": (286.0, 20.0), "sot": (285.0, 15.0), "t": (250.0, 20.0),
    "msl": (101000.0, 1500.0), "sp": (97000.0, 3000.0), "gh": (5000.0, 300.0), "z": (3000.0, 2000.0),
    "10u": (0.0, 8.0), "10v": (0.0, 8.0), "u": (5.0, 15.0), "v": (0.0, 10.0), "w": (0.0, 0.3),
    "q": (0.005, 0.004), "tcw": (20.0, 15.0), "lsm": (0.5, 0.5), "slor": (0.005, 0.004), "sdor": (50.0, 40.0),
    "vsw": (0.3, 0.1), "sd": (0.1, 0.1), "swh": (2.0, 1.5), "mwp": (8.0, 3.0), "mwd": (180.0, 90.0),
    "tp": (0.001, 0.001), "ro": (0.0005, 0.0005),
}
#: Fields in every file that no checkpoint here needs: the fetch must skip their bytes.
EXTRA_SURFACE = ("tp", "ro")
EXTRA_LEVEL = 300  # an extra pressure level of each pressure-level parameter
#: Wave fields are missing over "land" (a GRIB bitmap), as in real data.
WAVE_PARAMS = {"swh", "mwp", "mwd", "pp1d", "cdww", "wmb", "h1012", "h1214", "h1417", "h1721", "h2125", "h2530"}
MISSING = 9999.0


def is_land(lat, lon) -> np.ndarray:
    """A made-up continent: where wave fields are missing."""
    return (np.abs(lat - 30.0) < 15.0) & (np.abs(((lon + 180.0) % 360.0) - 200.0) < 25.0)


def analytic(param: str, level: int | None, member: int | None, cycle: dt.datetime | None, lat, lon) -> np.ndarray:
    """The value written for a field at (lat, lon) in degrees (broadcasting); smooth, so interpolation keeps it.

    Varies with the member and the cycle (none for constants: ``member``/``cycle`` None), and is not
    symmetric under a 180 degree shift of longitude (a mis-described grid shows).
    """
    base, amp = MAGNITUDES.get(param, (0.0, 1.0))
    if level is not None:
        base += amp * 0.001 * level  # each level its own field
    m = 0 if member is None else member + 1
    hours = 0.0 if cycle is None else (cycle - dt.datetime(2000, 1, 1)).total_seconds() / 3600.0
    phase = 0.35 * m + 0.2 * ((hours / 6.0) % 24)
    la, lo = np.radians(lat), np.radians(lon)
    return base + amp * (0.5 * np.cos(2 * la) + 0.3 * np.cos(la) * np.cos(lo - phase)
                         + 0.2 * np.sin(la) * np.cos(la) * np.sin(2 * lo + phase) + 0.05 * m)


def _grid_values(param, level, member, cycle) -> np.ndarray:
    values = analytic(param, level, member, cycle, GRID_LATITUDES[:, None], GRID_LONGITUDES[None, :])
    if param in WAVE_PARAMS:
        values = np.where(is_land(GRID_LATITUDES[:, None], GRID_LONGITUDES[None, :]), np.nan, values)
    return values.ravel()


#: GRIB keys that put a field on its level: pressure levels in hPa, soil levels by number.
_LEVEL_KEYS = {
    "pl": lambda level: [("typeOfLevel", "isobaricInhPa"), ("level", level)],
    "sol": lambda level: [("typeOfFirstFixedSurface", 151), ("scaleFactorOfFirstFixedSurface", 0),
                          ("scaledValueOfFirstFixedSurface", level)],
}


def encode(param: str, levtype: str, level: int | None, stream: str, kind: str, member: int | None,
           cycle: dt.datetime, values: np.ndarray) -> bytes:
    """One GRIB2 message as open data writes it (grid, ENS/deterministic local section, CCSDS packing)."""
    import eccodes

    h = eccodes.codes_grib_new_from_samples("GRIB2")
    try:
        keys = [("setLocalDefinition", 1), ("localDefinitionNumber", 1), ("stream", stream), ("type", kind)]
        if kind in ("cf", "pf"):
            keys += [("productDefinitionTemplateNumber", 1), ("number", member or 0),
                     ("numberOfForecastsInEnsemble", 51)]
        keys += [("Ni", NI), ("Nj", NJ), ("latitudeOfFirstGridPointInDegrees", 90.0),
                 ("longitudeOfFirstGridPointInDegrees", 180.0), ("latitudeOfLastGridPointInDegrees", -90.0),
                 ("longitudeOfLastGridPointInDegrees", 179.75), ("iDirectionIncrementInDegrees", STEP),
                 ("jDirectionIncrementInDegrees", STEP), ("dataDate", int(f"{cycle:%Y%m%d}")),
                 ("dataTime", cycle.hour * 100), ("stepRange", "0"), ("shortName", param)]
        if levtype in _LEVEL_KEYS:
            keys += _LEVEL_KEYS[levtype](level)
        for key, value in keys:
            eccodes.codes_set(h, key, value)
        eccodes.codes_set(h, "packingType", "grid_ccsds")
        eccodes.codes_set(h, "bitsPerValue", 16)
        if np.isnan(values).any():
            eccodes.codes_set(h, "bitmapPresent", 1)
            eccodes.codes_set(h, "missingValue", MISSING)
            values = np.where(np.isnan(values), MISSING, values)
        eccodes.codes_set_values(h, values)
        return eccodes.codes_get_message(h)
    finally:
        eccodes.codes_release(h)


@dataclasses.dataclass(frozen=True)
class Field:
    param: str
    levtype: str
    level: int | None


def _fields_by_stream(variables: Iterable[str]) -> dict[str, set[Field]]:
    """{origin: fields} for the variables, by aifs.inputs.rules, plus the extras no checkpoint needs."""
    from aifs.inputs.rules import CONSTANT, MEMBER, sources_of

    out: dict[str, set[Field]] = {}
    for source in sources_of(list(variables)).values():
        out.setdefault(source.origin, set()).add(Field(source.param, source.levtype, source.level))
    for origin in (MEMBER, CONSTANT):
        extras = {Field(p, "sfc", None) for p in EXTRA_SURFACE}
        extras |= {Field(f.param, "pl", EXTRA_LEVEL) for f in out.get(origin, ()) if f.levtype == "pl"}
        out.setdefault(origin, set()).update(extras)
    return out


def _write_file(path: str, messages) -> None:
    """The GRIB file and its index (one JSON line per message with its byte range), each under a temp name first."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    offset, lines = 0, []
    with open(path + ".part", "wb") as f:
        for entry, data in messages:
            f.write(data)
            lines.append(json.dumps({**entry, "_offset": offset, "_length": len(data)}))
            offset += len(data)
    index = path[: -len(".grib2")] + ".index"
    with open(index + ".part", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".part", path)
    os.replace(index + ".part", index)


def write_mirror(root: str, date: str | dt.datetime, checkpoint: str | None = None, members: Iterable[int] = (1, 2, 3),
                 variables: Iterable[str] | None = None, time_levels: int = 2,
                 timestep: dt.timedelta = dt.timedelta(hours=6), omit: Iterable[str] = (),
                 control: bool = True) -> list[str]:
    """Write the open-data files a date needs into ``root``; return their paths.

    The variables, time levels and step come from ``checkpoint`` (its metadata) unless given.
    ``omit``: open-data parameters left out of every file (a source that lacks a field).
    ``control``: write the control forecast (cf) too, as open data does; tests may skip it for time.
    """
    from aifs.inputs.opendata_layout import DataFile, deterministic_stream, time_level_cycles
    from aifs.inputs.rules import CONSTANT, MEMBER, STREAM_OF_ORIGIN, WAVE
    from aifs.layout import parse_date

    when = parse_date(date) if isinstance(date, str) else date
    if checkpoint is not None:
        from aifs.inputs.spec import read_input_spec

        spec = read_input_spec(checkpoint)
        variables = variables or spec.variables
        time_levels, timestep = spec.time_levels, spec.timestep
    by_origin = _fields_by_stream(variables)
    omit = set(omit)
    numbers = ([0] if control else []) + sorted(set(members))
    written = []

    def entry(field, stream, kind, member, cycle):
        e = {"domain": "g", "date": f"{cycle:%Y%m%d}", "time": f"{cycle:%H}00", "expver": "0001", "class": "od",
             "type": kind, "stream": stream, "step": "0", "levtype": field.levtype, "param": field.param}
        if field.level is not None:
            e["levelist"] = str(field.level)
        if kind == "pf":
            e["number"] = str(member)
        return e

    def ens_messages(origin, stream, cycle):
        for field in sorted(by_origin.get(origin, ()), key=lambda f: (f.levtype, f.param, f.level or 0)):
            if field.param in omit:
                continue
            for number in numbers:
                kind = "cf" if number == 0 else "pf"
                values = _grid_values(field.param, field.level, number, cycle)
                yield entry(field, stream, kind, number, cycle), encode(field.param, field.levtype, field.level, stream,
                                                                         kind, number, cycle, values)

    for cycle in time_level_cycles(when, time_levels, timestep):
        for origin in (MEMBER, WAVE):
            if origin in by_origin:
                file = DataFile(STREAM_OF_ORIGIN[origin], cycle)
                path = os.path.join(root, file.path())
                _write_file(path, ens_messages(origin, file.stream, cycle))
                written.append(path)
    file = DataFile(deterministic_stream(when), when)

    def constant_messages():
        for field in sorted(by_origin.get(CONSTANT, ()), key=lambda f: (f.levtype, f.param, f.level or 0)):
            if field.param not in omit:
                values = _grid_values(field.param, field.level, None, None)
                yield entry(field, file.stream, "fc", None, when), encode(field.param, field.levtype, field.level,
                                                                          file.stream, "fc", None, when, values)

    path = os.path.join(root, file.path())
    _write_file(path, constant_messages())
    written.append(path)
    return written


# --- serving ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Request:
    method: str
    path: str
    range: str | None
    bytes_sent: int = 0


@dataclasses.dataclass
class Drop:
    """Cut the connection after ``after`` body bytes of the next ``times`` GETs of paths containing ``match``."""

    match: str
    times: int
    after: int = 1000


_RANGE = re.compile(r"(\d+)-(\d+)")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's session expects
    server: "MirrorServer"

    def log_message(self, *args):  # quiet: the server's request list is the log
        pass

    def _file(self) -> str | None:
        rel = self.path.split("?", 1)[0].lstrip("/")
        path = os.path.realpath(os.path.join(self.server.root, rel))
        if not path.startswith(os.path.realpath(self.server.root) + os.sep) or not os.path.isfile(path):
            return None
        return path

    def do_HEAD(self):
        self._serve(head=True)

    def do_GET(self):
        self._serve(head=False)

    def _serve(self, head: bool):
        record = Request(self.command, self.path, self.headers.get("Range"))
        self.server.record(record)
        path = self._file()
        if path is None:
            body = b"not found"
            self.send_response(404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)
            return
        size = os.path.getsize(path)
        ranges = [(int(a), min(int(b), size - 1)) for a, b in _RANGE.findall(record.range or "")]
        with open(path, "rb") as f:
            def read(a, b):
                f.seek(a)
                return f.read(b - a + 1)

            if not ranges:
                status, headers, body = 200, {"Content-Type": "application/octet-stream"}, b"" if head else f.read()
                length = size
            elif len(ranges) == 1:
                a, b = ranges[0]
                status, length = 206, b - a + 1
                headers = {"Content-Type": "application/octet-stream", "Content-Range": f"bytes {a}-{b}/{size}"}
                body = b"" if head else read(a, b)
            else:
                boundary = "aifsmirrorboundary"
                chunks = []
                for a, b in ranges:
                    chunks.append(f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
                                  f"Content-Range: bytes {a}-{b}/{size}\r\n\r\n".encode() + read(a, b) + b"\r\n")
                chunks.append(f"--{boundary}--\r\n".encode())
                body = b"".join(chunks)
                status, length = 206, len(body)
                headers = {"Content-Type": f"multipart/byteranges; boundary={boundary}"}
        self.send_response(status)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(length))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if head:
            return
        cut = self.server.take_drop(self.path)
        if cut is not None and len(body) > cut:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            record.bytes_sent = cut
            self.close_connection = True
            self.connection.shutdown(2)  # the client sees a body that stops short
            return
        self.wfile.write(body)
        record.bytes_sent = len(body)


class MirrorServer(ThreadingHTTPServer):
    """``serve(root)``'s server: ``url``, ``requests`` (every request seen), ``drop(...)``, ``stop()``."""

    daemon_threads = True

    def __init__(self, root: str, port: int = 0, host: str = "127.0.0.1"):
        super().__init__((host, port), _Handler)
        self.root = root
        self.requests: list[Request] = []
        self.drops: list[Drop] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def drop(self, match: str, times: int = 1, after: int = 1000) -> None:
        with self._lock:
            self.drops.append(Drop(match, times, after))

    def take_drop(self, path: str) -> int | None:
        with self._lock:
            for drop in self.drops:
                if drop.times > 0 and drop.match in path and not path.endswith(".index"):
                    drop.times -= 1
                    return drop.after
        return None

    def gets(self, contains: str = "", suffix: str = "") -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and contains in r.path and r.path.endswith(suffix)]

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.drops.clear()

    def start(self) -> "MirrorServer":
        self._thread = threading.Thread(target=self.serve_forever, name="opendata-mirror", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread:
            self._thread.join(timeout=5)


def serve(root: str, port: int = 0) -> MirrorServer:
    """Serve ``root`` on 127.0.0.1 (port 0: a free one) in a background thread; ``.url``, ``.stop()``."""
    return MirrorServer(root, port).start()


# --- command line (python -m aifs.testing opendata-mirror) --------------------------------------------


def add_command(subparsers) -> None:
    p = subparsers.add_parser("opendata-mirror", help="write (and serve) a local ECMWF open-data mirror for a checkpoint")
    p.add_argument("--root", required=True, help="directory to write the files into")
    p.add_argument("--date", required=True, help="analysis date YYYYMMDD_HHMM")
    p.add_argument("--checkpoint", required=True, help="the fields it needs are written")
    p.add_argument("--members", default="1-3")
    p.add_argument("--serve", action="store_true", help="then serve ROOT over HTTP until interrupted")
    p.add_argument("--port", type=int, default=0, help="port to serve on (default: a free one)")


def command(args) -> int:
    import signal
    import time

    from aifs.members import parse_members

    paths = write_mirror(args.root, args.date, args.checkpoint, parse_members(args.members))
    for path in paths:
        print(path, flush=True)
    if not args.serve:
        return 0
    server = serve(args.root, args.port)
    print(f"serving {args.root} at {server.url} (use it as --source)", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
