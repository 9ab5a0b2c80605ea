"""What to fetch: the checkpoint's variables grouped into open-data requests, one group per file and level type.

ecmwf-opendata matches an index line when every requested key matches, so surface, soil and
pressure-level fields go in separate requests (a surface line has no level), and pressure-level
parameters are grouped by their level set (asking ``t, gh`` on ``500, 850`` would fetch all four).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections import defaultdict

from aifs.inputs.opendata_layout import DataFile, deterministic_stream, time_level_cycles
from aifs.inputs.rules import CONSTANT, STREAM_OF_ORIGIN, FieldSource


def index_identity(member: int | None) -> dict[str, str]:
    """Index keys that select a member's lines: ``pf`` + number, ``cf`` for 0, ``fc`` for the deterministic run."""
    if member is None:
        return {"type": "fc"}
    if member == 0:
        return {"type": "cf"}
    return {"type": "pf", "number": str(member)}


@dataclasses.dataclass(frozen=True)
class RequestGroup:
    """One ecmwf-opendata request: some fields of one file, for one member (None: the deterministic run)."""

    file: DataFile
    member: int | None
    levtype: str
    params: tuple[str, ...]
    levels: tuple[int, ...] | None
    fields: tuple[FieldSource, ...]  # exactly the params x levels asked, in no particular order

    def client_request(self) -> dict:
        c = self.file.cycle
        request = {"date": f"{c:%Y%m%d}", "time": c.hour, "stream": self.file.stream, "step": self.file.step,
                   "param": list(self.params), "levtype": self.levtype, **index_identity(self.member)}
        if self.member not in (None, 0):
            request["number"] = self.member
        if self.levels is not None:
            request["levelist"] = list(self.levels)
        return request

    def describe(self) -> str:
        who = "deterministic" if self.member is None else f"member {self.member}"
        levels = f" levels {','.join(map(str, self.levels))}" if self.levels else ""
        return f"{self.file} [{who}, {self.levtype}: {','.join(self.params)}{levels}]"


def _groups(file: DataFile, member: int | None, sources: set[FieldSource]) -> list[RequestGroup]:
    by_levtype: dict[str, list[FieldSource]] = defaultdict(list)
    for source in sources:
        by_levtype[source.levtype].append(source)
    groups = []
    for levtype, items in sorted(by_levtype.items()):
        if all(s.level is None for s in items):
            params = tuple(sorted({s.param for s in items}))
            groups.append(RequestGroup(file, member, levtype, params, None, tuple(sorted(set(items), key=FieldSource.key))))
            continue
        levels_of: dict[str, set[int]] = defaultdict(set)
        for s in items:
            levels_of[s.param].add(s.level)
        by_levelset: dict[tuple[int, ...], list[str]] = defaultdict(list)
        for param, levels in levels_of.items():
            by_levelset[tuple(sorted(levels))].append(param)
        for levels, params in sorted(by_levelset.items()):
            fields = tuple(FieldSource("", p, levtype, lev) for p in sorted(params) for lev in levels)
            groups.append(RequestGroup(file, member, levtype, tuple(sorted(params)), levels, fields))
    return groups


@dataclasses.dataclass(frozen=True)
class DatePlan:
    """Every request a date needs: per member and time level, and the constants once."""

    date: dt.datetime
    cycles: tuple[dt.datetime, ...]  # the time levels' analysis times, oldest first
    sources: dict[str, FieldSource]  # variable -> field

    def distinct(self, origin_filter) -> set[FieldSource]:
        # the field identity without scale/origin: z_500 and gh_500 would share one fetch
        return {FieldSource("", s.param, s.levtype, s.level) for s in self.sources.values() if origin_filter(s.origin)}

    def constant_groups(self) -> list[RequestGroup]:
        fields = self.distinct(lambda o: o == CONSTANT)
        return _groups(DataFile(deterministic_stream(self.date), self.date), None, fields) if fields else []

    def member_groups(self, member: int) -> list[list[RequestGroup]]:
        """One list of groups per time level, oldest first."""
        per_level = []
        for cycle in self.cycles:
            groups = []
            for origin, stream in STREAM_OF_ORIGIN.items():
                fields = self.distinct(lambda o, origin=origin: o == origin)
                if fields:
                    groups += _groups(DataFile(stream, cycle), member, fields)
            per_level.append(groups)
        return per_level

    def files(self) -> list[DataFile]:
        files = {g.file for groups in self.member_groups(1) for g in groups} | {g.file for g in self.constant_groups()}
        return sorted(files, key=lambda f: (f.cycle, f.stream))

    def variables_of_key(self, key: tuple[str, str, int | None]) -> list[str]:
        """The variables one fetched field (param, levtype, level) feeds: usually one."""
        return [v for v, s in self.sources.items() if s.key() == key]


def date_plan(date: dt.datetime, time_levels: int, timestep: dt.timedelta, sources: dict[str, FieldSource]) -> DatePlan:
    return DatePlan(date, tuple(time_level_cycles(date, time_levels, timestep)), dict(sources))
