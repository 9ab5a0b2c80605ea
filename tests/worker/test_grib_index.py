"""GRIB indexes beside the windows: written by the worker, used by the products to read only what they need.

Real parts: one member of the tiny model to 792 h through ``python -m aifs.worker`` (the real
runner and GRIB output, streaming uploads) into the GCS emulator; the products (``aifs.products``, in process)
read it back through a recording proxy that counts the bytes the bucket served, so "reads far
fewer bytes" is measured where the bytes leave the bucket, not where the reader says it read them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import types

import numpy as np
import pytest
from worker_helpers import DATE, Dirs, read_manifest, run_worker_subprocess, seed, tagged, worker_args

from aifs import layout
from aifs.exitcodes import ExitCode
from aifs.manifest import IndexObject, Manifest
from aifs.worker import grib_index

pytestmark = pytest.mark.timeout(300)

LEAD = 792  # the products need steps to 768 h
MEMBER = 1
WANTED = ("2t", "msl", "tp")  # what the products read (aifs.products.periods)


@pytest.fixture(scope="module")
def member_run(emulator, checkpoint, tmp_path_factory):
    """One member to 792 h through the worker (GRIB encoded on its own thread: the writer processes go through
    the same uploader, and test_end_to_end runs them), read back once."""
    from aifs.testing.emulator import anonymous_client

    client = anonymous_client(emulator.url)
    bucket = client.create_bucket("indexed-792")
    seed(bucket, checkpoint, [MEMBER])
    root = tmp_path_factory.mktemp("indexed")
    dirs = Dirs(root / "scratch")
    code, out = run_worker_subprocess(worker_args(bucket=bucket.name, checkpoint=checkpoint, dirs=dirs, lead_time=LEAD,
                                                  extra=["--grib-writers", "0"]), emulator.url, root, timeout=240)
    assert code == 0, out[-6000:]
    manifest = read_manifest(bucket, MEMBER)
    windows = {o.name: bucket.blob(o.name).download_as_bytes() for o in manifest.objects}
    indexes = {o.name: bucket.blob(o.index.name).download_as_bytes() for o in manifest.objects if o.index}
    return types.SimpleNamespace(client=client, bucket=bucket, dirs=dirs, out=out, manifest=manifest, windows=windows,
                                 indexes=indexes)


def _message_keys(message: bytes) -> tuple[str, int, str, str, str]:
    import eccodes

    h = eccodes.codes_new_from_message(message)
    try:
        get = lambda key: eccodes.codes_get(h, key)  # noqa: E731
        return (get("shortName"), int(get("endStep")), str(get("dataDate")), f"{int(get('dataTime')):04d}",
                str(get("level")))
    finally:
        eccodes.codes_release(h)


def test_each_window_has_an_index_whose_lines_slice_its_messages(member_run, spec):
    from aifs.products.gribread import iter_messages

    run = member_run
    assert [o.window for o in run.manifest.objects] == [(w.start, w.end) for w in layout.windows(LEAD)]
    for obj in run.manifest.objects:
        start, end = obj.window
        assert obj.index is not None, f"{obj.name} has no index in the manifest"
        assert obj.index.name == layout.forecast_index_object(DATE, MEMBER, start, end)
        assert obj.index.name.startswith(f"{DATE}/forecast_indexes/") and obj.index.name.endswith(
            f"_member{MEMBER:03d}_h{start:03d}-{end:03d}.index")
        stored = run.bucket.get_blob(obj.index.name)  # the manifest records the bucket's own size and checksum
        assert (stored.size, stored.crc32c) == (obj.index.size, obj.index.crc32c)

        data, text = run.windows[obj.name], run.indexes[obj.name].decode()
        raw = [json.loads(line) for line in text.splitlines()]
        lines = grib_index.parse(text, obj.index.name)
        # the messages as GRIB's own section 0 lengths find them, independently of eccodes' headers
        found = [(offset, len(message)) for offset, message in iter_messages(io.BytesIO(data), obj.name)]
        assert [(line.offset, line.length) for line in lines] == found
        assert len(lines) == obj.messages == (end - start) // 6 * len(spec.output_variables)
        assert len(data) == obj.size
        for line, fields in zip(lines, raw):
            assert set(fields) >= {"param", "levtype", "step", "number", "date", "time", "_offset", "_length"}
            short, step, date, time_, level = _message_keys(data[line.offset:line.end])
            assert (short, step, date, time_) == (line.param, line.step, line.date, line.time), line
            assert fields["number"] == MEMBER and fields["date"] == DATE[:8] and fields["time"] == DATE[9:]
            if line.levtype == "pl":
                assert fields["levelist"] == level  # t_850, z_500 carry their level
            else:
                assert "levelist" not in fields and fields["levtype"] == "sfc"
        # an accumulation 0-N is indexed at its end step N, as the products look it up
        assert {line.step for line in lines if line.param == "tp"} == set(range(start + 6, end + 1, 6))
    assert len(tagged(run.out, "[INDEX]")) == len(run.manifest.objects)
    assert run.dirs.files() == [], "index files were left on local disk"


def _read(proxy, bucket_name: str, manifest: Manifest):
    """The member's products values read through the counting proxy: (MemberProducts, proxy requests)."""
    from aifs.products import ensemble
    from aifs.testing.emulator import anonymous_client

    proxy.clear()
    bucket = anonymous_client(proxy.url).bucket(bucket_name)
    result = ensemble.read_member(bucket, DATE, MEMBER, LEAD, ensemble.parse_points("A:-1.29,36.82;B:51.5,0"), {},
                                  manifest)
    return result, list(proxy.served)


