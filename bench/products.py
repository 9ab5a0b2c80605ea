"""Benchmark of the products step: N members of N320 forecasts -> checked AI Weather Quest files, submitted.

    .venv/bin/python bench/products.py [--members 50] [--cores 2] [--workers 2]      (make bench-products)

Target (issue 15): 50 members in <= 5 min and <= 4 GB on 2 cores.

What it does:
1. a GCS emulator with its objects on disk in ``.bench/products/gcs`` (bench/_fast_emulator.py, the stock
   emulator with linear-cost resumable uploads); the synthetic members are written there ONCE and
   reused by later runs (``written.json`` says which); only missing members are written;
2. each member as the worker names and manifests it (aifs.testing.products_data): all 11 windows
   to 792 h, on N320, with only the fields the products read: ``2t``, ``msl`` and ``tp`` at every
   step of the six windows holding steps 432-768, and ``2t`` alone in the five windows the products
   never open. A real window carries ~100 fields a step (~1.4 GB); the products read each of their
   six windows to its end (aifs.products.gribread: no index), so real members move ~36 times the
   bytes read here: this bench measures the products' own work (decode, sums, MIR, probabilities,
   files, pictures, submission), not a bucket's throughput;
3. a 20-year climatology for the date (aifs.testing.climatology) and the local stand-in for the
   competition's endpoints (tests/stand_ins: ECBOX SDK stand-in + server), as in the tests;
4. ``python -m aifs.products --submit --force`` in a process of its own, pinned to ``--cores`` CPUs;
   time from its start to its exit (files made, checked by the package, submitted and confirmed)
   and the peak RSS of its process tree, sampled every 0.2 s. The emulator is not counted (it
   stands in for GCS); on a 2-CPU machine it shares the CPUs with the measured process.

Prints the figures against the target; with fewer than 50 members it also prints a linear
extrapolation of the member phase (reading + regridding grows with the members; files, pictures and
submission do not). Figures need a quiet machine: on a shared one they are upper bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugins"))
sys.path.insert(0, str(REPO / "tests" / "stand_ins"))

DATE = "20251127_0000"  # a Thursday, 00 UTC
TEAM, MODEL = "ECMWFtest", "benchmodel"  # the package's test team: no submission-window check
TOKEN = "bench-token"
BUCKET = "bench-products"
GRID = "N320"
TARGET_S, TARGET_GB, TARGET_MEMBERS = 300.0, 4.0, 50


def phase(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class TreeRss:
    """Peak summed RSS of a process and its children, sampled in a thread."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.proc, self.interval, self.peak = psutil.Process(pid), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            try:
                for p in [self.proc, *self.proc.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                return
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def synthetic_values():
    """values(short, step, member) on N320: smooth zonal fields, members spread around the climatology's middle."""
    from aifs.testing import products_data

    lats, lons = products_data.grid_latlons(GRID)
    coslat, wave = np.cos(np.radians(lats)), np.sin(np.radians(lons) * 2) * np.cos(np.radians(lats))
    t2m = 250.0 + 50.0 * coslat + 2.0 * wave
    msl = 101325.0 - 800.0 * np.cos(np.radians(3 * lats)) + 300.0 * wave
    rate = (0.004 + 0.03 * np.exp(-(lats / 12.0) ** 2)) / 168.0  # m per hour: the climatology's weekly middle

    def values(short: str, step: int, member: int) -> np.ndarray:
        spread = np.sin(member * 1.7)  # members in [-1, 1]: spread across the quintiles
        if short == "2t":
            return t2m + 2.5 * spread + 0.5 * np.sin(step / 24.0)
        if short == "msl":
            return msl + 400.0 * spread
        return rate * (1.0 + 0.5 * spread) * step  # accumulated from the start

    return values


def write_members(bucket, members: list[int], stamp: Path) -> None:
    from aifs.testing import products_data

    written = set(json.loads(stamp.read_text())["members"]) if stamp.exists() else set()
    missing = [m for m in members if m not in written]
    if not missing:
        phase(f"members {members[0]}-{members[-1]} already in the emulator (written once, {stamp})")
        return
    values = synthetic_values()
    started = time.perf_counter()
    for i, m in enumerate(missing, 1):
        products_data.write_member(bucket, DATE, m, values, grid=GRID, wall_s=450.0 + 3 * (m % 7))
        written.add(m)
        stamp.write_text(json.dumps({"date": DATE, "grid": GRID, "members": sorted(written)}))
        eta = (time.perf_counter() - started) / i * (len(missing) - i)
        phase(f"wrote member {m:03d} ({i}/{len(missing)}, ETA {eta:.0f} s)")


def pin(cores: int):
    available = sorted(os.sched_getaffinity(0))
    if cores >= len(available):
        return None, available
    chosen = set(available[:cores])
    return (lambda: os.sched_setaffinity(0, chosen)), available


def member_phase_seconds(log_text: str) -> tuple[float, int] | None:
    """(seconds from the run's start line to its last member line, members) from the products log."""
    stamps = []
    for line in log_text.splitlines():
        m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*\[PRODUCTS\] (\S+: \d+ member\(s\)|member \d+ read)", line)
        if m:
            stamps.append((datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f"), "read" in m.group(2)))
    reads = [t for t, is_read in stamps if is_read]
    if not stamps or not reads:
        return None
    return (reads[-1] - stamps[0][0]).total_seconds(), len(reads)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--members", type=int, default=TARGET_MEMBERS)
    p.add_argument("--cores", type=int, default=2, help="CPUs the products process may use")
    p.add_argument("--workers", type=int, default=2, help="members read at once (python -m aifs.products --workers)")
    p.add_argument("--work", default=str(REPO / ".bench" / "products"))
    args = p.parse_args(argv)
    if not 1 <= args.members <= 50:
        p.error("--members must be 1..50")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    members = list(range(1, args.members + 1))

    import aifs.testing.emulator as emulator_module
    from aiwq_server import AIWQServer

    from aifs import layout
    from aifs.testing import climatology

    # the stock emulator's resumable uploads are O(size^2): see bench/_fast_emulator.py
    emulator_module._executable = lambda: [sys.executable, str(REPO / "bench" / "_fast_emulator.py")]
    phase(f"GCS emulator, objects on disk in {work / 'gcs'}")
    emulator = emulator_module.StorageEmulator(data_dir=str(work / "gcs"), log_path=str(work / "emulator.log")).start()
    server = None
    try:
        os.environ["STORAGE_EMULATOR_HOST"] = emulator.url
        client = emulator_module.anonymous_client(emulator.url)
        bucket = client.lookup_bucket(BUCKET) or client.create_bucket(BUCKET)
        write_members(bucket, members, work / "written.json")
        clim = work / "climatology"
        if not clim.exists():
            climatology.write(str(clim), DATE)
        marker = bucket.get_blob(layout.submission_marker_object(DATE))
        if marker is not None:
            marker.delete()  # each run submits
        server = AIWQServer(TOKEN, registered=[(TEAM, MODEL)]).start()
        mir_cache = work / "mir-cache"
        cold = not mir_cache.exists() or not any(mir_cache.rglob("*"))
        mir_cache.mkdir(exist_ok=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "plugins"), str(REPO / "tests" / "stand_ins")]),
                   AIWQ_STANDIN_URL=server.url, AIFS_AIWQ_PASSWORD=TOKEN, MIR_CACHE_PATH=str(mir_cache))
        cmd = [sys.executable, "-m", "aifs.products", "--date", DATE, "--bucket", BUCKET, "--members", f"1-{args.members}",
               "--climatology", str(clim), "--team", TEAM, "--model", MODEL, "--submit", "--force",
               "--workers", str(args.workers)]
        pinning, cpus = pin(args.cores)
        load = os.getloadavg()[0]
        phase(f"python -m aifs.products on {args.members} members ({'cold' if cold else 'warm'} MIR cache; "
              f"{min(args.cores, len(cpus))} of {len(cpus)} CPUs; load average {load:.1f})")
        log_path = work / "products.log"
        with open(log_path, "w") as log:
            started = time.perf_counter()
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=log, text=True, preexec_fn=pinning)
            with TreeRss(proc.pid) as rss:
                out, _ = proc.communicate()
            wall = time.perf_counter() - started
        log_text = log_path.read_text()
        summary = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        if proc.returncode != 0:
            print(log_text[-3000:])
            phase(f"products failed: exit {proc.returncode} {summary.get('error', '')}")
            return 1
        sent = sorted(path.rsplit("/", 1)[1] for path, _ in server.uploads(prefix="/forecast_submissions/", suffix=".nc"))
        if summary.get("submission") != "submitted 6 files" or len(sent) != 6:
            phase(f"submission not complete: {summary.get('submission')!r}, server received {sent}")
            return 1
    finally:
        if server is not None:
            server.stop()
        emulator.stop()

    peak_gb = rss.peak / 1e9
    windows_read = sum(1 for w in layout.windows(layout.DEFAULT_LEAD_TIME_HOURS) if any(w.contains(s) for s in range(432, 769, 6)))
    print()
    print(f"products benchmark: {args.members} member(s) of {GRID}, {windows_read} windows read a member "
          f"(2t/msl/tp only), --workers {args.workers}, {min(args.cores, len(cpus))} CPU(s), load average {load:.1f} at start")
    print(f"  time to checked, submitted files: {wall:7.1f} s   (target for {TARGET_MEMBERS} members: <= {TARGET_S:.0f} s)")
    print(f"  peak memory (process tree RSS):   {peak_gb:7.2f} GB  (target: <= {TARGET_GB:.0f} GB)")
    reads = summary.get("reads") or {}
    if reads:  # aifs.products' own count; products_data writes no GRIB indexes, so every window is streamed here
        print(f"  bytes read from the bucket:       {reads['bytes_read'] / 1e9:7.2f} GB of the windows' "
              f"{reads['window_bytes'] / 1e9:.2f} GB ({reads['windows_by_index']} windows by index, "
              f"{reads['windows_streamed']} streamed)")
    phase_s = member_phase_seconds(log_text)
    if phase_s and args.members < TARGET_MEMBERS:
        read_s, n = phase_s
        rest = wall - read_s
        estimate = read_s / n * TARGET_MEMBERS + rest
        print(f"  member phase {read_s:.1f} s for {n} ({read_s / n:.2f} s a member), the rest {rest:.1f} s: "
              f"~{estimate:.0f} s for {TARGET_MEMBERS} members by linear extrapolation (not a measurement)")
    print(f"  submission: {len(sent)} files received by the local stand-in ({', '.join(sent[:2])}, ...)")
    print(f"  MIR cache: {'cold (weights computed in this run)' if cold else 'warm'}; log {log_path}")
    print("  figures from a shared machine are upper bounds: rerun on a quiet one for the issue's numbers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
