"""One member's whole cycle, top to bottom: the function to read to know what the worker does."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import socket
import time

from aifs.completeness import MemberState, RunSpec, check_member, manifest_problems
from aifs.exitcodes import ExitCode
from aifs.layout import WINDOW_HOURS, manifest_object, parse_date, windows
from aifs.manifest import Manifest
from aifs.worker import disk, storage
from aifs.worker.checkpoint_identity import check_checkpoint
from aifs.worker.errors import CheckpointFailed, DownloadFailed, InferenceFailed, MemberError
from aifs.worker.grib_writers import make_grib_writer, writers_setting
from aifs.worker.model import Model, member_seed, software_versions
from aifs.worker.safe_pickle import check_input_size, load_input_state
from aifs.worker.uploader import WindowUploader
from aifs.worker.validate import check_input_state

LOG = logging.getLogger("aifs.worker")


@dataclasses.dataclass
class MemberResult:
    member: int
    status: str  # "done", "skipped", "failed"
    exit_code: ExitCode = ExitCode.OK
    seconds: float = 0.0
    bytes_uploaded: int = 0
    error: str = ""


class StepProgress:
    """Per-step log lines with rate and ETA, e.g. ``member 003 step 12/132 +72h 0.4 s/step ETA 48s``."""

    def __init__(self, member: int, total_steps: int, every_seconds: float = 10.0):
        self.member, self.total, self.every = member, total_steps, every_seconds
        self.started = self.last_log = time.perf_counter()
        self.done = 0

    def step(self, hour: int) -> None:
        self.done += 1
        now = time.perf_counter()
        if now - self.last_log < self.every and self.done not in (1, self.total):
            return
        self.last_log = now
        rate = (now - self.started) / self.done
        LOG.info("[STEP] member %03d step %d/%d +%dh %.2f s/step ETA %s", self.member, self.done, self.total, hour,
                 rate, _duration(rate * (self.total - self.done)))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _member_state(bucket, run: RunSpec, member: int, deadline: float) -> MemberState:
    """aifs.completeness.check_member with the worker's request deadline; bucket trouble is a retryable failure."""
    url = f"gs://{bucket.name}/{manifest_object(run.date, member)}"
    try:
        return check_member(bucket, run, member, timeout=storage._timeout(deadline), retry=storage._retry(deadline))
    except storage.BUCKET_ERRORS as exc:
        raise DownloadFailed(member, f"could not read the member's completion manifest and objects: {exc}", url) from exc


