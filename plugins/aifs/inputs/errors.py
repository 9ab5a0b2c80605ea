"""Failures of ``python -m aifs.inputs``, one class per exit code; each names the member, file and problem."""

from __future__ import annotations

from aifs.commandline import CodedFailure
from aifs.exitcodes import ExitCode


class InputsError(CodedFailure):
    """Something that stops a member's input state (or every member's, when ``member`` is None)."""

    exit_code: ExitCode = ExitCode.SOURCE_FAILED


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
