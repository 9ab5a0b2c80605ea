"""aifs_ens_products end to end under ``dag.test()``: the real DAG, the real ``python -m aifs.products`` as a
CPU step of the local backend, a small known ensemble in the GCS emulator, and the report in headless Chromium.

One date goes through two runs, as an operator lives it (the products command is the costly part, so it
makes the products once):

1. members 1-4 are selected but member 4 never finished, submission is on and the minimum is 4: the
   products are made from 3 members and labelled partial, nothing is submitted, make_products fails
   with the command's reason, check_products still verifies what was written, and the run alert names
   the report. The competition's token (an Airflow connection) reaches the step's environment and
   nothing else.
2. the date was submitted in the meantime (the marker a confirmed submission leaves) and the minimum is
   now 3: the run succeeds and submits nothing. (The package's submission needs ECMWF's ECBOX SDK,
   which is not installed here: an attempt would fail the run.)

The report page made by run 1 is then opened in headless Chromium over loopback HTTP: every picture
loads and the screenshot is not blank.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import AIRFLOW_HOME, DAGS, FORECAST_DAY, PLUGINS, AlertSink, local_deployment, task_states

from aifs import layout

pytestmark = pytest.mark.slow

DATE = "20251127_0000"  # a Thursday: a competition date for the package's test team
SECRET = "aiwq-token-7f3e9b21c4-do-not-leak"
BUILD = r"""
import sys
import pyproj  # noqa: F401  (before eccodes: see design notes)
import numpy as np
from aifs.members import parse_members
from aifs.testing import climatology, products_data
from aifs.worker.storage import make_client

bucket_name, date, members, clim = sys.argv[1:5]
bucket = make_client(None).bucket(bucket_name)
lat, lon = products_data.grid_latlons("N32")

def values(short, step, member):  # smooth fields, one member a little warmer than the next
    base = {"2t": 280.0 + 20.0 * np.cos(np.radians(lat)), "msl": 101000.0 + 300.0 * np.sin(np.radians(lon)),
            "tp": 0.0005 * step * (1.0 + np.cos(np.radians(lat)))}[short]
    return base + (member - 2) * {"2t": 1.0, "msl": 50.0, "tp": 0.0}[short]

for member in parse_members(members):
    products_data.write_member(bucket, date, member, values, grid="N32", wall_s=400.0 + 10 * member)
