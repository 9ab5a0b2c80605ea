"""Command line of ``python -m aifs.inputs``: member syntax, credentials and exit codes as the worker's."""

from __future__ import annotations

import argparse
import dataclasses
import os

from aifs import layout
from aifs.commandline import (
    UsageError, add_date_members_bucket, add_service_account, checked_members, exit_code_help, service_account_file,
)
from aifs.exitcodes import ExitCode

__all__ = ["InputsOptions", "UsageError", "build_parser", "parse_args"]

INPUT_CODES = [c for c in ExitCode if c.value in (0, 1, 2, 15) or 20 <= c.value <= 29]
EXIT_CODE_HELP = exit_code_help(INPUT_CODES)


@dataclasses.dataclass
class InputsOptions:
    date: str
    members: list[int]
    bucket: str
    checkpoint: str
    source: str
    service_account: str | None
    workers: int
    cache_dir: str | None
    force: bool
    retries: int = 5
    retry_wait: float = 2.0

    def rerun_command(self, members: list[int]) -> str:
        import shlex

        from aifs.members import format_members

        parts = ["python", "-m", "aifs.inputs", "--date", self.date, "--members", format_members(members),
                 "--bucket", self.bucket, "--checkpoint", self.checkpoint, "--source", self.source]
        if self.service_account:
            parts += ["--service-account", self.service_account]
        return shlex.join(parts)


def default_workers() -> int:
    """Members built at once: the cores this process may use (fetching overlaps interpolation), at most 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m aifs.inputs",
        description="Build each member's input state from ECMWF open data (fields the checkpoint needs, "
        "interpolated with MIR to its grid) and write it to the bucket with a manifest.",
        epilog="exit codes:\n" + EXIT_CODE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_date_members_bucket(p, "analysis date YYYYMMDD_HHMM, e.g. 20251127_0000")
    p.add_argument("--checkpoint", default=os.environ.get("AIFS_CHECKPOINT", layout.DEFAULT_CHECKPOINT),
                   help="checkpoint file, gs://bucket/object or Hugging Face id (default: $AIFS_CHECKPOINT, else "
                   f"{layout.DEFAULT_CHECKPOINT}); only its metadata is read")
    p.add_argument("--source", default="ecmwf",
                   help="open-data source: ecmwf, aws, azure, google (close to a GCS bucket) or an http(s) URL "
                   "(default %(default)s)")
    add_service_account(p)
    p.add_argument("--workers", type=int, default=None,
                   help="members built at once (default: the usable cores, at most 4); each holds one state in "
                   "memory (variables x 2 x grid points x 4 bytes: ~0.4 GB on N320)")
    p.add_argument("--cache-dir", default=None,
                   help="MIR's interpolation-weight cache (default: $MIR_CACHE_PATH, else ~/.cache/aifs-ens/mir)")
    p.add_argument("--force", action="store_true", help="rebuild members whose input and manifest already match")
    p.add_argument("--retries", type=int, default=5, help="tries of one open-data request (default %(default)s)")
    p.add_argument("--retry-wait", type=float, default=2.0,
                   help="seconds before the first retry, doubling after each (default %(default)s)")
    return p


def parse_args(argv: list[str] | None = None) -> InputsOptions:
    args = build_parser().parse_args(argv)
    members = checked_members(args.date, args.members)
    from aifs.inputs.opendata_layout import UnknownSource, source_url

    try:
        source_url(args.source)
    except UnknownSource as exc:
        raise UsageError(str(exc)) from None
    workers = args.workers if args.workers is not None else default_workers()
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    if args.retries < 1 or args.retry_wait < 0:
        raise UsageError("--retries must be at least 1 and --retry-wait not negative")
    service_account = service_account_file(args.service_account)  # the worker's rule
    return InputsOptions(date=args.date, members=members, bucket=args.bucket, checkpoint=args.checkpoint,
                         source=args.source, service_account=service_account, workers=workers,
                         cache_dir=args.cache_dir, force=args.force, retries=args.retries, retry_wait=args.retry_wait)
