"""One member's period values on the competition grid, and its time series at the report's points.

Reads the member's windows (aifs.products.gribread: by their GRIB indexes where the manifest lists
them, else whole), keeps running sums on the model's own grid (a mean over a period commutes with a
linear or conservative regridding, so each period is regridded once, not each step), then regrids
each (variable, period) with MIR. Logs the bytes it read against the windows' sizes.
Memory per member in flight: two native fields per mean period and three accumulations, e.g.
7 x 542,080 x 8 B = 30 MB on N320, plus the read chunk or one window's wanted messages.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from aifs import layout
from aifs.manifest import Manifest
from aifs.products import gribread, periods, regrid
from aifs.products.errors import ForecastInvalid, ForecastsMissing

#: steps kept at the report's points (plumes): every 6 h from the first to the last step the periods need
PLUME_STEPS = tuple(range(periods.FIRST_STEP, periods.LAST_STEP + 1, periods.STEP_HOURS))

log = logging.getLogger("aifs.products")


@dataclasses.dataclass(frozen=True)
class Point:
    name: str
    lat: float
    lon: float


def parse_points(text: str) -> list[Point]:
    """``"Nairobi:-1.29,36.82;Kampala:0.35,32.58"`` -> points; clear error naming the bad part."""
    points = []
    for part in (p.strip() for p in (text or "").split(";")):
        if not part:
            continue
        name, sep, coords = part.partition(":")
        try:
            lat, lon = (float(x) for x in coords.split(","))
        except ValueError:
            raise ValueError(f"bad point {part!r}: expected NAME:LAT,LON") from None
        if not sep or not name.strip() or not -90 <= lat <= 90 or not -180 <= lon <= 360:
            raise ValueError(f"bad point {part!r}: expected NAME:LAT,LON with -90<=LAT<=90")
        points.append(Point(name.strip(), lat, lon))
    return points


@dataclasses.dataclass
class MemberProducts:
    member: int
    values: dict[tuple[str, int], np.ndarray]  # (variable, period) -> (121, 240) on the competition grid
    series: dict[str, np.ndarray]  # shortName -> (len(PLUME_STEPS), len(points)); NaN where not read
    seconds: float = 0.0
    bytes_read: int = 0  # fetched from the bucket: the wanted messages' ranges and indexes, or whole windows
    window_bytes: int = 0  # the windows' sizes: what streaming every window would read
    windows_by_index: int = 0
    windows_streamed: int = 0
    index_fallbacks: list[str] = dataclasses.field(default_factory=list)  # "window: why its index was not used"


def _nearest(lats: np.ndarray, lons: np.ndarray, points: list[Point]) -> np.ndarray:
    """Index of the nearest grid point (great circle) to each point."""
    if not points:
        return np.zeros(0, dtype=int)
    la, lo = np.radians(lats), np.radians(lons)
    xyz = np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], axis=1)
    out = []
    for p in points:
        pla, plo = np.radians(p.lat), np.radians(p.lon)
        v = np.array([np.cos(pla) * np.cos(plo), np.cos(pla) * np.sin(plo), np.sin(pla)])
        out.append(int(np.argmax(xyz @ v)))
    return np.array(out)


def read_member(bucket, date: str, member: int, lead_time: int, points: list[Point], grids: dict,
                manifest: Manifest | None = None, **request) -> MemberProducts:
    """``manifest`` (the member's, as the selection verified it): windows it lists with an index are read by it."""
    started = time.perf_counter()
    plist = periods.periods()
    wanted = {short: set(PLUME_STEPS) for short in {p.short_name for p in plist}}
    sums: dict[tuple[str, int], np.ndarray] = {}
    counts: dict[tuple[str, int], int] = {}
    accum: dict[tuple[str, int], np.ndarray] = {}  # (tp, step) -> accumulation since the start
    series = {short: np.full((len(PLUME_STEPS), len(points)), np.nan) for short in wanted}
    step_row = {s: i for i, s in enumerate(PLUME_STEPS)}
    state: dict = {"grid": None, "index": None}

    def on_field(field: gribread.Field) -> None:
        if state["grid"] is None:
            state["grid"] = field.grid
            state["index"] = _nearest(field.latitudes, field.longitudes, points)
            state["size"] = field.values.size
        elif field.grid != state["grid"] or field.values.size != state["size"]:
            raise ForecastInvalid(f"member {member:03d}: {field.short_name} step {field.step} is on grid "
                                  f"{field.grid}, other fields on {state['grid']}")
        series[field.short_name][step_row[field.step]] = field.values[state["index"]]
        for p in plist:
            if p.short_name != field.short_name or field.step not in p.steps:
                continue
            key = (p.variable, p.number)
            if p.aggregation == "mean":
                sums[key] = field.values if key not in sums else sums[key] + field.values
                counts[key] = counts.get(key, 0) + 1
            else:
                accum[(field.short_name, field.step)] = field.values

    found: set[tuple[str, int]] = set()
    listed = {tuple(o.window): o for o in manifest.objects} if manifest is not None else {}
    reads = []
    for window in gribread.windows_needed(lead_time, PLUME_STEPS):
        name = layout.forecast_object(date, member, window.start, window.end)
        entry = listed.get((window.start, window.end))
        read = gribread.read_window(bucket, name, wanted, on_field, date, grids,
                                    index=entry.index if entry is not None else None, window=window, **request)
        reads.append((read, entry))
        got = read.found
        expected = {(short, s) for short, steps in wanted.items() for s in steps if window.contains(s)}
        missing = sorted(expected - got)
        if missing:
            shown = ", ".join(f"{short} h{step:03d}" for short, step in missing[:6])
            raise ForecastsMissing(f"member {member:03d}: gs://{bucket.name}/{name} lacks {len(missing)} message(s) "
                                   f"the products need: {shown}{' ...' if len(missing) > 6 else ''}")
        found |= got

    values: dict[tuple[str, int], np.ndarray] = {}
    for p in plist:
        key = (p.variable, p.number)
        if p.aggregation == "mean":
            native = sums[key] / counts[key]
        else:
            native = accum[(p.short_name, p.end_hour)] - accum[(p.short_name, p.start_hour)]
            native = np.maximum(native, 0.0)  # packing noise can make a dry point's difference -1e-9
        values[key] = regrid.to_competition_grid(native, state["grid"], p.interpolation)
    result = MemberProducts(member, values, series, time.perf_counter() - started,
                            bytes_read=sum(r.bytes_read for r, _ in reads),
                            window_bytes=sum(e.size for _, e in reads if e is not None),
                            windows_by_index=sum(r.via == "index" for r, _ in reads),
                            windows_streamed=sum(r.via == "stream" for r, _ in reads),
                            index_fallbacks=[f"{e.name}: {r.fallback}" for r, e in reads if r.fallback])
    log.info("[PRODUCTS] member %03d: read %.1f MB of its %d windows' %.1f MB (%d by index, %d streamed%s)", member,
             result.bytes_read / 1e6, len(reads), result.window_bytes / 1e6, result.windows_by_index,
             result.windows_streamed,
             f", {len(result.index_fallbacks)} index(es) not usable" if result.index_fallbacks else "")
    return result


def read_summary(results: list[MemberProducts]) -> dict:
    """The products summary's account of reading: bytes read against the windows' sizes, indexes not usable."""
    read, total = sum(r.bytes_read for r in results), sum(r.window_bytes for r in results)
    return {"bytes_read": read, "window_bytes": total,
            "windows_by_index": sum(r.windows_by_index for r in results),
            "windows_streamed": sum(r.windows_streamed for r in results),
            "index_fallbacks": [f"member {r.member:03d}: {why}" for r in results for why in r.index_fallbacks]}
