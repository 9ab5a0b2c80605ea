"""aifs.inputs end to end: a local open-data mirror (real GRIB2 on the 0.25 deg grid, real index files,
byte ranges over HTTP), the real ecmwf-opendata client, real MIR, the GCS emulator, then the worker.

The mirror's values are analytic functions of latitude, longitude, member and time
(aifs.testing.opendata_mirror.analytic), so what comes out of interpolation is compared with the
exact value at the checkpoint's own grid points.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from worker_helpers import Dirs, Spec, kept_root_logging, run_worker_subprocess, subprocess_env, worker_args

from aifs import layout

DATE = "20250601_0000"
MEMBERS = (1, 2, 3)
pytestmark = pytest.mark.timeout(240)


def run_inputs(argv: list[str]):
    """In-process ``python -m aifs.inputs ARGV``: (exit code, output, the final JSON summary line)."""
    from aifs.inputs.__main__ import main

    buffer = io.StringIO()
    with kept_root_logging(), contextlib.redirect_stdout(buffer):
        code = main(argv)
    out = buffer.getvalue()
    return code, out, json.loads(out.strip().splitlines()[-1])


def inputs_args(bucket: str, checkpoint: str, source: str, cache: str, members: str = "1-3", extra=()) -> list[str]:
    return ["--date", DATE, "--members", members, "--bucket", bucket, "--checkpoint", checkpoint, "--source", source,
            "--cache-dir", cache, "--workers", "2", "--retry-wait", "0.05", *extra]


def load_state(bucket, member: int, checkpoint: str, validate: bool = True) -> dict:
    """The pickle as the worker reads it: its bounded allow-list unpickler, then (``validate``) its checks.

    A checkpoint whose inputs carry NaN (waves over land) needs an imputer the tiny model lacks: the
    worker's check refuses NaN there, so such states are only unpickled.
    """
    import tempfile

    from aifs.worker.model import Model
    from aifs.worker.safe_pickle import load_input_state
    from aifs.worker.validate import check_input_state

    spec = Model(checkpoint, None, None, None, weights=False).spec  # any generation: only its metadata is read
    with tempfile.NamedTemporaryFile(suffix=".pkl") as f:
        bucket.blob(layout.input_object(DATE, member)).download_to_filename(f.name)
        state = load_input_state(f.name, member, spec.input_budget())
    if validate:
        check_input_state(state, spec, layout.parse_date(DATE), member, "test")
    return state


@pytest.fixture(scope="module")
def mir_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("mir-cache"))


@pytest.fixture(scope="module")
def mirror(tmp_path_factory, checkpoint):
    from aifs.testing.opendata_mirror import serve, write_mirror

    root = tmp_path_factory.mktemp("opendata")
    files = write_mirror(str(root), DATE, checkpoint, MEMBERS)
    server = serve(str(root))
    yield types.SimpleNamespace(root=root, files=files, server=server)
    server.stop()


@pytest.fixture(scope="module")
def emulator_host(emulator):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STORAGE_EMULATOR_HOST", emulator.url)
        mp.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
        yield emulator.url


@pytest.fixture(scope="module")
def built(emulator_host, mirror, checkpoint, mir_cache):
    """Members 1-3 built once from the mirror; the tests below read what it left."""
    from aifs.testing.emulator import anonymous_client

    client = anonymous_client(emulator_host)
    bucket = client.create_bucket("inputs-built")
    mirror.server.reset()
    code, out, summary = run_inputs(inputs_args(bucket.name, checkpoint, mirror.server.url, mir_cache))
    requests = list(mirror.server.requests)
    states = {m: load_state(bucket, m, checkpoint) for m in MEMBERS} if code == 0 else {}
    return types.SimpleNamespace(client=client, bucket=bucket, code=code, out=out, summary=summary,
                                 requests=requests, states=states)


def manifest(bucket, member: int) -> dict:
    return json.loads(bucket.blob(layout.input_manifest_object(DATE, member)).download_as_bytes())


def target_points(checkpoint: str):
    from anemoi.inference.checkpoint import Checkpoint

    (md,) = Checkpoint(checkpoint).multi_dataset_metadata.values()
    return np.asarray(md.latitudes), np.asarray(md.longitudes)


def cycles():
    t = layout.parse_date(DATE)
    import datetime as dt

    return [t - dt.timedelta(hours=6), t]


# --- the main run --------------------------------------------------------------------------------


def test_every_member_written_with_its_manifest(built):
    assert built.code == 0, built.out
    assert built.summary["done"] == len(MEMBERS) and built.summary["failed"] == 0
    names = sorted(b.name for b in built.client.list_blobs(built.bucket.name))
    assert names == sorted([layout.input_object(DATE, m) for m in MEMBERS]
                           + [layout.input_manifest_object(DATE, m) for m in MEMBERS])
    assert not any(layout.input_manifest_object(DATE, m).startswith(f"{DATE}/input/") for m in MEMBERS)
    assert "[MEMBER] 003" in built.out and "ETA" in built.out and "[SUMMARY]" in built.out


def test_variable_set_shapes_and_types_are_the_checkpoints(built, spec):
    for member, state in built.states.items():
        assert set(state["fields"]) == set(spec.input_variables), member
        assert state["date"] == layout.parse_date(DATE)
        for name, values in state["fields"].items():
            assert values.shape == (spec.time_levels, spec.grid_points) and values.dtype == np.float32, name


def test_values_match_the_analytic_field_at_the_target_points(built, checkpoint):
    """0.25 deg -> O48 by MIR: within interpolation error of the exact value, for each member and time level.

    The open-data grid starts at longitude -180: read as starting at 0, every field would be
    shifted by 180 degrees; the last assertion shows this check would catch that.
    """
    from aifs.testing.opendata_mirror import MAGNITUDES, analytic

    lat, lon = target_points(checkpoint)
    checks = {"2t": ("2t", None), "msl": ("msl", None), "10u": ("10u", None), "t_850": ("t", 850)}
    for member, state in built.states.items():
        for name, (param, level) in checks.items():
            amp = MAGNITUDES[param][1]
            for k, cycle in enumerate(cycles()):  # time levels in order: t-6h, then t
                exact = analytic(param, level, member, cycle, lat, lon)
                error = np.abs(state["fields"][name][k] - exact).max()
                assert error < 0.01 * amp, (member, name, cycle, error)
    shifted = analytic("2t", None, 1, cycles()[1], lat, lon + 180.0)
    assert np.abs(built.states[1]["fields"]["2t"][1] - shifted).max() > 0.2 * MAGNITUDES["2t"][1]


def test_z_levels_are_gh_times_gravity_and_constants_are_shared(built, checkpoint):
    from aifs.inputs.rules import GRAVITY
    from aifs.testing.opendata_mirror import MAGNITUDES, analytic

    lat, lon = target_points(checkpoint)
    for member, state in built.states.items():
        for k, cycle in enumerate(cycles()):
            gh = analytic("gh", 500, member, cycle, lat, lon)
            assert np.abs(state["fields"]["z_500"][k] - gh * GRAVITY).max() < 0.01 * MAGNITUDES["gh"][1] * GRAVITY
        for name in ("lsm", "z"):  # surface constants: the deterministic run's, not gh
            exact = analytic(name, None, None, None, lat, lon)
            assert np.abs(state["fields"][name] - exact).max() < 0.01 * MAGNITUDES[name][1]
            np.testing.assert_array_equal(state["fields"][name], built.states[1]["fields"][name])


def test_members_differ_as_their_sources_do(built):
    a, b = built.states[1]["fields"], built.states[2]["fields"]
    for name in ("2t", "t_850", "z_500"):
        assert not np.allclose(a[name], b[name]), name
        assert not np.allclose(a[name][0], a[name][1]), name  # and the two time levels differ


def test_each_index_read_once_constants_fetched_once_only_needed_bytes(built, mirror):
    index_gets = [r.path for r in built.requests if r.method == "GET" and r.path.endswith(".index")]
    assert sorted(index_gets) == sorted(set(index_gets)) and len(index_gets) == 3
    constant_gets = [r for r in built.requests if r.method == "GET" and "-oper-fc.grib2" in r.path]
    assert len(constant_gets) == 1 and constant_gets[0].range  # one byte-range request for the whole date
    for member in MEMBERS:
        m = manifest(built.bucket, member)
        fetched = {f for s in m["sources"] for f in s["fields"]}
        assert fetched == {"10u", "10v", "2t", "msl", "t_850", "gh_500"}, fetched  # not tp, ro, t_300 (also in the file)
        assert {f for s in m["constant_sources"] for f in s["fields"]} == {"lsm", "z"}
        assert m["bytes_fetched"] == sum(length for s in m["sources"] for _, length in s["ranges"])
        assert [s["time_level"] for s in m["sources"]] == sorted(s["time_level"] for s in m["sources"])
    data_gets = [r for r in built.requests if r.method == "GET" and r.path.endswith(".grib2")]
    assert all(r.range for r in data_gets)
    assert sum(r.bytes_sent for r in data_gets) < 0.5 * sum(p.stat().st_size for p in mirror.root.rglob("*.grib2"))


def test_manifest_records_sources_checkpoint_and_crc(built, checkpoint):
    from aifs.worker.checkpoint_identity import checkpoint_identity

    blob = built.bucket.get_blob(layout.input_object(DATE, 2))
    m = manifest(built.bucket, 2)
    assert (m["size"], m["crc32c"]) == (blob.size, blob.crc32c)
    assert m["checkpoint"]["identity"] == checkpoint_identity(checkpoint)
    assert m["time_levels"] == [c.isoformat() for c in cycles()] and m["grid"] == "O48"
    assert all(s["url"].startswith("http://127.0.0.1") and s["ranges"] for s in m["sources"])
    assert m["timings"]["total_s"] > 0


def test_rerun_skips_complete_members_and_force_rebuilds(built, mirror, checkpoint, mir_cache):
    mirror.server.reset()
    code, out, summary = run_inputs(inputs_args(built.bucket.name, checkpoint, mirror.server.url, mir_cache))
    assert code == 0 and summary["skipped"] == len(MEMBERS), out
    assert not mirror.server.gets(suffix=".grib2")  # nothing fetched
    code, out, summary = run_inputs(inputs_args(built.bucket.name, checkpoint, mirror.server.url, mir_cache,
                                                members="2", extra=["--force"]))
    assert code == 0 and summary["done"] == 1, out
    assert mirror.server.gets(suffix=".grib2")


def test_the_worker_forecasts_from_the_produced_inputs(built, emulator, checkpoint, tmp_path):
    dirs = Dirs(tmp_path / "scratch")
    code, out = run_worker_subprocess(
        worker_args(bucket=built.bucket.name, checkpoint=checkpoint, dirs=dirs, members="1", lead_time=12),
        emulator.url, tmp_path, timeout=180)
    assert code == 0, out[-3000:]
    assert built.bucket.get_blob(layout.manifest_object(DATE, 1)) is not None


# --- the source fails --------------------------------------------------------------------------------


def test_a_field_missing_at_the_source_names_it_and_writes_nothing(emulator_host, checkpoint, mir_cache, tmp_path):
    from aifs.testing.emulator import anonymous_client
    from aifs.testing.opendata_mirror import serve, write_mirror

    write_mirror(str(tmp_path), DATE, checkpoint, (1,), omit={"msl"}, control=False)
    server = serve(str(tmp_path))
    try:
        bucket = anonymous_client(emulator_host).create_bucket("inputs-missing")
        code, out, _ = run_inputs(inputs_args(bucket.name, checkpoint, server.url, mir_cache, members="1"))
        data_gets = server.gets(suffix=".grib2")
    finally:
        server.stop()
    assert code == 21, out  # SOURCE_INCOMPLETE
    assert "lacks msl (for variable(s) msl)" in out and "enfo-ef.index" in out
    assert list(bucket.list_blobs()) == [] and not data_gets


def test_a_dropped_connection_is_retried(built, mirror, checkpoint, mir_cache, emulator_host):
    from aifs.testing.emulator import anonymous_client

    bucket = anonymous_client(emulator_host).create_bucket("inputs-drop-once")
    mirror.server.reset()
    mirror.server.drop("-enfo-ef.grib2", times=2, after=5000)
    code, out, _ = run_inputs(inputs_args(bucket.name, checkpoint, mirror.server.url, mir_cache, members="1"))
    assert code == 0, out
    assert "retrying" in out and [r for r in mirror.server.gets(suffix=".grib2") if r.bytes_sent == 5000]
    state = load_state(bucket, 1, checkpoint)
    for name, values in state["fields"].items():
        np.testing.assert_array_equal(values, built.states[1]["fields"][name])


def test_a_connection_that_keeps_dropping_fails_clearly_and_writes_nothing(mirror, checkpoint, mir_cache, emulator_host):
    from aifs.testing.emulator import anonymous_client

    bucket = anonymous_client(emulator_host).create_bucket("inputs-drop-always")
    mirror.server.reset()
    mirror.server.drop("-enfo-ef.grib2", times=1000, after=5000)
    code, out, summary = run_inputs(inputs_args(bucket.name, checkpoint, mirror.server.url, mir_cache, members="1",
                                                extra=["--retries", "2"]))
    mirror.server.reset()
    assert code == 22, out  # SOURCE_FAILED
    assert "giving up after 2 attempts" in summary["members"]["001"]["error"]
    assert "enfo-ef.grib2" in summary["members"]["001"]["error"]
    assert list(bucket.list_blobs()) == []


# --- publication, rules, other checkpoints -------------------------------------------------------------


def test_published_check_is_light_and_true_only_when_every_index_exists(mirror):
    from aifs.inputs import opendata_published

    assert opendata_published(mirror.server.url, DATE)
    assert not opendata_published(mirror.server.url, "20250602_0000")
    assert not opendata_published(mirror.server.url, DATE, waves=True)  # this mirror has no wave stream
    heavy = "numpy requests eccodes mir torch anemoi ecmwf multiurl".split()
    code = ("import sys, aifs.inputs; from aifs.inputs.published import opendata_published; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_variable_no_rule_covers_is_named():
    from aifs.inputs.rules import NoRule, source_of, sources_of

    assert source_of("z_500").param == "gh" and source_of("z").origin == "constant"
    assert (source_of("stl2").param, source_of("stl2").levtype, source_of("stl2").level) == ("sot", "sol", 2)
    with pytest.raises(NoRule, match="'foo_bar', 'snowc'"):
        sources_of(["2t", "foo_bar", "snowc"])


def test_another_checkpoint_gets_its_own_inputs_with_soil_and_waves(emulator_host, mir_cache, tmp_path):
    """The benchmark's variable lists (v1's surface and soil fields, its pressure-level parameters at the top and
    bottom levels: the mirror's time goes with the field count) plus ocean waves, on O48."""
    from aifs.inputs.rules import GRAVITY
    from aifs.testing import tiny_model
    from aifs.testing.emulator import anonymous_client
    from aifs.testing.opendata_mirror import MAGNITUDES, analytic, is_land, serve, write_mirror

    ckpt = tiny_model.build_checkpoint(str(tmp_path / "bench.ckpt"), grid="O48",
                                       prognostic=tiny_model.SURFACE + ["swh", "mwd"]
                                       + [f"{p}_{lev}" for p in tiny_model.PL_PARAMS for lev in (50, 1000)],
                                       constant=tiny_model.BENCH_CONSTANT, diagnostic=["tp"])
    write_mirror(str(tmp_path / "od"), DATE, ckpt, (4,), control=False)
    server = serve(str(tmp_path / "od"))
    try:
        bucket = anonymous_client(emulator_host).create_bucket("inputs-bench")
        code, out, _ = run_inputs(inputs_args(bucket.name, ckpt, server.url, mir_cache, members="4"))
    finally:
        server.stop()
    assert code == 0, out
    state = load_state(bucket, 4, ckpt, validate=False)
    assert set(state["fields"]) == set(Spec(ckpt).input_variables)
    lat, lon = target_points(ckpt)
    t = cycles()[1]
    for name, (param, level, scale) in {"stl1": ("sot", 1, 1.0), "swvl2": ("vsw", 2, 1.0), "q_50": ("q", 50, 1.0),
                                        "z_1000": ("gh", 1000, GRAVITY), "sdor": ("sdor", None, 1.0)}.items():
        exact = analytic(param, level, None if name == "sdor" else 4, None if name == "sdor" else t, lat, lon) * scale
        assert np.abs(state["fields"][name][1] - exact).max() < 0.01 * MAGNITUDES[param][1] * scale, name
    swh = state["fields"]["swh"][1]
    land = is_land(lat, lon)
    assert np.isnan(swh[land]).mean() > 0.8 and not np.isnan(swh[~land]).any()  # missing stays missing, sea is not
    sea = ~np.isnan(swh)
    assert np.abs(swh[sea] - analytic("swh", None, 4, t, lat, lon)[sea]).max() < 0.02 * MAGNITUDES["swh"][1]


