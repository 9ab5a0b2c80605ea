"""aifs.layout: object names are byte-exact copies of the original scripts' contract."""

from __future__ import annotations

import datetime as dt
import fnmatch

import pytest

from aifs import layout

DATE = "20251127_0000"


# --- dates -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("20251127_0000", dt.datetime(2025, 11, 27, 0, 0)),
        ("20251127_1200", dt.datetime(2025, 11, 27, 12, 0)),
        ("20240229_0600", dt.datetime(2024, 2, 29, 6, 0)),  # leap day
        ("19991231_2359", dt.datetime(1999, 12, 31, 23, 59)),
    ],
)
def test_parse_date_valid(text, expected):
    assert layout.parse_date(text) == expected
    assert layout.format_date(expected) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "20251127",
        "20251127_000",
        "20251127_00000",
        "2025-11-27_0000",
        "20251127-0000",
        "20251127 0000",
        " 20251127_0000",
        "20251127_0000 ",
        "20251127_0000\n",
        "20251327_0000",  # month 13
        "20250230_0000",  # 30 February
        "20250229_0000",  # not a leap year
        "20251127_2400",  # hour 24
        "20251127_0060",  # minute 60
        "2025112a_0000",
        "٢٠٢٥١١٢٧_٠٠٠٠",  # non-ASCII digits
        "../20251127_0000",
    ],
)
def test_parse_date_rejects(text):
    with pytest.raises(layout.BadDate) as info:
        layout.parse_date(text)
    assert repr(text) in str(info.value)  # the message quotes what was given


@pytest.mark.parametrize("value", [None, 20251127, b"20251127_0000", dt.datetime(2025, 11, 27)])
def test_parse_date_rejects_non_strings(value):
    with pytest.raises(layout.BadDate):
        layout.parse_date(value)


def test_bad_date_is_value_error():
    assert issubclass(layout.BadDate, ValueError)


def test_bad_date_message_gives_example():
    with pytest.raises(layout.BadDate, match="YYYYMMDD_HHMM"):
        layout.parse_date("yesterday")


# --- object names ------------------------------------------------------------------------------


def test_input_names_byte_exact():
    assert layout.input_object(DATE, 1) == "20251127_0000/input/input_state_member_001.pkl"
    assert layout.input_object(DATE, 50) == "20251127_0000/input/input_state_member_050.pkl"
    assert layout.input_filename(7) == "input_state_member_007.pkl"
    assert layout.input_object(DATE, 7).endswith("/" + layout.input_filename(7))


def test_forecast_names_byte_exact():
    assert (
        layout.forecast_object(DATE, 1, 0, 72)
        == "20251127_0000/forecasts/aifs_ens_forecast_20251127_0000_member001_h000-072.grib"
    )
    assert (
        layout.forecast_object(DATE, 50, 720, 792)
        == "20251127_0000/forecasts/aifs_ens_forecast_20251127_0000_member050_h720-792.grib"
    )
    assert layout.forecast_filename(DATE, 3, 144, 150) == "aifs_ens_forecast_20251127_0000_member003_h144-150.grib"
    assert layout.forecast_prefix(DATE) == "20251127_0000/forecasts/"
    assert layout.forecast_object(DATE, 3, 72, 144).startswith(layout.forecast_prefix(DATE))


def test_manifest_name_outside_grib_names():
    name = layout.manifest_object(DATE, 5)
    assert name == "20251127_0000/manifests/aifs_ens_forecast_20251127_0000_member005.json"
    assert name.startswith(layout.manifest_prefix(DATE))
    assert layout.manifest_prefix(DATE) == "20251127_0000/manifests/"
    # nothing that lists or globs the forecasts ever sees the manifest
    assert not name.startswith(layout.forecast_prefix(DATE))
    assert not name.endswith(".grib")
    assert not fnmatch.fnmatch(name.rsplit("/", 1)[1], layout.member_grib_glob(5))


def test_names_of_all_members_are_distinct_and_sort_by_member():
    inputs = [layout.input_object(DATE, m) for m in range(1, 51)]
    manifests = [layout.manifest_object(DATE, m) for m in range(1, 51)]
    assert len(set(inputs)) == 50 and inputs == sorted(inputs)
    assert len(set(manifests)) == 50 and manifests == sorted(manifests)


def test_forecast_names_sort_by_window():
    names = [layout.forecast_object(DATE, 1, w.start, w.end) for w in layout.windows(792)]
    assert names == sorted(names)