def run_member(member: int, *, opts, bucket, get_model) -> MemberResult:
    """Download, validate, forecast, write and upload windows, write the manifest; always clean up.

    ``get_model`` returns the process's Model, loading it on first use (members that are skipped
    or fail before inference never pay for it).
    """
    started = time.perf_counter()
    date = parse_date(opts.date)
    timings: dict[str, float] = {}
    try:
        manifest_name = manifest_object(opts.date, member)
        # complete means complete for THIS run (aifs.completeness): same lead time, checkpoint (by
        # content), windows, every object verifying; a smoke run's manifest is not a 792 h member
        identity = check_checkpoint(opts.checkpoint, opts.checkpoint_identity)  # CheckpointFailed: every member
        run = RunSpec.for_worker(opts.date, opts.lead_time, opts.checkpoint, identity, opts.checkpoint_identity)
        found = _member_state(bucket, run, member, opts.upload_timeout)
        if found.has_manifest:
            if found.complete and not opts.force:
                LOG.info("[SKIP] member %03d: complete (gs://%s/%s matches this run and every object verifies; "
                         "--force redoes it)", member, bucket.name, manifest_name)
                return MemberResult(member, "skipped")
            # withdraw the old manifest before any object is overwritten: a redo that dies half-way
            # must leave the member incomplete, never an old manifest over new, partial windows
            storage.delete_object(bucket, manifest_name, member, opts.upload_timeout)
            if found.complete:
                LOG.info("[FORCE] member %03d: removed gs://%s/%s, redoing the member", member, bucket.name, manifest_name)
            else:
                LOG.info("[REDO] member %03d: gs://%s/%s does not make it complete for this run (%s): withdrawn, "
                         "redoing the member", member, bucket.name, manifest_name, "; ".join(found.problems))

        # 1. room on disk, then the input
        os.makedirs(opts.input_dir, exist_ok=True)
        os.makedirs(opts.output_dir, exist_ok=True)
        disk.sweep_leftovers(opts.input_dir, opts.output_dir, keep_input_of=member)
        blob = storage.find_input(bucket, opts.date, member, opts.upload_timeout)
        model: Model = get_model()  # the checkpoint's metadata: what a state holds and may claim; no weights yet
        budget = model.spec.input_budget()
        check_input_size(blob.size or 0, budget, member, f"gs://{bucket.name}/{blob.name}")  # before any download
        disk.require_free_space(member, opts.input_dir, opts.output_dir, blob.size, model.spec.window_bytes(WINDOW_HOURS))
        t = time.perf_counter()
        local_input = storage.download_input(blob, member, opts.input_dir, opts.upload_timeout)
        timings["download_s"] = time.perf_counter() - t

        # 2. safe, bounded load and check against the checkpoint's metadata, before the weights
        t = time.perf_counter()
        loaded = None
        try:
            loaded = load_input_state(local_input, member, budget)
        finally:
            timings["unpickle_s"] = time.perf_counter() - t
            LOG.info("[INPUT] member %03d: %s %s (%d bytes) in %.3f s", member, "unpickled" if loaded is not None
                     else "refused", local_input, os.path.getsize(local_input), timings["unpickle_s"])
        state = check_input_state(loaded, model.spec, date, member, local_input)
        model.load_weights()  # once per process, for the first input that passed; CheckpointFailed: every member

        # 3-5. forecast; GRIB windows written on their own thread and uploaded as they close
        seed = member_seed(opts.date, member)
        steps = int(dt.timedelta(hours=opts.lead_time) / model.spec.timestep)
        LOG.info("[MEMBER] %03d: forecast to +%dh (%d steps, %d windows), seed %d", member, opts.lead_time, steps,
                 len(windows(opts.lead_time)), seed)
        uploader = WindowUploader(bucket, member, opts.upload_threads, opts.upload_timeout)
        # GRIB encoded in writer processes (--grib-writers; 0: on a thread of this process)
        writer = make_grib_writer(writers_setting(opts.grib_writers), model=model, date=opts.date, member=member,
                                  lead_time=opts.lead_time, output_dir=opts.output_dir, uploader=uploader)
        progress = StepProgress(member, steps)
        t = time.perf_counter()
        try:
            try:
                for state_at_step in model.forecast(state, opts.lead_time, seed):
                    hour = int(state_at_step["step"] / dt.timedelta(hours=1))
                    if hour > 0:
                        progress.step(hour)
                    writer.put(state_at_step)
            except MemberError:
                raise
            except Exception as exc:
                raise InferenceFailed(member, f"inference failed: {type(exc).__name__}: {exc}") from exc
            timings["model_s"] = time.perf_counter() - t
            writer.finish()
            objects = uploader.wait()
        except BaseException:
            writer.abort()
            raise
        finally:
            uploader.shutdown()
        timings["grib_write_s"] = writer.write_seconds
        timings["upload_s"] = uploader.upload_seconds
        timings["upload_tail_s"] = uploader.tail_seconds
        timings["index_s"] = uploader.index_seconds  # part of upload_s: indexing each finished window
        timings["wall_s"] = time.perf_counter() - started

        # 6. the manifest is written last: with it the member is complete (aifs.completeness)
        fields = len(model.spec.output_variables)  # GRIB messages a step, so verify can count each window's steps
        manifest = Manifest(date=opts.date, member=member, seed=seed, lead_time=opts.lead_time,
                            checkpoint=opts.checkpoint, checkpoint_identity=identity,
                            step_hours=int(model.spec.timestep / dt.timedelta(hours=1)),
                            objects=[dataclasses.replace(o, fields=fields) for o in objects], versions=software_versions(),
                            timings={k: round(v, 3) for k, v in timings.items()}, host=socket.gethostname())
        # never publish a manifest that the one definition of complete would refuse (e.g. a short window)
        wrong = manifest_problems(manifest, run, member)
        if wrong:
            raise InferenceFailed(member, "the member's output does not make it complete: " + "; ".join(wrong))
        storage.upload_text(bucket, manifest.to_json(), manifest_name, member, opts.upload_timeout)
        LOG.info("[MANIFEST] gs://%s/%s: %d objects, %.2f GB", bucket.name, manifest_name, len(objects),
                 manifest.total_bytes / 1e9)
        return MemberResult(member, "done", seconds=time.perf_counter() - started, bytes_uploaded=manifest.total_bytes)
    except MemberError as exc:
        LOG.error("[FAILED] %s (exit code %d: %s)", exc, exc.exit_code, exc.exit_code.name)
        return MemberResult(member, "failed", exc.exit_code, time.perf_counter() - started, error=str(exc))
    except CheckpointFailed:
        raise  # not this member's fault: the caller fails every remaining member
    except Exception as exc:  # a bug or an unforeseen failure: fail this member, keep the others going
        LOG.exception("[FAILED] member %03d: unexpected %s", member, type(exc).__name__)
        return MemberResult(member, "failed", ExitCode.INFERENCE_FAILED, time.perf_counter() - started,
                            error=f"unexpected {type(exc).__name__}: {exc}")
    finally:
        disk.cleanup_member(member, opts.input_dir, opts.output_dir)
