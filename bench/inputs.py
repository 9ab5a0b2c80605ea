#!/usr/bin/env python
"""Input states from a local open-data mirror at 0.25 deg to N320: aifs.inputs against the original script's way.

    .venv/bin/python bench/inputs.py [--members 2] [--workers 1] [--json OUT]     # ~2 min on 2 cores

Real parts: the mirror's GRIB2 files and index files (aifs.testing.opendata_mirror, written by a
separate process) served over HTTP with byte ranges, the real ecmwf-opendata client, real MIR.
The checkpoint is the tiny N320 model with the benchmark's AIFS-ENS v1-like variable lists
(tiny_model.BENCH_PROGNOSTIC + BENCH_CONSTANT: 12 surface and soil fields, 6 parameters on 13
pressure levels, 4 constants = 94 input variables), two time levels.

- aifs.inputs: the library's own Builder (plan, index read once a file, byte ranges for the
  needed fields only, constants once per date, MIR to N320, float32), then the pickle written to
  local disk (the upload is the worker's verified upload, measured in the worker's benchmark).
  Reported per member: wall and CPU seconds (process CPU, every thread), fields/s, bytes fetched.
  MIR's first use computes the 0.25 deg -> N320 weights into an empty cache: timed separately.
- original: the original script's request pattern with the same client against the same mirror,
  fetch only: one ``retrieve`` per parameter (a pressure-level parameter with all its levels),
  per member and time level, and every constant fetched again for every member. The client reads
  the file's index for every ``retrieve``: those bytes are counted too.

Peak memory is this process's maximum RSS (the mirror is written by another process).
The CPU breakdown per member (thread CPU of the member's own stages: fetch, header check, MIR, store, pickle,
crc32c; the rest of the process's CPU, incl. the in-process mirror, as "other") and, inside MIR's share, a
per-field split (``mir``: eccodes' decode of the input, MIR without output, ArrayOutput, the Regridder) come last.
"""

from __future__ import annotations

# pyproj before eccodes: both bundle libproj; the other order crashes the interpreter at exit.
import pyproj  # noqa: F401  isort: skip

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "plugins"))

DATE = "20250601_0000"


def _served_bytes(server, since: int) -> tuple[int, int, int]:
    """(data bytes, index bytes, GET requests) the mirror served since request number ``since``."""
    requests = [r for r in server.requests[since:] if r.method == "GET"]
    data = sum(r.bytes_sent for r in requests if r.path.endswith(".grib2"))
    index = sum(r.bytes_sent for r in requests if r.path.endswith(".index"))
    return data, index, len(requests)


