"""Build a tiny checkpoint or seed a bucket with synthetic inputs (worker environment).

    python -m aifs.testing checkpoint --grid O48 --out tiny.ckpt
    python -m aifs.testing seed --checkpoint tiny.ckpt --bucket B --date 20250601_0000 --members 1-3
    python -m aifs.testing climatology --date 20251127_0000 --out clim/
    python -m aifs.testing opendata-mirror --root DIR --date 20250601_0000 --checkpoint tiny.ckpt --members 1-3 [--serve]

``seed`` honours STORAGE_EMULATOR_HOST (and creates the bucket there when missing).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aifs.testing", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ck = sub.add_parser("checkpoint", help="write a tiny AIFS-ENS stand-in checkpoint")
    ck.add_argument("--grid", default="O48", help="builtin grid: O48 (tests), N320 (benchmark)")
    ck.add_argument("--out", required=True)
    ck.add_argument("--step-seconds", type=float, default=0.0, help="minimum time per model step")
    ck.add_argument("--many-fields", action="store_true", help="~100 output fields a step, like AIFS-ENS (v2: 120)")
    ck.add_argument(
        "--arch", choices=["v1", "v2"], default="v1",
        help="v1: the stand-in module (any environment); v2: AIFS-ENS 2.0's real anemoi-models 0.11 ensemble "
        "architecture, untrained, waves and snow cover included (the v2 environment only)",
    )
    sd = sub.add_parser("seed", help="upload synthetic input pickles for some members")
    sd.add_argument("--checkpoint", required=True)
    sd.add_argument("--bucket", required=True)
    sd.add_argument("--date", required=True)
    sd.add_argument("--members", default="1-3")
    cl = sub.add_parser("climatology", help="write a quintile climatology in the AI Weather Quest's file format")
    cl.add_argument("--date", required=True, help="forecast date YYYYMMDD_HHMM (files for its two periods)")
    cl.add_argument("--out", required=True, help="directory (give it to python -m aifs.products --climatology)")
    from aifs.testing.opendata_mirror import add_command as add_mirror_command

    add_mirror_command(sub)  # opendata-mirror: a local ECMWF open-data mirror (aifs.inputs tests, demo)
    args = parser.parse_args(argv)

    if args.command == "opendata-mirror":
        from aifs.testing.opendata_mirror import command

        return command(args)

    if args.command == "climatology":
        from aifs.testing import climatology

        for path in climatology.write(args.out, args.date):
            print(path)
        return 0

    if args.command == "checkpoint" and args.arch == "v2":
        from aifs.testing import tiny_model_v2

        variables = {}
        if args.many_fields:
            variables = dict(prognostic=tiny_model_v2.BENCH_PROGNOSTIC, constant=tiny_model_v2.BENCH_CONSTANT,
                             diagnostic=tiny_model_v2.BENCH_DIAGNOSTIC)
        tiny_model_v2.build_checkpoint(args.out, grid=args.grid, **variables)
        print(args.out)
        return 0

    if args.command == "checkpoint":
        from aifs.testing import tiny_model

        variables = {}
        if args.many_fields:
            variables = dict(
                prognostic=tiny_model.BENCH_PROGNOSTIC,
                constant=tiny_model.BENCH_CONSTANT,
                diagnostic=tiny_model.BENCH_DIAGNOSTIC,
            )
        tiny_model.build_checkpoint(args.out, grid=args.grid, step_seconds=args.step_seconds, **variables)
        print(args.out)
        return 0

    from aifs.members import parse_members
    from aifs.testing.synthetic import seed_bucket
    from aifs.worker.storage import make_client

    client = make_client(None)
    bucket = client.lookup_bucket(args.bucket) or client.create_bucket(args.bucket)
    with tempfile.TemporaryDirectory() as workdir:
        for name in seed_bucket(bucket, args.date, parse_members(args.members), args.checkpoint, workdir):
            print(f"gs://{args.bucket}/{name}")
    return 0


# Only `python -m aifs.testing` runs it. Airflow's plugin loader, should it ever see this file, imports it
# under the name "__main__" too (the module name is the file's stem), but with a __spec__ named
# "__main__": nothing here may run inside an Airflow process (argparse would read Airflow's argv).
if __name__ == "__main__" and getattr(__spec__, "name", None) == "aifs.testing.__main__":
    sys.exit(main())
