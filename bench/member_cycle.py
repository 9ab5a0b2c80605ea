#!/usr/bin/env python
"""One member, several ways, in one run: GRIB writer processes against the single in-process writer.

    .venv/bin/python bench/member_cycle.py [--step-seconds 1.5] [--fields 102] [--lead-time 216]
        [--modes writers,in-process,serial] [--grib-writers N] [--json OUT]
    .venv/bin/python bench/member_cycle.py --matrix      # what `make bench` runs (~35 min on 2 cores; one process per configuration)

Real parts: a gcp-storage-emulator process (the worker reaches it through STORAGE_EMULATOR_HOST),
the real anemoi-inference runner on the tiny N320 checkpoint with 102 (AIFS-ENS v1) or 120
(v2) output fields a step, each model step held to ``--step-seconds`` (a stand-in for the GPU),
and the worker's own code path (``aifs.worker.cycle.run_member``).

- writers: ``run_member`` with ``--grib-writers N`` (default: cores - 1): each step copied into
  shared memory and encoded by N writer processes (aifs.worker.grib_writers), each window
  streamed into its resumable upload session as it is written, verified and deleted.
- in-process: ``run_member`` with ``--grib-writers 0``: today's single writer thread in the
  model's process (encoding shares the model's interpreter lock and cores).
- serial: what the old scripts did, with the same Model instance and seed: GRIB written in line
  in the model loop, then every window uploaded on ``--upload-threads`` threads, then deleted.

``--matrix`` runs 216 h at a 4 s and a 1 s step, at 102 and 120 fields, writers vs in-process
(same run, same model), then the same 1 s step at 120 fields with the GPU-like replay
(``--stand-in replay``). The CPU stand-in's step is ``--step-seconds`` *plus* anemoi's per-step
tensor work at N320 on this CPU (~3 s, holding a core); the replay's step is exactly
``--step-seconds`` and holds no core, as a model process waiting on an H100, so it shows what an
encoder that cannot keep up costs on a fast GPU. Messages/s against the number of writers, with
the cores left to the writers, is ``bench/grib_writers.py``.

"model s" is the time spent inside the forecast generator's ``next()`` (anemoi's per-step work
plus the stand-in GPU time); "wall s" runs from the forecast's start to the last window verified
in the bucket. Peak disk is sampled every ~0.1 s by a thread summing file sizes under the input
and output dirs; peak memory every ~0.5 s as the summed PSS of this process and its writer
processes (shared memory counted once). Figures are ratios against a mode measured in the same
run: nothing is asserted on time. Working files live under .bench/ and are deleted at the end.
"""

from __future__ import annotations

# pyproj before eccodes: both bundle libproj; the other order crashes the interpreter at exit.
import pyproj  # noqa: F401  isort: skip

import argparse
import concurrent.futures as cf
import datetime as dt
import json
import logging
import os
import pickle
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugins"))

import psutil  # noqa: E402

DATE = "20250601_0000"
MEMBER = 1
T0 = time.perf_counter()
LOG = logging.getLogger("bench")


def elapsed() -> str:
    return f"{time.perf_counter() - T0:6.1f}s"


def phase(text: str) -> None:
    print(f"[{elapsed()}] == {text}", flush=True)


class _Elapsed(logging.Formatter):
    def format(self, record):
        return f"[{elapsed()}]    {record.getMessage()}"


def configure_logging() -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_Elapsed())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    for noisy in ("anemoi", "earthkit", "urllib3", "google", "matplotlib", "aifs.worker.disk"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# -- measuring ---------------------------------------------------------------------------------


class DiskSampler:
    """Peak of the summed sizes of every file under ``dirs``, sampled every ``interval`` s."""

    def __init__(self, dirs: list[str], interval: float = 0.1):
        self.dirs, self.interval = dirs, interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="disk-sampler", daemon=True)

    def total(self) -> int:
        total = 0
        for root in self.dirs:
            for dirpath, _, files in os.walk(root):
                for name in files:
                    try:
                        total += os.stat(os.path.join(dirpath, name)).st_size
                    except FileNotFoundError:  # deleted between listing and stat
                        pass
        return total

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self.total())
            self.samples += 1
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "DiskSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.total())


