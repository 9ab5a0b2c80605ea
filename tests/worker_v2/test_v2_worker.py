"""AIFS-ENS 2.0 through ``python -m aifs.worker`` in the v2 environment, on the tiny real v2 architecture.

Inputs as ECMWF open data gives them: waves NaN over land, snow depth and soil moisture NaN over
sea, mean wave direction ``mwd`` in degrees. One worker run writes a member to +150 h (three
windows); the tests read its GRIB back with eccodes. Then what must be refused: a NaN the
checkpoint does not impute (exit 11) and a v1 checkpoint in this environment (exit 15).
"""

from __future__ import annotations

import pickle
import re
import types

import numpy as np
import pytest
from worker_helpers import (
    DATE,
    SHORT_LEAD,
    Dirs,
    expected_forecast_objects,
    forecast_names,
    make_state,
    manifest_names,
    read_manifest,
    run_worker_subprocess,
    upload_bytes,
    worker_args,
)

from aifs import layout
from aifs.testing.tiny_model_v2 import LAND_ONLY, WAVES

pytestmark = pytest.mark.timeout(300)

WAVES_WRITTEN = [w for w in WAVES if w not in ("cos_mwd", "sin_mwd")] + ["mwd"]


def land_mask() -> np.ndarray:
    """Continents on the O48 grid: a smooth pattern, about a third of the points."""
    from aifs.testing.tiny_model import builtin_grid_latlon

    lat, lon = builtin_grid_latlon("O48")
    return np.sin(np.deg2rad(lon) * 2 + 0.5) * np.cos(np.deg2rad(lat)) > 0.3


def v2_state(checkpoint: str, member: int, *, mwd_in_degrees: bool = True) -> dict:
    """A v2 input state as open data gives it (NaN where the field does not exist, mwd in degrees)."""
    state = make_state(checkpoint, DATE, member)
    fields, land = state["fields"], land_mask()
    fields["lsm"][:] = land.astype("float32")
    for name in LAND_ONLY:
        fields[name][:, ~land] = np.nan
    for name in WAVES:
        fields[name][:, land] = np.nan
    if mwd_in_degrees:
        rng = np.random.default_rng(member)
        mwd = rng.uniform(0, 360, fields["cos_mwd"].shape).astype("float32")
        mwd[:, land] = np.nan
        del fields["cos_mwd"], fields["sin_mwd"]
        fields["mwd"] = mwd
    return state


def upload(bucket, state, member: int) -> None:
    upload_bytes(bucket, layout.input_object(DATE, member), pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))


def read_grib(path) -> list[dict]:
    """Every message: its keys and values, missing points as NaN (eccodes' bitmap)."""
    import eccodes

    messages = []
    with open(path, "rb") as f:
        while (h := eccodes.codes_grib_new_from_file(f)) is not None:
            try:
                values = eccodes.codes_get_values(h).astype("f8")
                if eccodes.codes_get(h, "bitmapPresent"):
                    values[values == eccodes.codes_get(h, "missingValue")] = np.nan
                messages.append({
                    "shortName": eccodes.codes_get(h, "shortName"),
                    "paramId": eccodes.codes_get(h, "paramId"),
                    "edition": eccodes.codes_get(h, "edition"),
                    "step": eccodes.codes_get(h, "endStep"),
                    "number": eccodes.codes_get(h, "number"),
                    "bitmapPresent": eccodes.codes_get(h, "bitmapPresent"),
                    "values": values,
                })
            finally:
                eccodes.codes_release(h)
    return messages


@pytest.fixture(scope="module")
def v2_run(emulator, v2_checkpoint, tmp_path_factory):
    """One member to +150 h: input NaN over land (waves) and over sea (snow, soil), GRIB writer processes."""
    from aifs.testing.emulator import anonymous_client

    client = anonymous_client(emulator.url)
    bucket = client.create_bucket("v2-e2e")
    upload(bucket, v2_state(v2_checkpoint, 1), 1)
    root = tmp_path_factory.mktemp("v2-e2e")
    dirs = Dirs(root / "scratch")
    code, out = run_worker_subprocess(
        worker_args(bucket=bucket.name, checkpoint=v2_checkpoint, dirs=dirs, members="1", lead_time=SHORT_LEAD,
                    extra=["--grib-writers", "1"]),
        emulator.url, root, timeout=240,
    )
    assert code == 0, out[-6000:]
    windows = {}
    for name in forecast_names(client, bucket.name):
        path = root / name.rsplit("/", 1)[1]
        bucket.blob(name).download_to_filename(str(path))
        windows[name] = read_grib(path)
    return types.SimpleNamespace(client=client, bucket=bucket, out=out, windows=windows, dirs=dirs)


def test_v2_member_completes_every_window_decodes(v2_run, v2_checkpoint):
    from worker_helpers import Spec

    assert sorted(v2_run.windows) == expected_forecast_objects(1, SHORT_LEAD)
    manifest = read_manifest(v2_run.bucket, 1)
    assert manifest is not None and manifest_names(v2_run.client, v2_run.bucket.name)
    written = Spec(v2_checkpoint).output_variables
    fields = len(written) - 1  # cos_mwd and sin_mwd are written as one mwd
    for obj, (name, messages) in zip(manifest.objects, sorted(v2_run.windows.items())):
        steps = sorted({m["step"] for m in messages})
        assert len(messages) == fields * len(steps), name
        assert obj.fields == fields and obj.messages == len(messages)
        assert {m["number"] for m in messages} == {1}
    assert v2_run.dirs.files() == []