def bench_library(spec, plan, server, members, workers, scratch) -> dict:
    import concurrent.futures as cf

    from aifs.inputs.build import Builder
    from aifs.inputs.fetch import OpenData
    from aifs.inputs.regrid import Regridder
    from aifs.inputs.spec import check_grid_points
    from aifs.inputs.writer import write_pickle

    check_grid_points(spec)
    opendata = OpenData(server.url)
    builder = Builder(spec, plan, opendata, Regridder(spec.grid, spec.grid_points), scratch)

    # MIR's weights for 0.25 deg -> N320 into an empty cache, and the constants: once per date
    mark = len(server.requests)
    wall, cpu = time.perf_counter(), time.process_time()
    builder.constants()
    first = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    constant_bytes = _served_bytes(server, mark)[0]

    per_member = []

    def one(member):
        from aifs.worker.storage import crc32c_of_file

        t = time.perf_counter()
        state, own = builder.member_state(member)
        with own.timings.stage("pickle"):
            path = write_pickle(state, scratch, member)
        with own.timings.stage("crc32c"):  # what the verified upload computes
            crc32c_of_file(path)
        size = os.path.getsize(path)
        os.remove(path)
        return member, time.perf_counter() - t, own, size, len(state["fields"])

    mark = len(server.requests)
    wall, cpu = time.perf_counter(), time.process_time()
    with cf.ThreadPoolExecutor(workers) as pool:
        for member, seconds, own, size, nvars in pool.map(one, members):
            per_member.append({"member": member, "wall_s": round(seconds, 2), "fetch_s": round(own.timings.fetch, 2),
                               "interpolate_s": round(own.timings.decode_interpolate, 2),
                               "cpu_s": {k: round(v, 3) for k, v in own.timings.cpu.items()},
                               "bytes_fetched": sum(s["bytes"] for s in own.sources), "pickle_bytes": size})
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    data, index, gets = _served_bytes(server, mark)
    fields = len(spec.variables) * spec.time_levels
    n = len(members)
    stages = {k: sum(m["cpu_s"][k] for m in per_member) / n for k in per_member[0]["cpu_s"]}
    # the rest of the process's CPU: the in-process mirror serving the bytes, the client's other threads, Python
    stages["other (incl. the in-process mirror server)"] = cpu / n - sum(stages.values())
    return {
        "variables": len(spec.variables), "time_levels": spec.time_levels, "fields_per_member": fields,
        "first_use_constants_and_mir_weights": {k: round(v, 2) for k, v in first.items()},
        "constant_bytes_once_per_date": constant_bytes,
        "members": per_member, "workers": workers,
        "wall_s_per_member": round(wall / n, 2), "cpu_s_per_member": round(cpu / n, 2),
        "cpu_s_per_member_per_core": round(cpu / n / min(workers, os.cpu_count() or 1), 2),
        "cpu_breakdown_s_per_member": {k: round(v, 2) for k, v in stages.items()},
        # members after the first, their own thread's CPU (every stage): the first also computes MIR's weights for
        # fields whose matrix differs from the constants' (a second cache entry, ~2 s once per cache)
        "cpu_s_per_member_after_the_first": round(sum(sum(m["cpu_s"].values()) for m in per_member[1:])
                                                  / max(1, n - 1), 2) if n > 1 else None,
        "fields_per_s": round(fields * n / wall, 1),
        "bytes_fetched_per_member": (data + index) // n, "requests_per_member": gets / n,
        "index_fetches_total": opendata.index.fetches,
    }


def bench_mir(root: str, grid: str, points: int, sample: int = 20) -> dict:
    """Inside MIR's share, per field (thread CPU ms, one ENS file's messages): what MIR's own decode of the CCSDS
    input costs (eccodes), MIR with no output (decode + interpolation), ArrayOutput (what the first version read),
    and aifs.inputs' Regridder (IEEE 64-bit GRIB output read with numpy)."""
    import glob
    import json as _json

    import eccodes
    import mir
    import numpy as np

    from aifs.inputs.decode import Message
    from aifs.inputs.regrid import Regridder

    path = sorted(glob.glob(os.path.join(root, "**", "*-enfo-ef.grib2"), recursive=True))[-1]
    with open(path[: -len(".grib2")] + ".index") as f:
        lines = [_json.loads(line) for line in f if line.strip()]
    with open(path, "rb") as f:
        data = f.read()
    messages = [data[x["_offset"]: x["_offset"] + x["_length"]] for x in lines if x.get("number") == "1"][:sample]
    job, regrid = mir.Job(), Regridder(grid, points)
    job.set("grid", grid)

    def decode(m):
        h = eccodes.codes_new_from_message(m)
        eccodes.codes_get_values(h)
        eccodes.codes_release(h)

    def array_output(m):
        out = mir.ArrayOutput()
        job.execute(mir.GribMemoryInput(m), out)
        np.asarray(out.values(), "f8")

    ways = {"eccodes_decode_input": decode, "mir_no_output": lambda m: job.execute(mir.GribMemoryInput(m), mir.EmptyOutput()),
            "mir_array_output": array_output, "regridder": lambda m: regrid(Message("", None, m))}
    figures = {}
    for name, way in ways.items():
        way(messages[0])  # weights in memory
        started = time.thread_time()
        for m in messages:
            way(m)
        figures[name] = round((time.thread_time() - started) / len(messages) * 1000, 1)
    return {"ms_cpu_per_field": figures, "fields": len(messages)}


