"""Split a fetched file into its GRIB messages and check each against the index line it was fetched for.

Parameter, level and member must be what the index promised (bytes that are something else are
an error, not a silently wrong field), and the grid must be a regular lat/lon grid that MIR can
read as it is described in the message (open data's starts at longitude -180: the message says
so, and MIR honours it, bitmap of missing points included).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

from aifs.inputs.errors import SourceFailed
from aifs.inputs.fetch import Fetched


@dataclasses.dataclass
class Message:
    param: str
    level: int | None
    data: bytes  # the whole GRIB message, for MIR
    missing: bool = False  # the message has a bitmap: some points are missing (waves over land)


def messages(fetched: Fetched) -> Iterator[Message]:
    """The fetched file's messages, in the order of its index lines, each checked against its line."""
    import eccodes

    def fail(problem: str) -> SourceFailed:
        return SourceFailed(problem, fetched.group.member, fetched.url)

    with open(fetched.path, "rb") as f:
        for line, (offset, length) in zip(fetched.lines, fetched.ranges):
            data = f.read(length)
            if len(data) != length:
                raise fail(f"bytes {offset}+{length}: the fetched file is short")
            try:
                handle = eccodes.codes_new_from_message(data)
            except Exception as exc:  # eccodes raises its own error kinds for non-GRIB bytes
                raise fail(f"bytes {offset}+{length} ({line['param']}) are not a GRIB message: {exc}") from exc
            try:
                def get(key):
                    return eccodes.codes_get(handle, key)

                level = int(line["levelist"]) if line.get("levelist") is not None else None
                got = (get("shortName"), get("level") if level is not None else None)
                if got != (line["param"], level):
                    raise fail(f"bytes {offset}+{length} hold {got[0]} level {got[1]}, the index says {line['param']} level {level}")
                if line.get("number") is not None and str(get("number")) != line["number"]:
                    raise fail(f"bytes {offset}+{length} hold member {get('number')}, the index says {line['number']}")
                if get("gridType") != "regular_ll":
                    raise fail(f"{line['param']}: gridType {get('gridType')}, expected open data's regular_ll")
                missing = bool(get("bitmapPresent"))
            finally:
                eccodes.codes_release(handle)
            yield Message(line["param"], level, data, missing)