def _without_index(manifest: Manifest) -> Manifest:
    return dataclasses.replace(manifest, objects=[dataclasses.replace(o, index=None) for o in manifest.objects])


def _same_products(a, b) -> None:
    assert a.values.keys() == b.values.keys()
    for key in a.values:
        np.testing.assert_array_equal(a.values[key], b.values[key], err_msg=str(key))
    for short in a.series:
        np.testing.assert_array_equal(a.series[short], b.series[short], err_msg=short)


@pytest.fixture(scope="module")
def reads(member_run, proxy):
    """The member read by its indexes and streamed whole (the same manifest less its indexes)."""
    from aifs.products import ensemble

    by_index, by_index_requests = _read(proxy, member_run.bucket.name, member_run.manifest)
    by_index_media = {o.name: proxy.media(o.name) for o in member_run.manifest.objects}
    index_media = {o.index.name: proxy.media(o.index.name) for o in member_run.manifest.objects}
    streamed, _ = _read(proxy, member_run.bucket.name, _without_index(member_run.manifest))
    streamed_media = {o.name: proxy.media(o.name) for o in member_run.manifest.objects}
    needed = {layout.forecast_object(DATE, MEMBER, w.start, w.end)
              for w in ensemble.gribread.windows_needed(LEAD, ensemble.PLUME_STEPS)}
    return types.SimpleNamespace(by_index=by_index, streamed=streamed, by_index_media=by_index_media,
                                 index_media=index_media, streamed_media=streamed_media, needed=needed,
                                 requests=by_index_requests)


