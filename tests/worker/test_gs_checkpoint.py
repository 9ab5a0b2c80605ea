"""A checkpoint named ``gs://bucket/object``: fetched once per host into the cache, verified, then loaded.

Real parts: the GCS emulator behind a recording proxy (every request the worker makes is seen, so
"not downloaded again" is proven where it happens, on the wire), the real worker CLI in its own
processes, the real anemoi-inference runner and GRIB writer processes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import zipfile
from pathlib import Path
from urllib.parse import unquote

import pytest
from worker_helpers import (
    DATE,
    Dirs,
    kept_root_logging,
    object_names,
    read_manifest,
    run_worker_subprocess,
    seed,
    tagged,
    worker_args,
)

from aifs import layout
from aifs.exitcodes import ExitCode
from aifs.testing.emulator import anonymous_client
from aifs.worker import checkpoint_cache
from aifs.worker import checkpoint_identity as ci
from aifs.worker.errors import CheckpointFailed

pytestmark = pytest.mark.timeout(240)

LEAD = 12  # one short window: the member runs, the checkpoint is what is under test
CKPT_OBJECT = "checkpoints/tiny.ckpt"


@pytest.fixture(scope="module")
def store(emulator, checkpoint):
    """A bucket holding the tiny checkpoint, as a deployment keeps one; (bucket, sha256 of the uploaded file)."""
    bucket = anonymous_client(emulator.url).create_bucket("checkpoints-store")
    bucket.blob(CKPT_OBJECT).upload_from_filename(checkpoint, checksum="crc32c")
    return bucket, hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def host_cache(tmp_path_factory) -> Path:
    """One host's checkpoint cache, shared by the module's runs (as successive workers on one VM)."""
    return tmp_path_factory.mktemp("checkpoint-cache")


@pytest.fixture(autouse=True)
def fresh_process_state(monkeypatch, host_cache, proxy, tmp_path):
    """Each test starts as a new worker process would: nothing resolved or hashed yet; the worker's storage
    goes through the recording proxy; the host's cache is $AIFS_CHECKPOINT_CACHE."""
    monkeypatch.setattr(checkpoint_cache, "_resolved", {})
    monkeypatch.setattr(ci, "_memo", {})
    monkeypatch.setenv("AIFS_CHECKPOINT_CACHE", str(host_cache))
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.chdir(tmp_path)  # no coiled-data.json is picked up from the repo
    proxy.faults.clear()


def _gets(proxy, bucket: str, name: str, *, media: bool) -> list[str]:
    """GETs of gs://bucket/name the proxy passed: downloads of its bytes (alt=media) or of its metadata."""
    found = []
    for method, target, _status in proxy.requests:
        path, _, query = unquote(target).partition("?")
        if method == "GET" and path.endswith(f"/b/{bucket}/o/{name}") and ("alt=media" in query) == media:
            found.append(target)
    return found


def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _run_bucket(emulator, checkpoint, name: str):
    bucket = anonymous_client(emulator.url).create_bucket(name)
    seed(bucket, checkpoint, [1])
    return bucket


def test_the_worker_runs_a_gs_checkpoint_downloaded_once_per_host(emulator, proxy, store, host_cache, checkpoint, tmp_path):
    store_bucket, original_sha = store
    ref = f"gs://{store_bucket.name}/{CKPT_OBJECT}"
    run_bucket = _run_bucket(emulator, checkpoint, "gs-ckpt-run")

    def args(scratch: str) -> list[str]:
        return worker_args(bucket=run_bucket.name, checkpoint=ref, dirs=Dirs(tmp_path / scratch), lead_time=LEAD,
                           extra=["--grib-writers", "1", "--checkpoint-identity", f"sha256:{original_sha}"])

    generation = store_bucket.get_blob(CKPT_OBJECT).generation
    cached = Path(checkpoint_cache.cached_path(store_bucket.name, CKPT_OBJECT, generation))

    code, text = run_worker_subprocess(args("first"), proxy.url, tmp_path)

    assert code == 0, text[-4000:]
    manifest = read_manifest(run_bucket, 1)
    assert manifest is not None and manifest.checkpoint == ref
    assert manifest.checkpoint_identity == f"sha256:{original_sha}"  # of the file loaded: the uploaded one
    assert cached.parent.parent == host_cache and _sha256(cached) == original_sha
    assert not os.path.exists(f"{cached}.part")
    assert len(_gets(proxy, store_bucket.name, CKPT_OBJECT, media=True)) == 1
    # one look-up of the object in all: the GRIB writer process loaded the local file, not gs:// again
    assert len(_gets(proxy, store_bucket.name, CKPT_OBJECT, media=False)) == 1
    assert any(f"cached at {cached} (generation {generation})" in line for line in tagged(text, "[CHECKPOINT]"))
    before = os.stat(cached)

    # another worker process on the same host: the cached file serves it, nothing is downloaded
    code, text = run_worker_subprocess(args("second"), proxy.url, tmp_path)

    assert code == 0, text[-4000:]
    assert "1 skipped" in text  # complete for this checkpoint: the identity of the cached file matched the manifest
    assert len(_gets(proxy, store_bucket.name, CKPT_OBJECT, media=True)) == 1
    after = os.stat(cached)
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)


