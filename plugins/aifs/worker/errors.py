"""Member failures, one class per exit code: each message names the member, the file and the problem."""

from __future__ import annotations

from aifs.commandline import CodedFailure
from aifs.exitcodes import ExitCode


class MemberError(CodedFailure):
    """A member could not be completed. ``exit_code`` tells the DAG what kind of failure it was."""

    exit_code: ExitCode = ExitCode.INFERENCE_FAILED

    def __init__(self, member: int, problem: str, path: str | None = None):
        super().__init__(problem, member, path)
        self.path = path


class InputMissing(MemberError):
    exit_code = ExitCode.INPUT_MISSING


class InputInvalid(MemberError):
    exit_code = ExitCode.INPUT_INVALID


class InferenceFailed(MemberError):
    exit_code = ExitCode.INFERENCE_FAILED


class UploadFailed(MemberError):
    exit_code = ExitCode.UPLOAD_FAILED


class OutOfDisk(MemberError):
    exit_code = ExitCode.OUT_OF_DISK


class CheckpointFailed(Exception):
    """The checkpoint could not be loaded: every member would fail the same way."""

    exit_code = ExitCode.CHECKPOINT_FAILED


class DownloadFailed(MemberError):
    exit_code = ExitCode.DOWNLOAD_FAILED