def test_member_grib_glob_matches_own_files_only():
    own = [layout.forecast_filename(d, 7, w.start, w.end) for d in (DATE, "20240101_1200") for w in layout.windows(150)]
    for name in own:
        assert fnmatch.fnmatch(name, layout.member_grib_glob(7)), name
    for other in (1, 8, 17, 50):
        assert not fnmatch.fnmatch(layout.forecast_filename(DATE, other, 0, 72), layout.member_grib_glob(7))
    # member 1's glob must not catch members 10..19 or 100+ (zero padding)
    for other in (10, 11, 19, 21):
        assert not fnmatch.fnmatch(layout.forecast_filename(DATE, other, 0, 72), layout.member_grib_glob(1))
    assert not fnmatch.fnmatch(layout.input_filename(7), layout.member_grib_glob(7))


# --- windows -----------------------------------------------------------------------------------


def _pairs(ws):
    return [(w.start, w.end) for w in ws]


def test_windows_full_lead_time():
    ws = layout.windows(792)
    assert len(ws) == 11
    assert _pairs(ws) == [(s, s + 72) for s in range(0, 792, 72)]
    assert layout.windows(layout.DEFAULT_LEAD_TIME_HOURS) == ws


@pytest.mark.parametrize(
    "lead, expected",
    [
        (150, [(0, 72), (72, 144), (144, 150)]),
        (144, [(0, 72), (72, 144)]),
        (72, [(0, 72)]),
        (78, [(0, 72), (72, 78)]),
        (6, [(0, 6)]),
        (1, [(0, 1)]),
        (800, [(s, s + 72) for s in range(0, 792, 72)] + [(792, 800)]),
    ],
)
def test_windows_last_shorter(lead, expected):
    assert _pairs(layout.windows(lead)) == expected


@pytest.mark.parametrize("lead", [0, -6, -792])
def test_windows_reject_non_positive(lead):
    with pytest.raises(ValueError):
        layout.windows(lead)


@pytest.mark.parametrize("lead", [6, 66, 72, 78, 144, 150, 360, 786, 792])
def test_windows_partition_the_steps(lead):
    """Every 6-hourly step up to the lead time falls in exactly one window; windows are contiguous."""
    ws = layout.windows(lead)
    assert ws[0].start == 0 and ws[-1].end == lead
    for a, b in zip(ws, ws[1:]):
        assert a.end == b.start
    for w in ws:
        assert 0 < w.end - w.start <= layout.WINDOW_HOURS
    for hour in range(6, lead + 1, 6):
        holders = [w for w in ws if w.contains(hour)]
        assert len(holders) == 1, (hour, holders)
        assert layout.window_of(hour, lead) == holders[0]


def test_window_is_start_exclusive_end_inclusive():
    w = layout.Window(0, 72)
    assert not w.contains(0)
    assert w.contains(6) and w.contains(72)
    assert not w.contains(78)
    assert [h for h in range(0, 800, 6) if w.contains(h)] == list(range(6, 73, 6))  # 12 steps, 6..72
    assert layout.window_of(72, 792) == layout.Window(0, 72)
    assert layout.window_of(78, 792) == layout.Window(72, 144)
    assert layout.window_of(792, 792) == layout.Window(720, 792)
    assert layout.window_of(150, 150) == layout.Window(144, 150)


def test_window_is_hashable_and_frozen():
    w = layout.Window(0, 72)
    assert {w: 1}[layout.Window(0, 72)] == 1
    with pytest.raises(Exception):
        w.start = 6  # type: ignore[misc]


def test_defaults_from_original_scripts():
    assert layout.DEFAULT_BUCKET == "aifs-aiquest-us-20251127"
    assert layout.DEFAULT_SERVICE_ACCOUNT == "coiled-data.json"
    assert layout.DEFAULT_INPUT_DIR == "/scratch/input_states"
    assert layout.DEFAULT_OUTPUT_DIR == "/scratch/ensemble_outputs"
    assert layout.DEFAULT_UPLOAD_THREADS == 5
    assert layout.UPLOAD_CHUNK_BYTES == 32 * 1024 * 1024
    assert layout.DEFAULT_LEAD_TIME_HOURS == 792
    assert layout.WINDOW_HOURS == 72
    # resumable uploads need chunks that are a multiple of 256 KiB
    assert layout.UPLOAD_CHUNK_BYTES % (256 * 1024) == 0


def test_member_index_glob_matches_own_index_files_only():
    own = layout.forecast_index_object(DATE, 7, 0, 72).rsplit("/", 1)[1]
    assert fnmatch.fnmatch(own, layout.member_index_glob(7))
    assert not fnmatch.fnmatch(layout.forecast_index_object(DATE, 17, 0, 72).rsplit("/", 1)[1], layout.member_index_glob(7))
    assert not fnmatch.fnmatch(layout.forecast_filename(DATE, 7, 0, 72), layout.member_index_glob(7))
