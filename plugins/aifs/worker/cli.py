"""Command line of ``python -m aifs.worker`` (also the ``aifs-worker`` console script).

Flags and defaults are those of the original ``automate_aifs_gpu_pipeline.py`` plus the model
options; exit codes are in aifs.exitcodes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from aifs import layout
from aifs.completeness import is_checkpoint_identity
from aifs.commandline import (
    UsageError, add_date_members_bucket, add_service_account, checked_members, exit_code_help, service_account_file,
)

__all__ = ["UsageError", "WorkerOptions", "build_parser", "parse_args"]

EXIT_CODE_HELP = exit_code_help()


@dataclasses.dataclass
class WorkerOptions:
    date: str
    members: list[int]
    bucket: str
    service_account: str | None  # None: the machine's default credentials
    input_dir: str
    output_dir: str
    upload_threads: int
    checkpoint: str
    lead_time: int
    precision: str | None
    num_chunks: int | None
    device: str | None
    force: bool
    upload_timeout: float
    checkpoint_identity: str | None = None  # what the checkpoint must be (aifs.completeness); None: not checked
    grib_writers: int | None = None  # GRIB writer processes; None: $AIFS_GRIB_WRITERS, else cores - 1 (grib_writers)

    def rerun_command(self, members: list[int]) -> str:
        """The exact command that reruns ``members`` with this run's settings (shell-quoted)."""
        import shlex

        from aifs.members import format_members

        flags = {
            "--date": self.date,
            "--members": format_members(members),
            "--bucket": self.bucket,
            "--checkpoint": self.checkpoint,
            "--checkpoint-identity": self.checkpoint_identity,
            "--lead-time": self.lead_time,
            "--service-account": self.service_account,
            "--input-dir": self.input_dir if self.input_dir != layout.DEFAULT_INPUT_DIR else None,
            "--output-dir": self.output_dir if self.output_dir != layout.DEFAULT_OUTPUT_DIR else None,
            "--upload-threads": self.upload_threads if self.upload_threads != layout.DEFAULT_UPLOAD_THREADS else None,
            "--precision": self.precision,
            "--num-chunks": self.num_chunks,
            "--device": self.device,
            "--grib-writers": self.grib_writers,
        }
        parts = ["python", "-m", "aifs.worker"]
        for flag, value in flags.items():
            if value is not None:
                parts += [flag, str(value)]
        return shlex.join(parts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m aifs.worker",
        description="Run AIFS-ENS members one after another: download input, infer, write GRIB "
        "windows, upload each window as it closes, clean up.",
        epilog="exit codes:\n" + EXIT_CODE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_date_members_bucket(p, "forecast date YYYYMMDD_HHMM, e.g. 20251127_0000")
    add_service_account(p)
    p.add_argument("--input-dir", default=layout.DEFAULT_INPUT_DIR, help="local input dir (default %(default)s)")
    p.add_argument("--output-dir", default=layout.DEFAULT_OUTPUT_DIR, help="local GRIB dir (default %(default)s)")
    p.add_argument(
        "--upload-threads", type=int, default=layout.DEFAULT_UPLOAD_THREADS,
        help="windows uploading at once (default %(default)s; each window streams to the bucket while it is written "
        "and at most two are on disk at a time, so more than 2 adds nothing)",
    )
    p.add_argument(
        "--checkpoint",
        default=os.environ.get("AIFS_CHECKPOINT", layout.DEFAULT_CHECKPOINT),
        help="checkpoint file, gs://bucket/object (fetched once into $AIFS_CHECKPOINT_CACHE), or a Hugging "
        "Face repo id[:filename] (default: $AIFS_CHECKPOINT, "
        f"else {layout.DEFAULT_CHECKPOINT}; %(default)s here)",
    )
    p.add_argument(
        "--checkpoint-identity",
        default=None,
        help="what the checkpoint must be, by content: sha256:<hex> of the file or hf:<revision>; a checkpoint "
        "that is anything else is refused (exit 15). Completion manifests record the loaded checkpoint's identity.",
    )
    p.add_argument("--lead-time", type=int, default=layout.DEFAULT_LEAD_TIME_HOURS, help="hours (default %(default)s)")
    p.add_argument("--precision", choices=["16", "bf16", "32"], default=None, help="model precision (default: the checkpoint's)")
    p.add_argument("--num-chunks", type=int, default=None, help="ANEMOI_INFERENCE_NUM_CHUNKS: lower GPU memory, slower")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument(
        "--grib-writers", type=int, default=None,
        help="processes that encode GRIB in parallel, off the model's process (default: $AIFS_GRIB_WRITERS, else the "
        "cores this process may use minus one; 0 encodes on a thread of the model's process)",
    )
    p.add_argument("--force", action="store_true", help="redo members whose completion manifest exists")
    p.add_argument(
        "--upload-timeout", type=float, default=600.0, help="seconds one object may take, retries included (default %(default)s)"
    )
    return p


def parse_args(argv: list[str] | None = None) -> WorkerOptions:
    args = build_parser().parse_args(argv)
    members = checked_members(args.date, args.members)
    if args.lead_time <= 0:
        raise UsageError(f"--lead-time must be a positive number of hours, got {args.lead_time}")
    if args.upload_threads < 1:
        raise UsageError(f"--upload-threads must be at least 1, got {args.upload_threads}")
    if args.checkpoint_identity is not None and not is_checkpoint_identity(args.checkpoint_identity):
        raise UsageError(f"--checkpoint-identity must be sha256:<64 hex digits> or hf:<revision>, "
                         f"got {args.checkpoint_identity!r}")
    from aifs.worker.grib_writers import writers_setting

    try:
        writers_setting(args.grib_writers)  # --grib-writers, else $AIFS_GRIB_WRITERS: a bad value is a usage error
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.num_chunks is not None and args.num_chunks < 1:
        raise UsageError(f"--num-chunks must be at least 1, got {args.num_chunks}")

    return WorkerOptions(
        date=args.date,
        members=members,
        bucket=args.bucket,
        service_account=service_account_file(args.service_account),
        input_dir=args.input_dir,
        output_dir=args.output_dir,
        upload_threads=args.upload_threads,
        checkpoint=args.checkpoint,
        lead_time=args.lead_time,
        precision=args.precision,
        num_chunks=args.num_chunks,
        device=args.device,
        force=args.force,
        upload_timeout=args.upload_timeout,
        checkpoint_identity=args.checkpoint_identity,
        grib_writers=args.grib_writers,
    )
