"""The inputs loop end to end: open data -> aifs_ens_inputs -> input states in the bucket -> aifs_ens_forecast.

Nothing stands in: a local ECMWF open-data mirror (GRIB2 on the real 0.25 degree grid and ``.index``
files, written by the worker environment's eccodes, served over HTTP with byte ranges), the GCS
emulator, ``dag.test()`` of the real DAGs, ``python -m aifs.inputs`` (the real ecmwf-opendata client
and MIR) run by the local backend's CPU step, and then the real worker forecasting from the pickles
the inputs run made. And the other way: a source that does not publish a field the checkpoint needs
fails the step at once with a message naming the field and exit 21, writes nothing, emits no asset
event (so no forecast starts).
"""

from __future__ import annotations

import base64
import json
import os
import shutil

import google_crc32c
import pytest
from conftest import FORECAST_DAY, load_dag, run_conf, task_states, worker_run
from test_inputs_dag import asset_events, conf, load_inputs_dag

from aifs import layout
from aifs.exitcodes import ExitCode
from aifs.orchestration.inputs_asset import EVENT_PARAMS

pytestmark = pytest.mark.timeout(300)

DATE = "20250601_0000"
MEMBERS = "1-2"
#: The open-data parameter the incomplete source does not publish (the tiny model needs it: its msl).
MISSING_PARAM = "msl"
#: Hours the forecast runs: one short window is enough to show the worker takes what the inputs run wrote.
LEAD_TIME = 12


def without_param(full: str, partial: str, param: str) -> None:
    """A copy of the mirror at ``full`` whose index files do not list ``param``: a source that does not publish it.

    The GRIB files are hard links (same bytes); only the index changes, which is what a client reads
    to know what a source has.
    """
    for folder, _, files in os.walk(full):
        target = os.path.join(partial, os.path.relpath(folder, full))
        os.makedirs(target, exist_ok=True)
        for name in files:
            src, dst = os.path.join(folder, name), os.path.join(target, name)
            if not name.endswith(".index"):
                os.link(src, dst)
                continue
            with open(src) as f:
                kept = [line for line in f if json.loads(line)["param"] != param]
            with open(dst, "w") as f:
                f.writelines(kept)


@pytest.fixture(scope="module")
def mirrors(worker_python, tiny_checkpoint, tmp_path_factory):
    """Two open-data sources serving the date: one complete, one lacking MISSING_PARAM. -> (full url, partial url)."""
    from aifs.testing.opendata_mirror import serve  # the server itself needs no eccodes

    root = tmp_path_factory.mktemp("opendata")
    full, partial = str(root / "full"), str(root / "partial")
    worker_run(worker_python, "-m", "aifs.testing", "opendata-mirror", "--root", full, "--date", DATE,
               "--checkpoint", tiny_checkpoint, "--members", MEMBERS)
    without_param(full, partial, MISSING_PARAM)
    servers = [serve(full), serve(partial)]
    yield servers[0], servers[1]
    for server in servers:
        server.stop()
    shutil.rmtree(root, ignore_errors=True)


def inputs_conf(bucket: str, checkpoint: str) -> dict:
    return conf(bucket, members=MEMBERS, checkpoint=checkpoint, publish_wait_minutes=0.5, publish_poke_seconds=1, workers=2)


def bucket_names(gcs, bucket: str) -> list[str]:
    return sorted(b.name for b in gcs.list_blobs(bucket))


def crc32c_of(data: bytes) -> str:
    return base64.b64encode(google_crc32c.Checksum(data).digest()).decode()


def test_open_data_becomes_verified_inputs_an_asset_event_and_then_forecasts(
    airflow_db, deployment, emulator, gcs, bucket, tiny_checkpoint, mirrors, monkeypatch, alert_sink
):
    source, _ = mirrors
    monkeypatch.setenv("AIFS_ENS_OPENDATA_SOURCE", source.url)
    dr = load_inputs_dag().test(logical_date=FORECAST_DAY, run_conf=inputs_conf(bucket, tiny_checkpoint))
    assert dr.state == "success", task_states(dr)
    assert alert_sink.messages == []

    # every member's pickle and input manifest, read back from the bucket: the bucket's crc32c of the pickle is the
    # manifest's, and so is that of the bytes downloaded
    b = gcs.bucket(bucket)
    for member in (1, 2):
        pickle_blob = b.get_blob(layout.input_object(DATE, member))
        manifest = json.loads(b.blob(layout.input_manifest_object(DATE, member)).download_as_bytes())
        assert (manifest["date"], manifest["member"], manifest["object"]) == (DATE, member, pickle_blob.name)
        assert manifest["checkpoint"]["reference"] == tiny_checkpoint
        assert (manifest["size"], manifest["crc32c"]) == (pickle_blob.size, pickle_blob.crc32c)
        assert crc32c_of(pickle_blob.download_as_bytes()) == manifest["crc32c"]
        assert manifest["source"] == source.url and manifest["bytes_fetched"] > 0
    # the index files read, then byte ranges of the GRIB files: never a whole file
    assert source.gets(suffix=".index") and all(r.range for r in source.gets(suffix=".grib2"))

    [event] = asset_events("aifs_ens_inputs", dr.run_id)
    assert event == {"bucket": bucket, "date": DATE, "members": MEMBERS, "checkpoint": tiny_checkpoint,
                     "prefix": f"gs://{bucket}/{DATE}/input/"}

    # the forecast, for what the event names (as AIFS_ENS_FORECAST_TRIGGER=inputs gives it), from those pickles
    params = {key: event[key] for key in EVENT_PARAMS}
    forecast = load_dag().test(logical_date=FORECAST_DAY, run_conf=run_conf(lead_time=LEAD_TIME, **params))
    states = task_states(forecast)
    assert forecast.state == "success", states
    assert [states[("run_member", i)] for i in (0, 1)] == ["success", "success"]
    names = bucket_names(gcs, bucket)
    for member in (1, 2):
        assert layout.manifest_object(DATE, member) in names
        assert [layout.forecast_object(DATE, member, w.start, w.end) for w in layout.windows(LEAD_TIME)] == [
            n for n in names if n.startswith(layout.member_forecast_prefix(DATE, member))]
    assert alert_sink.messages == []


