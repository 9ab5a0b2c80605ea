"""Failures of ``python -m aifs.inputs``, one class per exit code; each names the member, file and problem."""

from __future__ import annotations

from aifs.exitcodes import ExitCode
from aifs.members import member_label


class InputsError(Exception):
    """Something that stops a member's input state (or every member's, when ``member`` is None)."""

    exit_code: ExitCode = ExitCode.SOURCE_FAILED

    def __init__(self, problem: str, member: int | None = None, where: str | None = None):
        self.problem, self.member, self.where = problem, member, where
        who = f"{member_label(member)}: " if member is not None else ""
        at = f"{where}: " if where else ""
        super().__init__(f"{who}{at}{problem}")


class SourceNotPublished(InputsError):
    exit_code = ExitCode.SOURCE_NOT_PUBLISHED


class SourceIncomplete(InputsError):
    exit_code = ExitCode.SOURCE_INCOMPLETE


class SourceFailed(InputsError):
    exit_code = ExitCode.SOURCE_FAILED


class InputWriteFailed(InputsError):
    exit_code = ExitCode.INPUT_WRITE_FAILED


class InterpolationFailed(InputsError):
    exit_code = ExitCode.INTERPOLATION_FAILED
