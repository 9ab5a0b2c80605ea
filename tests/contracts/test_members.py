"""aifs.members: one parser for the worker's --members and the DAG's members param."""

from __future__ import annotations

import random
import re

import pytest

from aifs import members as M

# Known contract bug (reported): parse_members drops every space before matching, so "1 0" is
# member 10 and "1 2,3" is [3, 12], while MEMBERS_PATTERN (the DAG param) rejects both.


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1-50", list(range(1, 51))),
        (M.DEFAULT_MEMBERS, list(range(1, 51))),
        ("1,5,10", [1, 5, 10]),
        ("1-3,7,20-22", [1, 2, 3, 7, 20, 21, 22]),
        ("7", [7]),
        ("50", [50]),
        ("5-5", [5]),
        ("10,1", [1, 10]),  # sorted
        ("1-5,3-7", [1, 2, 3, 4, 5, 6, 7]),  # overlaps merged
        ("3,3,3", [3]),  # de-duplicated
        (" 1 - 3 , 7 ", [1, 2, 3, 7]),  # spaces tolerated
        ("01,050", [1, 50]),  # zero padding as in file names
    ],
)
def test_parse_members_valid(text, expected):
    assert M.parse_members(text) == expected


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("0", "member 0"),
        ("51", "member 51"),
        ("1-51", "member 51"),
        ("0-3", "member 0"),
        ("1-", "'1-'"),
        ("-1", "'-1'"),
        ("-", "'-'"),
        ("3-1", "backwards"),
        ("1,,2", "''"),
        (",1", "''"),
        ("1,", "''"),
        ("a", "'a'"),
        ("1.5", "'1.5'"),
        ("1-2-3", "'1-2-3'"),
        ("+1", "'+1'"),
        ("1;2", "'1;2'"),
        ("1 2,3", "'1 2'"),
        ("all", "'all'"),
        ("100", "member 100"),
    ],
)
def test_parse_members_rejects(text, fragment):
    with pytest.raises(M.BadMembers) as info:
        M.parse_members(text)
    if fragment:
        assert fragment in str(info.value)


@pytest.mark.parametrize("value", [None, 5, [1, 2], b"1-3"])
def test_parse_members_rejects_non_strings(value):
    with pytest.raises(M.BadMembers):
        M.parse_members(value)


def test_bad_members_is_value_error():
    assert issubclass(M.BadMembers, ValueError)


def test_bounds():
    assert (M.MIN_MEMBER, M.MAX_MEMBER) == (1, 50)


@pytest.mark.parametrize(
    "members, text",
    [
        ([1, 2, 3, 7], "1-3,7"),
        ([5], "5"),
        (list(range(1, 51)), "1-50"),
        ([7, 1, 3, 2, 3], "1-3,7"),
        ([1, 3, 5], "1,3,5"),
        ([1, 2], "1-2"),
        ([], ""),
    ],
)
def test_format_members(members, text):
    assert M.format_members(members) == text


def test_format_parse_round_trip_random():
    rng = random.Random(1234)
    for _ in range(500):
        chosen = sorted(rng.sample(range(1, 51), rng.randint(1, 50)))
        text = M.format_members(chosen)
        assert M.parse_members(text) == chosen, text
        assert re.match(M.MEMBERS_PATTERN, text), text


VALID = ["1-50", "1,5,10", "1-3,7,20-22", " 1 - 3 , 7 ", "5", "01,050", "3-3"]
INVALID = ["", "   ", "1-", "-1", "1,,2", ",1", "1,", "a", "1.5", "1-2-3", "1;2", "+1"]
INVALID += ["1 0", "1 2,3"]  # digits are never joined across spaces


@pytest.mark.parametrize("text", VALID + INVALID)
def test_pattern_and_parser_agree(text):
    """The DAG param's JSON-schema pattern and the parser accept the same syntax.

    (The parser also range-checks, which the pattern cannot; the corpus here stays in range.)
    """
    pattern_ok = re.match(M.MEMBERS_PATTERN, text) is not None
    try:
        M.parse_members(text)
        parser_ok = True
    except M.BadMembers:
        parser_ok = False
    assert pattern_ok == parser_ok, f"{text!r}: pattern {pattern_ok}, parser {parser_ok}"


def test_member_label():
    assert M.member_label(7) == "member 007"
    assert M.member_label(50) == "member 050"
