"""Two members to 792 h through ``python -m aifs.worker``: names, GRIB content, manifests, cleanup.

One worker process runs both members (model loaded once); the tests below each check one
aspect of what it left in the bucket and on disk. Also: reruns reproduce a member bit for bit,
and the seed (not only the input) makes members differ.
"""

from __future__ import annotations

import base64
import re
import threading
import time
import types

import numpy as np
import pytest
from worker_helpers import (
    DATE,
    Dirs,
    expected_forecast_objects,
    forecast_names,
    make_state,
    manifest_names,
    object_names,
    read_manifest,
    run_worker_subprocess,
    seed,
    tagged,
    upload_state,
    worker_args,
)

from aifs import layout

LEAD = 792
MEMBERS = (1, 2)

pytestmark = pytest.mark.timeout(420)


@pytest.fixture(scope="module")
def e2e(emulator, checkpoint, tmp_path_factory):
    from aifs.testing.emulator import anonymous_client

    client = anonymous_client(emulator.url)
    bucket = client.create_bucket("e2e-792")
    seed(bucket, checkpoint, MEMBERS)
    root = tmp_path_factory.mktemp("e2e")
    dirs = Dirs(root / "scratch")
    peak = {"grib": 0, "pkl": 0}
    stop = threading.Event()

    def watch_disk():  # how many GRIB windows / pickles sit on local disk at once
        while not stop.is_set():
            peak["grib"] = max(peak["grib"], len(list(dirs.output.glob("*.grib"))))
            peak["pkl"] = max(peak["pkl"], len(list(dirs.input.glob("*.pkl"))))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch_disk, daemon=True)
    watcher.start()
    try:
        code, out = run_worker_subprocess(
            worker_args(bucket=bucket.name, checkpoint=checkpoint, dirs=dirs, members="1-2", lead_time=LEAD),
            emulator.url, root, timeout=360,
        )
    finally:
        stop.set()
        watcher.join()
    return types.SimpleNamespace(client=client, bucket=bucket, dirs=dirs, code=code, out=out, root=root, peak=peak)


@pytest.fixture(scope="module")
def gribs(e2e):
    """Every forecast object downloaded once: {object name: local path}."""
    local = e2e.root / "readback"
    local.mkdir()
    paths = {}
    for name in forecast_names(e2e.client, e2e.bucket.name):
        path = local / name.rsplit("/", 1)[1]
        e2e.bucket.blob(name).download_to_filename(str(path))
        paths[name] = str(path)
    return paths


KEYS = ["shortName", "level", "typeOfLevel", "step", "stepRange", "dataDate", "dataTime", "number", "type",
        "stream", "productDefinitionTemplateNumber", "numberOfValues"]


def _read(path: str) -> list[dict]:
    import earthkit.data as ekd

    return [dict(zip(KEYS, values)) for values in ekd.from_source("file", path).metadata(KEYS)]


@pytest.fixture(scope="module")
def grib_meta(gribs):
    """GRIB keys of every message of every forecast object, read once: {object name: [ {key: value} ]}."""
    return {name: _read(path) for name, path in gribs.items()}


def test_exit_0(e2e):
    assert e2e.code == 0, e2e.out[-6000:]


def test_object_names_exact(e2e):
    expected = [layout.input_object(DATE, m) for m in MEMBERS]
    expected += [name for m in MEMBERS for name in expected_forecast_objects(m, LEAD)]
    expected += [layout.forecast_index_object(DATE, m, w.start, w.end) for m in MEMBERS for w in layout.windows(LEAD)]
    expected += [layout.manifest_object(DATE, m) for m in MEMBERS]
    assert object_names(e2e.client, e2e.bucket.name) == sorted(expected)
    for m in MEMBERS:
        ours = [n for n in forecast_names(e2e.client, e2e.bucket.name) if f"_member{m:03d}_" in n]
        assert len(ours) == 11
        assert ours[0].endswith(f"_member{m:03d}_h000-072.grib") and ours[-1].endswith(f"_member{m:03d}_h720-792.grib")


def test_local_dirs_empty(e2e):
    assert e2e.dirs.files() == []
    assert "[CLEANUP]" in e2e.out


def test_disk_bounded_while_running(e2e):
    """Windows are uploaded and deleted as they close: never more than two GRIBs and one input on disk."""
    assert 1 <= e2e.peak["grib"] <= 2, e2e.peak
    assert e2e.peak["pkl"] <= 1, e2e.peak


@pytest.mark.parametrize("member", MEMBERS)
def test_grib_content(e2e, grib_meta, spec, member):
    for window in layout.windows(LEAD):
        name = layout.forecast_object(DATE, member, window.start, window.end)
        messages = grib_meta[name]
        steps = list(range(window.start + 6, window.end + 1, 6))
        assert len(messages) == len(spec.output_variables) * len(steps), name
        assert sorted({m["step"] for m in messages}) == steps, name
        for step in steps:  # every output field exactly once per step
            at_step = [m["shortName"] for m in messages if m["step"] == step]
            assert len(at_step) == len(spec.output_variables), (name, step, at_step)
            assert set(at_step) == spec.output_short_names, (name, step)
        for m in messages:
            assert (m["dataDate"], m["dataTime"]) == (20250601, 0), m
            assert m["number"] == member, m
            assert m["type"] == "pf", m
            assert m["stream"] == "enfo", m
            assert m["numberOfValues"] == spec.grid_points, m
            if m["shortName"] != "tp":  # accumulations use the ensemble accumulation template (11)
                assert m["productDefinitionTemplateNumber"] == 1, m
            else:
                assert m["productDefinitionTemplateNumber"] in (1, 11), m
        assert {(m["shortName"], m["level"]) for m in messages if m["typeOfLevel"] == "isobaricInhPa"} == {("t", 850), ("z", 500)}


