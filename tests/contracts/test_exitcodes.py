"""aifs.exitcodes: the worker <-> DAG contract. Values are frozen: the DAG maps them to outcomes."""

from __future__ import annotations

import pytest

from aifs.exitcodes import ExitCode, describe

FROZEN = {
    "OK": 0,
    "MEMBERS_FAILED": 1,
    "USAGE": 2,
    "INPUT_MISSING": 10,
    "INPUT_INVALID": 11,
    "INFERENCE_FAILED": 12,
    "UPLOAD_FAILED": 13,
    "OUT_OF_DISK": 14,
    "CHECKPOINT_FAILED": 15,
    "DOWNLOAD_FAILED": 16,
    # python -m aifs.inputs
    "SOURCE_NOT_PUBLISHED": 20,
    "SOURCE_INCOMPLETE": 21,
    "SOURCE_FAILED": 22,
    "INPUT_WRITE_FAILED": 23,
    "INTERPOLATION_FAILED": 24,
    # python -m aifs.products
    "FORECASTS_MISSING": 30,
    "TOO_FEW_MEMBERS": 31,
    "CLIMATOLOGY_FAILED": 32,
    "SUBMISSION_FAILED": 33,
    "CHECK_FAILED": 34,
    "PRODUCTS_UPLOAD_FAILED": 35,
    "FORECAST_INVALID": 36,
}


def test_values_frozen():
    assert {c.name: c.value for c in ExitCode} == FROZEN


def test_codes_fit_a_process_status_and_are_unique():
    values = [c.value for c in ExitCode]
    assert len(values) == len(set(values))
    assert all(0 <= v <= 125 for v in values)  # 126+ mean exec failures / signals in shells


def test_usage_matches_argparse():
    import argparse

    parser = argparse.ArgumentParser()
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--nope"])
    assert info.value.code == ExitCode.USAGE


def test_int_compatible():
    assert ExitCode.INPUT_INVALID == 11
    assert int(ExitCode.UPLOAD_FAILED) == 13
    assert ExitCode(14) is ExitCode.OUT_OF_DISK


@pytest.mark.parametrize("code", list(ExitCode))
def test_every_code_described(code):
    assert isinstance(code.describe, str) and code.describe.strip()
    assert describe(int(code)) == code.describe
    assert describe(code) == code.describe


def test_descriptions_distinct():
    texts = [c.describe for c in ExitCode]
    assert len(set(texts)) == len(texts)


@pytest.mark.parametrize("status", [3, 9, 17, 134, 137, 139, 255, -9, -15])
def test_describe_unknown_status(status):
    text = describe(status)
    assert str(status) in text
    assert "unexpected" in text


def test_retryable_set():
    retryable = {c for c in ExitCode if c.retryable}
    assert retryable == {
        ExitCode.UPLOAD_FAILED,
        ExitCode.DOWNLOAD_FAILED,
        ExitCode.INFERENCE_FAILED,
        ExitCode.MEMBERS_FAILED,
        # open data not there yet, or a transfer/bucket hiccup: the next try can succeed
        ExitCode.SOURCE_NOT_PUBLISHED,
        ExitCode.SOURCE_FAILED,
        ExitCode.INPUT_WRITE_FAILED,
        ExitCode.CLIMATOLOGY_FAILED,
        ExitCode.SUBMISSION_FAILED,
        ExitCode.PRODUCTS_UPLOAD_FAILED,
    }
    # failures that no retry can fix
    for code in (ExitCode.USAGE, ExitCode.INPUT_MISSING, ExitCode.INPUT_INVALID, ExitCode.CHECKPOINT_FAILED,
                 ExitCode.SOURCE_INCOMPLETE, ExitCode.INTERPOLATION_FAILED, ExitCode.TOO_FEW_MEMBERS,
                 ExitCode.CHECK_FAILED, ExitCode.FORECAST_INVALID):
        assert not code.retryable
    assert not ExitCode.OK.retryable


def test_cli_help_lists_every_code():
    from aifs.worker.cli import EXIT_CODE_HELP

    for code in ExitCode:
        assert f"{code.value:3d}  {code.name}" in EXIT_CODE_HELP