climatology.write(clim, date)
"""


def worker(worker_python: str, *args: str, timeout: float = 120) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([worker_python, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[:2]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def load_products_dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS / "aifs_ens_products.py"))
    assert not bag.import_errors, bag.import_errors
    return bag.get_dag("aifs_ens_products")


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def run_products(bucket: str, scratch: Path, clim: str, **settings: str):
    """One dag.test() of aifs_ens_products under a deployment with these products settings."""
    env = {**local_deployment(scratch), "AIFS_ENS_CLIMATOLOGY": clim, "AIFS_ENS_SUBMIT": "true",
           "AIFS_ENS_AIWQ_TEAM": "ECMWFtest", "AIFS_ENS_AIWQ_MODEL": "tinyaifs",
           "AIFS_ENS_PRODUCTS_POINTS": "Nairobi:-1.29,36.82;Kampala:0.35,32.58", **settings}
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        dag = load_products_dag()
        return dag.test(logical_date=FORECAST_DAY, run_conf={"date": DATE, "bucket": bucket, "members": "1-4"})


@pytest.fixture(scope="module")
def first_run(airflow_db, emulator, gcs, worker_python):
    """Run 1 (below the minimum, partial) on a fresh bucket; returns what the tests look at."""
    from aifs.orchestration.backends.local import LocalBackend

    bucket = gcs.create_bucket("aifs-test-199").name
    home = Path(tempfile.mkdtemp(prefix="aifs-products-dag-"))
    clim = str(home / "climatology")
    worker(worker_python, "-c", BUILD, bucket, DATE, "1-3", clim)

    handed, collect, sink = [], Collect(), AlertSink()
    original = LocalBackend.run_step

    def spy(self, run, step, module, args, env, log, **kwargs):
        handed.append(dict(env))
        return original(self, run, step, module, args, env, log, **kwargs)

    logging.getLogger().addHandler(collect)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(LocalBackend, "run_step", spy)
            mp.setenv("AIRFLOW_CONN_AIFS_AIWQ", json.dumps({"conn_type": "generic", "password": SECRET}))
            mp.setenv("AIRFLOW_CONN_AIFS_ALERTS", sink.connection_env())
            dr = run_products(bucket, home / "scratch", clim, AIFS_ENS_PRODUCTS_MIN_MEMBERS="4")
    finally:
        logging.getLogger().removeHandler(collect)
        sink.close()
    yield {"dr": dr, "bucket": bucket, "home": home, "clim": clim, "handed": handed, "logs": "\n".join(collect.lines),
           "alerts": sink.messages}
    shutil.rmtree(home, ignore_errors=True)


def test_a_partial_ensemble_below_the_minimum_is_made_labelled_and_not_submitted(first_run, gcs):
    dr, bucket = first_run["dr"], first_run["bucket"]
    states = task_states(dr)
    assert dr.state == "failed", states
    assert states[("check_params", -1)] == states[("step_kwargs", -1)] == "success"
    assert states[("make_products", 0)] == "failed" and states[("check_products", -1)] == "failed", states

    manifest = json.loads(gcs.bucket(bucket).blob(layout.products_manifest_object(DATE)).download_as_bytes())
    assert manifest["members_used"] == [1, 2, 3] and manifest["partial"] is True and "4" in manifest["members_excluded"]
    assert gcs.bucket(bucket).get_blob(layout.submission_marker_object(DATE)) is None  # nothing submitted
    logs = first_run["logs"]
    # the run says why: the command's exit code, its words, and the summary of what was made
    assert "exit 31, TOO_FEW_MEMBERS" in logs and "fewer than the minimum" in logs
    assert "members: 3 of 4 used (PARTIAL ENSEMBLE: the products say so)" in logs
    assert "member 004 left out: no completion manifest" in logs
    assert f"report gs://{bucket}/{DATE}/products/report.html" in logs
    assert f"console: https://console.cloud.google.com/storage/browser/_details/{bucket}/{DATE}/products/report.html" in logs
    # the run's alert carries the report; make_products' own alert says why, in the step's words
    alert = next(m for m in first_run["alerts"] if ": run " in m["title"])
    assert f"Report: gs://{bucket}/{DATE}/products/report.html" in alert["message"], alert["message"]
    step_alert = next(m for m in first_run["alerts"] if "make_products" in m["title"])
    assert "fewer verified members than the products' minimum: nothing submitted (exit 31" in step_alert["message"], step_alert


def test_the_competitions_token_reaches_the_step_only(first_run):
    from airflow.models.renderedtifields import RenderedTaskInstanceFields
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    dr = first_run["dr"]
    assert first_run["handed"] and all(env.get("AIFS_AIWQ_PASSWORD") == SECRET for env in first_run["handed"]), \
        "the step did not get the token from the aifs_aiwq connection"
    with create_session() as session:
        xcoms = session.scalars(select(XComModel).where(XComModel.dag_id == dr.dag_id, XComModel.run_id == dr.run_id)).all()
        rendered = session.scalars(select(RenderedTaskInstanceFields).where(
            RenderedTaskInstanceFields.dag_id == dr.dag_id, RenderedTaskInstanceFields.run_id == dr.run_id)).all()
        texts = {f"xcom {x.task_id}/{x.key}": json.dumps(x.value, default=str) for x in xcoms}
        texts.update({f"rendered {r.task_id}[{r.map_index}]": json.dumps(r.rendered_fields, default=str) for r in rendered})
    assert any(k.startswith("rendered make_products") for k in texts) and any("step_outcome" in k for k in texts)
    texts["logs"] = first_run["logs"]
    texts["alerts"] = json.dumps(first_run["alerts"])
    assert "[PRODUCTS]" in texts["logs"], "the step's log was not captured"
    leaks = [where for where, text in texts.items() if SECRET in text]
    assert not leaks, f"the token is in {leaks}"


def test_a_second_run_of_a_submitted_date_submits_nothing(first_run, gcs, worker_python):
    bucket = first_run["bucket"]
    marker = gcs.bucket(bucket).blob(layout.submission_marker_object(DATE))
    marker.upload_from_string(json.dumps({"date": DATE, "submitted_at": "2025-11-27T06:00:00+00:00"}))  # as a confirmed submission leaves it
    generation = gcs.bucket(bucket).get_blob(marker.name).generation
    collect = Collect()
    logging.getLogger().addHandler(collect)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("AIRFLOW_CONN_AIFS_AIWQ", json.dumps({"conn_type": "generic", "password": SECRET}))
            dr = run_products(bucket, first_run["home"] / "scratch", first_run["clim"], AIFS_ENS_PRODUCTS_MIN_MEMBERS="3")
    finally:
        logging.getLogger().removeHandler(collect)
    logs = "\n".join(collect.lines)
    assert dr.state == "success", (task_states(dr), logs[-3000:])
    assert "already submitted" in logs and "nothing sent" in logs
    assert gcs.bucket(bucket).get_blob(marker.name).generation == generation  # the marker was not rewritten
    results = dr.get_task_instance("check_products").xcom_pull(task_ids="check_products")
    assert results[0]["submitted"] is True and results[0]["report"]["gs"] == f"gs://{bucket}/{DATE}/products/report.html"


# -- the report page renders in a browser -------------------------------------------------------------

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
#: a page on the same origin that opens the report in a frame and lists each picture's loaded size
PROBE = """<!doctype html><html><body><pre id="result">pending</pre>
<iframe id="page" src="report.html" width="1280" height="900" onload="
  var d = document.getElementById('page').contentDocument;
  var images = Array.from(d.images).map(function (i) {
    return {src: i.getAttribute('src'), complete: i.complete, width: i.naturalWidth, height: i.naturalHeight};
  });
  document.getElementById('result').textContent = JSON.stringify(images);"></iframe></body></html>"""
