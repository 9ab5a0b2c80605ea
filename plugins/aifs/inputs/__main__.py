"""``python -m aifs.inputs``: every selected member's input state from ECMWF open data, into the bucket.

At the end: a summary table, the rerun command for failed members, and one JSON line (the last
line of stdout) that a caller can parse; the exit code says what went wrong (aifs.exitcodes, 20-29).
"""

from __future__ import annotations

# pyproj before eccodes: both bundle libproj, and the other order crashes the interpreter at exit (design.md)
import pyproj  # noqa: F401  isort: skip

import json
import logging
import os
import sys
import time

from aifs.commandline import configure_logging, parse_or_exit_code, unwind_on_sigterm
from aifs.exitcodes import ExitCode
from aifs.inputs.cli import InputsOptions, parse_args
from aifs.members import format_members

LOG = logging.getLogger("aifs.inputs")


def _configure_logging() -> None:
    configure_logging(("anemoi", "earthkit", "urllib3", "google", "multiurl"))
    logging.getLogger("ecmwf.opendata").setLevel(logging.ERROR)  # its scda/oper notice, once per thread: the layout handles it
    os.environ.setdefault("TQDM_DISABLE", "1")  # multiurl's per-file progress bars: the member logs say more


def summarize(opts: InputsOptions, results, seconds: float) -> int:
    LOG.info("[SUMMARY] %-8s %-8s %8s %12s %12s  %s", "member", "status", "seconds", "MB fetched", "MB written", "problem")
    for r in results:
        LOG.info("[SUMMARY] %-8s %-8s %8.1f %12.1f %12.1f  %s", f"{r.member:03d}", r.status, r.seconds,
                 r.bytes_fetched / 1e6, r.size / 1e6, r.error)
    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
    LOG.info("[SUMMARY] %d done, %d skipped, %d failed in %.1f s", counts["done"], counts["skipped"], counts["failed"], seconds)
    failed = [r for r in results if r.status == "failed"]
    codes = {r.exit_code for r in failed}
    code = ExitCode.OK if not failed else (codes.pop() if len(codes) == 1 else ExitCode.MEMBERS_FAILED)
    if failed:
        LOG.error("[RERUN] %s", opts.rerun_command([r.member for r in failed]))
    print(json.dumps({"date": opts.date, "exit_code": int(code), **counts, "seconds": round(seconds, 1),
                      "members": {f"{r.member:03d}": {"status": r.status, "bytes_fetched": r.bytes_fetched,
                                                      **({"error": r.error} if r.error else {})} for r in results}}),
          flush=True)
    return int(code)


def main(argv: list[str] | None = None) -> int:
    _configure_logging()
    unwind_on_sigterm(LOG, "stopping; members not uploaded are not written")
    opts, code = parse_or_exit_code(parse_args, argv, LOG)
    if opts is None:
        return code
    from aifs.inputs.run import DateFailed, MemberResult, run

    LOG.info("[START] inputs for %s members %s from %s into gs://%s (checkpoint %s, %d workers)", opts.date,
             format_members(opts.members), opts.source, opts.bucket, opts.checkpoint, opts.workers)
    started = time.perf_counter()
    try:
        results = run(opts)
    except DateFailed as exc:
        LOG.error("[FAILED] %s: nothing was written", exc)
        results = [MemberResult(m, "failed", exc.exit_code, error=str(exc)) for m in opts.members]
    return summarize(opts, results, time.perf_counter() - started)


if __name__ == "__main__" and getattr(__spec__, "name", None) == "aifs.inputs.__main__":
    sys.exit(main())