@pytest.mark.parametrize("when, stream", [("20250601_0600", "scda"), ("20260601_0600", "oper"), ("20250601_1200", "oper"),
                                          ("20250601_1800", "enfo"), ("20260601_1800", "waef")])
def test_open_data_layout_is_the_clients(when, stream):
    """The published check and the mirror build URLs without the client: they must be the client's (06/18 UTC
    deterministic runs under scda before IFS 50r1, oper after)."""
    from ecmwf.opendata import Client

    from aifs.inputs.opendata_layout import DataFile, deterministic_stream, source_url

    cycle = layout.parse_date(when)
    if stream in ("oper", "scda"):
        assert deterministic_stream(cycle) == stream
    kind = {"enfo": "pf", "waef": "pf"}.get(stream, "fc")
    client = Client(source="google")
    urls = client._get_urls(use_index=False, date=f"{cycle:%Y%m%d}", time=cycle.hour, step=0, type=kind,
                            stream="oper" if stream in ("oper", "scda") else stream).urls
    assert urls == [DataFile(stream, cycle).url(source_url("google"))]


def test_ieee_reader_matches_eccodes_and_refuses_what_it_cannot_read():
    """The regridder reads MIR's IEEE-64 GRIB output with numpy (eccodes costs ~9 ms a N320 field more):
    same doubles as eccodes decodes, and a clear refusal for any other packing or a bitmap."""
    import eccodes
    import numpy as np

    from aifs.inputs.errors import InterpolationFailed
    from aifs.inputs.regrid import ieee64_values

    handle = eccodes.codes_grib_new_from_samples("reduced_gg_pl_48_grib2")
    try:
        eccodes.codes_set(handle, "packingType", "grid_ieee")
        eccodes.codes_set(handle, "precision", 2)
        points = eccodes.codes_get(handle, "numberOfDataPoints")
        values = np.linspace(-50.0, 320.0, points) + 1e-9 * np.arange(points)
        eccodes.codes_set_values(handle, values)
        message = eccodes.codes_get_message(handle)
        decoded = eccodes.codes_get_values(eccodes.codes_new_from_message(message))
        assert np.array_equal(ieee64_values(memoryview(message), points), decoded)
        with pytest.raises(InterpolationFailed, match="expected"):
            ieee64_values(memoryview(message), points + 1)

        eccodes.codes_set(handle, "precision", 1)  # 32-bit IEEE: not what the regridder asked MIR for
        with pytest.raises(InterpolationFailed, match="IEEE 64-bit"):
            ieee64_values(memoryview(eccodes.codes_get_message(handle)), points)

        eccodes.codes_set(handle, "precision", 2)
        eccodes.codes_set(handle, "bitmapPresent", 1)
        with_missing = values.copy()
        with_missing[:10] = eccodes.codes_get(handle, "missingValue")
        eccodes.codes_set_values(handle, with_missing)
        with pytest.raises(InterpolationFailed, match="bitmap"):
            ieee64_values(memoryview(eccodes.codes_get_message(handle)), points)
    finally:
        eccodes.codes_release(handle)


