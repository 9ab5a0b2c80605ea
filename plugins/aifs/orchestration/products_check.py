"""Check a date's products by reading the bucket back: the manifest, every object it lists, the report.

``python -m aifs.products`` writes its manifest last, after every product object is uploaded: its
presence is the one signal that a date's products are complete (as a member's manifest is for its
forecasts). Here the Airflow side trusts nothing the step said about itself: each object the
manifest lists must be in the bucket with the crc32c the manifest recorded, checked against the
bucket's own crc32c (computed by GCS on upload), and the report page must be among them. What the
manifest says about the ensemble (members used of those selected, partial, submitted or why not)
goes into the run summary, with the report's addresses.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Mapping

from aifs.orchestration.products_report import format_products_summary, report_addresses
from aifs.orchestration.storage import get_blob, is_transient, read_bytes


@dataclasses.dataclass
class ProductsCheck:
    results: list[dict[str, Any]]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def findings(self) -> str:
        lines = [f"products not complete: {len(self.problems)} problem(s)"] + [f"  {p}" for p in self.problems]
        reports = [r["report"]["gs"] for r in self.results if r.get("report")]
        if reports:
            lines.append("report: " + ", ".join(reports))
        lines.append("How to rerun: fix the cause (make_products' log says it), then clear make_products of this run, "
                     "or trigger aifs_ens_products with the date and bucket.")
        return "\n".join(lines)


def _manifest_name(date: str) -> str:
    from aifs import layout

    return layout.products_manifest_object(date)


def check_target(client, target: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(what the products are, problems) for one bucket and date; storage hiccups raise (the task retries)."""
    from google.api_core.exceptions import NotFound

    bucket, date = target["bucket"], target["date"]
    where = f"gs://{bucket}/{date}/products/"
    result: dict[str, Any] = {"bucket": bucket, "date": date, "members_selected": len(target.get("members", []))}
    name = _manifest_name(date)
    try:
        manifest = json.loads(read_bytes(client, bucket, name))
    except NotFound:
        return result, [f"{date}: no products manifest gs://{bucket}/{name}: the products of {where} are not complete (make_products' log says why)"]
    except ValueError as exc:
        return result, [f"{date}: products manifest gs://{bucket}/{name} is not JSON: {exc}"]
    summary = _describe_manifest(manifest)
    result.update(summary)

    problems = []
    objects = _listed_objects(manifest, date)
    if not objects:
        problems.append(f"{date}: the products manifest lists no objects")
    for entry in objects:
        try:
            blob = get_blob(client, bucket, entry["name"])
        except Exception as exc:
            if is_transient(exc):
                raise
            problems.append(f"{date}: {entry.get('name')}: cannot be read: {exc}")
            continue
        if blob is None:
            problems.append(f"{date}: {entry['name']} is listed in the products manifest but not in the bucket")
        elif not blob.crc32c:
            problems.append(f"{date}: {entry['name']}: the bucket has no crc32c for it")
        elif not entry.get("crc32c"):
            problems.append(f"{date}: {entry['name']}: the products manifest records no crc32c for it")
        elif blob.crc32c != entry["crc32c"]:
            problems.append(f"{date}: {entry['name']}: crc32c in the bucket {blob.crc32c} != manifest {entry['crc32c']} (changed or damaged since it was written)")
        elif entry.get("size") is not None and blob.size != entry["size"]:
            problems.append(f"{date}: {entry['name']}: {blob.size} bytes in the bucket, the manifest says {entry['size']}")
    result["objects"] = len(objects)
    try:
        from aifs import layout

        marker = get_blob(client, bucket, layout.submission_marker_object(date))
    except Exception as exc:
        if is_transient(exc):
            raise
        marker = None
    result["submitted"] = marker is not None  # written only after a confirmed submission
    result["checksums"] = "compared with the manifest's"

    report = summary.get("report_object")
    if not report:
        problems.append(f"{date}: the products manifest names no report")
    elif report not in {o.get("name") for o in objects}:
        problems.append(f"{date}: the report {report} is not among the manifest's objects")
    elif not any(p.startswith(f"{date}: {report}") for p in problems):
        result["report"] = report_addresses(bucket, report)
    return result, problems


def _listed_objects(manifest: Mapping[str, Any], date: str) -> list[dict[str, Any]]:
    """The manifest's objects as ``{name, size, crc32c}`` (an entry without a crc32c is a finding)."""
    objects = manifest.get("objects")
    return [dict(o) for o in objects if isinstance(o, dict) and o.get("name")] if isinstance(objects, list) else []


def _describe_manifest(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What the run summary shows, from the products manifest."""
    from aifs.orchestration.products_report import split_gs_uri

    report = manifest.get("report")
    if isinstance(report, str) and report.startswith("gs://"):
        report = split_gs_uri(report)[1]
    used, selected = manifest.get("members_used"), manifest.get("members_selected")
    return {
        "members_used": len(used) if isinstance(used, list) else used,
        "members_selected": len(selected) if isinstance(selected, list) else selected,
        "members_left_out": manifest.get("members_excluded") or {},
        "partial": bool(manifest.get("partial")),
        "report_object": report,
    }


def check_targets(client, config: Mapping[str, Any], log: Callable[[str], None], step_outcomes: Any = None) -> ProductsCheck:
    """check_target for every target of a products run; logs each target's summary.

    ``step_outcomes``: what each make_products instance recorded (aifs.orchestration.products_step):
    a target whose step did not succeed is a problem even when its products look complete (the step
    may have refused to submit: too few members), and the problem says why, in the step's words.
    """
    outcomes = [step_outcomes] if isinstance(step_outcomes, dict) else list(step_outcomes or [])
    by_target = {(o.get("bucket"), o.get("date")): o for o in outcomes if isinstance(o, dict)}
    results, problems = [], []
    for target in config["targets"]:
        result, found = check_target(client, target)
        step = by_target.get((target["bucket"], target["date"]))
        if step is None:
            found.insert(0, f"{target['date']}: make_products did not run for gs://{target['bucket']}/{target['date']}/")
        elif not step.get("ok"):
            found.insert(0, f"{target['date']}: make_products failed: {step.get('error')}")
        said = (step or {}).get("summary") or {}
        if said.get("submission"):  # the command's own words: submitted, already submitted, or why not
            result["submission_note"] = said["submission"]
        results.append(result)
        problems += found
        log("\n" + format_products_summary(target, result) + ("\n" + "\n".join(found) if found else ""))
    return ProductsCheck(results, problems)