def test_products_read_by_index_equal_streamed_and_fetch_only_the_wanted_messages(member_run, reads, spec):
    from aifs.products import ensemble

    _same_products(reads.by_index, reads.streamed)
    assert (reads.by_index.windows_by_index, reads.by_index.windows_streamed) == (len(reads.needed), 0)
    assert (reads.streamed.windows_by_index, reads.streamed.windows_streamed) == (0, len(reads.needed))
    assert not reads.by_index.index_fallbacks

    wanted_bytes = index_bytes = whole_bytes = wanted_messages = all_messages = 0
    for obj in member_run.manifest.objects:
        lines = grib_index.parse(member_run.indexes[obj.name], obj.index.name)
        chosen = grib_index.select(lines, {short: set(ensemble.PLUME_STEPS) for short in WANTED})
        served = reads.by_index_media[obj.name]
        if obj.name not in reads.needed:  # windows the products never open are not touched either way
            assert served == [] and reads.streamed_media[obj.name] == [] and reads.index_media[obj.index.name] == []
            continue
        groups = grib_index.byte_ranges(chosen)
        # exactly the wanted messages' bytes, one ranged request per run of adjacent messages
        assert sorted(served) == sorted((f"bytes={a}-{b - 1}", b - a) for a, b, _ in groups), obj.name
        assert len(groups) < len(chosen), "adjacent messages (2t, msl) were not fetched in one request"
        assert reads.index_media[obj.index.name] == [("", obj.index.size)]
        assert sum(n for _, n in reads.streamed_media[obj.name]) == obj.size  # streaming moves the whole window
        wanted_bytes += sum(b - a for a, b, _ in groups)
        index_bytes += obj.index.size
        whole_bytes += obj.size
        wanted_messages += len(chosen)
        all_messages += obj.messages
    assert reads.by_index.bytes_read == wanted_bytes + index_bytes
    assert reads.streamed.bytes_read == whole_bytes == reads.by_index.window_bytes
    # what the index saves follows from the field count: 3 of the model's fields at the steps the periods need
    assert wanted_messages == len(WANTED) * len(ensemble.PLUME_STEPS)
    fraction = wanted_messages / all_messages
    assert all_messages == len(reads.needed) * 12 * len(spec.output_variables)
    assert wanted_bytes / whole_bytes == pytest.approx(fraction, rel=0.1)  # messages on one grid: alike in size
    assert (wanted_bytes + index_bytes) / whole_bytes < fraction * 1.2


def _upload_index(bucket, name: str, lines: list[grib_index.IndexLine]) -> IndexObject:
    blob = bucket.blob(name)
    blob.upload_from_string(grib_index.to_text(lines), checksum="crc32c")
    blob.reload()
    return IndexObject(name, blob.size, blob.crc32c)


def _with_index(manifest: Manifest, window_name: str, index: IndexObject) -> Manifest:
    return dataclasses.replace(manifest, objects=[dataclasses.replace(o, index=index) if o.name == window_name else o
                                                  for o in manifest.objects])


def test_a_shifted_index_falls_back_to_streaming_the_window_with_a_warning(member_run, reads, proxy, caplog):
    """Offsets shifted by one message (the manifest agreeing with the bad index): each message is decoded and
    checked against its line, the window is streamed instead, the values are the same."""
    obj = next(o for o in member_run.manifest.objects if o.name in reads.needed and o.window[0] > 432)
    lines = grib_index.parse(member_run.indexes[obj.name], obj.index.name)
    # every line but the first (10u, not wanted) names its message but points at the one before it
    shifted = [dataclasses.replace(line, offset=before.offset, length=before.length)
               for before, line in zip(lines, lines[1:])]
    bad = _upload_index(member_run.bucket, f"{DATE}/forecast_indexes/shifted.index", shifted)
    with caplog.at_level(logging.WARNING, logger="aifs.products"):
        result, _ = _read(proxy, member_run.bucket.name, _with_index(member_run.manifest, obj.name, bad))
    _same_products(result, reads.by_index)
    assert (result.windows_by_index, result.windows_streamed) == (len(reads.needed) - 1, 1)
    [why] = result.index_fallbacks
    assert why.startswith(obj.name) and "the index says" in why
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"gs://{member_run.bucket.name}/{obj.name}" in w and bad.name in w and "streaming the whole window" in w
               for w in warning), warning
    assert sum(n for _, n in proxy.media(obj.name)) >= obj.size  # the window was streamed after all