class MemorySampler:
    """Peak summed PSS (shared pages split between their users) of this process and its children but ``exclude``."""

    def __init__(self, exclude: set[int], interval: float = 0.5):
        self.exclude, self.interval = exclude, interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def total(self) -> int:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            if p.pid in self.exclude:
                continue
            try:
                info = p.memory_full_info()
                total += getattr(info, "pss", info.rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        return total

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self.total())
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class ForecastMeter:
    """Wraps ``Model.forecast`` (bench only): sums the time spent inside the generator's ``next()``."""

    def __init__(self, model):
        self._forecast = model.forecast
        model.forecast = self.forecast  # instance attribute: shadows the method for this Model only
        self.reset()

    def reset(self) -> None:
        self.started = None
        self.model_s = 0.0
        self.step_s: list[float] = []
        self.consumer_s = 0.0  # time the caller held each yielded state (copy + queue or in-line write)

    def forecast(self, state, lead_time_hours, seed):
        self.started = time.perf_counter()
        steps = self._forecast(state, lead_time_hours, seed)
        while True:
            t = time.perf_counter()
            try:
                item = next(steps)
            except StopIteration:
                self.model_s += time.perf_counter() - t
                return
            took = time.perf_counter() - t
            self.model_s += took
            self.step_s.append(took)
            t = time.perf_counter()
            yield item
            self.consumer_s += time.perf_counter() - t


class ReplayForecast:
    """Bench only: a GPU-like stand-in for ``Model.forecast`` that holds no CPU core while it "steps".

    On a GPU host the model's step runs on the GPU and its process mostly waits, so the host's
    cores are free for GRIB writing and uploads. The CPU stand-in cannot show that: anemoi's
    per-step tensor work at N320 holds a core here (a "1 s" step takes ~4 s). This stand-in runs
    the real runner once for ``captured`` steps and keeps those states (read-only: anything that
    wrote into the runner's arrays would fail loudly); each member step then sleeps
    ``step_seconds`` and yields one of them with its own step and date, in fresh dicts, as the
    runner does. Every writer, window, upload and manifest downstream is the worker's own.
    """

    def __init__(self, model, state, step_seconds: float, captured: int = 2):
        self.step_seconds = step_seconds
        timestep = model.spec.timestep
        hours = int(captured * timestep / dt.timedelta(hours=1))
        self.leading, self.states = [], []  # leading: what the runner yields before its first step (if anything)
        for s in model.forecast(state, hours, 0):
            kept = {**s, "fields": dict(s["fields"])}
            for array in kept["fields"].values():
                array.flags.writeable = False
            (self.leading if s["step"] <= dt.timedelta(0) else self.states).append(kept)
        self.timestep = timestep
        model.forecast = self.forecast  # instance attribute: shadows the method for this Model only

    def forecast(self, state, lead_time_hours, seed):
        steps = int(dt.timedelta(hours=lead_time_hours) / self.timestep)
        start = state["date"]
        for kept in self.leading:
            yield {**kept, "date": start + kept["step"], "fields": dict(kept["fields"])}
        for i in range(1, steps + 1):
            time.sleep(self.step_seconds)
            kept = self.states[(i - 1) % len(self.states)]
            step = self.timestep * i
            yield {**kept, "date": start + step, "step": step, "fields": dict(kept["fields"])}


def cpu_seconds(procs) -> float:
    """CPU seconds (user + system) of ``procs`` (psutil processes; one that has exited counts nothing)."""
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


class CpuMeter:
    """CPU seconds (user + system) of this process and of the emulator process tree."""

    def __init__(self, emulator_pid: int):
        self.me = psutil.Process()
        self.emulator = psutil.Process(emulator_pid)

    def _tree_cpu(self, proc: psutil.Process) -> float:
        return cpu_seconds([proc, *proc.children(recursive=True)])

    def snapshot(self) -> tuple[float, float]:
        t = self.me.cpu_times()
        return t.user + t.system, self._tree_cpu(self.emulator)


# -- the two modes -----------------------------------------------------------------------------


