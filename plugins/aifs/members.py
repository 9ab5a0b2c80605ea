"""Ensemble member selections: ``1-50``, ``1,5,10``, ``1-3,7,20-22``.

One parser for the worker's ``--members`` flag and the DAG's ``members`` param, so a selection
that one side accepts the other accepts too.
"""

from __future__ import annotations

import re

MIN_MEMBER = 1
MAX_MEMBER = 50
DEFAULT_MEMBERS = f"{MIN_MEMBER}-{MAX_MEMBER}"

#: JSON-schema pattern for the DAG param; the parser below is the real check.
MEMBERS_PATTERN = r"^\s*\d+(\s*-\s*\d+)?(\s*,\s*\d+(\s*-\s*\d+)?)*\s*$"
_PART = re.compile(r"^(\d+)(?:-(\d+))?$")


class BadMembers(ValueError):
    """A member selection that cannot be parsed or falls outside MIN_MEMBER..MAX_MEMBER."""


def parse_members(text: str) -> list[int]:
    """Sorted, de-duplicated member numbers; raises BadMembers saying what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise BadMembers(f"empty member selection {text!r}: use e.g. 1-50 or 1,5,10")
    members: set[int] = set()
    for raw in text.split(","):
        part = re.sub(r"\s*-\s*", "-", raw.strip())  # "1 - 5" is a range; "1 0" is not member 10
        match = _PART.match(part)
        if not match:
            raise BadMembers(f"bad member selection {text!r}: {raw.strip()!r} is not N or N-M")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if lo > hi:
            raise BadMembers(f"bad member selection {text!r}: range {lo}-{hi} runs backwards")
        for number in (lo, hi):
            if not MIN_MEMBER <= number <= MAX_MEMBER:
                raise BadMembers(
                    f"bad member selection {text!r}: member {number} is outside {MIN_MEMBER}..{MAX_MEMBER}"
                )
        members.update(range(lo, hi + 1))
    return sorted(members)


def format_members(members: list[int]) -> str:
    """Compact form of a selection: ``[1, 2, 3, 7]`` -> ``"1-3,7"`` (round-trips parse_members)."""
    parts: list[str] = []
    ordered = sorted(set(members))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def member_label(member: int) -> str:
    return f"member {member:03d}"
