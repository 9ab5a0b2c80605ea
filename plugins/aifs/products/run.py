"""The whole products step for one date: members -> periods -> probabilities -> files, pictures, report, submission."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import tempfile
import time

import numpy as np

from aifs import layout
from aifs.members import format_members
from aifs.products import climatology, ensemble, files, members as member_selection, periods, pictures, probabilities, report, submission
from aifs.products.errors import ForecastsMissing, ProductsUploadFailed, TooFewMembers

log = logging.getLogger("aifs.products")
_CONTENT_TYPES = {".nc": "application/x-netcdf", ".png": "image/png", ".html": "text/html; charset=utf-8",
                  ".json": "application/json"}


@dataclasses.dataclass
class Options:
    date: str
    members: list[int]
    team: str
    model: str
    climatology: str | None
    min_members: int
    points: list[ensemble.Point]
    submit: bool
    force: bool
    cost_per_hour: float = 0.0
    workers: int = 2


def _upload(bucket, name: str, path: str) -> dict:
    """Upload one product; returns ``{name, size, crc32c}`` as the bucket computed them (for the manifest)."""
    blob = bucket.blob(name)
    try:
        blob.upload_from_filename(path, content_type=_CONTENT_TYPES.get(os.path.splitext(path)[1]), checksum="crc32c")
    except Exception as exc:
        raise ProductsUploadFailed(f"upload of gs://{bucket.name}/{name} failed: {exc}") from None
    if not blob.crc32c or blob.size != os.path.getsize(path):
        raise ProductsUploadFailed(f"upload of gs://{bucket.name}/{name}: the bucket reports {blob.size} bytes, "
                                   f"crc32c {blob.crc32c!r} for a {os.path.getsize(path)}-byte file")
    return {"name": name, "size": blob.size, "crc32c": blob.crc32c}


def _read_members(bucket, opts: Options, selection) -> list[ensemble.MemberProducts]:
    grids: dict = {}
    done: list[ensemble.MemberProducts] = []
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, opts.workers)) as pool:
        futures = {pool.submit(ensemble.read_member, bucket, opts.date, m, selection.lead_time, opts.points, grids,
                               selection.manifests[m]): m
                   for m in selection.used}
        for future in concurrent.futures.as_completed(futures):
            result = future.result()  # a member's error ends the run, naming it
            done.append(result)
            elapsed = time.perf_counter() - started
            eta = elapsed / len(done) * (len(futures) - len(done))
            log.info("[PRODUCTS] member %03d read and regridded in %.1f s (%d/%d, ETA %.0f s)",
                     result.member, result.seconds, len(done), len(futures), eta)
    return sorted(done, key=lambda r: r.member)


def make(bucket, opts: Options) -> tuple[dict, int]:
    """Returns (summary, exit status); raises ProductsError for a failure that stops the run."""
    date = opts.date
    selection = member_selection.select(bucket, date, opts.members)
    for member, why in selection.excluded.items():
        log.warning("[PRODUCTS] member %03d left out: %s", member, why)
    if not selection.used:
        raise ForecastsMissing(f"no verified member among {format_members(opts.members)} for {date}: "
                               + "; ".join(f"member {m:03d}: {w}" for m, w in list(selection.excluded.items())[:5]))
    summary = {
        "date": date, "bucket": bucket.name, "members_selected": opts.members, "members_used": selection.used,
        "members_excluded": {str(m): w for m, w in selection.excluded.items()}, "partial": selection.partial,
        "team": opts.team, "model": opts.model, "files": [],
        # what was asked; the submission marker (written only after a confirmed submission) says what happened
        "submission": "requested (see the submission marker)" if opts.submit else "not requested",
        "report": f"gs://{bucket.name}/{layout.products_report_object(date)}",
    }
    marker = submission.read_marker(bucket, date)
    if not opts.force:
        existing = bucket.get_blob(layout.products_manifest_object(date))
        if existing is not None:
            old = json.loads(bucket.blob(existing.name).download_as_bytes())
            if old.get("members_used") == selection.used and old.get("team") == opts.team and old.get("model") == opts.model:
                log.info("[PRODUCTS] products for %s already made from the same %d members (--force remakes them)",
                         date, len(selection.used))
                return _submit_stage(bucket, opts, old, marker, None, selection)

    log.info("[PRODUCTS] %s: %d member(s) %s%s", date, len(selection.used), format_members(selection.used),
             f" (PARTIAL: {len(selection.excluded)} left out)" if selection.partial else "")
    results = _read_members(bucket, opts, selection)
    summary["reads"] = ensemble.read_summary(results)  # bytes read vs the windows' sizes; indexes that were not usable
    log.info("[PRODUCTS] read %.1f MB of the %.1f MB in the members' windows (%d windows by index, %d streamed)",
             summary["reads"]["bytes_read"] / 1e6, summary["reads"]["window_bytes"] / 1e6,
             summary["reads"]["windows_by_index"], summary["reads"]["windows_streamed"])

    with tempfile.TemporaryDirectory(prefix="aifs-products-") as workdir:
        local: dict[str, str] = {}  # file name -> local path
        netcdf: dict[tuple[str, int], str] = {}
        maps = []
        for period in periods.periods():
            edges = climatology.load(opts.climatology, date, period)
            stack = np.stack([r.values[(period.variable, period.number)] for r in results])
            probs = probabilities.quintile_probabilities(stack, edges)
            name = layout.aiwq_filename(period.variable, date, period.number, opts.team, opts.model)
            path = os.path.join(workdir, name)
            files.write_and_check(files.data_array(probs, period, date, opts.team, opts.model, selection.used,
                                                   selection.partial), path, period, date)
            local[name], netcdf[(period.variable, period.number)] = path, path
            png = f"map_{period.variable}_p{period.number}.png"
            title = (f"{period.label}: most likely quintile, {len(selection.used)} members"
                     + (" (partial)" if selection.partial else "") + f", issued {date}")
            pictures.probability_map(probs, title, os.path.join(workdir, png))
            local[png] = os.path.join(workdir, png)
            maps.append((title, png))
            log.info("[PRODUCTS] %s: file %s checked, map %s", period.label, name, png)
        plumes = []
        for i, point in enumerate(opts.points):
            png = f"plume_{i + 1}_{''.join(c if c.isalnum() else '_' for c in point.name)}.png"
            series = {short: np.stack([r.series[short][:, i] for r in results]) for short in results[0].series}
            pictures.plume(f"{point.name} ({point.lat:g}, {point.lon:g})", ensemble.PLUME_STEPS, series,
                           os.path.join(workdir, png))
            local[png] = os.path.join(workdir, png)
            plumes.append((f"{point.name}", png))
        walls = [float(selection.manifests[m].timings.get("wall_s", 0.0)) for m in selection.used]
        caption = pictures.durations(selection.used, walls, opts.cost_per_hour, os.path.join(workdir, "run_durations.png"))
        local["run_durations.png"] = os.path.join(workdir, "run_durations.png")
        summary["run"] = {"member_seconds": dict(zip(map(str, selection.used), walls)), "caption": caption}
        summary["files"] = sorted(local) + ["report.html"]
        page = os.path.join(workdir, "report.html")
        with open(page, "w") as f:
            f.write(report.render(summary, maps, plumes, (caption, "run_durations.png"), sorted(n for n in local if n.endswith(".nc"))))
        local["report.html"] = page
        # the manifest records what the bucket holds, so a later check compares, not just finds
        summary["objects"] = [_upload(bucket, layout.product_object(date, name), path) for name, path in sorted(local.items())]
        manifest_path = os.path.join(workdir, "products_manifest.json")
        with open(manifest_path, "w") as f:
            json.dump(summary, f, indent=2)
        _upload(bucket, layout.products_manifest_object(date), manifest_path)  # last: its presence means complete
        log.info("[PRODUCTS] %d files in gs://%s/%s", len(local), bucket.name, layout.products_prefix(date))
        return _submit_stage(bucket, opts, summary, marker, netcdf, selection)


def _submit_stage(bucket, opts: Options, summary: dict, marker: dict | None, netcdf, selection) -> tuple[dict, int]:
    date = opts.date
    if len(selection.used) < opts.min_members:
        summary["submission"] = (f"not submitted: {len(selection.used)} verified member(s), fewer than the minimum "
                                 f"{opts.min_members}")
        raise TooFewMembers(summary["submission"] + "; products written: " + summary["report"]) from None
    if not opts.submit:
        return summary, 0
    if marker is not None:
        summary["submission"] = f"already submitted ({marker.get('submitted_at', 'marker present')}): nothing sent"
        log.info("[PRODUCTS] %s", summary["submission"])
        return summary, 0
    problem = submission.competition_date_problem(date, opts.team)
    if problem:
        summary["submission"] = f"not submitted: not a competition date now: {problem}"
        log.warning("[PRODUCTS] %s", summary["submission"])
        return summary, 0
    with tempfile.TemporaryDirectory(prefix="aifs-products-nc-") as workdir:
        if netcdf is None:  # products made by an earlier run: submit the stored files
            netcdf = {}
            for p in periods.periods():
                name = layout.aiwq_filename(p.variable, date, p.number, opts.team, opts.model)
                netcdf[(p.variable, p.number)] = os.path.join(workdir, name)
                bucket.blob(layout.product_object(date, name)).download_to_filename(netcdf[(p.variable, p.number)])
        sent = submission.submit(netcdf, date, opts.team, opts.model)
    body = submission.marker(date, opts.team, opts.model, sent, selection.used)
    try:
        bucket.blob(layout.submission_marker_object(date)).upload_from_string(body, content_type="application/json")
    except Exception as exc:
        raise ProductsUploadFailed(f"submitted {len(sent)} files but the marker could not be written: {exc}") from None
    summary["submission"] = f"submitted {len(sent)} files"
    log.info("[PRODUCTS] %s", summary["submission"])
    return summary, 0
