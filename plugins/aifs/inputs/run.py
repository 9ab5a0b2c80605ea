"""A date's members, end to end: read the checkpoint, plan, check the source, build members in parallel, write.

Everything that can fail for the whole date (the checkpoint, a variable without a rule, an index
that is missing or lacks a field, a grid MIR cannot make) fails before any member is fetched or
written. Members are then built ``workers`` at a time; one member's failure does not stop the others.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import shutil
import tempfile
import threading
import time

from aifs.exitcodes import ExitCode
from aifs.inputs.cli import InputsOptions
from aifs.inputs.errors import InputsError, SourceIncomplete
from aifs.layout import input_object, parse_date

LOG = logging.getLogger("aifs.inputs")


@dataclasses.dataclass
class MemberResult:
    member: int
    status: str  # done, skipped, failed
    exit_code: ExitCode = ExitCode.OK
    seconds: float = 0.0
    bytes_fetched: int = 0
    size: int = 0
    error: str = ""


class DateFailed(Exception):
    """Every member fails the same way (checkpoint, rules, source, grid)."""

    def __init__(self, exit_code: ExitCode, message: str):
        super().__init__(message)
        self.exit_code = exit_code


def software_versions() -> dict[str, str]:
    from aifs.manifest import installed_versions

    return installed_versions(("aifs-ens-airflow", "ecmwf-opendata", "multiurl", "mir-python", "eccodes", "anemoi-inference", "numpy"))


def _check_source(opendata, plan, members: list[int]) -> None:
    """Every field of every member at every time level, and the constants, listed in the index: else one error naming them all."""
    problems = []
    for member, groups in [(None, plan.constant_groups())] + [(m, g) for m in members for g in plan.member_groups(m)]:
        for group in groups:
            missing = opendata.missing(group)
            if missing:
                variables = sorted({v for f in missing for v in plan.variables_of_key((f.param, group.levtype, f.level))})
                who = "the deterministic run" if member is None else f"member {member}"
                problems.append(f"{opendata.root}/{group.file.index_path()}: {who} lacks "
                                f"{', '.join(f.label() for f in missing)} (for variable(s) {', '.join(variables)})")
    if problems:
        shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise SourceIncomplete("the source does not publish what the checkpoint needs: " + "; ".join(shown))


def run(opts: InputsOptions) -> list[MemberResult]:
    from aifs.inputs.regrid import use_cache_dir

    use_cache_dir(opts.cache_dir)  # before MIR is loaded
    from aifs.inputs.build import Builder, time_levels_text
    from aifs.inputs.fetch import OpenData, RetryPolicy
    from aifs.inputs.manifest import build_manifest
    from aifs.inputs.plan import date_plan
    from aifs.inputs.regrid import Regridder
    from aifs.inputs.rules import NoRule, sources_of
    from aifs.inputs.spec import check_grid_points, read_input_spec
    from aifs.inputs.writer import existing_problems, upload_member, write_pickle
    from aifs.worker.checkpoint_identity import checkpoint_identity
    from aifs.worker.errors import CheckpointFailed
    from aifs.worker.storage import make_client

    date = parse_date(opts.date)
    client = make_client(opts.service_account)  # the bucket's, and a gs:// checkpoint's (fetched into the host's cache)
    try:
        spec = read_input_spec(opts.checkpoint, client)
        identity = checkpoint_identity(opts.checkpoint)  # the file read_input_spec read
    except CheckpointFailed as exc:
        raise DateFailed(ExitCode.CHECKPOINT_FAILED, str(exc)) from exc
    try:
        sources = sources_of(spec.variables)
    except NoRule as exc:
        raise DateFailed(ExitCode.SOURCE_INCOMPLETE, str(exc)) from exc
    plan = date_plan(date, spec.time_levels, spec.timestep, sources)
    LOG.info("[PLAN] %s: %d variables on %s (%d points), time levels %s; files %s", opts.checkpoint, len(spec.variables),
             spec.grid, spec.grid_points, ", ".join(f"{c:%Y-%m-%d %H:%M}" for c in plan.cycles),
             ", ".join(str(f) for f in plan.files()))

    bucket = client.bucket(opts.bucket)
    results: dict[int, MemberResult] = {}
    todo = []
    for member in opts.members:
        problems = ["--force"] if opts.force else existing_problems(bucket, opts.date, member, identity, spec.variables)
        if problems:
            todo.append(member)
        else:
            LOG.info("[SKIP] member %03d: gs://%s/%s and its manifest match this checkpoint", member, opts.bucket,
                     input_object(opts.date, member))
            results[member] = MemberResult(member, "skipped")
    if not todo:
        return [results[m] for m in opts.members]

    opendata = OpenData(opts.source, RetryPolicy(attempts=opts.retries, first_wait=opts.retry_wait))
    try:
        _check_source(opendata, plan, todo)
        check_grid_points(spec)
    except InputsError as exc:
        raise DateFailed(exc.exit_code, str(exc)) from exc
    LOG.info("[SOURCE] %s lists every field for members %s (%d index files, %.1f MB, each read once)",
             opendata.root, ",".join(map(str, todo)), opendata.index.fetches, opendata.index.bytes / 1e6)

    scratch = tempfile.mkdtemp(prefix=f"aifs-inputs-{opts.date}-")
    builder = Builder(spec, plan, opendata, Regridder(spec.grid, spec.grid_points), scratch)
    software = software_versions()
    started = time.perf_counter()
    finished = []
    lock = threading.Lock()

    def one(member: int) -> MemberResult:
        t0 = time.perf_counter()
        member_scratch = os.path.join(scratch, f"member{member:03d}")
        os.makedirs(member_scratch, exist_ok=True)
        try:
            state, own = builder.member_state(member)
            constants = builder.constants()
            local = write_pickle(state, member_scratch, member)
            del state
            timings = {"fetch_s": round(own.timings.fetch, 3), "decode_interpolate_s": round(own.timings.decode_interpolate, 3)}

            def manifest_of(size: int, crc: str) -> dict:
                timings["total_s"] = round(time.perf_counter() - t0, 3)
                return build_manifest(date=opts.date, member=member, obj=input_object(opts.date, member), size=size,
                                      crc32c=crc, checkpoint=opts.checkpoint, identity=identity, spec=spec,
                                      cycles=time_levels_text(plan.cycles), sources=own.sources,
                                      constant_sources=constants.sources, timings=timings, software=software,
                                      source=opendata.root)

            manifest = upload_member(bucket, opts.date, member, local, manifest_of)
            result = MemberResult(member, "done", seconds=time.perf_counter() - t0,
                                  bytes_fetched=manifest["bytes_fetched"], size=manifest["size"])
        except InputsError as exc:
            LOG.error("[FAILED] %s", exc)
            result = MemberResult(member, "failed", exc.exit_code, time.perf_counter() - t0, error=str(exc))
        finally:
            shutil.rmtree(member_scratch, ignore_errors=True)
        with lock:
            finished.append(result)
            done = len(finished)
            elapsed = time.perf_counter() - started
            eta = elapsed / done * (len(todo) - done)
            LOG.info("[MEMBER] %03d %s in %.1f s (%.1f MB fetched, %.1f MB written); %d/%d, %.1f min elapsed, ETA %.1f min",
                     member, result.status, result.seconds, result.bytes_fetched / 1e6, result.size / 1e6, done, len(todo),
                     elapsed / 60, eta / 60)
        return result

    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(opts.workers, len(todo)),
                                                   thread_name_prefix="member") as pool:
            for result in pool.map(one, todo):
                results[result.member] = result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return [results[m] for m in opts.members]
