"""One table of rules: a model variable -> the open-data field it comes from and how to transform it.

Rules are tried in order; the first whose pattern matches the whole variable name wins. A
variable no rule covers is an error naming it (:class:`NoRule`), before anything is fetched.
The table is the only place that knows open data's names: add a rule, not a per-model list.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

#: Standard gravity: open data publishes geopotential height (gh); the models read geopotential (z).
GRAVITY = 9.80665

#: Where a field comes from. ``member``: the ENS member's own file (enfo, pf number=N; cf for 0) at
#: every time level; ``wave``: the ENS wave stream (waef), likewise; ``constant``: the deterministic
#: forecast's step 0 at the date itself, fetched once per date and shared by every member and time level.
MEMBER, WAVE, CONSTANT = "member", "wave", "constant"
STREAM_OF_ORIGIN = {MEMBER: "enfo", WAVE: "waef"}  # CONSTANT: oper or scda by cycle (opendata_layout)


class NoRule(KeyError):
    """A variable the checkpoint needs that no rule maps to open data."""

    def __str__(self) -> str:
        return self.args[0]


@dataclasses.dataclass(frozen=True)
class FieldSource:
    """One open-data field: ``param`` on ``levtype`` (sfc, pl, sol) at ``level``, times ``scale``."""

    origin: str  # MEMBER, WAVE or CONSTANT
    param: str
    levtype: str = "sfc"
    level: int | None = None
    scale: float = 1.0

    def key(self) -> tuple[str, str, int | None]:
        """What identifies the field inside one file (besides the member number)."""
        return self.param, self.levtype, self.level

    def label(self) -> str:
        """``gh level 500``, ``2t``: the field as the index names it."""
        return self.param + (f" level {self.level}" if self.level is not None else "")

    def describe(self) -> str:
        level = f" level {self.level}" if self.level is not None else ""
        scale = f" x {self.scale:g}" if self.scale != 1.0 else ""
        return f"{self.param} ({self.levtype}{level}){scale} from the {self.origin} stream"


def _fixed(origin: str, levtype: str = "sfc") -> Callable[[re.Match], FieldSource]:
    return lambda m: FieldSource(origin, m.group(1), levtype)


#: (pattern, how to build the source). Order matters: ``z_500`` is geopotential on a pressure
#: level (from gh), ``z`` alone the surface geopotential constant.
RULES: list[tuple[re.Pattern, Callable[[re.Match], FieldSource]]] = [
    (re.compile(r"z_(\d+)"), lambda m: FieldSource(MEMBER, "gh", "pl", int(m.group(1)), GRAVITY)),
    (re.compile(r"(t|u|v|w|q|r|gh)_(\d+)"), lambda m: FieldSource(MEMBER, m.group(1), "pl", int(m.group(2)))),
    (re.compile(r"stl(\d)"), lambda m: FieldSource(MEMBER, "sot", "sol", int(m.group(1)))),  # soil temperature
    (re.compile(r"swvl(\d)"), lambda m: FieldSource(MEMBER, "vsw", "sol", int(m.group(1)))),  # soil moisture
    (re.compile(r"(lsm|z|slor|sdor)"), _fixed(CONSTANT)),  # not in enfo: the deterministic run's step 0
    (re.compile(r"(10u|10v|2d|2t|msl|skt|sp|tcw|sd|sst|ci|100u|100v|tcc)"), _fixed(MEMBER)),
    # ocean waves (AIFS-ENS v2): mwd stays in degrees as published; the model's own filter makes cos/sin
    (re.compile(r"(swh|mwp|mwd|pp1d|cdww|wmb|h1012|h1214|h1417|h1721|h2125|h2530)"), _fixed(WAVE)),
]


def source_of(variable: str) -> FieldSource:
    """The open-data field ``variable`` comes from; NoRule naming it when no rule covers it."""
    for pattern, build in RULES:
        match = pattern.fullmatch(variable)
        if match:
            return build(match)
    raise NoRule(f"no open-data rule covers variable {variable!r} (aifs.inputs.rules.RULES)")


def sources_of(variables) -> dict[str, FieldSource]:
    """Every variable's source; NoRule naming all uncovered variables at once."""
    sources, uncovered = {}, []
    for variable in variables:
        try:
            sources[variable] = source_of(variable)
        except NoRule:
            uncovered.append(variable)
    if uncovered:
        raise NoRule(f"no open-data rule covers variable(s) {', '.join(map(repr, uncovered))} (aifs.inputs.rules.RULES)")
    return sources