PIXELS = r"""
import json, sys
from PIL import Image, ImageStat
image = Image.open(sys.argv[1]).convert("L")
print(json.dumps({"size": image.size, "variance": ImageStat.Stat(image).var[0], "colours": len(image.getcolors(1 << 16) or [])}))
"""


def chromium() -> str:
    found = os.environ.get("AIFS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("no chromium: run tests/airflow/setup_chromium.sh (CI does, in .ci/run)")
    return found


def browse(url: str, *flags: str, timeout: float = 60) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="aifs-chromium-")  # a new, empty profile each time
    try:
        return subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *flags, url],
                              capture_output=True, text=True, timeout=timeout)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def test_the_report_page_renders_with_every_picture(first_run, gcs, worker_python, tmp_path):
    bucket, prefix = first_run["bucket"], layout.products_prefix(DATE)
    site = tmp_path / "products"
    site.mkdir()
    for blob in gcs.list_blobs(bucket, prefix=prefix):  # the products folder as the run left it
        (site / blob.name[len(prefix):]).write_bytes(gcs.bucket(bucket).blob(blob.name).download_as_bytes())
    assert (site / "report.html").is_file()
    (site / "__probe.html").write_text(PROBE)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(site)))
    server.RequestHandlerClass.log_message = lambda *a: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        probe = browse(f"{base}/__probe.html", "--virtual-time-budget=15000", "--dump-dom")
        shot = AIRFLOW_HOME / "products-report.png"
        taken = browse(f"{base}/report.html", "--window-size=1280,2400", "--hide-scrollbars", f"--screenshot={shot}")
    finally:
        server.shutdown()

    dom = probe.stdout
    images = json.loads(dom[dom.index('<pre id="result">') + len('<pre id="result">'):dom.index("</pre>")])
    on_page = sorted(p.name for p in site.glob("*.png"))
    assert sorted(i["src"] for i in images) == on_page, "the page does not show every picture the run made"
    assert len(images) >= 6 + 2 + 1  # a map per variable and period, a plume per point (2 here), the run's durations
    not_loaded = [i for i in images if not (i["complete"] and i["width"] > 0 and i["height"] > 0)]
    assert not not_loaded, f"pictures that did not load: {not_loaded}"

    assert taken.returncode == 0 and shot.is_file(), taken.stderr[-2000:]
    stats = json.loads(worker(worker_python, "-c", PIXELS, str(shot)))
    assert stats["size"] == [1280, 2400]
    assert stats["variance"] > 100 and stats["colours"] > 20, f"the screenshot looks blank: {stats}"


def test_check_finds_a_product_changed_after_it_was_written(first_run, gcs):
    """The check compares the bucket's crc32c with the one the manifest recorded, not merely that objects exist."""
    from aifs.orchestration.products_check import check_target

    bucket = first_run["bucket"]
    target = {"bucket": bucket, "date": DATE, "members": [1, 2, 3, 4]}
    _, problems = check_target(gcs, target)
    assert problems == [], problems
    manifest = json.loads(gcs.bucket(bucket).blob(layout.products_manifest_object(DATE)).download_as_bytes())
    assert all(o["crc32c"] and o["size"] > 0 for o in manifest["objects"]), manifest["objects"]
    damaged = layout.product_object(DATE, "run_durations.png")
    original = gcs.bucket(bucket).blob(damaged).download_as_bytes()
    try:
        gcs.bucket(bucket).blob(damaged).upload_from_string(original[:-1] + bytes([original[-1] ^ 1]), checksum="crc32c")
        _, problems = check_target(gcs, target)
        assert any(damaged in p and "crc32c" in p for p in problems), problems
    finally:
        gcs.bucket(bucket).blob(damaged).upload_from_string(original, checksum="crc32c")
