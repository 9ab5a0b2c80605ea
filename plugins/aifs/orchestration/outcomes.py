"""What a worker exit code means for the ``run_member`` task, and how to rerun what failed.

The worker (``python -m aifs.worker``) reports each kind of failure with its own exit code
(aifs.exitcodes). Some cannot get better by retrying the same member unchanged (a missing or
invalid input, a full disk, a checkpoint that will not load, bad flags): those fail the task at
once, without burning retries and hours of GPU. The others (inference, upload, a crash or a
signal) are worth retrying with backoff.
"""

from __future__ import annotations

import dataclasses
import json
import shlex

from aifs.exitcodes import ExitCode, describe
from aifs.members import format_members, member_label


@dataclasses.dataclass(frozen=True)
class MemberOutcome:
    member: int
    exit_code: int
    retryable: bool
    message: str

    @property
    def ok(self) -> bool:
        return self.exit_code == ExitCode.OK

    @property
    def name(self) -> str:
        try:
            return ExitCode(self.exit_code).name
        except ValueError:
            return "CRASHED"


#: Exit codes that retrying unchanged cannot fix, and what a person should do instead.
_FIX = {
    ExitCode.USAGE: "check the run's params (the worker refused its flags)",
    ExitCode.INPUT_MISSING: "make sure the input pickle is in the bucket",
    ExitCode.INPUT_INVALID: "replace the input pickle with a valid one",
    ExitCode.OUT_OF_DISK: "free or enlarge the GPU host's scratch disk",
    ExitCode.CHECKPOINT_FAILED: ("check the 'checkpoint' param, that the host can read it and that it is the checkpoint "
                                 "AIFS_ENS_CHECKPOINTS declares (the worker refuses another identity)"),
    # python -m aifs.inputs (the aifs_ens_inputs DAG's build_inputs step)
    ExitCode.SOURCE_INCOMPLETE: ("the step's log names the variable: if the source lists it under another name or not at "
                                 "all, the checkpoint needs a rule in aifs.inputs.rules, or its inputs made elsewhere "
                                 "(aifs_ens_forecast's input sensor waits for them)"),
    ExitCode.INTERPOLATION_FAILED: ("check the checkpoint's grid (its metadata) and the worker image's mir-python: "
                                    "MIR could not produce that grid from open data's 0.25 degree grid"),
    # python -m aifs.products (the aifs_ens_products DAG's make_products step)
    ExitCode.FORECASTS_MISSING: ("run (or clear the failed run_member of) aifs_ens_forecast for the date until its "
                                 "verify passes; the step's log names the member and window that is missing"),
    ExitCode.TOO_FEW_MEMBERS: ("rerun the date's failed forecast members (aifs_ens_forecast), or an admin lowers "
                               "AIFS_ENS_PRODUCTS_MIN_MEMBERS; nothing was submitted"),
    ExitCode.CHECK_FAILED: ("the step's log names the file and what the AI Weather Quest package refused: a products "
                            "bug or a changed competition format; nothing was submitted"),
    ExitCode.FORECAST_INVALID: ("the step's log names the member and message: redo that member (clear its run_member in "
                                "aifs_ens_forecast, or trigger the date with that member and force)"),
}

#: What to check when a retryable failure keeps coming back until the retries run out.
_IF_RETRIES_RUN_OUT = {
    ExitCode.SOURCE_NOT_PUBLISHED: ("the date's open data is not at AIFS_ENS_OPENDATA_SOURCE: check the date (open data "
                                    "keeps recent dates only) and the source; or wait and clear the task"),
    ExitCode.SOURCE_FAILED: ("check the network from the step's host to AIFS_ENS_OPENDATA_SOURCE (on GCP the 'google' "
                             "mirror is closest), then clear the task"),
    ExitCode.INPUT_WRITE_FAILED: "check that the bucket exists and that the step's service account may write to it",
    ExitCode.CLIMATOLOGY_FAILED: "check AIFS_ENS_CLIMATOLOGY and the competition's credentials (the aifs_aiwq connection)",
    ExitCode.SUBMISSION_FAILED: ("check the aifs_aiwq connection's credentials and the competition's deadline; the date "
                                 "is not marked submitted, so clearing make_products submits it once"),
    ExitCode.PRODUCTS_UPLOAD_FAILED: "check that the bucket exists and that the step's service account may write to it",
    ExitCode.UPLOAD_FAILED: "check that the bucket exists and that the host's service account may write to it",
    ExitCode.DOWNLOAD_FAILED: "check that the host's service account may read the bucket, and the network to it",
}


def what_to_do(exit_code: int) -> str | None:
    """What a person should do about a failure with this exit code (a retryable one: once retries run out); None if
    the code has no advice beyond its description (success, a crash, a signal)."""
    try:
        code = ExitCode(exit_code)
    except ValueError:
        return None
    return _FIX.get(code) or _IF_RETRIES_RUN_OUT.get(code)


def classify(member: int, exit_code: int) -> MemberOutcome:
    label = member_label(member)
    if exit_code == ExitCode.OK:
        return MemberOutcome(member, exit_code, False, f"{label}: {describe(exit_code)}")
    try:
        code = ExitCode(exit_code)
    except ValueError:
        return MemberOutcome(member, exit_code, True, f"{label} failed: {describe(exit_code)}; will retry")
    if code.retryable:
        return MemberOutcome(member, exit_code, True, f"{label} failed: {code.describe} (exit {exit_code}, {code.name}); will retry")
    fix = _FIX.get(code, "see the log above")
    return MemberOutcome(
        member,
        exit_code,
        False,
        f"{label} failed: {code.describe} (exit {exit_code}, {code.name}); not retried: {fix}, then clear this task",
    )


def rerun_instructions(dag_id: str, run_id: str, date: str, failed: list[tuple[int, int | None]]) -> str:
    """How to rerun failed members: ``failed`` is ``[(member, map index of run_member or None)]``."""
    if not failed:
        return ""
    members = [m for m, _ in failed]
    indexed = [(m, i) for m, i in failed if i is not None]
    lines = ["How to rerun:"]
    if indexed:
        labels = ", ".join(f"run_member [{i}] ({member_label(m)})" for m, i in indexed)
        task_ids = [["run_member", i] for _, i in indexed]
        body = {"dag_run_id": run_id, "task_ids": task_ids, "dry_run": False, "only_failed": False}
        lines += [
            f"  - Airflow UI: run {run_id}, clear {labels}; the host is created again for it and deleted after, and "
            "the worker redoes the member (withdrawing first any manifest of it that does not verify).",
            f"  - REST API: POST /api/v2/dags/{dag_id}/clearTaskInstances {json.dumps(body)}",
        ]
    conf = json.dumps({"date": date, "members": format_members(members)})
    lines.append(
        f"  - or a new run for the date (members complete for its settings are skipped; incomplete ones are redone): "
        f"airflow dags trigger {dag_id} --conf {shlex.quote(conf)}"
    )
    return "\n".join(lines)
