"""``python -m aifs.products``: command-line flags, logging and exit codes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from aifs import layout
from aifs.exitcodes import ExitCode
from aifs.members import BadMembers, DEFAULT_MEMBERS, parse_members

DEFAULT_POINTS = "Nairobi:-1.29,36.82;Addis Ababa:9.03,38.74;Kampala:0.35,32.58;Dar es Salaam:-6.79,39.21"
DEFAULT_TEAM, DEFAULT_MODEL = "AIFS", "AIFSENS"


def parser() -> argparse.ArgumentParser:
    codes = "\n".join(f"  {c.value:3d}  {c.describe}" for c in ExitCode if c.value == 0 or c.value >= 30 or c.value == 2)
    p = argparse.ArgumentParser(prog="python -m aifs.products", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="AI Weather Quest probabilities, files, pictures and submission for one date.",
                                epilog="exit codes:\n" + codes)
    p.add_argument("--date", required=True, help="forecast date YYYYMMDD_HHMM")
    p.add_argument("--bucket", default=layout.DEFAULT_BUCKET)
    p.add_argument("--members", default=DEFAULT_MEMBERS, help="selection, e.g. 1-50 or 1,5,10")
    p.add_argument("--service-account", default=None, help="key file (default: the machine's credentials)")
    p.add_argument("--team", default=DEFAULT_TEAM)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--climatology", default=None, help="directory or http(s) prefix of climatology files "
                                                       "(default: the competition's retrieval with AIFS_AIWQ_PASSWORD)")
    p.add_argument("--min-members", type=int, default=1, help="fewer verified members: nothing is submitted (exit 31)")
    p.add_argument("--points", default=DEFAULT_POINTS, help='plume points "Name:lat,lon;..."')
    p.add_argument("--submit", action="store_true", help="submit to the AI Weather Quest (once per date)")
    p.add_argument("--force", action="store_true", help="remake products already made from the same members")
    p.add_argument("--cost-per-hour", type=float, default=float(os.environ.get("AIFS_PRODUCTS_COST_PER_HOUR", "0") or 0),
                   help="GPU host $/h for the run's cost picture (default $AIFS_PRODUCTS_COST_PER_HOUR)")
    p.add_argument("--workers", type=int, default=2, help="members read at once")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    from aifs.products import ensemble
    from aifs.products.errors import ProductsError

    try:
        layout.parse_date(args.date)
        members = parse_members(args.members)
        points = ensemble.parse_points(args.points)
        if args.min_members < 1:
            raise ValueError("--min-members must be at least 1")
        if args.service_account and not os.path.isfile(args.service_account):
            raise ValueError(f"service-account file {args.service_account} not found")
    except (layout.BadDate, BadMembers, ValueError) as exc:
        print(f"python -m aifs.products: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE

    from aifs.products.run import Options, make
    from aifs.worker.storage import make_client

    opts = Options(args.date, members, args.team, args.model, args.climatology, args.min_members, points,
                   args.submit, args.force, args.cost_per_hour, args.workers)
    bucket = make_client(args.service_account).bucket(args.bucket)
    try:
        summary, status = make(bucket, opts)
    except ProductsError as exc:
        logging.getLogger("aifs.products").error("[PRODUCTS] %s (exit %d: %s)", exc, exc.code, exc.code.describe)
        print(json.dumps({"date": args.date, "status": int(exc.code), "error": str(exc)}))
        return int(exc.code)
    summary["status"] = status
    logging.getLogger("aifs.products").info("[PRODUCTS] done: %d member(s)%s, report %s, %s", len(summary["members_used"]),
                                            " (partial)" if summary["partial"] else "", summary["report"], summary["submission"])
    print(json.dumps(summary))
    return status