def run_streaming(args, model, meter, bucket, dirs, writers: int) -> dict:
    """The worker's own per-member cycle, GRIB encoded by ``writers`` processes (0: its in-process thread)."""
    import aifs.worker.cycle as cycle
    from aifs.layout import manifest_object
    from aifs.manifest import Manifest
    from aifs.worker.cli import WorkerOptions

    uploads_done = {}

    class TimedUploader(cycle.WindowUploader):  # bench only: note when the last window is verified
        def wait(self):
            try:
                return super().wait()
            finally:
                uploads_done["at"] = time.perf_counter()

    opts = WorkerOptions(
        date=DATE, members=[MEMBER], bucket=bucket.name, service_account=None, input_dir=dirs["input"],
        output_dir=dirs["output"], upload_threads=args.upload_threads, checkpoint=args.checkpoint_path,
        lead_time=args.lead_time, precision=None, num_chunks=None, device="cpu", force=True, upload_timeout=600.0,
        grib_writers=writers,
    )
    saved = cycle.WindowUploader
    cycle.WindowUploader = TimedUploader
    meter.reset()
    try:
        with DiskSampler([dirs["input"], dirs["output"]]) as disk, MemorySampler(args.exclude_pids) as memory:
            started = time.perf_counter()
            result = cycle.run_member(MEMBER, opts=opts, bucket=bucket, get_model=lambda: model)
            member_s = time.perf_counter() - started
    finally:
        cycle.WindowUploader = saved
    if result.status != "done":
        raise SystemExit(f"streaming run failed: {result.error}")
    manifest = Manifest.from_json(bucket.blob(manifest_object(DATE, MEMBER)).download_as_bytes())
    return {
        "wall_s": uploads_done["at"] - meter.started,
        "model_s": meter.model_s,
        "member_s": member_s,
        "messages": sum(o.messages for o in manifest.objects),
        "window_bytes": max(o.size for o in manifest.objects),
        "objects": {o.name: (o.size, o.crc32c) for o in manifest.objects},
        "peak_disk_bytes": disk.peak,
        "peak_memory_bytes": memory.peak,
        "disk_samples": disk.samples,
        "grib_write_s": manifest.timings.get("grib_write_s"),
        "upload_s": manifest.timings.get("upload_s"),
        "upload_tail_s": manifest.timings.get("upload_tail_s"),
        "download_s": manifest.timings.get("download_s"),
        "caller_s": meter.consumer_s,
        "step_s": meter.step_s,
    }


def run_baseline(args, model, meter, bucket, dirs) -> dict:
    """The old scripts: GRIB in line in the model loop, all uploads after inference, then delete."""
    from anemoi.inference.outputs import create_output

    from aifs.layout import forecast_filename, forecast_object, parse_date, window_of
    from aifs.worker import storage
    from aifs.worker.model import member_seed
    from aifs.worker.safe_pickle import load_input_state
    from aifs.worker.validate import check_input_state
    from aifs.worker.windows import count_messages, ensemble_encoding

    meter.reset()
    with DiskSampler([dirs["input"], dirs["output"]]) as disk, MemorySampler(args.exclude_pids) as memory:
        started = time.perf_counter()
        blob = storage.find_input(bucket, DATE, MEMBER, 600.0)
        t = time.perf_counter()
        local_input = storage.download_input(blob, MEMBER, dirs["input"], 600.0)
        download_s = time.perf_counter() - t
        state = check_input_state(load_input_state(local_input, MEMBER), model.spec, parse_date(DATE), MEMBER, local_input)

        accumulate = model.accumulator()
        output, window, files, write_s = None, None, [], 0.0
        for step_state in model.forecast(state, args.lead_time, member_seed(DATE, MEMBER)):
            hour = int(step_state["step"] / dt.timedelta(hours=1))
            if hour <= 0:
                continue
            t = time.perf_counter()
            if window_of(hour, args.lead_time) != window:
                if output is not None:
                    output.close()
                window = window_of(hour, args.lead_time)
                path = os.path.join(dirs["output"], forecast_filename(DATE, MEMBER, window.start, window.end))
                files.append((path, forecast_object(DATE, MEMBER, window.start, window.end)))
                config = {"grib": {"path": path, "encoding": ensemble_encoding(MEMBER), "write_initial_state": False,
                                   **model.grib_output_options()}}  # the checkpoint's field rules, as the worker
                output = create_output(model.runner, config, model.metadata)
            # Accumulate.process replaces entries of state["fields"]: keep the runner's own dict intact
            output.write_state(accumulate.process({**step_state, "fields": dict(step_state["fields"])}))
            write_s += time.perf_counter() - t
        output.close()
        inference_done = time.perf_counter()

        with cf.ThreadPoolExecutor(max_workers=args.upload_threads) as pool:
            futures = {name: pool.submit(storage.upload_verified, bucket, path, name, MEMBER, 600.0) for path, name in files}
            objects = {name: f.result() for name, f in futures.items()}
        uploads_done = time.perf_counter()
        messages = sum(count_messages(path) for path, _ in files)  # after the clock: not part of the old cycle
        for path, _ in files:
            os.remove(path)
        os.remove(local_input)
        member_s = time.perf_counter() - started
    return {
        "wall_s": uploads_done - meter.started,
        "model_s": meter.model_s,
        "member_s": member_s,
        "messages": messages,
        "window_bytes": max(size for size, _ in objects.values()),
        "objects": objects,
        "peak_disk_bytes": disk.peak,
        "peak_memory_bytes": memory.peak,
        "disk_samples": disk.samples,
        "grib_write_s": write_s,
        "upload_s": uploads_done - inference_done,
        "upload_tail_s": uploads_done - inference_done,  # nothing overlaps the model: all of it is tail
        "download_s": download_s,
        "caller_s": meter.consumer_s,
        "step_s": meter.step_s,
    }


