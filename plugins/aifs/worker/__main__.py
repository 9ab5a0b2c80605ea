"""``python -m aifs.worker``: run members one after another with the model loaded once.

A failed member does not stop the others. At the end: a summary table and, when members
failed, the exact command that reruns only those; the exit code says what went wrong
(aifs.exitcodes).
"""

from __future__ import annotations

# pyproj before eccodes: both bundle libproj, and the other order crashes the interpreter at
# exit (design.md), turning a successful run into exit status 134.
import pyproj  # noqa: F401  isort: skip

import logging
import sys
import time

from aifs.commandline import configure_logging, parse_or_exit_code, unwind_on_sigterm
from aifs.exitcodes import ExitCode
from aifs.members import format_members
from aifs.worker.cli import WorkerOptions, parse_args
from aifs.worker.cycle import MemberResult, run_member
from aifs.worker.errors import CheckpointFailed

LOG = logging.getLogger("aifs.worker")


#: libraries whose INFO lines would bury the member logs
QUIET_LOGGERS = ("anemoi", "earthkit", "urllib3", "google", "matplotlib")


def run(opts: WorkerOptions) -> list[MemberResult]:
    from aifs.worker.model import Model
    from aifs.worker.storage import make_client

    client = make_client(opts.service_account)  # one identity for inputs, outputs and a gs:// checkpoint
    bucket = client.bucket(opts.bucket)
    loaded: list[Model] = []

    def get_model() -> Model:
        if not loaded:
            t = time.perf_counter()
            loaded.append(Model(opts.checkpoint, opts.device, opts.precision, opts.num_chunks, client=client))
            LOG.info("[MODEL] metadata read in %.1f s", time.perf_counter() - t)  # weights: Model.load_weights
        return loaded[0]

    results: list[MemberResult] = []
    try:
        # the checkpoint's metadata before any member: a checkpoint this environment cannot load
        # (another generation's, aifs.generations) or cannot read fails every member with exit 15
        # before a download, not after the first member's input was fetched (or found missing)
        get_model()
    except CheckpointFailed as exc:
        LOG.error("[FAILED] %s", exc)
        return [MemberResult(m, "failed", ExitCode.CHECKPOINT_FAILED, error=str(exc)) for m in opts.members]
    started = time.perf_counter()
    for position, member in enumerate(opts.members, start=1):
        LOG.info("[MEMBER] %03d (%d of %d) for %s", member, position, len(opts.members), opts.date)
        try:
            result = run_member(member, opts=opts, bucket=bucket, get_model=get_model)
        except CheckpointFailed as exc:
            LOG.error("[FAILED] %s", exc)
            results += [MemberResult(m, "failed", ExitCode.CHECKPOINT_FAILED, error=str(exc)) for m in opts.members[position - 1:]]
            break
        results.append(result)
        done = [r for r in results if r.status == "done"]
        if done and position < len(opts.members):
            per_member = sum(r.seconds for r in done) / len(done)
            remaining = len(opts.members) - position
            LOG.info("[PROGRESS] %d/%d members, %.1f min elapsed, ETA %.1f min", position, len(opts.members),
                     (time.perf_counter() - started) / 60, per_member * remaining / 60)
    return results


def summarize(opts: WorkerOptions, results: list[MemberResult]) -> int:
    LOG.info("[SUMMARY] %-8s %-8s %8s %12s  %s", "member", "status", "minutes", "GB uploaded", "problem")
    for r in results:
        LOG.info("[SUMMARY] %-8s %-8s %8.1f %12.2f  %s", f"{r.member:03d}", r.status, r.seconds / 60,
                 r.bytes_uploaded / 1e9, r.error)
    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
    LOG.info("[SUMMARY] %d done, %d skipped, %d failed", counts["done"], counts["skipped"], counts["failed"])
    failed = [r for r in results if r.status == "failed"]
    if not failed:
        return ExitCode.OK
    LOG.error("[RERUN] %s", opts.rerun_command([r.member for r in failed]))
    codes = {r.exit_code for r in failed}
    return codes.pop() if len(codes) == 1 else ExitCode.MEMBERS_FAILED


def main(argv: list[str] | None = None) -> int:
    configure_logging(QUIET_LOGGERS)
    unwind_on_sigterm(LOG, "stopping, cleaning up the member in flight")
    opts, code = parse_or_exit_code(parse_args, argv, LOG)
    if opts is None:
        return code
    LOG.info("[START] %s members %s bucket %s checkpoint %s lead time %dh", opts.date, format_members(opts.members),
             opts.bucket, opts.checkpoint, opts.lead_time)
    return int(summarize(opts, run(opts)))


# Only `python -m aifs.worker` runs it. Airflow's plugin loader, should it ever see this file, imports it
# under the name "__main__" too (the module name is the file's stem), but with a __spec__ named
# "__main__": nothing here may run inside an Airflow process (argparse would read Airflow's argv).
if __name__ == "__main__" and getattr(__spec__, "name", None) == "aifs.worker.__main__":
    sys.exit(main())