def test_an_index_that_is_not_the_manifests_is_not_used(member_run, reads, proxy, caplog):
    """The index object replaced after the manifest was written: its crc32c differs, the window is streamed."""
    obj = next(o for o in member_run.manifest.objects if o.name in reads.needed)
    lines = grib_index.parse(member_run.indexes[obj.name], obj.index.name)
    impostor = f"{DATE}/forecast_indexes/impostor.index"
    _upload_index(member_run.bucket, impostor, lines[:-1])
    recorded = dataclasses.replace(obj.index, name=impostor)  # the manifest's size and crc32c of the true index
    with caplog.at_level(logging.WARNING, logger="aifs.products"):
        result, _ = _read(proxy, member_run.bucket.name, _with_index(member_run.manifest, obj.name, recorded))
    _same_products(result, reads.by_index)
    [why] = result.index_fallbacks
    assert "the manifest says" in why and impostor in why


def _run_products(argv, emulator_url, monkeypatch):
    from aifs.products.cli import main

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator_url)
    root = logging.getLogger()
    saved = list(root.handlers)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            code = main(argv)
    finally:
        for h in list(root.handlers):
            if h not in saved:
                root.removeHandler(h)
    return code, json.loads(out.getvalue().strip().splitlines()[-1])


def _netcdf_values(bucket, names: list[str], where) -> dict[str, np.ndarray]:
    import xarray as xr

    values = {}
    for name in names:
        path = where / name
        bucket.blob(layout.product_object(DATE, name)).download_to_filename(str(path))
        with xr.open_dataarray(path) as da:
            values[name] = da.load().values
    return values


def test_products_files_identical_with_an_index_and_with_an_old_manifest(member_run, proxy, monkeypatch, tmp_path):
    """The whole products step by index, then with the manifest as older workers wrote it (no ``index`` key):
    the same files, the streaming path, and the summary says how many bytes each read."""
    from aifs.testing import climatology

    bucket = member_run.bucket
    clim = tmp_path / "clim"
    climatology.write(str(clim), DATE)
    argv = ["--date", DATE, "--bucket", bucket.name, "--members", str(MEMBER), "--climatology", str(clim),
            "--team", "ECMWFtest", "--model", "aifsens", "--force", "--workers", "1", "--points", ""]  # no plumes: faster
    code, summary = _run_products(argv, proxy.url, monkeypatch)
    assert code == 0, summary
    nc = [n for n in summary["files"] if n.endswith(".nc")]
    assert len(nc) == 6
    by_index = _netcdf_values(bucket, nc, tmp_path)
    reads_index = summary["reads"]

    manifest_name = layout.manifest_object(DATE, MEMBER)
    written = json.loads(bucket.blob(manifest_name).download_as_bytes())
    old = dict(written, objects=[{k: v for k, v in o.items() if k != "index"} for o in written["objects"]])
    bucket.blob(manifest_name).upload_from_string(json.dumps(old), content_type="application/json")
    try:
        assert all(o.index is None for o in Manifest.from_json(json.dumps(old)).objects)
        code, summary = _run_products(argv, proxy.url, monkeypatch)
    finally:
        bucket.blob(manifest_name).upload_from_string(json.dumps(written), content_type="application/json")
    assert code == 0, summary
    assert summary["members_used"] == [MEMBER]
    streamed = _netcdf_values(bucket, nc, tmp_path)
    for name in nc:
        np.testing.assert_array_equal(by_index[name], streamed[name], err_msg=name)
    reads_stream = summary["reads"]
    assert reads_index["windows_streamed"] == 0 and reads_index["windows_by_index"] == reads_stream["windows_streamed"] > 0
    assert reads_stream["bytes_read"] == reads_stream["window_bytes"] == reads_index["window_bytes"]
    assert reads_index["bytes_read"] < reads_stream["bytes_read"] / 2 and reads_index["index_fallbacks"] == []