def test_mean_wave_direction_is_mwd_in_degrees(v2_run):
    land = land_mask()
    names = {m["shortName"] for ms in v2_run.windows.values() for m in ms}
    assert "mwd" in names and not names & {"cos_mwd", "sin_mwd", "cos", "sin"}, names
    for messages in v2_run.windows.values():
        for m in (m for m in messages if m["shortName"] == "mwd"):
            sea = m["values"][~land]
            assert m["paramId"] == 140230
            assert np.isfinite(sea).all()
            assert (sea >= 0).all() and (sea < 360).all(), (sea.min(), sea.max())
            assert np.ptp(sea) > 90  # a field of directions, not a constant


def test_wave_fields_over_land_are_missing_in_the_bitmap(v2_run):
    land = land_mask()
    for messages in v2_run.windows.values():
        for m in (m for m in messages if m["shortName"] in WAVES_WRITTEN):
            assert m["bitmapPresent"] == 1, m["shortName"]
            assert np.isnan(m["values"][land]).all(), m["shortName"]
            assert np.isfinite(m["values"][~land]).all(), m["shortName"]
        for m in (m for m in messages if m["shortName"] in LAND_ONLY):
            assert m["bitmapPresent"] == 1 and np.isnan(m["values"][~land]).all(), m["shortName"]
            assert np.isfinite(m["values"][land]).all(), m["shortName"]
        for m in (m for m in messages if m["shortName"] in ("2t", "msl", "tp")):
            assert m["bitmapPresent"] == 0 and np.isfinite(m["values"]).all(), m["shortName"]


def test_every_field_has_a_real_grib_parameter(v2_run):
    for messages in v2_run.windows.values():
        by_name = {m["shortName"]: m for m in messages}
        assert "snowc" not in by_name
        assert by_name["fscov"]["paramId"] == 260289 and by_name["fscov"]["edition"] == 2  # snow cover fraction
        assert all(m["shortName"] not in ("unknown", "") for m in messages)
        assert {"h1012", "h2530", "swh", "mwp", "cdww", "wmb", "t", "z", "q", "w", "sd", "swvl1"} <= set(by_name)


def test_tp_accumulates_from_the_start(v2_run):
    tp = [m for ms in v2_run.windows.values() for m in ms if m["shortName"] == "tp"]
    steps = [m["step"] for m in tp]
    assert steps == sorted(steps) and steps[-1] == SHORT_LEAD


def test_nan_the_checkpoint_does_not_impute_exit_11(emulator, client, bucket, v2_checkpoint, tmp_path):
    state = v2_state(v2_checkpoint, 3)
    state["fields"]["2t"][1, 17] = np.nan
    upload(bucket, state, 3)
    dirs = Dirs(tmp_path / "scratch")
    code, out = run_worker_subprocess(
        worker_args(bucket=bucket.name, checkpoint=v2_checkpoint, dirs=dirs, members="3", lead_time=12,
                    extra=["--grib-writers", "0"]),
        emulator.url, tmp_path,
    )
    assert code == 11, out[-5000:]
    line = [x for x in out.splitlines() if "[FAILED]" in x and layout.input_filename(3) in x]
    assert line and re.search(r"member\s*0*3", line[0], re.I), out[-3000:]
    assert "'2t'" in line[0] and "time level 1" in line[0] and "grid point 17" in line[0], line[0]
    assert forecast_names(client, bucket.name) == [] and manifest_names(client, bucket.name) == []
    assert dirs.files() == []


def test_pickle_with_cos_sin_mwd_runs(emulator, client, bucket, v2_checkpoint, tmp_path):
    """Inputs that already carry the model's cos_mwd/sin_mwd are accepted as they are."""
    upload(bucket, v2_state(v2_checkpoint, 2, mwd_in_degrees=False), 2)
    dirs = Dirs(tmp_path / "scratch")
    code, out = run_worker_subprocess(
        worker_args(bucket=bucket.name, checkpoint=v2_checkpoint, dirs=dirs, members="2", lead_time=12,
                    extra=["--grib-writers", "0"]),
        emulator.url, tmp_path,
    )
    assert code == 0, out[-5000:]
    assert len(manifest_names(client, bucket.name)) == 1


def test_v1_checkpoint_in_v2_environment_exit_15(emulator, client, bucket, v1_checkpoint, tmp_path):
    upload(bucket, make_state(v1_checkpoint, DATE, 4), 4)
    dirs = Dirs(tmp_path / "scratch")
    code, out = run_worker_subprocess(
        worker_args(bucket=bucket.name, checkpoint=v1_checkpoint, dirs=dirs, members="4", lead_time=12),
        emulator.url, tmp_path,
    )
    assert code == 15, out[-5000:]
    failed = [x for x in out.splitlines() if "[FAILED]" in x and "generation v1" in x]
    assert failed and "anemoi-models 0.6" in failed[0] and "anemoi-models 0.11" in failed[0], out[-3000:]
    assert not re.search(r"weights of .* loaded", out)
    assert forecast_names(client, bucket.name) == [] and manifest_names(client, bucket.name) == []