def test_a_reuploaded_object_is_fetched_anew_and_read_by_the_inputs_step(emulator, proxy, store, checkpoint, tmp_path,
                                                                        monkeypatch):
    """A new generation is a new file in the cache; aifs.inputs reads its metadata through the same path,
    with the client it is given (the proxy's; the environment's default client would bypass the proxy)."""
    from aifs.inputs.spec import read_input_spec

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
    store_bucket, original_sha = store
    name = "checkpoints/reuploaded.ckpt"
    ref = f"gs://{store_bucket.name}/{name}"
    client = anonymous_client(proxy.url)
    store_bucket.blob(name).upload_from_filename(checkpoint, checksum="crc32c")
    first = checkpoint_cache.fetch(ref, client)
    again = checkpoint_cache.fetch(ref, client)
    assert first.downloaded and not again.downloaded and again.path == first.path
    assert len(_gets(proxy, store_bucket.name, name, media=True)) == 1

    changed = tmp_path / "retrained.ckpt"  # other bytes, still a checkpoint: the zip's comment differs
    shutil.copyfile(checkpoint, changed)
    with zipfile.ZipFile(changed, "a") as archive:
        archive.comment = b"re-uploaded"
    store_bucket.blob(name).upload_from_filename(str(changed), checksum="crc32c")
    new_generation = store_bucket.get_blob(name).generation
    assert new_generation != first.generation

    spec = read_input_spec(ref, client)  # what python -m aifs.inputs does first: the metadata, no weights

    path = checkpoint_cache._resolved[ref]
    assert path == checkpoint_cache.cached_path(store_bucket.name, name, new_generation) != first.path
    assert _sha256(path) == _sha256(changed) != original_sha
    assert ci.checkpoint_identity(ref) == f"sha256:{_sha256(changed)}"  # of the file that was read
    assert len(_gets(proxy, store_bucket.name, name, media=True)) == 2
    assert spec.grid == "O48" and spec.time_levels == 2 and spec.variables


def test_a_missing_object_fails_the_run_before_any_input_is_fetched(emulator, proxy, store, checkpoint, tmp_path,
                                                                     call_main):
    store_bucket, _ = store
    run_bucket = _run_bucket(emulator, checkpoint, "gs-ckpt-missing")
    ref = f"gs://{store_bucket.name}/checkpoints/nothing.ckpt"
    dirs = Dirs(tmp_path / "scratch")

    code, text = call_main(worker_args(bucket=run_bucket.name, checkpoint=ref, dirs=dirs, lead_time=LEAD))

    assert code == ExitCode.CHECKPOINT_FAILED
    assert f"checkpoint not found: {ref} (no such object in bucket {store_bucket.name}" in text
    assert object_names(anonymous_client(emulator.url), run_bucket.name) == [layout.input_object(DATE, 1)]
    assert _gets(proxy, run_bucket.name, layout.input_object(DATE, 1), media=True) == []
    assert dirs.files() == []


