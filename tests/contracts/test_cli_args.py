"""aifs.worker.cli.parse_args: flags, defaults, usage errors and the [RERUN] command (no heavy deps)."""

from __future__ import annotations

import shlex

import pytest

from aifs import layout
from aifs.worker.cli import UsageError, WorkerOptions, build_parser, parse_args

DATE = "20251127_0000"


def test_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no coiled-data.json here
    monkeypatch.delenv("AIFS_CHECKPOINT", raising=False)
    o = parse_args(["--date", DATE])
    assert o.date == DATE
    assert o.members == list(range(1, 51))
    assert o.bucket == layout.DEFAULT_BUCKET
    assert o.service_account is None
    assert o.input_dir == layout.DEFAULT_INPUT_DIR
    assert o.output_dir == layout.DEFAULT_OUTPUT_DIR
    assert o.upload_threads == 5
    assert o.checkpoint == layout.DEFAULT_CHECKPOINT
    assert o.lead_time == 792
    assert o.precision is None and o.num_chunks is None and o.device is None
    assert o.force is False
    assert o.upload_timeout > 0


def test_default_service_account_used_when_present(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / layout.DEFAULT_SERVICE_ACCOUNT).write_text("{}")
    assert parse_args(["--date", DATE]).service_account == layout.DEFAULT_SERVICE_ACCOUNT


def test_explicit_service_account(tmp_path):
    key = tmp_path / "sa.json"
    key.write_text("{}")
    assert parse_args(["--date", DATE, "--service-account", str(key)]).service_account == str(key)


def test_missing_service_account_is_usage_error(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(UsageError) as info:
        parse_args(["--date", DATE, "--service-account", str(missing)])
    assert str(missing) in str(info.value)
    assert "service account" in str(info.value)


def test_service_account_directory_is_usage_error(tmp_path):
    with pytest.raises(UsageError):
        parse_args(["--date", DATE, "--service-account", str(tmp_path)])


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--date", "2025-11-27"], "2025-11-27"),
        (["--date", "20251327_0000"], "20251327_0000"),
        (["--date", DATE, "--members", "51"], "51"),
        (["--date", DATE, "--members", "1-"], "1-"),
        (["--date", DATE, "--members", "0"], "0"),
        (["--date", DATE, "--members", ""], "empty"),
        (["--date", DATE, "--lead-time", "0"], "lead-time"),
        (["--date", DATE, "--lead-time", "-6"], "lead-time"),
        (["--date", DATE, "--upload-threads", "0"], "upload-threads"),
        (["--date", DATE, "--num-chunks", "0"], "num-chunks"),
    ],
)
def test_usage_errors(argv, fragment):
    with pytest.raises(UsageError) as info:
        parse_args(argv)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "argv",
    [
        [],  # --date is required
        ["--date", DATE, "--lead-time", "abc"],
        ["--date", DATE, "--precision", "8"],
        ["--date", DATE, "--unknown-flag"],
    ],
)
def test_argparse_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2


def test_help_lists_exit_codes():
    text = build_parser().format_help()
    for name in ("INPUT_MISSING", "INPUT_INVALID", "UPLOAD_FAILED", "OUT_OF_DISK"):
        assert name in text


def test_all_flags_parse(tmp_path):
    key = tmp_path / "sa.json"
    key.write_text("{}")
    o = parse_args(
        [
            "--date", DATE, "--members", "1-3,7", "--bucket", "b", "--service-account", str(key),
            "--input-dir", str(tmp_path / "in"), "--output-dir", str(tmp_path / "out"),
            "--upload-threads", "2", "--checkpoint", str(tmp_path / "c.ckpt"), "--lead-time", "150",
            "--precision", "16", "--num-chunks", "4", "--device", "cpu", "--force", "--upload-timeout", "10",
        ]
    )
    assert o.members == [1, 2, 3, 7]
    assert (o.bucket, o.upload_threads, o.lead_time, o.precision, o.num_chunks, o.device) == ("b", 2, 150, "16", 4, "cpu")
    assert o.force and o.upload_timeout == 10.0


def _rerun_argv(options: WorkerOptions, members: list[int]) -> list[str]:
    words = shlex.split(options.rerun_command(members))
    assert words[:3] == ["python", "-m", "aifs.worker"]
    return words[3:]


def test_rerun_command_round_trips(tmp_path):
    key = tmp_path / "sa.json"
    key.write_text("{}")
    argv = [
        "--date", DATE, "--members", "1-10", "--bucket", "bkt", "--service-account", str(key),
        "--input-dir", str(tmp_path / "in"), "--output-dir", str(tmp_path / "out"),
        "--checkpoint", str(tmp_path / "c.ckpt"), "--lead-time", "150", "--precision", "16", "--num-chunks", "4",
    ]
    original = parse_args(argv)
    again = parse_args(_rerun_argv(original, [3, 4, 5, 9]))
    assert again.members == [3, 4, 5, 9]
    for field in ("date", "bucket", "service_account", "input_dir", "output_dir", "checkpoint", "lead_time",
                  "precision", "num_chunks"):
        assert getattr(again, field) == getattr(original, field), field
    assert "--members 3-5,9" in original.rerun_command([3, 4, 5, 9])


def test_rerun_command_keeps_device(tmp_path):
    """A run pinned to --device cpu must rerun on cpu too (else it picks cuda on a GPU host)."""
    original = parse_args(["--date", DATE, "--members", "1-3", "--device", "cpu", "--checkpoint", "c.ckpt"])
    assert parse_args(_rerun_argv(original, [2])).device == "cpu"


def test_rerun_command_is_shell_safe(tmp_path):
    """Paths with spaces (or shell metacharacters) must survive copy-paste into a shell."""
    odd = tmp_path / "my dir; x"
    argv = ["--date", DATE, "--members", "1-3", "--input-dir", str(odd / "in"), "--output-dir", str(odd / "out"),
            "--checkpoint", str(odd / "c.ckpt")]
    original = parse_args(argv)
    again = parse_args(_rerun_argv(original, [2]))
    assert (again.input_dir, again.output_dir, again.checkpoint) == (original.input_dir, original.output_dir, original.checkpoint)