def test_a_field_the_source_does_not_publish_fails_the_step_at_once_writes_nothing_and_starts_no_forecast(
    airflow_db, deployment, emulator, gcs, bucket, tiny_checkpoint, mirrors, monkeypatch, alert_sink
):
    _, partial = mirrors
    monkeypatch.setenv("AIFS_ENS_OPENDATA_SOURCE", partial.url)
    dr = load_inputs_dag().test(logical_date=FORECAST_DAY, run_conf=inputs_conf(bucket, tiny_checkpoint))
    states = task_states(dr)
    assert dr.state == "failed"
    assert states[("wait_for_opendata", -1)] == "success"  # the index files are there: published, but incomplete
    assert states[("build_inputs", -1)] == "failed" and states[("verify_inputs", -1)] == "upstream_failed"
    [build] = [ti for ti in dr.get_task_instances() if ti.task_id == "build_inputs"]
    assert build.try_number == 1, "a source that lacks a field is not retried"

    alert = next(m for m in alert_sink.messages if "build_inputs failed" in m["title"])["message"]
    # the step's outcome, what to do about it, and the step's own words naming the field, member and file
    assert f"(exit {int(ExitCode.SOURCE_INCOMPLETE)}, SOURCE_INCOMPLETE); not retried" in alert, alert
    assert "aifs.inputs.rules" in alert, alert
    assert f"member 1 lacks {MISSING_PARAM}" in alert and "(for variable(s) msl)" in alert, alert
    assert f"{partial.url}/20250601/00z/ifs/0p25/enfo/20250601000000-0h-enfo-ef.index" in alert, alert
    assert not partial.gets(suffix=".grib2"), "nothing is fetched from a source that lacks a field"

    assert bucket_names(gcs, bucket) == []  # no pickle, no manifest
    assert asset_events("aifs_ens_inputs", dr.run_id) == []  # so no forecast run is started


# -- what a person should do, for each exit code of the steps ---------------------------------------------

STEP_CODES = [code for code in ExitCode if 20 <= code <= 39]


@pytest.mark.parametrize("code", STEP_CODES, ids=[c.name for c in STEP_CODES])
def test_every_step_exit_code_tells_a_person_what_to_do(code):
    from aifs.orchestration.outcomes import what_to_do
    from aifs.orchestration.steps import classify_step

    advice = what_to_do(code)
    assert advice and len(advice) > 30, f"{code.name} has no advice"
    retryable, message = classify_step("inputs", code, ["2026-01-01 ERROR [FAILED] member 003: the step's words"])
    assert retryable is code.retryable
    assert advice in message and message.endswith("\n  2026-01-01 ERROR [FAILED] member 003: the step's words")
    assert ("if it keeps failing" in message) is code.retryable



def test_a_failed_steps_message_quotes_its_last_error_lines_with_secrets_masked():
    from airflow.sdk.log import mask_secret

    from aifs.orchestration.steps import ERROR_LINES_KEPT, _ErrorLines

    secret = "pw-81c0ffee-not-in-alerts"
    mask_secret(secret, "AIWQ_PASSWORD")
    logged: list[str] = []
    output = _ErrorLines(logged.append)
    output("2026-01-01 INFO [MEMBER] 001 done")
    for i in range(ERROR_LINES_KEPT + 2):
        output(f"2026-01-01 ERROR [FAILED] member {i:03d}: login with {secret} refused")
    assert len(logged) == ERROR_LINES_KEPT + 3  # every line still goes to the task log
    assert output.lines == [f"2026-01-01 ERROR [FAILED] member {i:03d}: login with *** refused"
                            for i in range(2, ERROR_LINES_KEPT + 2)]
