"""Local scratch disk: sweep what crashed runs left, check there is room, clean up after a member."""

from __future__ import annotations

import glob
import logging
import os
import shutil

from aifs.layout import input_filename, member_grib_glob, member_index_glob
from aifs.worker.errors import OutOfDisk

LOG = logging.getLogger("aifs.worker")

#: Everything the worker ever writes locally (and partial downloads).
INPUT_GLOBS = ("input_state_member_*.pkl", "input_state_member_*.pkl.part")
OUTPUT_GLOBS = ("aifs_ens_forecast_*_member*_h*.grib", "aifs_ens_forecast_*_member*_h*.index")


def _remove(paths: list[str]) -> list[str]:
    removed = []
    for path in paths:
        try:
            os.remove(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def sweep_leftovers(input_dir: str, output_dir: str, keep_input_of: int) -> list[str]:
    """Remove files of earlier crashed runs; keep this member's pickle (reused when its crc32c matches)."""
    keep = os.path.join(input_dir, input_filename(keep_input_of))
    stale = [p for pattern in INPUT_GLOBS for p in glob.glob(os.path.join(input_dir, pattern)) if p != keep]
    stale += [p for pattern in OUTPUT_GLOBS for p in glob.glob(os.path.join(output_dir, pattern))]
    removed = _remove(stale)
    if removed:
        LOG.warning("[CLEANUP] removed %d leftover file(s) of earlier runs: %s", len(removed),
                    ", ".join(os.path.basename(p) for p in removed))
    return removed


def free_bytes(path: str) -> int:
    return shutil.disk_usage(path).free


def require_free_space(member: int, input_dir: str, output_dir: str, input_bytes: int, window_bytes: int) -> None:
    """OutOfDisk unless the disk(s) can hold one input plus two GRIB windows."""
    need = {input_dir: input_bytes, output_dir: 2 * window_bytes}
    if os.stat(input_dir).st_dev == os.stat(output_dir).st_dev:
        need = {output_dir: input_bytes + 2 * window_bytes}
    for path, bytes_needed in need.items():
        free = free_bytes(path)
        if free < bytes_needed:
            raise OutOfDisk(
                member,
                f"only {free / 1e9:.2f} GB free, need {bytes_needed / 1e9:.2f} GB "
                f"(one input of {input_bytes / 1e9:.2f} GB plus two GRIB windows of ~{window_bytes / 1e9:.2f} GB)",
                path,
            )


def cleanup_member(member: int, input_dir: str, output_dir: str) -> None:
    """Delete the member's pickle and every GRIB (and GRIB index) of it, whatever happened to the member."""
    paths = [os.path.join(input_dir, input_filename(member)), os.path.join(input_dir, input_filename(member) + ".part")]
    paths += [p for pattern in (member_grib_glob(member), member_index_glob(member))
              for p in glob.glob(os.path.join(output_dir, pattern))]
    removed = _remove(paths)
    LOG.info("[CLEANUP] member %03d: removed %d local file(s)%s", member, len(removed),
             (": " + ", ".join(os.path.basename(p) for p in removed)) if removed else "")
