"""One member's input state: fetch its groups, decode, interpolate, transform, assemble.

Memory: a member holds its state (variables x time levels x grid points x 4 bytes: 92 x 2 x
542,080 x 4 = 0.4 GB on N320) plus one 0.25 deg field being interpolated (8 MB); fetched bytes
go to a scratch file, not memory. The constant fields are built once per date and shared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time

import numpy as np

from aifs.inputs.decode import messages
from aifs.inputs.fetch import Fetched, OpenData
from aifs.inputs.plan import DatePlan, RequestGroup
from aifs.inputs.regrid import Regridder
from aifs.inputs.spec import DTYPE, InputSpec

LOG = logging.getLogger("aifs.inputs")


#: Where a member's CPU goes: HTTP and the scratch file, reading each message's header against its index line,
#: MIR (its own GRIB decode, the interpolation, the output), scaling and the cast into the float32 state.
STAGES = ("fetch", "check", "interpolate", "store")


@dataclasses.dataclass
class Timings:
    fetch: float = 0.0  # wall seconds
    decode_interpolate: float = 0.0  # wall seconds: check + interpolate + store
    cpu: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))  # this thread's CPU a stage

    @contextlib.contextmanager
    def stage(self, name: str):
        started = time.thread_time()
        try:
            yield
        finally:
            self.cpu[name] = self.cpu.get(name, 0.0) + time.thread_time() - started


@dataclasses.dataclass
class Built:
    """What fetching one set of groups produced: {variable: (time levels, points)}, and where it came from."""

    levels: int
    points: int
    fields: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    filled: set[tuple[str, int]] = dataclasses.field(default_factory=set)
    sources: list[dict] = dataclasses.field(default_factory=list)
    timings: Timings = dataclasses.field(default_factory=Timings)

    def put(self, variable: str, level: int, values: np.ndarray) -> None:
        """Write one time level in place: the state is allocated once, never stacked (a copy of 0.4 GB on N320)."""
        if variable not in self.fields:
            self.fields[variable] = np.empty((self.levels, self.points), DTYPE)
        self.fields[variable][level] = values  # cast to float32 on the way in
        self.filled.add((variable, level))


class Builder:
    """Builds states of one date; shared by the member threads (constants are built by the first that needs them)."""

    def __init__(self, spec: InputSpec, plan: DatePlan, opendata: OpenData, regridder: Regridder, scratch: str):
        self.spec, self.plan, self.opendata, self.regrid, self.scratch = spec, plan, opendata, regridder, scratch
        self._constants: Built | None = None
        self._constants_lock = threading.Lock()

    def _fetch_into(self, groups: list[RequestGroup], level: int, out: Built, tag: str) -> None:
        for n, group in enumerate(groups):
            target = os.path.join(self.scratch, f"{tag}-{level}-{n}.grib2")
            started, clock = time.perf_counter(), out.timings.stage
            with clock("fetch"):
                fetched: Fetched = self.opendata.fetch(group, target)
            out.timings.fetch += time.perf_counter() - started
            started = time.perf_counter()
            try:
                with contextlib.closing(messages(fetched)) as checked:
                    while True:
                        with clock("check"):
                            message = next(checked, None)
                        if message is None:
                            break
                        with clock("interpolate"):
                            field = self.regrid(message)
                        with clock("store"):
                            for variable in self.plan.variables_of_key((message.param, group.levtype, message.level)):
                                scale = self.plan.sources[variable].scale
                                out.put(variable, level, field * scale if scale != 1.0 else field)
            finally:
                os.remove(target)
            out.timings.decode_interpolate += time.perf_counter() - started
            out.sources.append({"url": fetched.url, "request": group.describe(), "time_level": level,
                                "ranges": [list(r) for r in fetched.ranges], "bytes": fetched.bytes,
                                "fields": [line["param"] + (f"_{line['levelist']}" if line.get("levelist") else "")
                                           for line in fetched.lines],
                                "seconds": round(fetched.seconds, 3)})

    def constants(self) -> Built:
        """The deterministic run's constant fields at the date, fetched and interpolated once per date."""
        with self._constants_lock:
            if self._constants is None:
                built = Built(1, self.spec.grid_points)
                self._fetch_into(self.plan.constant_groups(), 0, built, "constants")
                self._constants = built
                LOG.info("[CONSTANTS] %s: %d fields, %.1f MB, fetched once for every member (%.1f s)",
                         ", ".join(sorted(built.fields)), len(built.fields), sum(s["bytes"] for s in built.sources) / 1e6,
                         built.timings.fetch + built.timings.decode_interpolate)
            return self._constants

    def member_state(self, member: int) -> tuple[dict, Built]:
        """``{"date", "fields"}`` for one member, and what was fetched for it (constants not included)."""
        levels = len(self.plan.cycles)
        own = Built(levels, self.spec.grid_points)
        for level, groups in enumerate(self.plan.member_groups(member)):
            self._fetch_into(groups, level, own, f"member{member:03d}")
        constants = self.constants()
        fields = {}
        for variable in self.spec.variables:
            if variable in constants.fields:  # one copy per member: the pickle holds each member's own arrays
                fields[variable] = np.repeat(constants.fields[variable], levels, axis=0)
                continue
            missing = [self.plan.cycles[k] for k in range(levels) if (variable, k) not in own.filled]
            if missing:  # the planner checked the index for every field: only a bug gets here
                raise RuntimeError(f"member {member}: {variable} was not built for {missing}")
            fields[variable] = own.fields.pop(variable)
        return {"date": self.plan.date, "fields": fields}, own


def time_levels_text(cycles) -> list[str]:
    return [c.isoformat() for c in cycles]

