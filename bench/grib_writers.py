#!/usr/bin/env python
"""GRIB messages/s against the number of writer processes, with the cores left to the writers.

    .venv/bin/python bench/grib_writers.py [--fields 120] [--lead-time 144] [--writers 0,1,2] [--json OUT]

What ``bench/member_cycle.py`` cannot show on a small CPU machine: whether the writer pool's
throughput grows with the writers it is given. In the member benchmark the CPU stand-in model
holds a core and the emulated bucket's server runs on the same cores, so on 2 cores a second
writer has nowhere to run. Here the model is the GPU-like replay (``member_cycle.ReplayForecast``:
the real runner's first steps, captured once, replayed with no core held) stepping as fast as the
writers take steps, and the bucket is local disk: each window, once complete, has its size and
crc32c read from the finished file (what the uploader verifies against the bucket) and is
deleted. Everything between is the worker's own: ``grib_writers.make_grib_writer`` (0 = the
single writer thread in the model's process), the accumulation, windows, the shared-memory ring,
anemoi-inference's GRIB encoder in each writer, appends in step order.

Per writer count: wall from the first step handed over to the last window complete, messages/s,
speed-up against 1 writer and against the in-process writer (all measured in this run), CPU
seconds of the writer processes and of this process, and whether every window has the same size
and crc32c as the in-process writer's. Nothing is asserted on time.
"""

from __future__ import annotations

# pyproj before eccodes: both bundle libproj; the other order crashes the interpreter at exit.
import pyproj  # noqa: F401  isort: skip

import argparse
import concurrent.futures as cf
import json
import os
import pickle
import shutil
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugins"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil  # noqa: E402
from member_cycle import (  # noqa: E402
    DATE, MEMBER, ReplayForecast, configure_logging, cpu_seconds, phase, variable_sets)


class _LocalWindow:
    """One window: completed by the writer when its last step is in the file."""

    def __init__(self, uploader: "LocalWindows", local: str, window):
        self.uploader, self.local, self.window = uploader, local, window

    def complete(self, messages: int) -> None:
        self.uploader.completed(self, messages)


class LocalWindows:
    """The uploader's interface over local disk: the finished file's size and crc32c, then deleted.

    As ``uploader.WindowUploader``, at most ``max_on_disk`` windows are open at once (opening waits
    for a slot), so the bound on disk and the back-pressure on the model are the worker's own.
    """

    def __init__(self, max_on_disk: int = 2):
        self._slots = threading.Semaphore(max_on_disk)
        self._verify = cf.ThreadPoolExecutor(max_workers=max_on_disk, thread_name_prefix="verify")
        self._futures: list[cf.Future] = []
        self.done_at = 0.0

    def open_window(self, local: str, name: str, window, interrupt=None) -> _LocalWindow:
        while not self._slots.acquire(timeout=0.5):
            self.raise_if_failed()
            if interrupt is not None:
                interrupt()
        try:
            os.remove(local)
        except FileNotFoundError:
            pass
        return _LocalWindow(self, local, window)

    def completed(self, w: _LocalWindow, messages: int) -> None:
        self._futures.append(self._verify.submit(self._finish, w, messages))

    def _finish(self, w: _LocalWindow, messages: int) -> tuple:
        import google_crc32c

        try:
            crc = google_crc32c.Checksum()
            with open(w.local, "rb") as f:
                while chunk := f.read(32 << 20):
                    crc.update(chunk)
            size = os.path.getsize(w.local)
            os.remove(w.local)
            self.done_at = max(self.done_at, time.perf_counter())
            return (w.window.start, w.window.end), size, crc.hexdigest().decode(), messages
        finally:
            self._slots.release()

    def raise_if_failed(self) -> None:
        for f in self._futures:
            if f.done() and f.exception() is not None:
                raise f.exception()

    def wait(self) -> list[tuple]:
        return sorted(f.result() for f in self._futures)


def run_writers(model, writers: int, lead_time: int, output_dir: str, input_state) -> dict:
    """One member's steps through ``writers`` writer processes (0: the in-process thread)."""
    from aifs.worker.grib_writers import get_pool, make_grib_writer, shutdown_pool

    pool_procs = []
    if writers:
        pool = get_pool(writers, str(model.runner.checkpoint.path))  # started once per worker process: untimed
        deadline = time.monotonic() + 300
        while pool.ready < pool.n and time.monotonic() < deadline:
            time.sleep(0.1)
        if pool.ready < pool.n:
            raise SystemExit(f"{pool.n - pool.ready} writer processes not ready after 300 s")
        pool_procs = [psutil.Process(p.pid) for p in pool.procs]
    me = psutil.Process()
    uploads = LocalWindows()
    cpu_before = cpu_seconds(pool_procs), cpu_seconds([me])
    writer = make_grib_writer(writers, model=model, date=DATE, member=MEMBER, lead_time=lead_time,
                              output_dir=output_dir, uploader=uploads)
    started = time.perf_counter()
    try:
        for state in model.forecast(input_state, lead_time, 0):
            writer.put(state)
        writer.finish()
        objects = uploads.wait()
    except BaseException:
        writer.abort()
        raise
    wall = uploads.done_at - started
    cpu_after = cpu_seconds(pool_procs), cpu_seconds([me])
    if writers:
        shutdown_pool()
    messages = sum(m for *_, m in objects)
    return {"writers": writers, "wall_s": wall, "messages": messages, "msg_per_s": messages / wall,
            "encode_s": writer.write_seconds, "writer_cpu_s": cpu_after[0] - cpu_before[0],
            "model_process_cpu_s": cpu_after[1] - cpu_before[1],
            "objects": [[list(window), size, crc] for window, size, crc, _ in objects]}