def warm_up(model, dirs, state) -> None:
    """One step written to GRIB once: imports, templates and torch warm before either timed run."""
    from anemoi.inference.outputs import create_output

    from aifs.worker.windows import ensemble_encoding

    path = os.path.join(dirs["output"], "warmup.grib")
    output = create_output(model.runner, {"grib": {"path": path, "encoding": ensemble_encoding(MEMBER),
                                                   **model.grib_output_options()}}, model.metadata)
    accumulate = model.accumulator()
    for s in model.forecast(state, 6, 0):
        if s["step"] > dt.timedelta(0):
            output.write_state(accumulate.process({**s, "fields": dict(s["fields"])}))
    output.close()
    os.remove(path)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


# -- report --------------------------------------------------------------------------------------


def report(args, figures: dict, input_bytes: int, reference: str) -> dict:
    """One configuration's table; every mode's wall/model against ``reference``'s, measured in the same run."""
    window = max(f["window_bytes"] for f in figures.values())
    two = (input_bytes + 2 * window) / 1e9
    rows = []
    header = ["mode", "wall s", "model s", "wall/model", "GRIB msg/s", "peak memory GB", "peak disk GB",
              "input+2 windows GB"]
    for mode, f in figures.items():
        f["ratio"] = f["wall_s"] / f["model_s"]
        f["msg_per_s"] = f["messages"] / f["wall_s"]
        rows.append([mode, f"{f['wall_s']:.1f}", f"{f['model_s']:.1f}", f"{f['ratio']:.3f}", f"{f['msg_per_s']:.1f}",
                     f"{f['peak_memory_bytes'] / 1e9:.2f}", f"{f['peak_disk_bytes'] / 1e9:.2f}", f"{two:.2f}"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    print()
    print(f"one member, {args.generation} tiny model, N320 ({args.fields} output fields a step), lead time {args.lead_time} h "
          f"({args.steps} steps, {args.windows} windows), step {args.step_seconds} s "
          f"({'GPU-like replay, no core held' if args.stand_in == 'replay' else 'CPU stand-in'}), {args.upload_threads} upload threads, "
          f"{len(os.sched_getaffinity(0))} cores, torch threads {torch_threads()}, "
          f"{'stock' if args.stock_emulator else 'linear-upload'} emulator")
    print(line(header))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(line(r))
    print()
    detail = ["mode", "member s", "download s", "GRIB write s", "upload s", "upload after window close s", "caller s",
              "model s/step (median)", "bench CPU s", "emulator CPU s"]
    print(" | ".join(detail))
    for mode, f in figures.items():
        print(" | ".join([mode, f"{f['member_s']:.1f}", f"{f['download_s']:.1f}", f"{f['grib_write_s']:.1f}",
                          f"{f['upload_s']:.1f}", f"{f['upload_tail_s']:.1f}", f"{f['caller_s']:.1f}",
                          f"{statistics.median(f['step_s']):.3f}", f"{f['cpu_s']:.1f}", f"{f['emulator_cpu_s']:.1f}"]))
    print()
    ref = figures[reference]
    same = all(f["objects"] == ref["objects"] for f in figures.values())
    print(f"same bytes in the bucket from every mode (size + crc32c of every window): {'yes' if same else 'NO'}")
    target = args.target_ratio
    checks = {}
    for mode, f in figures.items():
        if mode == reference:
            continue
        print(f"{mode} vs {reference}: wall/model {f['ratio']:.3f} vs {ref['ratio']:.3f}; wall {f['wall_s']:.1f} vs "
              f"{ref['wall_s']:.1f} s ({100 * (1 - f['wall_s'] / ref['wall_s']):+.0f}% saved)")
    if "writers" in figures:
        f = figures["writers"]
        checks["disk"] = f["peak_disk_bytes"] <= input_bytes + 2 * window
        if args.step_seconds > 0 or args.stand_in == "cpu":  # a 0 s replay has no model time to divide by
            checks["ratio"] = f["ratio"] <= target
            print(f"target: writers wall/model <= {target}: {'MET' if checks['ratio'] else 'NOT MET'} ({f['ratio']:.3f})")
        print(f"peak disk <= input + 2 windows: {'MET' if checks['disk'] else 'NOT MET'} "
              f"({f['peak_disk_bytes'] / 1e9:.2f} GB <= {two:.2f} GB)")
    return {
        "config": {"grid": "N320", "fields": args.fields, "lead_time": args.lead_time, "steps": args.steps,
                   "windows": args.windows, "step_seconds": args.step_seconds, "generation": args.generation, "upload_threads": args.upload_threads,
                   "grib_writers": args.grib_writers, "cpus": len(os.sched_getaffinity(0)),
                   "torch_threads": torch_threads(), "stock_emulator": args.stock_emulator, "stand_in": args.stand_in},
        "input_bytes": input_bytes,
        "window_bytes": window,
        "modes": {m: {k: v for k, v in f.items() if k != "objects"} for m, f in figures.items()},
        "same_output": same,
        "targets_met": checks,
    }


# -- main ----------------------------------------------------------------------------------------

#: 102 fields a step (AIFS-ENS v1, the tiny model's bench set) or 120 (v2: three more pressure levels)
EXTRA_LEVELS_FOR_120 = [10, 30, 70]


def variable_sets(fields: int) -> tuple[list[str], list[str], list[str]]:
    from aifs.testing.tiny_model import BENCH_CONSTANT, BENCH_DIAGNOSTIC, BENCH_PROGNOSTIC, PL_PARAMS

    prognostic = list(BENCH_PROGNOSTIC)
    if fields == 120:
        prognostic += [f"{p}_{lev}" for p in PL_PARAMS for lev in EXTRA_LEVELS_FOR_120]
    elif fields != 102:
        raise SystemExit("--fields must be 102 or 120")
    return prognostic, list(BENCH_CONSTANT), list(BENCH_DIAGNOSTIC)


def v2_checkpoint_and_input(work: Path, when) -> tuple[str, dict]:
    """The tiny v2 architecture at N320 with AIFS-ENS 2.0's 120 GRIB fields, and an input as open data gives it."""
    import numpy as np

    from aifs.testing import tiny_model_v2
    from aifs.testing.synthetic import make_input_state, synthetic_input_seed
    from aifs.testing.tiny_model import builtin_grid_latlon

    path = tiny_model_v2.build_checkpoint(str(work / "tiny-v2-n320.ckpt"), grid="N320",
                                          prognostic=tiny_model_v2.BENCH_PROGNOSTIC,
                                          constant=tiny_model_v2.BENCH_CONSTANT,
                                          diagnostic=tiny_model_v2.BENCH_DIAGNOSTIC)
    state = make_input_state(path, when, seed=synthetic_input_seed(when, MEMBER))
    lat, lon = builtin_grid_latlon("N320")
    land = np.sin(np.deg2rad(lon) * 2 + 0.5) * np.cos(np.deg2rad(lat)) > 0.3
    fields = state["fields"]
    fields["lsm"][:] = land
    for name in tiny_model_v2.LAND_ONLY:
        fields[name][:, ~land] = np.nan
    for name in tiny_model_v2.WAVES:
        fields[name][:, land] = np.nan
    return path, state


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--step-seconds", type=float, default=1.5, help="fixed time per model step (default %(default)s)")
    p.add_argument("--fields", type=int, default=102, choices=[102, 120], help="output fields a step (default %(default)s)")
    p.add_argument(
        "--generation", choices=["v1", "v2"], default="v1",
        help="v1: the stand-in model held to --step-seconds (any environment); v2: AIFS-ENS 2.0's real anemoi-models "
        "0.11 ensemble architecture, tiny and untrained, 120 GRIB fields a step (waves NaN over land, mwd from "
        "cos/sin), its own CPU time a step (--step-seconds does not apply); run it with .venv-v2's python",
    )
    p.add_argument(
        "--stand-in", choices=["cpu", "replay"], default="cpu",
        help="cpu: the tiny model stepped by the real runner on this CPU (anemoi's per-step tensor work holds a core, "
        "so a step takes --step-seconds plus that work); replay: GPU-like, the runner's first steps captured once and "
        "replayed after sleeping --step-seconds, holding no core, as a model process waiting on its GPU (default %(default)s)",
    )
    p.add_argument("--lead-time", type=int, default=216, help="hours, 72 h a window (default %(default)s = 3 windows)")
    p.add_argument("--modes", default="writers,in-process",
                   help="comma-separated, first is the reference for the others: writers, in-process, serial "
                   "(default %(default)s)")
    p.add_argument("--grib-writers", type=int, default=None,
                   help="writer processes for the writers mode (default: cores - 1, as the worker)")
    p.add_argument("--upload-threads", type=int, default=5, help="upload threads, all modes (default %(default)s)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="CPU threads for the model's tensor work (default %(default)s). On a GPU host that work runs on "
                   "the GPU and leaves the CPU cores to GRIB writing and uploads; on this CPU-only stand-in it is held "
                   "to one core so the other cores play the same role")
    p.add_argument("--target-ratio", type=float, default=None,
                   help="wall/model target for the writers mode (default 1.05 at steps >= 2 s, else 1.10)")
    p.add_argument("--matrix", action="store_true",
                   help="216 h at 4 s and 1 s steps x 102 and 120 fields (writers vs in-process), then msg/s vs writers")
    p.add_argument("--json", metavar="OUT", help="also write the figures as JSON to OUT")
    p.add_argument("--stock-emulator", action="store_true",
                   help="run the stock gcp-storage-emulator (quadratic resumable uploads: ~150 s of its CPU a window)")
    p.add_argument("--keep", action="store_true", help="keep the working directory (debugging)")
    args = p.parse_args(argv)
    if args.lead_time <= 0:
        p.error("--lead-time must be positive (the benchmark is meant for >= 216 h: three windows or more)")
    return args


class Bench:
    """The emulator, the bucket and the input, shared by every configuration of one run."""

    def __init__(self, args, work: Path):
        self.args, self.work = args, work
        self.emulator = None

    def start(self):
        from aifs.testing.emulator import StorageEmulator

        phase(f"setup: GCS emulator in {self.work}")
        if not self.args.stock_emulator:  # the stock emulator's resumable uploads are O(size^2): see _fast_emulator.py
            import aifs.testing.emulator as emulator_module

            emulator_module._executable = lambda: [sys.executable, str(Path(__file__).with_name("_fast_emulator.py"))]
        self.emulator = StorageEmulator(log_path=str(self.work / "emulator.log")).start()
        os.environ["STORAGE_EMULATOR_HOST"] = self.emulator.url  # before the worker's client exists
        os.environ.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
        from aifs.worker.storage import make_client

        self.bucket = make_client(None).create_bucket("bench-member-cycle")
        self.cpu = CpuMeter(self.emulator.process.pid)
        self.args.exclude_pids = {self.emulator.process.pid} | {
            p.pid for p in psutil.Process(self.emulator.process.pid).children(recursive=True)}
        return self

    def stop(self):
        if self.emulator is not None:
            self.emulator.stop()

    def configuration(self, step_seconds: float, fields: int, lead_time: int, modes: list[str]) -> dict:
        """One checkpoint (step time and fields), one input, each mode in turn on the same model."""
        from aifs.layout import input_object, parse_date, windows
        from aifs.testing.synthetic import make_input_state, synthetic_input_seed
        from aifs.testing.tiny_model import build_checkpoint
        from aifs.worker.grib_writers import shutdown_pool, writers_setting
        from aifs.worker.model import Model

        args = argparse.Namespace(**vars(self.args))
        args.step_seconds, args.fields, args.lead_time = step_seconds, fields, lead_time
        if args.generation == "v2":
            args.step_seconds, args.fields = 0.0, 120  # the real architecture's own step time; v2's field count
            step_seconds, fields = args.step_seconds, args.fields
        args.grib_writers = writers_setting(args.grib_writers) or 1
        if args.target_ratio is None:
            args.target_ratio = 1.05 if step_seconds >= 2 else 1.10
        if args.stand_in == "replay" and args.generation != "v1":
            raise SystemExit("--stand-in replay replays the v1 stand-in model (its field count is --fields)")
        tag = f"{args.generation}-{args.stand_in}-{fields}f-{step_seconds:g}s-{lead_time}h-{args.grib_writers}w"
        work = self.work / tag
        # one pair of dirs per mode: anemoi-inference refuses a GRIB path used before in the process
        mode_dirs = {m: {"input": str(work / m / "input"), "output": str(work / m / "output")} for m in modes}
        for dirs in mode_dirs.values():
            for d in dirs.values():
                os.makedirs(d, exist_ok=True)
        phase(f"setup {tag}: tiny N320 checkpoint ({args.generation}), {fields} fields, "
              + (f"{step_seconds} s a step" if args.generation == "v1" else "the v2 architecture's own step time"))
        when = parse_date(DATE)
        if args.generation == "v2":
            args.checkpoint_path, input_state = v2_checkpoint_and_input(work, when)
        else:
            prognostic, constant, diagnostic = variable_sets(fields)
            model_step = step_seconds if args.stand_in == "cpu" else 0.0  # replay: the sleep is the stand-in's
            args.checkpoint_path = build_checkpoint(str(work / "tiny-n320.ckpt"), grid="N320", prognostic=prognostic,
                                                    constant=constant, diagnostic=diagnostic, step_seconds=model_step)
            input_state = make_input_state(args.checkpoint_path, when, seed=synthetic_input_seed(when, MEMBER))
        data = pickle.dumps(input_state, protocol=pickle.HIGHEST_PROTOCOL)
        input_bytes = len(data)
        self.bucket.blob(input_object(DATE, MEMBER)).upload_from_string(data, checksum="crc32c")
        del data
        phase(f"setup {tag}: load the model once (shared by every mode), warm up with one step")
        model = Model(args.checkpoint_path, "cpu", None, None)
        if args.stand_in == "replay":
            phase(f"setup {tag}: capture the runner's first steps for the GPU-like replay")
            ReplayForecast(model, input_state, step_seconds)
        meter = ForecastMeter(model)
        warm_up(model, mode_dirs[modes[-1]], input_state)
        del input_state
        assert len(model.spec.output_variables) == fields, (len(model.spec.output_variables), fields)
        args.steps = int(dt.timedelta(hours=lead_time) / model.spec.timestep)
        args.windows = len(windows(lead_time))
        if "writers" in modes:  # the pool starts once per worker process: not part of a member's time
            from aifs.worker.grib_writers import get_pool

            pool = get_pool(args.grib_writers, str(model.runner.checkpoint.path))
            deadline = time.monotonic() + 300
            while pool.ready < pool.n and time.monotonic() < deadline:
                time.sleep(0.1)
        figures = {}
        try:
            for mode in modes:
                phase(f"{tag} {mode}: one member, {args.steps} steps, {args.windows} windows")
                before = self.cpu.snapshot()
                if mode == "serial":
                    figures[mode] = run_baseline(args, model, meter, self.bucket, mode_dirs[mode])
                else:
                    writers = args.grib_writers if mode == "writers" else 0
                    figures[mode] = run_streaming(args, model, meter, self.bucket, mode_dirs[mode], writers)
                after = self.cpu.snapshot()
                figures[mode]["cpu_s"] = after[0] - before[0]
                figures[mode]["emulator_cpu_s"] = after[1] - before[1]
                f = figures[mode]
                phase(f"{tag} {mode}: done, wall {f['wall_s']:.1f} s, model {f['model_s']:.1f} s, "
                      f"peak disk {f['peak_disk_bytes'] / 1e9:.2f} GB, peak memory {f['peak_memory_bytes'] / 1e9:.2f} GB")
                for blob in self.bucket.list_blobs(prefix=f"{DATE}/"):  # free the emulator's memory between modes
                    if not blob.name.startswith(f"{DATE}/input/"):
                        blob.delete()
        finally:
            shutdown_pool()
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
        return report(args, figures, input_bytes, reference=modes[-1] if "in-process" not in modes else "in-process")


def matrix_configurations() -> list[list[str]]:
    """The configurations of ``--matrix``, as command-line arguments of one single-configuration run."""
    configs = [["--step-seconds", str(step), "--fields", str(fields), "--lead-time", "216", "--modes", "writers,in-process"]
               for step in (4.0, 1.0) for fields in (102, 120)]
    cores = len(os.sched_getaffinity(0))
    # a true 1 s step (H100-class), 120 fields: every writer the cores allow against the in-process writer
    configs.append(["--stand-in", "replay", "--step-seconds", "1", "--fields", "120", "--lead-time", "216",
                    "--modes", "writers,in-process", "--grib-writers", str(cores)])
    return configs


def run_matrix(args, work: Path) -> list[dict]:
    """Each configuration in a process (and with an emulator) of its own.

    One process for the whole matrix let the in-memory emulator and the bench grow with every
    configuration until the kernel killed one (seen: 20 GB after two configurations on 24 GB).
    A fresh process per configuration also starts each one from the same state.
    """
    import subprocess

    results = []
    for i, config in enumerate(matrix_configurations()):
        out = work / f"matrix-{i}.json"
        common = ["--upload-threads", str(args.upload_threads), "--torch-threads", str(args.torch_threads)]
        if args.grib_writers is not None and "--grib-writers" not in config:
            common += ["--grib-writers", str(args.grib_writers)]
        if args.stock_emulator:
            common.append("--stock-emulator")
        command = [sys.executable, str(Path(__file__).resolve()), *config, *common, "--json", str(out)]
        phase(f"matrix {i + 1}/{len(matrix_configurations())}: {' '.join(config)}")
        subprocess.run(command, check=True)
        results.append(json.loads(out.read_text()))
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_logging()
    import torch

    torch.set_num_threads(args.torch_threads)
    work = REPO / ".bench" / f"member_cycle-{os.getpid()}"
    os.makedirs(work, exist_ok=True)
    bench = Bench(args, work)
    results = []
    try:
        if args.matrix:
            results += run_matrix(args, work)
            print()
            print("summary (wall/model; GRIB messages/s; peak memory GB; peak disk GB):")
            for r in results:
                c = r["config"]
                for mode, f in r["modes"].items():
                    name = f"writers x{c['grib_writers']}" if mode == "writers" else mode
                    stand_in = "GPU-like replay" if c.get("stand_in") == "replay" else "CPU stand-in"
                    print(f"  {c['lead_time']} h, {c['step_seconds']:g} s step ({stand_in}), {c['fields']} fields, {name:<12}: "
                          f"{f['ratio']:.3f}; {f['msg_per_s']:.1f} msg/s; {f['peak_memory_bytes'] / 1e9:.2f} GB; "
                          f"{f['peak_disk_bytes'] / 1e9:.2f} GB")
        else:
            bench.start()
            modes = [m.strip() for m in args.modes.split(",") if m.strip()]
            unknown = set(modes) - {"writers", "in-process", "serial"}
            if unknown:
                raise SystemExit(f"unknown modes: {', '.join(sorted(unknown))}")
            results.append(bench.configuration(args.step_seconds, args.fields, args.lead_time, modes))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results if args.matrix else results[0], f, indent=2)
            print(f"figures written to {args.json}")
        return 0
    finally:
        bench.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            try:
                os.rmdir(REPO / ".bench")
            except OSError:
                pass
        phase("cleaned up" if not args.keep else f"kept {work}")


if __name__ == "__main__":
    sys.exit(main())
