"""Where a date's report is, in the forms a person uses, and the products run summary the last task logs.

The report (``report.html`` in ``{date}/products/``) links the maps, plumes and the run's costs by
relative names, so it renders wherever the products folder is served whole: opened from the
bucket through the authenticated browser URL, or downloaded. The console URL shows the object's
details (and a download button) to anyone with read access to the bucket.
"""

from __future__ import annotations

from typing import Any, Mapping
from urllib.parse import quote

#: XCom key under which check_products leaves each target's report addresses (the run alert reads it).
REPORT_KEY = "report"


def split_gs_uri(uri: str) -> tuple[str, str]:
    """``gs://bucket/path/to/object`` -> (bucket, object name)."""
    if not isinstance(uri, str) or not uri.startswith("gs://") or "/" not in uri[5:]:
        raise ValueError(f"not a gs:// object address: {uri!r}")
    bucket, name = uri[5:].split("/", 1)
    if not bucket or not name:
        raise ValueError(f"not a gs:// object address: {uri!r}")
    return bucket, name


def report_addresses(bucket: str, name: str) -> dict[str, str]:
    """The report's gs:// address, its Cloud console page, and the browser URL that renders it."""
    return {
        "gs": f"gs://{bucket}/{name}",
        "console": f"https://console.cloud.google.com/storage/browser/_details/{quote(bucket)}/{quote(name)}",
        "browser": f"https://storage.cloud.google.com/{quote(bucket)}/{quote(name)}",
    }


def describe_report(addresses: Mapping[str, str]) -> str:
    return f"report {addresses['gs']}\n  console: {addresses['console']}\n  open in a browser: {addresses['browser']}"


def format_products_summary(target: Mapping[str, Any], outcome: Mapping[str, Any]) -> str:
    """The run summary of one date's products: members used, partial or not, submission, report.

    ``outcome``: what check_products found (keys ``members_used``, ``members_selected``, ``partial``,
    ``submitted``, ``submission_note``, ``objects``, ``report``).
    """
    used, selected = outcome.get("members_used"), outcome.get("members_selected")
    lines = [f"AIFS-ENS products for {target['date']} (gs://{target['bucket']}/{target['date']}/products/)"]
    members = f"members: {used if used is not None else '?'} of {selected if selected is not None else '?'} used"
    if outcome.get("partial"):
        members += " (PARTIAL ENSEMBLE: the products say so)"
    lines.append(members)
    left_out = outcome.get("members_left_out") or {}
    for member, why in sorted(left_out.items(), key=lambda kv: str(kv[0]))[:10]:
        lines.append(f"  member {int(member):03d} left out: {why}")
    lines.append(f"objects: {outcome.get('objects', '?')} listed, all in the bucket (crc32c {outcome.get('checksums', '?')})")
    marker = "the date is marked submitted" if outcome.get("submitted") else "the date is not marked submitted"
    lines.append(f"submission: {outcome.get('submission_note') or '(see make_products)'}; {marker}")
    if outcome.get("report"):
        lines.append(describe_report(outcome["report"]))
    return "\n".join(lines)