def test_an_index_that_miscounts_the_window_fails_the_member_as_a_writing_failure(run_main, client, bucket, checkpoint,
                                                                                   spec, dirs, monkeypatch):
    """The index must list every message the writer wrote; one short, the member fails (exit 12), no manifest."""
    seed(bucket, checkpoint, [MEMBER])
    real = grib_index.build
    monkeypatch.setattr(grib_index, "build", lambda path: real(path)[:-1])
    code, text = run_main(worker_args(bucket=bucket.name, checkpoint=checkpoint, dirs=dirs, lead_time=12,
                                      extra=["--grib-writers", "0"]))
    assert code == ExitCode.INFERENCE_FAILED, text[-4000:]
    [failed] = tagged(text, "[FAILED]")
    written = 2 * len(spec.output_variables)  # two 6 h steps
    assert "member 001" in failed and "h000-012" in failed
    assert f"its index lists {written - 1} GRIB messages, the writer wrote {written}" in failed
    assert read_manifest(bucket, MEMBER) is None
    assert list(client.list_blobs(bucket.name, prefix=f"{DATE}/forecast_indexes/")) == []
    assert dirs.files() == []


def test_index_lines_parse_and_refuse():
    good = grib_index.IndexLine("2t", 6, "20250601", "0000", 0, 100, "sfc", None, 1)
    pl = grib_index.IndexLine("t", 6, "20250601", "0000", 100, 50, "pl", "850", 1)
    text = grib_index.to_text([good, pl])
    assert json.loads(text.splitlines()[0]) == {"param": "2t", "levtype": "sfc", "step": "6", "number": 1,
                                                "date": "20250601", "time": "0000", "_offset": 0, "_length": 100}
    assert grib_index.parse(text, "x") == [good, pl]
    assert grib_index.byte_ranges([good, pl]) == [(0, 150, [good, pl])]
    overlapping = grib_index.to_text([good, dataclasses.replace(pl, offset=99)])
    for bad, why in ((text.replace('"_offset": 100', '"_offset": "100"'), "line 2: ValueError: bad byte range"),
                     (overlapping, "line 2: message at byte 99 overlaps"),
                     ("{not json\n", "line 1: JSONDecodeError"),
                     (text.replace('"param": "2t", ', ""), "line 1: KeyError")):
        with pytest.raises(grib_index.IndexUnreadable, match=why):
            grib_index.parse(bad, "gs://b/x.index")


def test_index_name_is_outside_the_forecasts_and_the_manifest_keeps_old_shape():
    import fnmatch

    name = layout.forecast_index_object("20251127_0000", 7, 72, 144)
    assert name == "20251127_0000/forecast_indexes/aifs_ens_forecast_20251127_0000_member007_h072-144.index"
    assert not name.startswith(layout.forecast_prefix("20251127_0000"))
    assert not fnmatch.fnmatch(name.rsplit("/", 1)[1], layout.member_grib_glob(7))

    from aifs.manifest import ManifestObject

    window = layout.forecast_object("20251127_0000", 7, 72, 144)
    indexed = ManifestObject(window, 10, "AAAAAA==", (72, 144), 84, 7, IndexObject(name, 5, "AAAAAQ=="))
    plain = dataclasses.replace(indexed, index=None)
    manifest = Manifest(date="20251127_0000", member=7, seed=1, lead_time=144, checkpoint="c", objects=[plain, indexed],
                        checkpoint_identity="sha256:" + "0" * 64, step_hours=6)
    data = json.loads(manifest.to_json())
    assert "index" not in data["objects"][0]  # as manifests were written before indexes existed
    assert data["objects"][1]["index"] == {"name": name, "size": 5, "crc32c": "AAAAAQ=="}
    assert Manifest.from_json(manifest.to_json()) == manifest
    with pytest.raises(TypeError):
        Manifest.from_json(manifest.to_json().replace('"size": 5', '"bytes": 5'))
