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
    # python -m aifs.inputs (20-29): building input states from ECMWF open data
    SOURCE_NOT_PUBLISHED = 20  # an open-data file the date needs is not there (yet): its index is missing
    SOURCE_INCOMPLETE = 21  # a variable no rule covers, or one the source does not list for that date
    SOURCE_FAILED = 22  # open data did not deliver (HTTP errors or broken transfers after retries)
    INPUT_WRITE_FAILED = 23  # the input pickle or its manifest could not be written to the bucket
    INTERPOLATION_FAILED = 24  # MIR cannot produce the checkpoint's grid, or its output does not fit it
    # python -m aifs.products (30-39): AI Weather Quest probabilities, files, pictures, submission
    FORECASTS_MISSING = 30  # no verified member, or a verified member's window/message cannot be read (named)
    TOO_FEW_MEMBERS = 31  # fewer verified members than --min-members: nothing is submitted
    CLIMATOLOGY_FAILED = 32  # the 20-year quintile climatology could not be retrieved or does not fit the grid
    SUBMISSION_FAILED = 33  # the competition refused or lost a submission (nothing marked as submitted)
    CHECK_FAILED = 34  # a products file fails the competition package's checks
    PRODUCTS_UPLOAD_FAILED = 35  # products could not be written to the bucket
    FORECAST_INVALID = 36  # a forecast GRIB message is unreadable or its grid/fields do not fit the ensemble

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
            ExitCode.SOURCE_NOT_PUBLISHED,  # published later: the DAG waits for the index files first
            ExitCode.SOURCE_FAILED,
            ExitCode.INPUT_WRITE_FAILED,
            ExitCode.CLIMATOLOGY_FAILED,  # the competition's service may answer later
            ExitCode.SUBMISSION_FAILED,  # never marked as submitted, so a retry submits once
            ExitCode.PRODUCTS_UPLOAD_FAILED,
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
    ExitCode.SOURCE_NOT_PUBLISHED: "open data for the date is not published (an index file is missing)",
    ExitCode.SOURCE_INCOMPLETE: "a variable the checkpoint needs has no open-data rule or is not in the source",
    ExitCode.SOURCE_FAILED: "open data could not be fetched (HTTP errors or broken transfers after retries)",
    ExitCode.INPUT_WRITE_FAILED: "the input state or its manifest could not be written to the bucket",
    ExitCode.INTERPOLATION_FAILED: "interpolation to the checkpoint's grid is impossible or failed",
    ExitCode.FORECASTS_MISSING: "a forecast window or message the products need is missing (no verified member, or one named)",
    ExitCode.TOO_FEW_MEMBERS: "fewer verified members than the products' minimum: nothing submitted",
    ExitCode.CLIMATOLOGY_FAILED: "the 20-year quintile climatology could not be retrieved or does not fit",
    ExitCode.SUBMISSION_FAILED: "submission to the AI Weather Quest failed (the date is not marked submitted)",
    ExitCode.CHECK_FAILED: "a products file fails the AI Weather Quest package's checks",
    ExitCode.PRODUCTS_UPLOAD_FAILED: "products could not be written to the bucket",
    ExitCode.FORECAST_INVALID: "a forecast GRIB message is unreadable or does not fit the ensemble",
}


def describe(code: int) -> str:
    try:
        return ExitCode(code).describe
    except ValueError:
        return f"unexpected exit status {code} (crash or signal)"
