"""The checkpoint picks the worker environment (aifs.generations), read on the Airflow side.

Only the checkpoint's metadata travels (a file here, gs:// on the emulator, Hugging Face through
ranged HTTP reads of a local server); a checkpoint no environment loads fails the run at
choose_environment, before any host; a v2 checkpoint's members run in the v2 environment.

The DAG runs the tiny real AIFS-ENS 2.0 architecture (``aifs.testing checkpoint --arch v2``, built and
run in the v2 environment). The readers' tests use the tiny v1-style model with its recorded
anemoi-models rewritten (checkpoint_files): the record is all aifs.generations reads.
"""

from __future__ import annotations

import json
import os
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from checkpoint_files import with_recorded_models
from conftest import FORECAST_DAY, REPO, TEST_CHECKPOINTS, load_dag, local_deployment, run_conf, task_states, worker_run

from aifs import layout
from aifs.generations import UnsupportedCheckpoint
from aifs.orchestration.checkpoints import (
    CheckpointUnreadable, GenerationMismatch, RangedHTTPFile, choose_generation, read_metadata,
)
from aifs.orchestration.deployment import DeploymentSettings

DATE = "20250601_0000"
#: the v2 worker environment: $AIFS_WORKER_PYTHON_V2 (make test sets it), else the one make env builds
V2_PYTHON = Path(os.environ.get("AIFS_WORKER_PYTHON_V2") or REPO / ".venv-v2" / "bin" / "python")


