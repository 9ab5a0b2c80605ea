"""Bad flags exit with USAGE (2) and a clear message, before any model or bucket work."""

from __future__ import annotations

import pytest
from worker_helpers import DATE, run_worker_subprocess, worker_args

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ({"date": "2025-06-01"}, "2025-06-01"),
        ({"date": "20250631_0000"}, "20250631_0000"),
        ({"members": "51"}, "51"),
        ({"members": "1-"}, "1-"),
        ({"members": "0"}, "0"),
        ({"members": "5-2"}, "backwards"),
    ],
)
def test_usage_errors_exit_2(run_main, bucket, checkpoint, dirs, override, fragment):
    args = worker_args(bucket=bucket.name, checkpoint=checkpoint, dirs=dirs, **override)
    code, text = run_main(args)
    assert code == 2, text
    assert fragment in text
    assert dirs.files() == []


def test_missing_service_account_file(run_main, bucket, checkpoint, dirs, tmp_path):
    missing = tmp_path / "no-such-key.json"
    code, text = run_main(worker_args(bucket=bucket.name, checkpoint=checkpoint, dirs=dirs,
                                      extra=["--service-account", str(missing)]))
    assert code == 2, text
    assert str(missing) in text
    assert "service account" in text.lower()


def test_argparse_errors_exit_2(run_main, bucket, checkpoint, dirs):
    code, _ = run_main(["--members", "1"])  # --date missing
    assert code == 2
    code, _ = run_main(worker_args(bucket=bucket.name, checkpoint=checkpoint, dirs=dirs, extra=["--lead-time", "x"]))
    assert code == 2


def test_module_entry_point_usage_error(emulator, bucket, checkpoint, dirs, tmp_path):
    """``python -m aifs.worker`` itself (not just main()) turns a bad date into exit status 2."""
    code, text = run_worker_subprocess(
        worker_args(bucket=bucket.name, checkpoint=checkpoint, dirs=dirs, date="20251127"), emulator.url, tmp_path
    )
    assert code == 2, text
    assert "20251127" in text
    assert "Traceback" not in text


def test_help_exits_0(run_main, capsys):
    code, text = run_main(["--help"])
    assert code == 0
    assert "--members" in text and "INPUT_INVALID" in text