def bench_original(spec, plan, server, members, scratch) -> dict:
    """The original script's request pattern: one retrieve per parameter, constants again for every member."""
    from aifs.inputs.fetch import _quiet_client_class
    from aifs.inputs.plan import index_identity

    client = _quiet_client_class()(source=server.url)  # ecmwf-opendata's Client (index read on every retrieve), no progress bars
    mark = len(server.requests)
    wall = time.perf_counter()
    target = os.path.join(scratch, "original.grib2")
    retrieves = 0
    for member in members:
        for cycle in plan.cycles:
            for group in plan.member_groups(member)[plan.cycles.index(cycle)]:
                for param in group.params:
                    request = group.client_request() | {"param": [param]}
                    client.retrieve(target=target, **request)
                    retrieves += 1
        for group in plan.constant_groups():  # constants re-fetched for each member
            for param in group.params:
                c = group.file.cycle
                client.retrieve(target=target, date=f"{c:%Y%m%d}", time=c.hour, stream=group.file.stream, step=0,
                                param=param, levtype=group.levtype, **index_identity(None))
                retrieves += 1
    wall = time.perf_counter() - wall
    data, index, gets = _served_bytes(server, mark)
    n = len(members)
    return {"retrieves_per_member": retrieves / n, "requests_per_member": gets / n,
            "bytes_fetched_per_member": (data + index) // n, "index_bytes_per_member": index // n,
            "fetch_wall_s_per_member": round(wall / n, 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--members", type=int, default=2, help="members to build (default %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="members built at once (default %(default)s: CPU per member)")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()

    work = tempfile.mkdtemp(prefix="aifs-bench-inputs-", dir=os.environ.get("TMPDIR"))
    os.environ["MIR_CACHE_PATH"] = os.path.join(work, "mir-cache")  # empty: the first use computes the weights
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        from aifs.inputs.plan import date_plan
        from aifs.inputs.rules import sources_of
        from aifs.inputs.spec import read_input_spec
        from aifs.testing import tiny_model
        from aifs.testing.opendata_mirror import serve

        ckpt = os.path.join(work, "bench-n320.ckpt")
        tiny_model.build_checkpoint(ckpt, grid="N320", prognostic=tiny_model.BENCH_PROGNOSTIC,
                                    constant=tiny_model.BENCH_CONSTANT, diagnostic=tiny_model.BENCH_DIAGNOSTIC)
        members = list(range(1, args.members + 1))
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "aifs.testing", "opendata-mirror", "--root", os.path.join(work, "od"),
                        "--date", DATE, "--checkpoint", ckpt, "--members", f"1-{args.members}"],
                       check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=os.path.join(HERE, "..", "plugins")))
        print(f"mirror written in {time.perf_counter() - t:.1f} s", flush=True)
        spec = read_input_spec(ckpt)
        from aifs.layout import parse_date

        plan = date_plan(parse_date(DATE), spec.time_levels, spec.timestep, sources_of(spec.variables))
        server = serve(os.path.join(work, "od"))
        scratch = os.path.join(work, "scratch")
        os.makedirs(scratch)
        try:
            ours = bench_library(spec, plan, server, members, args.workers, scratch)
            ours["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
            original = bench_original(spec, plan, server, members, scratch)
            ours["mir"] = bench_mir(os.path.join(work, "od"), spec.grid, spec.grid_points)
        finally:
            server.stop()
        figures = {"aifs.inputs": ours, "original_pattern": original, "cores": os.cpu_count(),
                   "bytes_ratio_original_over_ours": round(original["bytes_fetched_per_member"] / ours["bytes_fetched_per_member"], 2)}
        print(json.dumps(figures, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(figures, f, indent=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