def test_precipitation_accumulates_from_the_start(e2e, gribs):
    """tp is accumulated once from step 0, across window boundaries (not restarted per window)."""
    import earthkit.data as ekd

    previous = None
    for window in layout.windows(LEAD)[:3]:
        path = gribs[layout.forecast_object(DATE, 1, window.start, window.end)]
        for field in ekd.from_source("file", path).sel(shortName="tp").order_by("step"):
            step = field.metadata("step")
            assert field.metadata("stepRange") == f"0-{step}"
            values = field.to_numpy(flatten=True)
            if previous is not None:
                assert np.all(values >= previous - 1e-6), step
            previous = values


@pytest.mark.parametrize("member", MEMBERS)
def test_manifest_matches_bucket(e2e, gribs, grib_meta, spec, member):
    import google_crc32c

    manifest = read_manifest(e2e.bucket, member)
    assert manifest is not None
    assert (manifest.date, manifest.member, manifest.lead_time) == (DATE, member, LEAD)
    assert [o.name for o in manifest.objects] == expected_forecast_objects(member, LEAD)
    assert [tuple(o.window) for o in manifest.objects] == [(w.start, w.end) for w in layout.windows(LEAD)]
    for obj in manifest.objects:
        blob = e2e.bucket.get_blob(obj.name)
        assert obj.size == blob.size
        assert obj.crc32c == blob.crc32c
        data = open(gribs[obj.name], "rb").read()
        assert obj.crc32c == base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()
        assert obj.messages == len(spec.output_variables) * 12 == len(grib_meta[obj.name])
    assert isinstance(manifest.seed, int)
    assert manifest.versions.get("anemoi-inference")
    assert manifest.timings
    assert manifest.total_bytes == sum(e2e.bucket.get_blob(o.name).size for o in manifest.objects)


def test_log_markers(e2e):
    uploaded = tagged(e2e.out, "[UPLOADED]")
    for m in MEMBERS:
        for name in expected_forecast_objects(m, LEAD):
            assert any(f"gs://{e2e.bucket.name}/{name}" in line for line in uploaded), name
    summary = "\n".join(tagged(e2e.out, "[SUMMARY]"))
    for m in MEMBERS:
        assert re.search(rf"\b0*{m}\b.*\bdone\b", summary), summary
    assert "[RERUN]" not in e2e.out


def test_model_loaded_once(e2e):
    """Several members, one model load: the per-load log line appears once."""
    loads = [line for line in tagged(e2e.out, "[MODEL]") if "loaded" in line]
    assert len(loads) == 1, loads


# --- reproducibility and seeding -----------------------------------------------------------------


def test_rerun_is_bit_identical_and_seed_makes_members(emulator, client, bucket, checkpoint, dirs, tmp_path, run_main):
    """Members 1 and 2 get the SAME input: they differ only through the seed; a rerun of 1 reproduces it."""
    import earthkit.data as ekd

    state = make_state(checkpoint, DATE, 1)
    upload_state(bucket, state, 1)
    upload_state(bucket, state, 2)
    lead = 78  # a full window and a short one
    code, out = run_worker_subprocess(
        worker_args(bucket=bucket.name, checkpoint=checkpoint, dirs=dirs, members="1-2", lead_time=lead), emulator.url, tmp_path
    )
    assert code == 0, out[-4000:]
    first = {name: bucket.blob(name).download_as_bytes() for name in forecast_names(client, bucket.name)}
    assert len(first) == 4
    manifest_before = read_manifest(bucket, 1)

    # a rerun in another process (this one), after the manifest exists: --force redoes it
    code, text = run_main(worker_args(bucket=bucket.name, checkpoint=checkpoint, dirs=dirs, members="1", lead_time=lead,
                                      extra=["--force"]))
    assert code == 0, text[-4000:]
    for name in expected_forecast_objects(1, lead):
        assert bucket.blob(name).download_as_bytes() == first[name], f"{name} differs on rerun"
    manifest_after = read_manifest(bucket, 1)
    assert [(o.name, o.size, o.crc32c) for o in manifest_after.objects] == [
        (o.name, o.size, o.crc32c) for o in manifest_before.objects
    ]
    assert manifest_after.seed == manifest_before.seed

    # same input, different member: the seed must make the forecasts differ
    for w in layout.windows(lead):
        one = ekd.from_source("memory", first[layout.forecast_object(DATE, 1, w.start, w.end)]).sel(shortName="2t")
        two = ekd.from_source("memory", first[layout.forecast_object(DATE, 2, w.start, w.end)]).sel(shortName="2t")
        assert not np.allclose(one[-1].to_numpy(), two[-1].to_numpy()), w
    assert manifest_before.seed != read_manifest(bucket, 2).seed
    assert dirs.files() == []
