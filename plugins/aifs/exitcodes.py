"""Worker exit codes: the contract between ``python -m aifs.worker`` and the DAG's tasks.

Each code names one way a member can fail; the DAG maps them to task outcomes (retry or not)
and to the message a person reads. When several members fail with different codes the worker
exits with MEMBERS_FAILED.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    MEMBERS_FAILED = 1  # several members failed for different reasons
    USAGE = 2  # bad flags: date, member range, missing service-account file (argparse uses 2 too)
    INPUT_MISSING = 10  # the member's input pickle is not in the bucket
    INPUT_INVALID = 11  # corrupt, hostile or inconsistent input state
    INFERENCE_FAILED = 12  # the model or the GRIB writer failed
    UPLOAD_FAILED = 13  # the bucket refused or lost an upload, or a checksum did not match
    OUT_OF_DISK = 14  # not enough local disk for one input plus two windows
    CHECKPOINT_FAILED = 15  # the checkpoint could not be loaded or is not the one the run expects (affects every member)
    DOWNLOAD_FAILED = 16  # the bucket did not deliver the input (connection, checksum)

    @property
    def describe(self) -> str:
        return _DESCRIPTIONS[self]

    @property
    def retryable(self) -> bool:
        """Whether retrying the same member unchanged can succeed (transient failures)."""
        return self in (
            ExitCode.UPLOAD_FAILED,
            ExitCode.DOWNLOAD_FAILED,
            ExitCode.INFERENCE_FAILED,
            ExitCode.MEMBERS_FAILED,
        )


_DESCRIPTIONS = {
    ExitCode.OK: "member(s) completed",
    ExitCode.MEMBERS_FAILED: "several members failed for different reasons",
    ExitCode.USAGE: "bad command-line arguments",
    ExitCode.INPUT_MISSING: "input pickle missing from the bucket",
    ExitCode.INPUT_INVALID: "input state invalid (corrupt, hostile or inconsistent with the checkpoint)",
    ExitCode.INFERENCE_FAILED: "inference or GRIB writing failed",
    ExitCode.UPLOAD_FAILED: "upload to the bucket failed or did not verify",
    ExitCode.OUT_OF_DISK: "not enough local disk",
    ExitCode.CHECKPOINT_FAILED: "checkpoint could not be loaded, or its identity is not the expected one",
    ExitCode.DOWNLOAD_FAILED: "download of the input from the bucket failed or did not verify",
}


def describe(code: int) -> str:
    try:
        return ExitCode(code).describe
    except ValueError:
        return f"unexpected exit status {code} (crash or signal)"