@pytest.fixture(scope="module")
def made(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The tiny model as v1 (as built), as v2 and as an unknown generation; and two unreadable files."""
    root = tmp_path_factory.mktemp("generations")
    (root / "not-a-zip.ckpt").write_bytes(b"<html>an error page</html>")
    with zipfile.ZipFile(root / "no-metadata.ckpt", "w") as z:
        z.writestr("model/data.pkl", b"weights")
    assert V2_PYTHON.is_file(), "the v2 worker environment (.venv-v2) is part of make env"
    real_v2 = root / "tiny-v2-real.ckpt"  # AIFS-ENS 2.0's real architecture, untrained, waves and snow cover
    worker_run(str(V2_PYTHON), "-m", "aifs.testing", "checkpoint", "--arch", "v2", "--grid", "O48", "--out", str(real_v2))
    return {
        "v1": Path(tiny_checkpoint),
        "v2-real": real_v2,
        "v2": with_recorded_models(tiny_checkpoint, root / "tiny-v2.ckpt", "0.11.2"),
        "future": with_recorded_models(tiny_checkpoint, root / "tiny-future.ckpt", "0.19.0"),
        "v2-heavy": with_recorded_models(tiny_checkpoint, root / "tiny-v2-heavy.ckpt", "0.11.2", padding=8 << 20),
        "not-a-zip": root / "not-a-zip.ckpt",
        "no-metadata": root / "no-metadata.ckpt",
    }


# -- reading the metadata --------------------------------------------------------------------------


def test_the_generation_is_read_from_a_file_and_a_bucket_object(made, gcs, bucket):
    assert choose_generation(str(made["v1"]), backend="local").name == "v1"
    assert choose_generation(str(made["v2"]), backend="local").name == "v2"

    blob = gcs.bucket(bucket).blob("checkpoints/tiny-v2.ckpt")
    blob.upload_from_filename(str(made["v2"]))
    found = read_metadata(f"gs://{bucket}/checkpoints/tiny-v2.ckpt")
    assert found.metadata["provenance_training"]["module_versions"]["anemoi.models"] == {"version": "0.11.2"}
    assert f"generation {blob.generation}" in found.source
    # a bucket object is read from Airflow on every backend, a GPU host's or not
    assert choose_generation(f"gs://{bucket}/checkpoints/tiny-v2.ckpt", backend="gce").name == "v2"


@pytest.mark.parametrize(("name", "says"), [
    ("missing", "no such file on this machine"),
    ("not-a-zip", "not a zip archive"),
    ("no-metadata", "has no anemoi metadata"),
])
def test_an_unreadable_checkpoint_is_refused_naming_it(made, name, says):
    ref = str(made["v1"].parent / "gone.ckpt") if name == "missing" else str(made[name])
    with pytest.raises(CheckpointUnreadable, match=says) as err:
        choose_generation(ref, backend="local")
    assert ref in str(err.value)


def test_a_missing_bucket_object_is_refused(gcs, bucket):
    with pytest.raises(CheckpointUnreadable, match=f"gs://{bucket}/nothing.ckpt: no such object"):
        read_metadata(f"gs://{bucket}/nothing.ckpt")


def test_a_checkpoint_no_environment_loads_names_what_it_needs(made):
    with pytest.raises(UnsupportedCheckpoint) as err:
        choose_generation(str(made["future"]), backend="local")
    assert "trained with anemoi-models 0.19.0" in str(err.value)
    assert "v1 (anemoi-models 0.6.x), v2 (anemoi-models 0.11.x)" in str(err.value)


def test_a_declaration_is_checked_against_the_checkpoint_and_used_only_for_a_gpu_hosts_path(made):
    with pytest.raises(GenerationMismatch, match="declares generation v1, but the checkpoint records the versions of v2"):
        choose_generation(str(made["v2"]), backend="local", declared="v1")
    # a path on the GPU host: never read here (it may not even exist on this machine), the declaration holds
    assert choose_generation("/opt/aifs/checkpoints/aifs-ens-crps-2.0.ckpt", backend="gce", declared="v2").name == "v2"
    with pytest.raises(CheckpointUnreadable, match="declares no generation"):
        choose_generation("/opt/aifs/checkpoints/aifs-ens-crps-2.0.ckpt", backend="ssh")


# -- Hugging Face: ranged HTTP reads ---------------------------------------------------------------


class RangeServer:
    """Serves one file like Hugging Face: ``/{repo}/resolve/{rev}/{file}`` redirects to a CDN path that
    answers byte ranges (206). ``honour_ranges=False`` answers every GET with the whole file (200)."""

    def __init__(self, path: Path, honour_ranges: bool = True):
        self.data, self.served, self.paths, self.auth = path.read_bytes(), 0, [], []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.paths.append(self.path)
                server.auth.append(self.headers.get("Authorization"))
                if "/resolve/" in self.path:
                    self.send_response(302)
                    self.send_header("Location", "/cdn/blob")
                    self.end_headers()
                    return
                data, header = server.data, self.headers.get("Range", "")
                if not honour_ranges or not header.startswith("bytes="):
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    return  # a client that reads this body downloads the whole checkpoint
                first, _, last = header[len("bytes="):].partition("-")
                start, end = (max(0, len(data) - int(last)), len(data) - 1) if first == "" else (int(first), min(int(last), len(data) - 1))
                body = data[start:end + 1]
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                server.served += len(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_hugging_face_checkpoint_is_read_by_ranges_at_the_pinned_revision(made, monkeypatch):
    from huggingface_hub import hf_hub_url

    from aifs.orchestration.checkpoints import hugging_face_url

    # the URL huggingface_hub itself builds (Composer need not have huggingface_hub: ours is written out)
    assert hugging_face_url("ecmwf/aifs-ens-2.0", "aifs-ens-crps-2.0.ckpt", "0123abcd", "https://huggingface.co") == \
        hf_hub_url("ecmwf/aifs-ens-2.0", "aifs-ens-crps-2.0.ckpt", revision="0123abcd", endpoint="https://huggingface.co")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    heavy = made["v2-heavy"]
    server = RangeServer(heavy)
    try:
        found = read_metadata("ecmwf/aifs-ens-2.0", identity="hf:0123abcd", hf_endpoint=server.url)
    finally:
        server.close()
    assert server.auth[0] == "Bearer hf_test_token"  # to Hugging Face; requests drops it on a redirect to another host
    assert found.metadata["provenance_training"]["module_versions"]["anemoi.models"] == {"version": "0.11.2"}
    # the known repository's file, at the commit the deployment pinned
    assert server.paths[0] == "/ecmwf/aifs-ens-2.0/resolve/0123abcd/aifs-ens-crps-2.0.ckpt"
    # the zip directory and the metadata entry, not the 8 MiB in front of them
    assert server.served < heavy.stat().st_size / 8, (server.served, heavy.stat().st_size)


def test_a_server_that_ignores_ranges_is_refused_without_downloading_the_file(made):
    server = RangeServer(made["v2-heavy"], honour_ranges=False)
    try:
        with pytest.raises(CheckpointUnreadable, match="not 206 Partial Content"):
            read_metadata("ecmwf/aifs-ens-2.0", hf_endpoint=server.url)
    finally:
        server.close()


def test_an_error_page_over_http_is_not_a_checkpoint(tmp_path):
    page = tmp_path / "page.html"
    page.write_bytes(b"<h1>")  # shorter than a zip's end record: the reader's seek must fail as a file's does
    server = RangeServer(page)
    try:
        with pytest.raises(CheckpointUnreadable, match="org/model:model.ckpt is not a checkpoint: not a zip archive"):
            read_metadata("org/model:model.ckpt", hf_endpoint=server.url)
    finally:
        server.close()


def test_the_ranged_reader_reads_like_a_file(made):
    data = made["v2-heavy"].read_bytes()
    server = RangeServer(made["v2-heavy"])
    try:
        with RangedHTTPFile(server.url + "/cdn/blob") as f:
            assert f.size == len(data)
            f.seek(5_000_000)
            assert f.read(300_000) == data[5_000_000:5_300_000]  # across blocks, one request
            f.seek(-10, os.SEEK_END)
            assert f.read(100) == data[-10:] and f.read(1) == b""
            before = f.requests
            f.seek(5_000_100)
            assert f.read(1000) == data[5_000_100:5_001_100] and f.requests == before  # kept blocks: no request
    finally:
        server.close()


# -- the deployment's checkpoints --------------------------------------------------------------------


def test_the_default_checkpoint_is_v2_and_v1_stays_selectable():
    settings = DeploymentSettings.from_env({})
    assert list(settings.checkpoints) == ["ecmwf/aifs-ens-2.0", "ecmwf/aifs-ens-1.0"] == settings.param_specs["checkpoint"]["enum"]
    assert layout.DEFAULT_CHECKPOINT == "ecmwf/aifs-ens-2.0"


def test_a_gpu_hosts_path_must_declare_its_generation_when_the_dag_is_parsed():
    host = json.dumps({"project_id": "p", "zone": "z", "service_account": "s@p.iam.gserviceaccount.com", "image": "img:v2",
                       "images": {"v1": "img:v1"}})
    path = "/opt/aifs/checkpoints/aifs-ens-crps-1.0.ckpt"
    env = {"AIFS_ENS_BACKEND": "gce", "AIFS_ENS_HOST": host}
    with pytest.raises(ValueError, match=f"'{path}' is a path on the gce host.*\"generation\": 'v1' or 'v2'"):
        DeploymentSettings.from_env({**env, "AIFS_ENS_CHECKPOINTS": json.dumps({path: {"identity": "sha256:" + "0" * 64}})})
    with pytest.raises(ValueError, match="generation 'v3' is not one of v1, v2"):
        DeploymentSettings.from_env({**env, "AIFS_ENS_CHECKPOINTS": json.dumps({path: {"identity": "sha256:" + "0" * 64, "generation": "v3"}})})
    settings = DeploymentSettings.from_env({**env, "AIFS_ENS_CHECKPOINTS": json.dumps({
        path: {"identity": "sha256:" + "0" * 64, "generation": "v1"}, "ecmwf/aifs-ens-2.0": {"identity": "hf:abc"}})})
    assert settings.checkpoint_generations == {path: "v1"}  # the Hugging Face one is read when a run starts
    with pytest.raises(ValueError, match="AIFS_ENS_HOST is not valid for the gce backend: images: 'v3' is not one of"):
        DeploymentSettings.from_env({**env, "AIFS_ENS_HOST": host.replace('"v1"', '"v3"')})


# -- through the DAG -----------------------------------------------------------------------------


@pytest.fixture
def generations_deployment(airflow_db, made, monkeypatch, tmp_path):
    """The test deployment allowing the made checkpoints, local backend, v2 worker Python set."""
    allowed = {**TEST_CHECKPOINTS, **{str(p): {"identity": None} for p in made.values()}}
    for name, value in {**local_deployment(tmp_path / "scratch"), "AIFS_ENS_CHECKPOINTS": json.dumps(allowed),
                        "AIFS_WORKER_PYTHON_V2": str(V2_PYTHON)}.items():
        monkeypatch.setenv(name, value)
    return tmp_path / "scratch"


def test_the_dag_refuses_a_checkpoint_no_environment_loads_before_any_host(generations_deployment, made, bucket, monkeypatch, alert_sink):
    from aifs.orchestration.backends.local import LocalBackend

    created = []
    monkeypatch.setattr(LocalBackend, "create_host", lambda self, run, log: created.append(run))
    dag = load_dag()

    dr = dag.test(logical_date=FORECAST_DAY, run_conf=run_conf(bucket, str(made["future"]), members="1"),
                  mark_success_pattern="wait_for_inputs|verify")

    states = task_states(dr)
    assert dr.state == "failed"
    assert states[("choose_environment", -1)] == "failed"
    assert states[("create_host", -1)] == "upstream_failed" and created == [] and not generations_deployment.exists()
    alert = next(m for m in alert_sink.messages if "choose_environment failed" in m["title"])
    assert "trained with anemoi-models 0.19.0" in alert["message"] and "No host was created" in alert["message"]
    tries = [ti.try_number for ti in dr.get_task_instances() if ti.task_id == "choose_environment"]
    assert tries == [1], "a checkpoint no environment loads is not retried"


def test_a_v2_checkpoint_runs_in_the_v2_environment_and_v1_in_v1(generations_deployment, made, gcs, bucket, worker_python):
    worker_run(str(V2_PYTHON), "-m", "aifs.testing", "seed", "--checkpoint", str(made["v2-real"]), "--bucket", bucket,
               "--date", DATE, "--members", "1")
    dag = load_dag()

    dr = dag.test(logical_date=FORECAST_DAY, run_conf=run_conf(bucket, str(made["v2-real"]), members="1", lead_time=6))

    states = task_states(dr)
    assert dr.state == "success", states
    [choose, host] = [ti for task in ("choose_environment", "create_host") for ti in dr.get_task_instances() if ti.task_id == task]
    assert choose.xcom_pull(task_ids="choose_environment")["generation"] == "v2"
    facts = host.xcom_pull(task_ids="create_host")
    assert facts["python"] == str(V2_PYTHON) and facts["anemoi_models"] == "0.11.2" and facts["generation"] == "v2"
    assert gcs.bucket(bucket).blob(layout.manifest_object(DATE, 1)).exists()

    # v1: the same deployment puts it in the v1 environment (the member itself: every other DAG test)
    dr = dag.test(logical_date=FORECAST_DAY, run_conf=run_conf(bucket, str(made["v1"]), members="2", lead_time=12),
                  mark_success_pattern="wait_for_inputs|run_member|delete_host|verify")
    facts = next(ti for ti in dr.get_task_instances() if ti.task_id == "create_host").xcom_pull(task_ids="create_host")
    assert facts["python"] == worker_python and facts["anemoi_models"].startswith("0.6.") and facts["generation"] == "v1"


def test_a_local_worker_python_of_another_generation_is_refused_at_create_host(monkeypatch, tmp_path):
    """The v2 run finds only a v1 environment (no worker_pythons.v2, no $AIFS_WORKER_PYTHON_V2): refused, saying what to set."""
    from aifs.orchestration.backends import RunInfo, get_backend

    fake = str(REPO / "tests" / "airflow" / "fake_python.sh")  # answers like an environment with anemoi-models 0.6.0
    monkeypatch.delenv("AIFS_WORKER_PYTHON_V2", raising=False)
    backend = get_backend("local", {"worker_python": fake, "scratch_dir": str(tmp_path), "device": "cpu", "min_free_gb": 0})
    run = RunInfo(dag_id="aifs_ens_forecast", run_id="manual__1", date=DATE, generation="v2")
    with pytest.raises(RuntimeError) as err:
        backend.create_host(run, lambda line: None)
    assert f"{fake} (host.worker_python) has anemoi-models 0.6.0, which cannot load this run's AIFS-ENS 2.0 checkpoint" in str(err.value)
    assert "host.worker_pythons.v2 or $AIFS_WORKER_PYTHON_V2 at the .venv-v2 environment" in str(err.value)

    # the generation's own setting wins over the one python of older deployments
    monkeypatch.setenv("AIFS_WORKER_PYTHON_V2", str(V2_PYTHON))
    assert backend.worker_python_for("v2") == (str(V2_PYTHON), "$AIFS_WORKER_PYTHON_V2")
    assert backend.worker_python_for("v1") == (fake, "host.worker_python")
    pinned = get_backend("local", {"worker_python": fake, "worker_pythons": {"v2": "/opt/v2/bin/python"}})
    assert pinned.worker_python_for("v2") == ("/opt/v2/bin/python", "host.worker_pythons.v2")


def test_the_ssh_backend_runs_each_generation_in_its_own_image_or_python():
    from unittest import mock

    from aifs.orchestration.backends import RunInfo, WorkerSettings, get_backend, remote_job, ssh
    from aifs.orchestration.backends.base import NoEnvironment

    backend = get_backend("ssh", {"launch": "container", "image": "worker:v2", "images": {"v1": "worker:v1"}})
    for generation, image in (("v1", "worker:v1"), ("v2", "worker:v2")):
        run = RunInfo(dag_id="aifs_ens_forecast", run_id=f"manual__{generation}", date=DATE, generation=generation)
        with mock.patch.object(remote_job, "wait_until_ready", return_value="ok") as ready, \
                mock.patch.object(ssh, "new_remote_job"), mock.patch.object(ssh, "run_remote_member", return_value=0) as member:
            backend.create_host(run, lambda line: None)
            assert backend.run_member(run, 1, WorkerSettings(bucket="b", checkpoint="c"), lambda line: None) == 0
        assert ready.call_args.args[1]["image"] == image  # ready: this generation's image is on the host
        script = remote_job.job_script(member.call_args.args[1], run.job_name(1), ["--members", "1"])
        assert f" --entrypoint python {image} -m aifs.worker --members 1" in script
    process = get_backend("ssh", {"pythons": {"v2": "/opt/v2/bin/python"}})
    assert process.environment_for("v2") == "python /opt/v2/bin/python on the host"
    assert process.environment_for("v1") == "python python3 on the host"
    with pytest.raises(NoEnvironment, match="add images.v1"):
        get_backend("ssh", {"launch": "container", "images": {"v2": "worker:v2"}}).environment_for("v1")