def test_a_gs_checkpoint_that_is_not_the_declared_one_is_refused(emulator, proxy, store, checkpoint, tmp_path, call_main):
    store_bucket, _ = store
    run_bucket = _run_bucket(emulator, checkpoint, "gs-ckpt-wrong")
    ref = f"gs://{store_bucket.name}/{CKPT_OBJECT}"
    wrong = "sha256:" + "0" * 64

    code, text = call_main(worker_args(bucket=run_bucket.name, checkpoint=ref, dirs=Dirs(tmp_path / "scratch"),
                                       lead_time=LEAD, extra=["--checkpoint-identity", wrong]))

    assert code == ExitCode.CHECKPOINT_FAILED
    assert f"checkpoint {ref} is sha256:{store[1]}, but this run expects {wrong}" in text
    assert object_names(anonymous_client(emulator.url), run_bucket.name) == [layout.input_object(DATE, 1)]


def test_a_part_file_left_by_a_killed_download_is_not_taken_for_the_checkpoint(proxy, store, checkpoint, host_cache):
    store_bucket, original_sha = store
    name = "checkpoints/interrupted.ckpt"
    store_bucket.blob(name).upload_from_filename(checkpoint, checksum="crc32c")
    blob = store_bucket.get_blob(name)
    final = Path(checkpoint_cache.cached_path(store_bucket.name, name, blob.generation))
    final.parent.mkdir(parents=True, exist_ok=True)
    # what a download killed at its end leaves: the full length, the wrong bytes, under .part
    Path(f"{final}.part").write_bytes(b"\0" * blob.size)

    path = checkpoint_cache.local_copy(f"gs://{store_bucket.name}/{name}", anonymous_client(proxy.url))

    assert path == str(final) and _sha256(final) == original_sha
    assert not Path(f"{final}.part").exists()
    assert len(_gets(proxy, store_bucket.name, name, media=True)) == 1


def test_a_bucket_the_worker_may_not_read_names_the_account_role_and_bucket(proxy, store, host_cache):
    store_bucket, _ = store
    ref = f"gs://{store_bucket.name}/{CKPT_OBJECT}"
    denied = proxy.fail("GET", rf"/b/{store_bucket.name}/o/", status=403, times=5)
    listed_before = sorted(p.name for p in host_cache.rglob("*"))

    with pytest.raises(CheckpointFailed) as failed:
        checkpoint_cache.local_copy(ref, anonymous_client(proxy.url))

    assert denied.hits, "the request went through the proxy"
    message = str(failed.value)
    assert ref in message and f"needs roles/storage.objectViewer on gs://{store_bucket.name}" in message
    assert "403" in message
    assert sorted(p.name for p in host_cache.rglob("*")) == listed_before


def test_no_room_for_the_checkpoint_is_refused_before_downloading(proxy, store, monkeypatch, tmp_path):
    store_bucket, _ = store
    name = "checkpoints/too-big-for-the-disk.ckpt"
    ref = f"gs://{store_bucket.name}/{name}"
    store_bucket.blob(name).upload_from_string(b"x" * 4096)
    monkeypatch.setenv("AIFS_CHECKPOINT_CACHE", str(tmp_path / "small-disk"))
    real_usage = shutil.disk_usage
    free = checkpoint_cache.ROOM_MARGIN_BYTES  # the margin, but not the checkpoint on top of it
    monkeypatch.setattr(shutil, "disk_usage",  # the OS boundary: a disk with `free` bytes left
                        lambda path: real_usage(path)._replace(free=free))

    with pytest.raises(CheckpointFailed) as failed:
        checkpoint_cache.local_copy(ref, anonymous_client(proxy.url))

    message = str(failed.value)
    assert ref in message and "not enough room" in message and f"{free / 1e9:.2f} GB free" in message
    assert _gets(proxy, store_bucket.name, name, media=True) == []
    assert [p for p in (tmp_path / "small-disk").rglob("*") if p.is_file() and not p.name.endswith(".lock")] == []


