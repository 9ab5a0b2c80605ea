"""What every ``python -m aifs.<step>`` command (aifs.worker, aifs.inputs) does alike around its own work.

The flags naming what a run is for (date, members, bucket, credentials) and their checks are the
same in every command, so a member selection or key file that one accepts the others accept too.
Logs to stdout (what a backend streams into the Airflow task log), a SIGTERM that unwinds through
``finally`` blocks instead of killing the process mid-write, bad flags as ExitCode.USAGE, and the
exit codes listed under ``--help``. Light: argparse, logging, signal and aifs' contract modules only.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any, Callable, Iterable

from aifs import layout
from aifs.exitcodes import ExitCode
from aifs.members import DEFAULT_MEMBERS, BadMembers, member_label, parse_members


class UsageError(Exception):
    """Bad flags: the command exits with ExitCode.USAGE."""


class CodedFailure(Exception):
    """A failure whose class says the command's exit code; its message names the member (when it is
    one member's), the file or object (when one is at fault) and the problem: ``member 007: path: problem``."""

    exit_code: ExitCode

    def __init__(self, problem: str, member: int | None = None, where: str | None = None):
        self.problem, self.member, self.where = problem, member, where
        who = f"{member_label(member)}: " if member is not None else ""
        at = f"{where}: " if where else ""
        super().__init__(f"{who}{at}{problem}")


def exit_code_help(codes: Iterable[ExitCode] = ExitCode) -> str:
    """The ``exit codes:`` block of a command's ``--help``: one line per code."""
    return "\n".join(f"  {c.value:3d}  {c.name}: {c.describe}" for c in codes)


def configure_logging(quiet: Iterable[str]) -> None:
    """INFO lines with a timestamp on stdout; the libraries named in ``quiet`` only from WARNING up."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )
    for noisy in quiet:
        logging.getLogger(noisy).setLevel(logging.WARNING)


class Terminated(SystemExit):
    """SIGTERM (docker stop, a killed Airflow task, a spot VM going away): unwind so cleanup runs.

    A BaseException, so no member code mistakes it for a member failure; ``finally`` blocks
    still delete local files and no manifest is written.
    """


def unwind_on_sigterm(log: logging.Logger, stopping: str) -> None:
    """From now on SIGTERM logs ``[TERMINATED] signal N: <stopping>`` and raises Terminated(128 + N)."""

    def _terminate(signum, frame) -> None:
        log.error("[TERMINATED] signal %d: %s", signum, stopping)
        raise Terminated(128 + signum)

    signal.signal(signal.SIGTERM, _terminate)


def parse_or_exit_code(parse_args: Callable[[list[str] | None], Any], argv: list[str] | None,
                       log: logging.Logger) -> tuple[Any, int | None]:
    """(the options, None); or (None, the exit code) for bad flags (logged as a usage error), ``--help`` or argparse's own refusal."""
    try:
        return parse_args(argv), None
    except UsageError as exc:
        log.error("usage error: %s", exc)
        return None, ExitCode.USAGE
    except SystemExit as exc:  # argparse: --help (0) or bad flags (2)
        return None, int(exc.code or 0)


def add_date_members_bucket(p: argparse.ArgumentParser, date_help: str) -> None:
    """``--date`` (required), ``--members`` and ``--bucket``."""
    p.add_argument("--date", required=True, help=date_help)
    p.add_argument("--members", default=DEFAULT_MEMBERS, help="e.g. 1-50, 1,5,10 or 1-3,7 (default %(default)s)")
    p.add_argument("--bucket", default=layout.DEFAULT_BUCKET, help="GCS bucket (default %(default)s)")


def add_service_account(p: argparse.ArgumentParser) -> None:
    """``--service-account``: a key file; see service_account_file for the default."""
    p.add_argument(
        "--service-account",
        default=None,
        help=f"service-account JSON key (default {layout.DEFAULT_SERVICE_ACCOUNT} when it exists, "
        "else the machine's default credentials)",
    )


def checked_members(date: str, members: str) -> list[int]:
    """The member numbers of ``--members``, once ``--date`` is a date that exists; else UsageError."""
    try:
        layout.parse_date(date)
        return parse_members(members)
    except (layout.BadDate, BadMembers) as exc:
        raise UsageError(str(exc)) from None


def service_account_file(given: str | None) -> str | None:
    """``--service-account`` checked: the file given, else the default key file when present, else None
    (the machine's default credentials)."""
    if given is not None and not os.path.isfile(given):
        raise UsageError(f"service account file not found: {given}")
    if given is None and os.path.isfile(layout.DEFAULT_SERVICE_ACCOUNT):
        return layout.DEFAULT_SERVICE_ACCOUNT
    return given