def test_aifs_ens_v2_inputs_then_its_forecast(v2_checkpoint, emulator, emulator_host, mir_cache, tmp_path):
    """AIFS-ENS 2.0's tiny real architecture: its whole input set (waves, snow, soil, 10 hPa) from the mirror,
    built in this (v1) tool environment from the checkpoint's metadata alone, then its own environment's
    worker forecasts from those pickles: waves NaN over land and snow/soil NaN over sea are valid for it."""
    import os

    from aifs.testing.emulator import anonymous_client
    from aifs.testing.opendata_mirror import is_land, serve, write_mirror

    write_mirror(str(tmp_path / "od"), DATE, v2_checkpoint, (2,), control=False)
    server = serve(str(tmp_path / "od"))
    try:
        bucket = anonymous_client(emulator_host).create_bucket("inputs-v2")
        code, out, _ = run_inputs(inputs_args(bucket.name, v2_checkpoint, server.url, mir_cache, members="2"))
    finally:
        server.stop()
    assert code == 0, out
    state = load_state(bucket, 2, v2_checkpoint, validate=False)
    assert {"mwd", "swh", "sd", "swvl1", "t_10"} <= set(state["fields"]), sorted(state["fields"])
    assert not {"cos_mwd", "sin_mwd"} & set(state["fields"])  # open data's mwd, in degrees: the worker makes cos/sin
    lat, lon = target_points(v2_checkpoint)
    assert np.isnan(state["fields"]["swh"][1][is_land(lat, lon)]).mean() > 0.8

    root = Path(__file__).resolve().parents[2]
    v2_python = os.environ.get("AIFS_WORKER_PYTHON_V2") or str(root / ".venv-v2" / "bin" / "python")
    dirs = Dirs(tmp_path / "scratch")
    args = worker_args(bucket=bucket.name, checkpoint=v2_checkpoint, dirs=dirs, members="2", lead_time=12)
    proc = subprocess.run([v2_python, "-m", "aifs.worker", *args], env=subprocess_env(emulator.url), cwd=str(tmp_path),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert bucket.get_blob(layout.manifest_object(DATE, 2)) is not None