def test_two_workers_on_one_host_download_once(proxy, store, checkpoint, caplog):
    """The second waits on the first's lock and then takes the file the first cached."""
    import fcntl
    import logging
    import threading
    import time

    store_bucket, original_sha = store
    name = "checkpoints/shared-host.ckpt"
    store_bucket.blob(name).upload_from_filename(checkpoint, checksum="crc32c")
    final = Path(checkpoint_cache.cached_path(store_bucket.name, name, store_bucket.get_blob(name).generation))
    final.parent.mkdir(parents=True, exist_ok=True)
    got: list = []
    with caplog.at_level(logging.INFO, logger="aifs.worker"), open(f"{final}.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # the first worker, downloading
        second = threading.Thread(target=lambda: got.append(
            checkpoint_cache.fetch(f"gs://{store_bucket.name}/{name}", anonymous_client(proxy.url))))
        second.start()
        deadline = time.monotonic() + 30
        while "another process on this host is fetching it" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "another process on this host is fetching it" in caplog.text
        assert second.is_alive() and got == []
        shutil.copyfile(f"{checkpoint}", f"{final}.part")  # the first finishes: verified, renamed
        os.replace(f"{final}.part", final)
        fcntl.flock(held, fcntl.LOCK_UN)
        second.join(timeout=30)

    (result,) = got
    assert not result.downloaded and result.path == str(final) and _sha256(final) == original_sha
    assert _gets(proxy, store_bucket.name, name, media=True) == []


@pytest.fixture
def refusing_token_server():
    """An OAuth token endpoint that refuses every grant, as Google's does for a disabled key; counts its calls."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            asked.append(self.path)
            body = json.dumps({"error": "invalid_grant", "error_description": "Invalid JWT Signature."}).encode()
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/token", asked
    server.shutdown()
    server.server_close()


def test_the_checkpoint_is_fetched_with_the_workers_service_account(emulator, proxy, store, checkpoint, tmp_path,
                                                                    call_main, refusing_token_server):
    """--service-account's key reads the checkpoint too: its refusal fails the run (exit 15, naming the
    account), where the machine's credentials (anonymous on the emulator) would have fetched it."""
    import json

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    token_uri, asked = refusing_token_server
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    account = "aifs-worker@test-project.iam.gserviceaccount.com"
    key = tmp_path / "worker-key.json"
    key.write_text(json.dumps({"type": "service_account", "project_id": "test-project", "private_key_id": "k1",
                               "private_key": private, "client_email": account, "client_id": "1",
                               "token_uri": token_uri}))
    store_bucket, _ = store
    run_bucket = _run_bucket(emulator, checkpoint, "gs-ckpt-key")
    ref = f"gs://{store_bucket.name}/{CKPT_OBJECT}"
    dirs = Dirs(tmp_path / "scratch")

    code, text = call_main(worker_args(bucket=run_bucket.name, checkpoint=ref, dirs=dirs, lead_time=LEAD,
                                       extra=["--service-account", str(key)]))

    assert code == ExitCode.CHECKPOINT_FAILED, text[-3000:]
    assert asked, "the key's token endpoint was asked"
    assert f"checkpoint {ref}: the worker's account {account} could not authenticate" in text
    assert dirs.files() == []


def test_the_inputs_step_builds_a_member_for_a_gs_checkpoint(emulator, proxy, store, checkpoint, tmp_path):
    """python -m aifs.inputs with --checkpoint gs://...: reads it through its own client (the proxy saw the
    download), records the uploaded file's sha256 in the input manifest."""
    import contextlib
    import io
    import json

    from aifs.inputs.__main__ import main as inputs_main
    from aifs.testing.opendata_mirror import serve, write_mirror

    store_bucket, original_sha = store
    name = "checkpoints/for-inputs.ckpt"
    store_bucket.blob(name).upload_from_filename(checkpoint, checksum="crc32c")
    ref = f"gs://{store_bucket.name}/{name}"
    write_mirror(str(tmp_path / "opendata"), DATE, checkpoint, (1,), control=False)
    server = serve(str(tmp_path / "opendata"))
    bucket = anonymous_client(emulator.url).create_bucket("gs-ckpt-inputs")
    out = io.StringIO()
    try:
        with kept_root_logging(), contextlib.redirect_stdout(out):
            code = inputs_main(["--date", DATE, "--members", "1", "--bucket", bucket.name, "--checkpoint", ref,
                                "--source", server.url, "--cache-dir", str(tmp_path / "mir"), "--workers", "1"])
    finally:
        server.stop()

    assert code == 0, out.getvalue()[-3000:]
    manifest = json.loads(bucket.blob(layout.input_manifest_object(DATE, 1)).download_as_bytes())
    assert manifest["checkpoint"] == {"reference": ref, "identity": f"sha256:{original_sha}"}
    assert len(_gets(proxy, store_bucket.name, name, media=True)) == 1