def parse_args(argv=None):
    cores = len(os.sched_getaffinity(0))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--fields", type=int, default=120, choices=[102, 120], help="output fields a step (default %(default)s)")
    p.add_argument("--lead-time", type=int, default=144, help="hours, 72 h a window (default %(default)s)")
    p.add_argument("--writers", default=",".join(str(n) for n in range(0, cores + 1)),
                   help="comma-separated writer counts, 0 = the in-process writer (default: 0 to the %d cores)" % cores)
    p.add_argument("--json", metavar="OUT", help="also write the figures as JSON to OUT")
    args = p.parse_args(argv)
    args.writers = [int(n) for n in args.writers.split(",") if n.strip()]
    if any(n < 0 for n in args.writers) or not args.writers:
        p.error("--writers: whole numbers, 0 or more")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_logging()
    import torch

    torch.set_num_threads(1)
    from aifs.layout import parse_date
    from aifs.testing.synthetic import make_input_state, synthetic_input_seed
    from aifs.testing.tiny_model import build_checkpoint
    from aifs.worker.model import Model

    work = REPO / ".bench" / f"grib_writers-{os.getpid()}"
    os.makedirs(work, exist_ok=True)
    try:
        phase(f"setup: tiny N320 checkpoint, {args.fields} fields a step; the runner's first steps captured for replay")
        prognostic, constant, diagnostic = variable_sets(args.fields)
        checkpoint = build_checkpoint(str(work / "tiny-n320.ckpt"), grid="N320", prognostic=prognostic,
                                      constant=constant, diagnostic=diagnostic)
        when = parse_date(DATE)
        input_state = make_input_state(checkpoint, when, seed=synthetic_input_seed(when, MEMBER))
        input_bytes = len(pickle.dumps(input_state, protocol=pickle.HIGHEST_PROTOCOL))
        model = Model(checkpoint, "cpu", None, None)
        ReplayForecast(model, input_state, step_seconds=0.0)
        results = []
        for i, writers in enumerate(args.writers):
            name = "in-process" if writers == 0 else f"{writers} writer{'s' if writers > 1 else ''}"
            phase(f"{name}: one member to +{args.lead_time} h, steps handed over as fast as they are taken")
            output_dir = work / f"out-{i}"  # anemoi-inference refuses a GRIB path used before in the process
            output_dir.mkdir()
            r = run_writers(model, writers, args.lead_time, str(output_dir), input_state)
            results.append(r)
            phase(f"{name}: {r['messages']} messages in {r['wall_s']:.1f} s = {r['msg_per_s']:.1f} msg/s")
        report(args, results, input_bytes)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"config": {"grid": "N320", "fields": args.fields, "lead_time": args.lead_time,
                                      "cpus": len(os.sched_getaffinity(0))}, "runs": results}, f, indent=2)
            print(f"figures written to {args.json}")
        return 0
    finally:
        from aifs.worker.grib_writers import shutdown_pool

        shutdown_pool()
        shutil.rmtree(work, ignore_errors=True)
        try:
            os.rmdir(REPO / ".bench")
        except OSError:
            pass


def report(args, results: list[dict], input_bytes: int) -> None:
    by_writers = {r["writers"]: r for r in results}
    one, inproc = by_writers.get(1), by_writers.get(0)
    reference = inproc or results[0]
    header = ["writers", "wall s", "messages", "msg/s", "x 1 writer", "x in-process", "encode s (summed)",
              "writer CPU s", "model process CPU s", "same bytes"]
    rows = []
    for r in results:
        rows.append(["in-process" if r["writers"] == 0 else str(r["writers"]), f"{r['wall_s']:.1f}", str(r["messages"]),
                     f"{r['msg_per_s']:.1f}", f"{r['msg_per_s'] / one['msg_per_s']:.2f}" if one else "-",
                     f"{r['msg_per_s'] / inproc['msg_per_s']:.2f}" if inproc else "-", f"{r['encode_s']:.1f}",
                     f"{r['writer_cpu_s']:.1f}", f"{r['model_process_cpu_s']:.1f}",
                     "yes" if r["objects"] == reference["objects"] else "NO"])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print()
    print(f"GRIB writer pool, N320, {args.fields} fields a step, +{args.lead_time} h, {len(os.sched_getaffinity(0))} cores, "
          f"GPU-like replay (no core held by the model), local windows (size + crc32c, then deleted); "
          f"input {input_bytes / 1e6:.0f} MB")
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths)))
    print()


if __name__ == "__main__":
    sys.exit(main())
